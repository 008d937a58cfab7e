"""A stand-in for containerboot.kube.client.Client as PodEvents uses it, for fast tests of the worker
(tests/unit/test_podevents.py). The real API server's answers are checked in tests/kube/test_podevents.py;
this one holds Events in a dict, records every call, and can refuse, fail or hang on request.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Mapping
from typing import Any

from containerboot.kube.client import KubeError


class FakeEventsClient:
    """`rights`: the verbs on events the access reviews allow. `calls`: (method, verb or event name) in
    order, for every call made through this client or a sibling. `fail`: codes the next writes answer
    with (KubeError), in order. `go`: while clear, calls wait for it (a slow server, up to 10 s). `hang`:
    while set, calls block until `interrupt()` (or `release`) and then fail, as a cut connection does."""

    def __init__(self, namespace: str = "ns", rights: tuple[str, ...] = ("get", "create", "patch")) -> None:
        self.namespace = namespace
        self.rights = set(rights)
        self.events: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, str]] = []
        self.fail: list[int] = []
        self.hang = False
        self.release = threading.Event()
        self.go = threading.Event()
        self.go.set()
        self.deadline: float | None = 12345.0  # the boot's deadline: PodEvents must not inherit it
        self.stop: Callable[[], bool] = lambda: False
        self.siblings: list[_Sibling] = []
        self.closed = False
        self._lock = threading.Lock()

    def sibling(self) -> _Sibling:
        other = _Sibling(self)
        self.siblings.append(other)
        return other

    def _call(self, method: str, what: str) -> None:
        with self._lock:
            self.calls.append((method, what))
        self.go.wait(10)
        if self.hang:
            self.release.wait(30)
            raise KubeError(f"{method} {what}: connection shut down")
        with self._lock:
            code = self.fail.pop(0) if self.fail and method != "SSAR" else 0
        if code:
            raise KubeError(f"{method} {what}: failed with {code}", code)

    def allowed(self, verb: str, resource: str, name: str = "", namespace: str = "",
                deadline: float | None = None) -> bool:
        assert resource == "events" and namespace == self.namespace and deadline is not None
        self._call("SSAR", verb)
        return verb in self.rights

    def get_event(self, namespace: str, name: str, deadline: float | None = None) -> dict[str, Any]:
        self._call("GET", name)
        if name not in self.events:
            raise KubeError(f'events "{name}" not found', 404)
        return copy.deepcopy(self.events[name])

    def create_event(self, namespace: str, event: Mapping[str, Any], deadline: float | None = None) -> None:
        name = event["metadata"]["name"]
        self._call("POST", name)
        if name in self.events:
            raise KubeError(f'events "{name}" already exists', 409)
        self.events[name] = copy.deepcopy(dict(event))

    def patch_event(self, namespace: str, name: str, ops: list[dict[str, Any]],
                    deadline: float | None = None) -> None:
        self._call("PATCH", name)
        if name not in self.events:
            raise KubeError(f'events "{name}" not found', 404)
        for op in ops:
            assert op["op"] == "add" and op["path"].count("/") == 1
            self.events[name][op["path"][1:]] = op["value"]

    def interrupt(self) -> None:
        self.release.set()

    def close(self) -> None:
        self.closed = True


class _Sibling:
    """A connection of its own to the same fake server: its own deadline, stop and closed; every call and
    every setting a test changes later (fail, hang, rights, go) are the server's."""

    def __init__(self, server: FakeEventsClient) -> None:
        self.server = server
        self.deadline, self.stop, self.closed = server.deadline, server.stop, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.server, name)

    def close(self) -> None:
        self.closed = True
