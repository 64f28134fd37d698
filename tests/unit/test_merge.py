"""Merging the workers' expositions (observe/merge.py): sums, worker 0's configuration gauges,
per-worker process metrics, and counters that never go backwards when a worker is replaced."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from egressgate.observe.merge import Merger, merge


def exposition(requests: float = 0, connections: float = 0, cpu: float = 0, ready: float = 1,
               bucket: float = 0) -> str:
    return f"""# HELP egressgate_requests_total Requests
# TYPE egressgate_requests_total counter
egressgate_requests_total{{client="a",profile="p",method="GET",status="200"}} {requests}
# HELP egressgate_active_connections Open
# TYPE egressgate_active_connections gauge
egressgate_active_connections{{listener="l"}} {connections}
# HELP egressgate_ready Ready
# TYPE egressgate_ready gauge
egressgate_ready {ready}
# HELP egressgate_connect_seconds Connect
# TYPE egressgate_connect_seconds histogram
egressgate_connect_seconds_bucket{{le="1.0",profile="p"}} {bucket}
egressgate_connect_seconds_bucket{{le="+Inf",profile="p"}} {bucket}
egressgate_connect_seconds_count{{profile="p"}} {bucket}
egressgate_connect_seconds_sum{{profile="p"}} {bucket / 10}
# HELP process_cpu_seconds_total CPU
# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total {cpu}
"""


def values(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def get(text: str, name: str, **labels: str) -> float:
    return sum(v for (n, lab), v in values(text).items() if n == name and set(labels.items()) <= set(lab))


def test_merge_sums_counters_and_live_gauges_and_keeps_worker_0s_config_gauges():
    out = merge([exposition(requests=3, connections=2, ready=1), exposition(requests=4, connections=5, ready=0)])
    assert get(out, "egressgate_requests_total") == 7
    assert get(out, "egressgate_active_connections") == 7
    assert get(out, "egressgate_ready") == 1  # worker 0's
    assert get(out, "process_cpu_seconds_total", worker="1") == 0



def test_provider_gauges_come_from_worker_0():
    """Every worker checks the providers itself: 1 + 1 reachable is not 2, and a timestamp is no sum."""
    def provider(reachable: float, at: float) -> str:
        return f"""# HELP egressgate_provider_reachable Reachable
# TYPE egressgate_provider_reachable gauge
egressgate_provider_reachable{{profile="p",member="10.0.0.1",provider="v"}} {reachable}
# HELP egressgate_provider_last_check_timestamp_seconds Checked
# TYPE egressgate_provider_last_check_timestamp_seconds gauge
egressgate_provider_last_check_timestamp_seconds{{profile="p",member="10.0.0.1",provider="v"}} {at}
# HELP egressgate_provider_switch_pending Pending
# TYPE egressgate_provider_switch_pending gauge
egressgate_provider_switch_pending{{profile="p"}} {reachable}
"""
    out = merge([provider(1, 1000.0), provider(1, 1001.0)])
    assert get(out, "egressgate_provider_reachable") == 1
    assert get(out, "egressgate_provider_last_check_timestamp_seconds") == 1000.0
    assert get(out, "egressgate_provider_switch_pending") == 1


# Each case: the answers of worker 1 at successive scrapes (pid, requests, connections, cpu), or None
# for "did not answer"; worker 0 answers 10 requests every time. Expected: merged requests and
# connections after each scrape.
CASES = {
    "steady": ([(100, 5, 1, 1.0), (100, 7, 1, 2.0)], [(15, 1), (17, 1)]),
    "replaced: the old total is carried": ([(100, 5, 1, 1.0), (200, 1, 0, 0.1), (200, 3, 2, 0.2)],
                                           [(15, 1), (16, 0), (18, 2)]),
    "silent: last counters stand in, gauges do not": ([(100, 5, 3, 1.0), None, (200, 2, 1, 0.1)],
                                                      [(15, 3), (15, 0), (17, 1)]),
    "replaced twice": ([(100, 5, 0, 1.0), (200, 4, 0, 1.0), (300, 1, 0, 1.0)], [(15, 0), (19, 0), (20, 0)]),
}


@pytest.mark.parametrize("answers, expected", CASES.values(), ids=CASES.keys())
def test_merger_counters_never_go_backwards(answers, expected):
    merger = Merger()
    last_cpu = 0.0
    last_bucket = 0.0
    for answer, (requests, connections) in zip(answers, expected, strict=True):
        one = (1, None, None) if answer is None else \
            (1, answer[0], exposition(requests=answer[1], connections=answer[2], cpu=answer[3], bucket=answer[1]))
        out = merger.merge([(0, 1, exposition(requests=10, bucket=10)), one])
        assert get(out, "egressgate_requests_total") == requests
        assert get(out, "egressgate_active_connections") == connections
        cpu = get(out, "process_cpu_seconds_total", worker="1")
        bucket = get(out, "egressgate_connect_seconds_count")
        assert cpu >= last_cpu and bucket >= last_bucket  # every cumulative family, not only requests
        last_cpu, last_bucket = cpu, bucket


def test_merger_keeps_worker_indices_when_a_worker_is_missing():
    merger = Merger()
    out = merger.merge([(0, 1, exposition()), (1, None, None), (2, 30, exposition(cpu=5.0))])
    assert get(out, "process_cpu_seconds_total", worker="2") == 5.0
    assert get(out, "process_cpu_seconds_total", worker="1") == 0


def test_every_metric_declares_how_the_workers_values_merge() -> None:
    """Issue 32: the merge policy is declared where each metric is made (``observe.metrics``),
    not in a second list: a family of a fresh ``Metrics`` without a declaration fails here, and
    a gauge cannot be made without one."""
    from egressgate.observe import metrics

    m = metrics.Metrics()
    ours = {f.name for f in m.registry.collect() if f.name.startswith(metrics.PREFIX)}
    assert len(ours) > 40, sorted(ours)
    undeclared = sorted(n for n in ours if metrics.merge_policies().get(n) not in (metrics.SUM, metrics.FIRST))
    assert not undeclared, f"metrics without a declared merge policy: {undeclared}"
    with pytest.raises(TypeError):
        metrics.gauge("new_gauge_without_policy", "doc", registry=None)  # type: ignore[call-arg]
    with pytest.raises(ValueError):
        metrics.gauge("new_gauge_bad_policy", "doc", merge="max", registry=None)


def test_a_family_declared_first_comes_from_worker_0_and_a_live_gauge_adds_up() -> None:
    """From the declarations: egressgate_ready (FIRST) is worker 0's; active_connections (SUM) adds up."""
    text = merge([exposition(connections=2, ready=1), exposition(connections=3, ready=0)])
    assert get(text, "egressgate_ready") == 1
    assert get(text, "egressgate_active_connections", listener="l") == 5
