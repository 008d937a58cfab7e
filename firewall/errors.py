"""The firewall's errors, apart from the model so that the iptables worker can raise them without
importing it (the worker imports nothing but the standard library and firewall/xtables.py)."""


class FirewallError(RuntimeError):
    """The kernel refused a change; the message says what and why."""


class FirewallBusy(FirewallError):
    """Another program holds the netfilter lock longer than we wait for it: try again later."""
