"""``Gate.refused``: a bounded per-source summary, and log lines rate-limited per source (with
the count of refusals since the previous line) under a global ceiling. Time is injected."""

from __future__ import annotations

import json

from egressgate.observe.metrics import Metrics
from egressgate.proxy import gate
from egressgate.proxy.gate import Admission, Gate


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _lines(capfd) -> list[dict]:
    return [json.loads(line) for line in capfd.readouterr().err.splitlines()
            if '"connection_rejected"' in line]


def test_one_line_per_source_per_period_with_the_suppressed_count(capfd) -> None:
    clock = Clock()
    g = Gate(Metrics(), clock, wall=clock)
    for _ in range(5):
        g.refused(Admission.SOURCE_NOT_ALLOWED, "192.0.2.1")
    g.refused(Admission.SOURCE_NOT_ALLOWED, "192.0.2.2")
    assert [(e["client_addr"], e["count"]) for e in _lines(capfd)] == [("192.0.2.1", 1), ("192.0.2.2", 1)]
    clock.now += gate.REJECTED_LOG_EVERY
    g.refused(Admission.SOURCE_NOT_ALLOWED, "192.0.2.1")
    (line,) = _lines(capfd)
    assert (line["client_addr"], line["count"], line["suppressed"], line["total"]) == ("192.0.2.1", 5, 4, 6)
    g.refused(Admission.MAX_CONNECTIONS, "192.0.2.3")  # summarised, not logged (not a source refusal)
    assert _lines(capfd) == []
    recent = g.refused_sources()
    assert [(s["client_addr"], s["count"], s["reason"]) for s in recent] == [
        ("192.0.2.3", 1, "max_connections"), ("192.0.2.1", 6, "source_not_allowed"),
        ("192.0.2.2", 1, "source_not_allowed")]
    assert g.refused_sources(limit=1)[0]["client_addr"] == "192.0.2.3"


def test_log_lines_and_sources_are_bounded(capfd) -> None:
    clock = Clock()
    g = Gate(Metrics(), clock, wall=clock)
    n = gate.REFUSED_SOURCES + 50
    for i in range(n):
        g.refused(Admission.SOURCE_NOT_ALLOWED, f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}")
    assert len(_lines(capfd)) == gate.REJECTED_LOG_BURST  # many sources at once: a ceiling in all
    assert g.refused_source_count == gate.REFUSED_SOURCES  # the least recently refused forgotten
    assert g.refused_sources()[0]["client_addr"] == f"10.0.{(n - 1) >> 8 & 255}.{(n - 1) & 255}"
    g.refused(Admission.PEER_GONE, "-")  # no address: counted only
    assert g.refused_source_count == gate.REFUSED_SOURCES
