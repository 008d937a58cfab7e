"""The tailnet lab shared by the e2e modules: one headscale and one client node for the whole session,
and `boot`, which runs containerboot in a lab namespace as a container would run it (tests/lab/tailnet_boot.py,
where the soak layer takes them from too)."""

from tests.lab.tailnet_boot import boot, client, net  # noqa: F401 - the fixtures of this layer
