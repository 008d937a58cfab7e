"""build_docker.sh parameters that need no Docker engine."""

import os
import subprocess

from tests.conftest import ROOT


def test_unknown_target_is_refused_before_building() -> None:
    proc = subprocess.run([str(ROOT / "build_docker.sh")], capture_output=True, text=True,
                          env={**os.environ, "TARGET": "k8s-operator"})
    assert (proc.returncode, proc.stdout) == (1, "unknown target: k8s-operator\n")
