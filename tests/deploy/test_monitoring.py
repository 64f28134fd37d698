"""deploy/monitoring: the Prometheus alert rules and the Grafana dashboard.

Offline checks (what `promtool check rules` and Grafana's import would catch, plus our own
conventions), then a live check: a real gateway is started, driven through every outcome the
rules and panels look at (forward, tunnel, denial, address-guard refusal, upstream failure,
report-mode denial, rejected peer, connection limit, reload success and failure), and its
/metrics scrape must contain every metric — and every label and label value — that a rule or
panel selects. Histograms are matched through their _bucket/_sum/_count series.

PromQL is parsed with ``promql-parser`` (the Python binding of GreptimeDB's Rust PromQL parser),
so syntax errors and unknown functions fail here, not in Prometheus.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests import required
from tests.deploy.conftest import DEPLOY, REPO
from tests.integration.peers import ClosedPort, EchoServer, GatewayProcess, Origin, base_config

MONITORING = DEPLOY / "monitoring"
RULES = MONITORING / "alerts.yaml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
RUNBOOK = REPO / "docs" / "operations.md"

# Series that Prometheus itself attaches to every target, never in the gateway's exposition.
PROMETHEUS_SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
TARGET_LABELS = {"job", "instance"}  # added by Prometheus at scrape time
SEVERITIES = {"critical", "warning", "info"}
DURATION = re.compile(r"^(?:\d+(?:ms|s|m|h|d|w|y))+$")
RULE_KEYS = {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
GROUP_KEYS = {"name", "interval", "rules", "limit", "query_offset"}

# The gateway metrics the brief asks the rules and the dashboard to cover.
ALERTED_METRICS = {
    "egressgate_egress_ip_match", "egressgate_denied_total", "egressgate_upstream_errors_total",
    "egressgate_requests_total", "egressgate_ready", "up", "egressgate_egress_source_up",
    "egressgate_config_reloads_total", "egressgate_provider_reachable", "egressgate_provider_switch_pending",
    "egressgate_egress_block_state",
    "egressgate_egress_member_carrying",
}
DASHBOARD_METRICS = {
    "egressgate_requests_total", "egressgate_bytes_total", "egressgate_active_connections",
    "egressgate_active_tunnels", "egressgate_connect_seconds_bucket", "egressgate_dns_seconds_bucket",
    "egressgate_denied_total", "egressgate_upstream_errors_total", "egressgate_egress_ip_match",
    "egressgate_config_reloads_total", "process_resident_memory_bytes", "process_open_fds",
    "process_cpu_seconds_total",
}


@pytest.fixture(scope="module")
def promql():
    return required.module("promql_parser")


def load_rules() -> dict[str, Any]:
    with RULES.open() as fh:
        return yaml.safe_load(fh)


def all_rules() -> list[dict[str, Any]]:
    return [rule for group in load_rules()["groups"] for rule in group["rules"]]


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels(dash: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dash["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows keep their panels inside


# Grafana's variables are not PromQL; replace them with what they expand to before parsing.
_GRAFANA_VAR = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")
_INTERVAL_VARS = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}


def expand_grafana(expr: str) -> str:
    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        return _INTERVAL_VARS.get(name, ".*")

    return _GRAFANA_VAR.sub(sub, expr)


_LABEL_VALUES = re.compile(r"^label_values\((?:(?P<selector>.+),\s*)?(?P<label>\w+)\)$")


def dashboard_queries(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target, annotation and query variable."""
    out = []
    for panel in dashboard_panels(dash):
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r} target {target.get('refId')}", expand_grafana(target["expr"])))
    for ann in dash.get("annotations", {}).get("list", []):
        if ann.get("expr"):
            out.append((f"annotation {ann['name']!r}", expand_grafana(ann["expr"])))
    for var in dash["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = _LABEL_VALUES.match(query.strip())
        assert m and m.group("selector"), f"variable {var['name']}: expected label_values(SELECTOR, LABEL), got {query!r}"
        out.append((f"variable {var['name']!r}", expand_grafana(m.group("selector"))))
    return out


def rule_queries() -> list[tuple[str, str]]:
    return [(f"alert {rule['alert']}", rule["expr"]) for rule in all_rules()]


# ------------------------------------------------------------------------------- PromQL analysis


def selectors(promql, expr) -> list[Any]:
    """Every VectorSelector in a parsed expression."""
    found = []
    promql.walk(expr, lambda node: found.append(node) if isinstance(node, promql.VectorSelector) else None)
    return found


def selector_name(sel) -> str:
    if sel.name:
        return sel.name
    for m in sel.matchers.matchers:
        if m.name == "__name__":
            return m.value
    raise AssertionError(f"selector without a metric name: {sel}")


def metric_names(promql, text: str) -> set[str]:
    return {selector_name(s) for s in selectors(promql, promql.parse(text))}


def output_labels(promql, node, series_labels) -> set[str] | None:
    """The label names an expression's result series carry (None for a scalar). ``series_labels``
    maps a selector to the label names its series have."""
    if isinstance(node, promql.VectorSelector):
        return set(series_labels(node))
    if isinstance(node, promql.MatrixSelector):
        return output_labels(promql, node.vector_selector, series_labels)
    if isinstance(node, (promql.ParenExpr, promql.UnaryExpr, promql.SubqueryExpr)):
        return output_labels(promql, node.expr, series_labels)
    if isinstance(node, (promql.NumberLiteral, promql.StringLiteral)):
        return None
    if isinstance(node, promql.AggregateExpr):
        inner = output_labels(promql, node.expr, series_labels) or set()
        if node.modifier is None:
            return set()
        listed = set(node.modifier.labels)
        return listed if node.modifier.type == promql.AggModifierType.By else inner - listed
    if isinstance(node, promql.Call):
        name = node.func.name
        if name == "vector":
            return set()
        if name in ("absent", "absent_over_time"):
            sel = selectors(promql, node.args[0])[0]
            return {m.name for m in sel.matchers.matchers if m.op == promql.MatchOp.Equal and m.name != "__name__"}
        if name == "scalar" or not node.args:
            return None
        vectors = [output_labels(promql, a, series_labels) for a in node.args]
        vectors = [v for v in vectors if v is not None]
        labels = vectors[0] if vectors else set()
        return labels - {"le"} if name == "histogram_quantile" else labels
    if isinstance(node, promql.BinaryExpr):
        lhs = output_labels(promql, node.lhs, series_labels)
        rhs = output_labels(promql, node.rhs, series_labels)
        if lhs is None or rhs is None:
            return rhs if lhs is None else lhs
        if str(node.op) == "or":
            return lhs & rhs
        modifier = node.modifier
        if modifier is not None and modifier.matching is not None and str(node.op) not in ("and", "unless"):
            matching = set(modifier.matching.labels)
            if modifier.matching.type == promql.LabelModifierType.Include:  # on(...)
                return lhs if str(modifier.card).endswith("ManyToOne") else lhs & matching
        return lhs
    raise AssertionError(f"unhandled PromQL node {type(node).__name__}: {node}")


def aggregation_labels(promql, expr) -> list[tuple[list[str], list[Any]]]:
    """(by-labels, selectors inside) for every `by (...)` aggregation."""
    found = []

    def visit(node):
        if isinstance(node, promql.AggregateExpr) and node.modifier is not None \
                and node.modifier.type == promql.AggModifierType.By:
            found.append((list(node.modifier.labels), selectors(promql, node.expr)))

    promql.walk(expr, visit)
    return found


# ------------------------------------------------------------------------------------ the rules


def test_rules_file_has_promtool_structure():
    doc = load_rules()
    assert set(doc) == {"groups"}, f"top level must be only `groups`, got {sorted(doc)}"
    assert doc["groups"], "no rule groups"
    names, alerts = set(), set()
    for group in doc["groups"]:
        assert set(group) <= GROUP_KEYS, f"group {group.get('name')}: unknown keys {set(group) - GROUP_KEYS}"
        assert group.get("name") and group["name"] not in names, f"group name missing or duplicated: {group}"
        names.add(group["name"])
        assert group["rules"], f"group {group['name']} has no rules"
        for rule in group["rules"]:
            where = f"{group['name']}/{rule.get('alert')}"
            assert set(rule) <= RULE_KEYS, f"{where}: unknown keys {set(rule) - RULE_KEYS}"
            assert "record" not in rule and re.fullmatch(r"Egressgate[A-Z][A-Za-z0-9]+", rule["alert"]), \
                f"{where}: alert names are EgressgateCamelCase"
            assert rule["alert"] not in alerts, f"duplicate alert {rule['alert']}"
            alerts.add(rule["alert"])
            assert isinstance(rule["expr"], str) and rule["expr"].strip(), f"{where}: empty expr"
            for key in ("for", "keep_firing_for"):
                if key in rule:
                    assert DURATION.match(str(rule[key])), f"{where}: {key}: {rule[key]!r} is not a duration"
            assert rule["labels"]["severity"] in SEVERITIES, f"{where}: severity must be one of {SEVERITIES}"
            assert all(isinstance(v, str) for v in rule["labels"].values()), f"{where}: label values are strings"
            ann = rule["annotations"]
            for key in ("summary", "description", "runbook_url"):
                assert isinstance(ann.get(key), str) and ann[key].strip(), f"{where}: annotation {key} missing"
            for key, text in ann.items():
                assert text.count("{{") == text.count("}}"), f"{where}: unbalanced template in {key}"


def test_alerts_cover_the_required_conditions(promql):
    used = set().union(*(metric_names(promql, expr) for _, expr in rule_queries()))
    assert used >= ALERTED_METRICS, f"no alert uses {sorted(ALERTED_METRICS - used)}"
    by_metric = {name: [r for r in all_rules() if name in metric_names(promql, r["expr"])] for name in used}
    assert any("== 0" in r["expr"] for r in by_metric["egressgate_egress_ip_match"]), "IP mismatch is == 0"
    assert any("absent(" in r["expr"] for r in by_metric["up"]), "an absent(up) alert is required"
    assert any('result="failure"' in r["expr"] for r in by_metric["egressgate_config_reloads_total"])
    ratio = [r for r in by_metric["egressgate_upstream_errors_total"]
             if "egressgate_requests_total" in metric_names(promql, r["expr"])]
    assert ratio, "the upstream error alert must compare errors with egressgate_requests_total"
    for rule in all_rules():  # alerts on rates and gauges debounce; counter-increase alerts may fire at once
        if "increase(" not in rule["expr"] and "absent(" not in rule["expr"]:
            assert "for" in rule, f"{rule['alert']}: a condition on a gauge or rate needs `for:`"


def test_rule_exprs_parse_as_promql(promql):
    for where, expr in rule_queries():
        try:
            promql.parse(expr)
        except ValueError as exc:
            pytest.fail(f"{where}: {exc}\n{expr}")


def test_annotation_labels_survive_the_expression(promql, scrape):
    """`{{ $labels.X }}` in an annotation must name a label the alert's series really carry
    (an aggregation that drops X turns it into an empty string in the page)."""
    for rule in all_rules():
        labels = output_labels(promql, promql.parse(rule["expr"]), scrape.label_names)
        assert labels is not None, f"{rule['alert']}: expression is a scalar"
        for key, text in rule["annotations"].items():
            for name in re.findall(r"\$labels\.(\w+)", text):
                assert name in labels, (f"{rule['alert']}: annotation {key} uses $labels.{name}, "
                                        f"but the expression's series only carry {sorted(labels)}")


def github_anchors(markdown: str) -> set[str]:
    anchors = set(re.findall(r'<a (?:id|name)="([^"]+)"', markdown))
    in_code = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        m = None if in_code else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            text = re.sub(r"[`*_\[\]]|\(.*?\)", "", m.group(1)).strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return anchors


def test_every_runbook_url_points_at_a_section_of_the_operations_runbook():
    assert RUNBOOK.exists(), f"{RUNBOOK} missing"
    anchors = github_anchors(RUNBOOK.read_text())
    for rule in all_rules():
        url = rule["annotations"]["runbook_url"]
        path, _, anchor = url.partition("#")
        assert path.endswith("docs/operations.md") and anchor, f"{rule['alert']}: runbook_url {url!r}"
        assert anchor in anchors, f"{rule['alert']}: docs/operations.md has no section #{anchor}"


# -------------------------------------------------------------------------------- the dashboard


def test_dashboard_structure():
    dash = load_dashboard()
    for key in ("title", "uid", "panels", "templating", "schemaVersion"):
        assert key in dash, f"dashboard: {key} missing"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    ds = variables.get("datasource")
    assert ds and ds["type"] == "datasource" and ds["query"] == "prometheus", "a Prometheus datasource variable"
    ids, boxes = set(), []
    for panel in dashboard_panels(dash):
        assert panel["id"] not in ids, f"duplicate panel id {panel['id']}"
        ids.add(panel["id"])
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, f"{panel['title']}: gridPos {g}"
        for other, og in boxes:
            overlap = g["x"] < og["x"] + og["w"] and og["x"] < g["x"] + g["w"] \
                and g["y"] < og["y"] + og["h"] and og["y"] < g["y"] + g["h"]
            assert not overlap, f"panels {panel['title']!r} and {other!r} overlap"
        boxes.append((panel["title"], g))
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", f"{panel['title']}: datasource not the variable"
        assert panel["targets"], f"{panel['title']}: no queries"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), f"{panel['title']}: duplicate refId"
        for t in panel["targets"]:
            assert t.get("datasource", {}).get("uid", "${datasource}") == "${datasource}", panel["title"]
            assert t["expr"].strip(), f"{panel['title']}: empty expr"
    for var in variables.values():
        if var["type"] == "query":
            assert var["datasource"]["uid"] == "${datasource}", f"variable {var['name']}: datasource"


