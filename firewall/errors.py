"""The firewall's errors, apart from the model so that the iptables driver's kernel side
(firewall/iptables_kernel.py) raises them without importing the model."""


class FirewallError(RuntimeError):
    """The kernel refused a change; the message says what and why."""


class FirewallBusy(FirewallError):
    """Another program holds the netfilter lock longer than we wait for it: try again later."""
