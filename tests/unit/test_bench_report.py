"""The benchmark's report (bench/report.py, bench/procs.py): CPU per operation from each
peer's /proc time, the run-to-run spread of repeated figures, the idle-tunnel memory at each
step, and the issue-19 targets computed from them. Synthetic results: no process runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_BENCH = str(Path(__file__).resolve().parents[2] / "bench")
sys.path.insert(0, _BENCH)
try:
    import procs
    import report
finally:  # (the bench's module names must not shadow anything for the tests that follow)
    sys.path.remove(_BENCH)


def window(cpu_s: float, wall_s: float = 4.0) -> dict:
    return {"wall_s": wall_s, "roles": {"proxy": {"name": "p", "cpu_pct": 100 * cpu_s / wall_s, "cpu_s": cpu_s,
                                                  "capacity_cores": 1}}}


def peer(rps: float, requests: int, rps_cpu: float, tunnels: float, count: int, tun_cpu: float,
         kib500: float, kib2000: float, runs: list[float] | None = None) -> dict:
    p = {
        "label": "x",
        "rps": {"rps": rps, "requests": requests, "cpu": window(rps_cpu),
                "cpu_us_per_op": procs.cpu_us_per_op(window(rps_cpu), requests)},
        "tunnels": {"rate": tunnels, "count": count, "errors": {}, "total_ms": {"p50": 1, "p99": 2},
                    "cpu_us_per_op": procs.cpu_us_per_op(window(tun_cpu), count)},
        "memory": {"steps": [{"target": 500, "idle_tunnels": 500, "kib_per_tunnel_rss": kib500},
                             {"target": 2000, "idle_tunnels": 1998, "kib_per_tunnel_rss": kib2000}],
                   "kib_per_tunnel_rss": kib2000, "kib_per_tunnel_pss": kib2000},
    }
    if runs:
        p["rps"]["run_digests"] = [{"rps": r, "cpu": p["rps"]["cpu_us_per_op"]} for r in runs]
    return p


def results(**peers) -> dict:
    r = {"peers": peers}
    r["summary"] = report.summarize(r)
    return r


def test_cpu_per_operation_is_the_proxy_role_cpu_seconds_over_the_operations():
    assert procs.cpu_us_per_op(window(0.5), 10_000) == pytest.approx(50.0)
    assert procs.cpu_us_per_op(window(0.5), 0) is None  # no operation: no figure, not a division by zero
    assert procs.cpu_us_per_op({"roles": {}}, 10) is None  # no proxy (the no-proxy baseline)


def test_targets_use_cpu_per_request_and_per_tunnel_against_squid():
    r = results(
        squid=peer(7000, 28000, 4.0, 2500, 10000, 3.7, 30, 31),
        egressgate=peer(8000, 32000, 1.6, 3600, 14400, 3.2, 3.5, 4.2),
    )
    row = r["summary"]["rows"]["egressgate"]
    assert row["cpu_req"] == pytest.approx(50.0) and row["cpu_tunnel"] == pytest.approx(3.2e6 / 14400)
    t = {x["target"]: x for x in r["summary"]["targets"] if x["peer"] == "egressgate"}
    req = t["CPU per forwarded request <= 0.5 x Squid's"]
    assert req["measured"] == pytest.approx(50.0 / (4e6 / 28000)) and req["status"] == "pass"
    tun = t["CPU per tunnel set-up <= 0.6 x Squid's"]
    assert tun["measured"] == pytest.approx((3.2e6 / 14400) / 370.0) and tun["status"] == "FAIL"
    assert t["<= 4 KiB RSS per idle tunnel at 500"]["status"] == "pass"
    assert t["<= 4 KiB RSS per idle tunnel at 2,000"]["status"] == "FAIL"
    table = report.cpu_table(r)
    assert "| x | 50 · 0.35× |" in table  # µs per request, and its ratio to Squid's


def test_repeated_figures_report_their_spread_in_the_targets():
    r = results(
        squid=peer(7000, 28000, 4.0, 2500, 10000, 3.7, 30, 31, runs=[6000, 7000, 8000]),
        egressgate=peer(14000, 56000, 3.0, 3600, 14400, 3.2, 3.5, 3.6, runs=[12000, 14000, 16000]),
    )
    x = next(t for t in r["summary"]["targets"] if t["peer"] == "egressgate" and t["target"].startswith("req/s"))
    assert x["measured"] == pytest.approx(2.0)
    assert x["spread"] == pytest.approx((12000 / 8000, 16000 / 6000))  # worst against best, both ways
    assert "2.00× (1.50–2.67)" in report.targets_table(r)


def test_policy_peer_is_held_within_ten_percent_on_cpu_too():
    r = results(
        squid=peer(7000, 28000, 4.0, 2500, 10000, 3.7, 30, 31),
        egressgate=peer(8000, 32000, 1.6, 3600, 14400, 3.2, 3.5, 3.6),
        **{"egressgate-policy": peer(7600, 30400, 1.9, 3500, 14000, 3.2, 3.5, 3.6)},
    )
    t = {x["target"]: x for x in r["summary"]["targets"] if x["peer"] == "egressgate-policy"}
    assert t["policy on: rps >= 0.9 x policy off"]["status"] == "pass"  # 0.95
    cpu = t["policy on: cpu_req <= 1.1 x policy off"]
    assert cpu["measured"] == pytest.approx((1.9e6 / 30400) / 50.0) and cpu["status"] == "FAIL"  # 1.25


def test_the_hot_path_benchmark_runs_and_reports_both_figures():
    """bench/hotpath.py drives the real gateway on the playbook's fake transports; a change that
    broke its harness (or the pooled keep-alive path it asserts) fails here, not in a bench run."""
    import subprocess

    out = subprocess.run([sys.executable, str(Path(report.__file__).parent / "hotpath.py"), "--requests", "200",
                          "--tunnels", "20", "--repeat", "1", "--policy"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "µs CPU per request" in out.stdout and "µs CPU per tunnel" in out.stdout