def test_dashboard_covers_the_required_panels(promql):
    dash = load_dashboard()
    queries = dashboard_queries(dash)
    used = set().union(*(metric_names(promql, q) for _, q in queries))
    assert used >= DASHBOARD_METRICS, f"no panel shows {sorted(DASHBOARD_METRICS - used)}"
    exprs = [t["expr"] for p in dashboard_panels(dash) for t in p.get("targets", [])]
    for hist in ("egressgate_connect_seconds_bucket", "egressgate_dns_seconds_bucket"):
        assert any("histogram_quantile(" in e and hist in e and re.search(r"\ble\b", e) for e in exprs), \
            f"{hist}: needs a histogram_quantile panel aggregated by le"
    grouped = {tuple(sorted(labels)) for e in exprs for labels, _ in aggregation_labels(promql, promql.parse(expand_grafana(e)))}
    for labels in [("status",), ("client",), ("profile",), ("direction", "profile"), ("reason",), ("kind",), ("result",)]:
        assert labels in grouped, f"no panel breaks a metric down by {labels}"


def test_dashboard_queries_parse_as_promql(promql):
    for where, query in dashboard_queries(load_dashboard()):
        try:
            promql.parse(query)
        except ValueError as exc:
            pytest.fail(f"dashboard {where}: {exc}\n{query}")


