"""/metrics read as Prometheus reads it (prometheus_client's parser, test-only), in a lab namespace."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tests.lab.tailnet import Tailnet

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(net: Tailnet, ns: str, addr: str = "127.0.0.1:9002") -> tuple[Samples, set[str]]:
    """Every sample by (name, labels), and the names of the families (with their HELP and TYPE)."""
    text = net.lab.run(ns, "curl", "-sf", "--max-time", "5", f"http://{addr}/metrics").stdout
    samples: Samples = {}
    names = set()
    for fam in text_string_to_metric_families(text):
        names.add(fam.name)
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, names


def one(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))
