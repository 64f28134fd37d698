"""Merge the Prometheus expositions of several worker processes into one.

Each family merges as ``observe.metrics`` declares it where the metric is made (``merge=``):
``SUM`` (counters, histograms, the gauges of live state: connections, tunnels) adds the
workers' values up; ``FIRST`` (the configuration, the egress and provider checks every worker
repeats, the worker processes, the admin listener) takes worker 0's alone (every worker holds
the same config; worker 0 owns the admin listener and supervises the others). A family no
``Metrics`` declares (a library's) adds up. Process
metrics (``process_*``) keep one series per worker, with a ``worker`` label.

Merged counters never go backwards, even when a worker dies and is replaced (``Merger``):
the last exposition seen from each worker is remembered, per worker slot and process id.
While a worker does not answer, its last counter and histogram values stand in for it; when
another process answers for the slot, the previous process's last values become a fixed
offset added to the new one's. Gauges are never carried (a dead worker has no connections).
What a worker counted after the last scrape that saw it is lost with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from .metrics import FIRST, merge_policies

CUMULATIVE = frozenset({"counter", "histogram", "summary"})  # carried across a worker's restart

Key = tuple[str, tuple[tuple[str, str], ...]]  # (sample name, sorted labels)


@dataclass(slots=True)
class Family:
    kind: str
    doc: str
    samples: dict[Key, float] = field(default_factory=dict)


Parsed = dict[str, Family]  # metric family name -> its samples


def parse(worker: int, text: str) -> Parsed:
    """One worker's exposition; ``process_*`` samples get a ``worker`` label."""
    out: Parsed = {}
    for family in text_string_to_metric_families(text):
        fam = out.setdefault(family.name, Family(family.type, family.documentation))
        for sample in family.samples:
            labels = dict(sample.labels)
            if family.name.startswith("process_"):
                labels["worker"] = str(worker)
            fam.samples[(sample.name, tuple(sorted(labels.items())))] = sample.value
    return out


def cumulative(parsed: Parsed) -> Parsed:
    """Only what may be carried forward: counter, histogram and summary samples (not their
    ``_created`` timestamps)."""
    return {name: Family(fam.kind, fam.doc, {k: v for k, v in fam.samples.items() if not k[0].endswith("_created")})
            for name, fam in parsed.items() if fam.kind in CUMULATIVE}


def add(into: Parsed, more: Parsed) -> None:
    for name, fam in more.items():
        target = into.setdefault(name, Family(fam.kind, fam.doc))
        for key, value in fam.samples.items():
            target.samples[key] = target.samples.get(key, 0.0) + value


def combine(workers: list[tuple[int, Parsed]]) -> Parsed:
    """Sum ``(worker index, parsed)`` pairs; families declared ``FIRST`` only from worker 0;
    ``_created`` timestamps: the earliest."""
    policies = merge_policies()
    out: Parsed = {}
    for worker, parsed in workers:
        for name, fam in parsed.items():
            target = out.setdefault(name, Family(fam.kind, fam.doc))
            if worker and policies.get(name) == FIRST:
                continue
            for key, value in fam.samples.items():
                if key[0].endswith("_created"):
                    target.samples[key] = min(target.samples.get(key, value), value)
                else:
                    target.samples[key] = target.samples.get(key, 0.0) + value
    return out


def render(families: Parsed) -> str:
    out: list[str] = []
    for name, fam in families.items():
        shown = name + "_total" if fam.kind == "counter" and not name.endswith("_total") else name
        out.append(f"# HELP {shown} {_escape_help(fam.doc)}")
        out.append(f"# TYPE {shown} {fam.kind if fam.kind != 'unknown' else 'untyped'}")
        for (sample_name, labels), value in fam.samples.items():
            label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
            out.append(f"{sample_name}{{{label_text}}} {_number(value)}" if labels else
                       f"{sample_name} {_number(value)}")
    return "\n".join(out) + "\n"


def merge(texts: list[str]) -> str:
    """``texts[i]`` is worker i's exposition; the result is one exposition for all."""
    return render(combine([(i, parse(i, text)) for i, text in enumerate(texts)]))


@dataclass(slots=True)
class _Slot:
    pid: int | None = None  # the process whose exposition was seen last
    last: Parsed = field(default_factory=dict)  # its cumulative samples, as last seen
    offset: Parsed = field(default_factory=dict)  # the sum of the slot's earlier processes' last values


class Merger:
    """``merge`` across scrapes, monotonic across worker restarts (see the module docstring).
    Holds one slot per worker index (bounded by ``workers``)."""

    def __init__(self) -> None:
        self._slots: dict[int, _Slot] = {}

    def merge(self, answers: list[tuple[int, int | None, str | None]]) -> str:
        """``answers``: (worker index, pid, exposition), exposition None when it did not answer."""
        parts: list[tuple[int, Parsed]] = []
        for index, pid, text in answers:
            slot = self._slots.setdefault(index, _Slot())
            if text is None:
                parts.append((index, slot.last))  # stale but never lower
            else:
                parsed = parse(index, text)
                if slot.pid is not None and pid != slot.pid:
                    add(slot.offset, slot.last)  # a new process: the old one's total stays counted
                slot.pid, slot.last = pid, cumulative(parsed)
                parts.append((index, parsed))
            if slot.offset:
                parts.append((index, slot.offset))
        return render(combine(parts))


def _number(value: float) -> str:
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n")
