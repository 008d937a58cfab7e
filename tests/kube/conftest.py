"""Fixtures of the kube layer: `pod`, a Pod with the operator's proxies' rights in a fresh namespace of the
session's kube-apiserver (tests/conftest.py), and `start`, which runs containerboot for it in the test root
and checks afterwards that the auth key never appeared in the output."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.lab.fakes import SECRET, Root, Run
from tests.lab.kubeapi import PROXIES_ROLE_RULES, KubeAPI
from tests.lab.kubepod import Pod, make_pod


@pytest.fixture
def pod(kubeapi: KubeAPI, kns: str, root: Root) -> Pod:
    return make_pod(kubeapi, kns, root, PROXIES_ROLE_RULES, secret={})


@pytest.fixture
def start(root: Root) -> Iterator[Callable[..., Run]]:
    runs: list[Run] = []

    def _start(pod: Pod, argv: list[str] | None = None, **env: str) -> Run:
        run = Run(root.env(**{**pod.env, **env}), argv=argv)
        runs.append(run)
        return run

    yield _start
    for run in runs:
        run.stop()
        assert SECRET not in run.output, "the auth key appeared in the output"
