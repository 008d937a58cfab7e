"""containerboot booted in the tailnet lab (tests/lab/tailnet.py), as the e2e and soak layers run it: the
fixtures `net` (one headscale and one client node for the whole session), `client` and `boot`, which runs
containerboot in a lab namespace as a container would run it and gives a `Booted`; `site`, a node on the
LAN with a web backend behind it, on a subnet of its own.

The fixtures are defined here and imported into tests/e2e/conftest.py and tests/soak/conftest.py: each of
those layers has a session tailnet of its own.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import pytest

from tests.conftest import containerboot_exe, need, need_root
from tests.lab.fakes import Run
from tests.lab.tailnet import Node, Tailnet, have_binaries, tailscale_ip

READY = "Startup complete, waiting for shutdown signal"
_sites = itertools.count(10)


@pytest.fixture(scope="session")
def net() -> Iterator[Tailnet]:
    need_root()
    need(have_binaries(), "needs tailscaled, tailscale and headscale: run scripts/build-go.sh")
    tailnet = Tailnet()
    try:
        tailnet.start_control()
        client = tailnet.client("client", "198.18.0.3")
        tailnet.lab.serve(client.ns, "client", "::")
        yield tailnet
    finally:
        tailnet.close()


@pytest.fixture
def client(net: Tailnet) -> Node:
    return next(n for n in net.nodes if n.name == "client")


class Booted:
    def __init__(self, net: Tailnet, ns: str, name: str, run: Run, socket: str) -> None:
        self.net, self.ns, self.name, self.run = net, ns, name, run
        self.node = Node(name, ns, "", socket)

    def status(self) -> dict[str, object]:
        return self.net.status(self.node)

    def ip(self, fam: int = 4) -> str:
        return tailscale_ip(self.net.status(self.node), fam)  # type: ignore[arg-type]


@pytest.fixture
def boot(net: Tailnet) -> Iterator[Callable[..., Booted]]:
    runs: list[Run] = []
    keys: list[str] = []

    def _boot(ns: str, name: str, wait: bool = True, setup: str = "", **env: str) -> Booted:
        """containerboot in `ns`; `setup` is shell run first inside its private mounts (e.g. to lay out
        the service-account files a Pod would have)."""
        full = net.containerboot_env(name, **env)
        keys.append(full.get("TS_AUTHKEY", ""))
        run = Run(full, argv=net.private_run(ns, [containerboot_exe()], setup))
        runs.append(run)
        if wait:
            run.wait_log(READY, timeout=60)
        return Booted(net, ns, name, run, full["TS_SOCKET"])

    yield _boot
    for run in runs:
        run.stop()
        for key in filter(None, keys):
            assert key not in run.output, "an auth key appeared in the output"


def site(net: Tailnet, name: str) -> tuple[str, str, int]:
    n = next(_sites)
    ns, backend = net.site(f"{name}{n}", f"198.18.0.{n}", n)
    return ns, backend, n
