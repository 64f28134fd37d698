"""Merge the Prometheus expositions of several worker processes into one.

Counters, histograms and summaries add up; so do the gauges of live state (connections,
tunnels). Gauges that describe the configuration or the egress check come from worker 0
alone (every worker holds the same config, and only worker 0 probes). Process metrics
(``process_*``) keep one series per worker, with a ``worker`` label.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

FROM_FIRST = frozenset({
    "egressgate_config_info", "egressgate_config_last_load_timestamp_seconds", "egressgate_egress_ip_match",
    "egressgate_egress_source_up", "egressgate_ready", "egressgate_config_last_reload_successful",
})


def merge(texts: list[str]) -> str:
    """``texts[i]`` is worker i's exposition; the result is one exposition for all."""
    order: list[str] = []
    meta: dict[str, tuple[str, str]] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for worker, text in enumerate(texts):
        for family in text_string_to_metric_families(text):
            name = family.name
            if name not in meta:
                meta[name] = (family.type, family.documentation)
                order.append(name)
                values[name] = {}
            if worker and name in FROM_FIRST:
                continue
            table = values[name]
            for sample in family.samples:
                labels = dict(sample.labels)
                if name.startswith("process_"):
                    labels["worker"] = str(worker)
                key = (sample.name, tuple(sorted(labels.items())))
                if sample.name.endswith("_created"):  # a timestamp: the earliest, not a sum
                    table[key] = min(table.get(key, sample.value), sample.value)
                else:
                    table[key] = table.get(key, 0.0) + sample.value
    out: list[str] = []
    for name in order:
        kind, doc = meta[name]
        shown = name + "_total" if kind == "counter" and not name.endswith("_total") else name
        out.append(f"# HELP {shown} {_escape_help(doc)}")
        out.append(f"# TYPE {shown} {kind if kind != 'unknown' else 'untyped'}")
        for (sample_name, labels), value in values[name].items():
            label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
            out.append(f"{sample_name}{{{label_text}}} {_number(value)}" if labels else
                       f"{sample_name} {_number(value)}")
    return "\n".join(out) + "\n"


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