# ---------------------------------------------------------------------- a live gateway's scrape


class Scrape:
    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[str, list[dict[str, str]]] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.samples.setdefault(sample.name, []).append(dict(sample.labels))

    def label_names(self, sel) -> set[str]:
        name = selector_name(sel)
        names = set(TARGET_LABELS)
        for labels in self.samples.get(name, []):
            names |= set(labels)
        return names

    def value(self, name: str, **labels: str) -> float:
        for family in text_string_to_metric_families(self.text):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return s.value
        raise KeyError(name)


# the admin listener is on loopback: never through a proxy named in the environment
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str) -> tuple[int, bytes]:
    try:
        with _DIRECT.open(url, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _post(url: str) -> int:
    try:
        with _DIRECT.open(urllib.request.Request(url, method="POST"), timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


def _proxy_request(gw: GatewayProcess, target: str, auth: str | None = None, source: str | None = None) -> bytes:
    """One request through the gateway over a fresh connection (Connection: close); the raw answer."""
    head = f"GET {target} HTTP/1.1\r\nHost: {target.split('/')[2]}\r\nConnection: close\r\n"
    if auth:
        head += f"Proxy-Authorization: Basic {base64.b64encode(auth.encode()).decode()}\r\n"
    with socket.create_connection((gw.host, gw.port), timeout=5,
                                  source_address=(source, 0) if source else None) as s:
        s.sendall((head + "\r\n").encode())
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except (ConnectionResetError, TimeoutError):
            pass
    return b"".join(chunks)


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.") else 0


@pytest.fixture(scope="module")
def scrape(tmp_path_factory) -> Iterator[Scrape]:
    """A gateway after one of every outcome; yields its /metrics scrape (taken while a tunnel is open)."""
    tmp = tmp_path_factory.mktemp("monitoring")
    origin, echo = Origin(), EchoServer()
    max_connections = 4
    cfg = base_config(
        security={"connect_ports": [echo.port]},
        egress={"default": {"direct": {}},
                "pinned": {"bind": ["127.0.0.2"], "expect_ip": ["127.0.0.2", "127.0.0.3"], "standby": ["127.0.0.3"],
                           "protect": [{"name": "origin", "destinations": ["127.0.0.1"], "max_concurrent": 1},
                                       {"name": "origin-by-name", "destinations": ["localhost"]}],
                           "providers": [{"name": "vendor", "url": origin.url("/only-from?addr=127.0.0.2"),
                                          "match": ["*.vendor.example"]}]}},
        clients=[
            {"name": "auditor", "from": ["127.0.0.1/32"], "username": "auditor", "password_env": "EG_AUDITOR_PW",
             "egress": ["pinned"], "deny": ["localhost"], "mode": "report"},
            {"name": "job", "from": ["127.0.0.1/32"], "egress": ["pinned", "default"], "deny": ["blocked.example"]},
        ],
        probe={"echo_url": origin.url("/ip"), "interval": "1h"},
        limits={"max_connections": max_connections},
    )
    gw = GatewayProcess(cfg, tmp, env={"EG_AUDITOR_PW": "s3cret"})
    held: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 10
        while json.loads(_get(gw.admin + "/status")[1])["profiles"]["pinned"]["ip_matches"] is not True:
            assert time.monotonic() < deadline, "the egress probe never confirmed profile pinned"
            time.sleep(0.05)
        while json.loads(_get(gw.admin + "/status")[1])["profiles"]["pinned"]["providers"]["checks"][0]["ok"] is not True:
            assert time.monotonic() < deadline, "the provider check of profile pinned never passed"
            time.sleep(0.05)
        first = Scrape(_get(gw.admin + "/metrics")[1].decode())  # before anyone asked /readyz

        assert _status(_proxy_request(gw, origin.url("/bytes?n=5000"))) == 200
        assert _status(_proxy_request(gw, origin.url("/", host="localhost"))) == 200  # a DNS lookup
        assert _status(_proxy_request(gw, "http://blocked.example/")) == 403
        assert _status(_proxy_request(gw, "http://169.254.169.254/latest/meta-data/")) == 403
        with ClosedPort() as closed:  # held: connections to it are refused
            assert _status(_proxy_request(gw, f"http://{closed.address}/")) == 502
        assert _status(_proxy_request(gw, origin.url("/", host="localhost"), auth="auditor:s3cret")) == 200  # report mode
        assert _proxy_request(gw, origin.url("/"), source="127.0.0.5") == b""  # source not allowed
        # a tunnel that stays open through the scrape
        tunnel = socket.create_connection((gw.host, gw.port), timeout=5)
        held.append(tunnel)
        tunnel.sendall(f"CONNECT 127.0.0.1:{echo.port} HTTP/1.1\r\nHost: 127.0.0.1:{echo.port}\r\n\r\n".encode())
        assert tunnel.recv(4096).startswith(b"HTTP/1.1 200"), "CONNECT refused"
        tunnel.sendall(b"ping")
        assert tunnel.recv(4096) == b"ping"
        # fill the connection limit, then one more is turned away
        for _ in range(max_connections - 1):
            held.append(socket.create_connection((gw.host, gw.port), timeout=5))
        deadline = time.monotonic() + 5
        while json.loads(_get(gw.admin + "/status")[1])["connections"]["total"] < max_connections:
            assert time.monotonic() < deadline, "held connections were not accepted"
            time.sleep(0.02)
        assert _status(_proxy_request(gw, origin.url("/"))) == 503
        for s in held[1:]:
            s.close()
        del held[1:]
        # reloads: one that applies, one that is refused
        assert _post(gw.admin + "/-/reload") == 200
        good = gw.config_path.read_text()
        gw.write_config("listen: [{address: 127.0.0.1:0}]\nnot_a_key: 1\n")
        assert _post(gw.admin + "/-/reload") == 400
        gw.write_config(good)
        assert _get(gw.admin + "/readyz")[0] == 200

        # shared-IP protection: the open tunnel holds the one place for 127.0.0.1 (a request there
        # is refused), and an origin's 429 with Retry-After starts a hold on localhost
        assert _status(_proxy_request(gw, origin.url("/"))) == 429
        assert _status(_proxy_request(gw, origin.url("/answer?code=429&retry_after=60", host="localhost"))) == 429

        result = Scrape(_get(gw.admin + "/metrics")[1].decode())
        result.first = first
        yield result
    finally:
        for s in held:
            s.close()
        gw.kill()
        origin.close()
        echo.close()


def test_traffic_reached_the_metrics(scrape):
    """The fixture's traffic is visible, so the name checks below test something real."""
    assert scrape.value("egressgate_active_tunnels") == 1
    assert scrape.value("egressgate_denied_total", reason="destination_ip_prohibited") == 1
    assert scrape.value("egressgate_config_reloads_total", result="failure") == 1
    assert scrape.value("egressgate_rejected_connections_total", reason="max_connections") == 1
    assert scrape.value("egressgate_egress_ip_match", profile="pinned") == 1
    assert scrape.value("egressgate_protect_refused_total", profile="pinned", member="127.0.0.2",
                        destination="origin", limit="concurrency") == 1
    assert scrape.value("egressgate_protect_in_flight", destination="origin") == 1
    assert scrape.value("egressgate_protect_held_hosts", destination="origin-by-name") == 1


def _check_selector(where: str, sel, scrape: Scrape, promql) -> None:
    name = selector_name(sel)
    if name in PROMETHEUS_SYNTHETIC:
        return
    series = scrape.samples.get(name)
    assert series, (f"{where}: metric {name} is not in the gateway's /metrics "
                    f"(egressgate series there: {sorted(n for n in scrape.samples if n.startswith('egressgate_'))})")
    for m in sel.matchers.matchers:
        if m.name in TARGET_LABELS or m.name == "__name__":
            continue
        assert any(m.name in labels for labels in series), f"{where}: {name} has no label {m.name!r}"
        if m.op == promql.MatchOp.Equal:
            ok = any(labels.get(m.name) == m.value for labels in series)
        elif m.op == promql.MatchOp.Re:
            ok = any(re.fullmatch(m.value, labels.get(m.name, "")) for labels in series)
        else:
            ok = True
        assert ok, f"{where}: no {name} series has {m.name}{m.op}{m.value!r}: {series}"


def _check_query(where: str, text: str, scrape: Scrape, promql) -> None:
    expr = promql.parse(text)
    for sel in selectors(promql, expr):
        _check_selector(where, sel, scrape, promql)
    for labels, inner in aggregation_labels(promql, expr):
        have = set().union(*(scrape.label_names(s) for s in inner)) if inner else set()
        missing = [label for label in labels if label not in have]
        assert not missing, f"{where}: aggregates by {missing}, which no series inside carries"


def test_every_metric_the_rules_use_is_exported(scrape, promql):
    for where, expr in rule_queries():
        _check_query(where, expr, scrape, promql)


def test_every_metric_the_dashboard_uses_is_exported(scrape, promql):
    for where, query in dashboard_queries(load_dashboard()):
        _check_query(where, query, scrape, promql)


def test_every_exported_gateway_metric_is_monitored(scrape, promql):
    """A new egressgate_ metric that neither an alert nor a panel shows is probably forgotten."""
    used = set()
    for _, q in rule_queries() + dashboard_queries(load_dashboard()):
        used |= metric_names(promql, q)
    suffixes = ("_bucket", "_count", "_sum", "_created", "_total")
    exported = {n for n in scrape.samples if n.startswith("egressgate_") and not n.endswith("_created")}
    for name in sorted(exported):
        family = name
        for suffix in ("_bucket", "_count", "_sum"):
            family = family.removesuffix(suffix)
        if not any(u == name or u.startswith(family) and u[len(family):] in ("",) + suffixes for u in used):
            pytest.fail(f"{name} is exported but no alert or dashboard panel uses it")


def test_ready_gauge_is_current_without_a_readyz_call(scrape):
    assert scrape.first.value("egressgate_ready") == 1


def test_direct_profile_member_label_is_direct(scrape):
    assert scrape.value("egressgate_egress_source_up", profile="default", member="direct") == 1
