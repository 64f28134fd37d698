"""deploy/argo: the WorkflowTemplate validated against Argo's models (hera, with unknown fields
treated as errors), its wiring (profiles, secrets, NO_PROXY bypass, pre-flight gating), and the
pre-flight script executed against a loopback fake of the gateway."""

from __future__ import annotations

import base64
import http.server
import json
import os
import subprocess
import sys
import threading
from urllib.parse import urlsplit

import pytest
import yaml
from conftest import ARGO, load_docs

from tests import required
from tests.integration.peers import QuietHandler

WFT_PATH = ARGO / "workflowtemplate.yaml"


def workflow_fixture(path):
    """A module fixture: the one document of the WorkflowTemplate at ``path``."""

    @pytest.fixture(scope="module")
    def wft():
        (doc,) = load_docs(path)
        return doc

    return wft


wft = workflow_fixture(WFT_PATH)


@pytest.fixture(scope="module")
def templates(wft):
    return {t["name"]: t for t in wft["spec"]["templates"]}


@pytest.fixture(scope="module")
def params(wft):
    return {p["name"]: p.get("value") for p in wft["spec"]["arguments"]["parameters"]}


def _unknown_keys(given, dumped, path="$"):
    """Keys in the YAML that the model dropped (pydantic ignores unknown fields)."""
    out = []
    if isinstance(given, dict):
        if not isinstance(dumped, dict):
            return [path]
        for k, v in given.items():
            if k not in dumped:
                out.append(f"{path}.{k}")
            else:
                out.extend(_unknown_keys(v, dumped[k], f"{path}.{k}"))
    elif isinstance(given, list) and isinstance(dumped, list):
        if len(given) != len(dumped):
            return [path]
        for i, (g, d) in enumerate(zip(given, dumped, strict=True)):
            out.extend(_unknown_keys(g, d, f"{path}[{i}]"))
    return out


def assert_valid_workflow(doc) -> None:
    """``doc`` is a WorkflowTemplate to Argo's models, with no field they do not know."""
    models = required.module("hera.workflows.models")
    model = models.WorkflowTemplate.model_validate(doc)
    dumped = json.loads(model.model_dump_json(by_alias=True, exclude_none=True))
    unknown = _unknown_keys(doc, dumped)
    assert not unknown, f"fields unknown to the Argo schema: {unknown}"


def test_valid_against_argo_models(wft):
    assert_valid_workflow(wft)


def test_unknown_field_detection_works():
    models = required.module("hera.workflows.models")
    bad = {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "WorkflowTemplate",
        "metadata": {"name": "x"},
        "spec": {
            "entrypoint": "m",
            "templates": [{"name": "m", "container": {"image": "a", "imagePolicy": 1}}],
        },
    }
    dumped = json.loads(
        models.WorkflowTemplate.model_validate(bad).model_dump_json(by_alias=True, exclude_none=True)
    )
    assert _unknown_keys(bad, dumped) == ["$.spec.templates[0].container.imagePolicy"]


def test_runs_non_root_with_own_service_account(wft):
    spec = wft["spec"]
    assert spec["serviceAccountName"] not in ("", "default")
    assert spec["securityContext"]["runAsNonRoot"] is True
    csc = spec["templateDefaults"]["container"]["securityContext"]
    assert csc["allowPrivilegeEscalation"] is False and csc["readOnlyRootFilesystem"] is True
    assert csc["capabilities"]["drop"] == ["ALL"]


def env_of(template):
    body = template.get("container") or template.get("script")
    return body["env"]


def proxy_profile_env(template):
    """(secret name, env list) of a step that authenticates to the gateway."""
    env = env_of(template)
    names = [e["name"] for e in env]
    assert names.index("PROXY_USER") < names.index("HTTPS_PROXY"), (
        "$(VAR) expansion needs the var defined first"
    )
    assert names.index("PROXY_PASSWORD") < names.index("HTTPS_PROXY")
    by_name = {e["name"]: e for e in env}
    user_ref = by_name["PROXY_USER"]["valueFrom"]["secretKeyRef"]
    pass_ref = by_name["PROXY_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert user_ref["name"] == pass_ref["name"]
    assert (user_ref["key"], pass_ref["key"]) == ("username", "password")
    assert by_name["HTTPS_PROXY"]["value"].startswith(
        "{{workflow.parameters.proxy-scheme}}://$(PROXY_USER):$(PROXY_PASSWORD)@")
    return user_ref["name"], by_name


@pytest.mark.parametrize("profile", ["vendor-x", "vendor-y"])
def test_collect_steps_use_their_profile_secret(templates, profile):
    secret, env = proxy_profile_env(templates[f"collect-{profile}"])
    assert secret == f"egressgate-client-{profile}"
    assert "NO_PROXY" in env and "no_proxy" in env
    # the secret exists (example) with the keys the step reads
    secrets = {
        d["metadata"]["name"]: d for d in load_docs(ARGO / "secrets.example.yaml") if d["kind"] == "Secret"
    }
    assert {"username", "password"} <= set(secrets[secret]["stringData"])
    assert secrets[secret]["stringData"]["username"] == profile


def _no_proxy_matches(host, no_proxy):
    for entry in (e.strip() for e in no_proxy.split(",")):
        if entry and (host == entry.lstrip(".") or host.endswith("." + entry.lstrip("."))):
            return True
    return False


def test_bypass_step_destination_is_in_no_proxy(templates, params):
    env = {e["name"]: e for e in env_of(templates["internal-fetch"])}
    assert "PROXY_USER" not in env and "PROXY_PASSWORD" not in env
    assert env["NO_PROXY"]["value"] == "{{workflow.parameters.no-proxy}}"
    host = urlsplit(params["internal-url"]).hostname
    assert _no_proxy_matches(host, params["no-proxy"])
    # ...while the provider URLs are NOT bypassed
    for p in ("vendor-x-url", "vendor-y-url"):
        assert not _no_proxy_matches(urlsplit(params[p]).hostname, params["no-proxy"])
    assert _no_proxy_matches("metadata.google.internal", params["no-proxy"])


def test_collection_waits_for_both_preflights(templates):
    tasks = {t["name"]: t for t in templates["main"]["dag"]["tasks"]}
    preflights = {n for n, t in tasks.items() if t["template"] == "preflight"}
    assert len(preflights) == 2
    for name in ("collect-vendor-x", "collect-vendor-y"):
        for pf in preflights:
            assert f"{pf}.Succeeded" in tasks[name]["depends"]
    for pf in preflights:
        profile = {p["name"]: p["value"] for p in tasks[pf]["arguments"]["parameters"]}["profile"]
        secret = {p["name"]: p["value"] for p in tasks[pf]["arguments"]["parameters"]}["secret"]
        assert secret == f"egressgate-client-{profile}"


# ---------------------------------------------------------------- pre-flight script against a fake


class FakeGateway(QuietHandler):
    protocol_version = "HTTP/1.0"
    answer: dict = {}
    seen: list = []

    def do_GET(self):  # noqa: N802
        FakeGateway.seen.append((self.path, self.headers.get("Proxy-Authorization")))
        self.reply(200, json.dumps(FakeGateway.answer).encode(), {"Content-Type": "application/json"})


@pytest.fixture
def fake_gateway():
    FakeGateway.seen = []
    server = http.server.HTTPServer(("127.0.0.1", 0), FakeGateway)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def run_preflight(templates, port, answer, expected_ip="203.0.113.10", profile="vendor-x", scheme="http",
                  ca="", provider=""):
    FakeGateway.answer = answer
    source = templates["preflight"]["script"]["source"]
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "http_proxy", "https_proxy")}
    env.update(
        HTTPS_PROXY=f"{scheme}://vendor-x:s3cret@{'localhost' if scheme == 'https' else '127.0.0.1'}:{port}",
        EXPECTED_IP=expected_ip,
        EXPECTED_PROFILE=profile,
        PROXY_CA=ca,
        EXPECTED_PROVIDER=provider,
    )
    return subprocess.run([sys.executable, "-c", source], env=env, capture_output=True, text=True, timeout=30)


GOOD = {
    "client": "vendor-x-collector",
    "profile": "vendor-x",
    "expect_ip": ["203.0.113.10"],
    "observed_ip": "203.0.113.10",
    "allow": ["*.vendor-x.com"],
}


def test_preflight_passes_on_match(templates, fake_gateway):
    proc = run_preflight(templates, fake_gateway.server_port, GOOD)
    assert proc.returncode == 0, proc.stderr
    ((path, auth),) = FakeGateway.seen
    assert path == "http://egressgate.whoami/"  # absolute-URI through the proxy
    assert auth == "Basic " + base64.b64encode(b"vendor-x:s3cret").decode()


@pytest.mark.parametrize(
    "change",
    [
        {"observed_ip": "198.51.100.99"},  # leaving from the wrong IP
        {"observed_ip": None},  # gateway could not tell
        {"profile": "default"},  # credentials mapped to another profile
        {"expect_ip": ["203.0.113.11"]},  # gateway config disagrees with the workflow
    ],
)
def test_preflight_fails_fast_on_mismatch(templates, fake_gateway, change):
    proc = run_preflight(templates, fake_gateway.server_port, {**GOOD, **change})
    assert proc.returncode == 1
    assert "PRE-FLIGHT FAILED" in proc.stderr


PROVIDERS = {"switch": "immediate", "providers": [{"name": "vendor-x"}], "pending_switch": None, "checks": [
    {"member": "10.0.1.5", "provider": "vendor-x", "ok": True, "outcome": "accepted", "detail": "HTTP/1.1 200 OK"},
    {"member": "10.0.1.6", "provider": "vendor-x", "ok": True, "outcome": "accepted", "detail": "HTTP/1.1 200 OK"},
]}


def _refused(member: str = "10.0.1.6") -> dict:
    checks = [dict(c) for c in PROVIDERS["checks"]]
    for c in checks:
        if c["member"] == member:
            c.update(ok=False, outcome="http_status", detail="HTTP/1.1 403 Forbidden")
    return {**PROVIDERS, "checks": checks}


def test_preflight_checks_the_provider_through_whoami(templates, fake_gateway):
    ok = run_preflight(templates, fake_gateway.server_port, {**GOOD, "providers": PROVIDERS})
    assert ok.returncode == 0 and "accepted by vendor-x" in ok.stdout, ok.stderr
    refused = run_preflight(templates, fake_gateway.server_port, {**GOOD, "providers": _refused()})
    assert refused.returncode == 1
    assert "provider vendor-x refuses member 10.0.1.6 (http_status: HTTP/1.1 403 Forbidden)" in refused.stderr
    # a throttled check (429 / 503 + Retry-After) is no refusal (issue 26 item 3)
    throttled = {**PROVIDERS, "checks": [{**PROVIDERS["checks"][0], "ok": False, "outcome": "throttled",
                                          "detail": "HTTP/1.1 429 Too Many Requests (retry after 120s)"}]}
    proc = run_preflight(templates, fake_gateway.server_port, {**GOOD, "providers": throttled})
    assert proc.returncode == 0 and "throttled the check of 10.0.1.5" in proc.stdout, proc.stderr
    unchecked = {**PROVIDERS, "checks": [{**PROVIDERS["checks"][0], "ok": None, "outcome": "unchecked"}]}
    assert run_preflight(templates, fake_gateway.server_port, {**GOOD, "providers": unchecked}).returncode == 1
    # a provider the step requires but the gateway does not check fails too (EXPECTED_PROVIDER)
    missing = run_preflight(templates, fake_gateway.server_port, GOOD, provider="vendor-x")
    assert missing.returncode == 1 and "does not check provider 'vendor-x'" in missing.stderr


def test_preflight_judges_a_standby_only_once_it_carries_traffic(templates, fake_gateway):
    """A standby member (issue 26) carries no job traffic: a provider refusing it does not fail
    the job's pre-flight -- unless the profile failed over to it."""
    standby = {"member": "10.0.1.7", "provider": "vendor-x", "ok": False, "outcome": "http_status",
               "detail": "HTTP/1.1 403 Forbidden", "role": "standby"}
    providers = {**PROVIDERS, "checks": [*PROVIDERS["checks"], standby]}
    spare = {**GOOD, "providers": providers, "egress": {"kind": "bind", "carrying": ["10.0.1.5", "10.0.1.6"]}}
    proc = run_preflight(templates, fake_gateway.server_port, spare)
    assert proc.returncode == 0, proc.stderr
    failed_over = {**spare, "egress": {"kind": "bind", "carrying": ["10.0.1.7"]}}
    proc = run_preflight(templates, fake_gateway.server_port, failed_over)
    assert proc.returncode == 1 and "refuses member 10.0.1.7" in proc.stderr, proc.stderr


def test_preflight_over_tls_to_the_proxy(templates, tmp_path):
    """https:// proxy URL: the pre-flight speaks TLS to the gateway and verifies it with PROXY_CA."""
    import ssl

    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    ca_path = tmp_path / "ca.crt"
    ca.cert_pem.write_to_path(str(ca_path))
    FakeGateway.seen = []
    server = http.server.HTTPServer(("127.0.0.1", 0), FakeGateway)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        proc = run_preflight(templates, server.server_port, GOOD, scheme="https", ca=str(ca_path))
        assert proc.returncode == 0, proc.stderr
        assert FakeGateway.seen[0][0] == "http://egressgate.whoami/"
        untrusted = run_preflight(templates, server.server_port, GOOD, scheme="https", ca="")
        assert untrusted.returncode != 0, "an unverified proxy certificate must fail the pre-flight"
    finally:
        server.shutdown()


def test_proxy_urls_are_https_by_default(params, templates):
    """Defect: credentials crossed the internet in clear text (http:// proxy URL to an external LB)."""
    assert params["proxy-scheme"] == "https"
    for name in ("collect-vendor-x", "collect-vendor-y"):
        args = templates[name]["container"]["args"]
        assert args[args.index("--proxy-cacert") + 1].startswith("/etc/egressgate-ca/")


def effective(wft, template):
    """The container/script spec as Argo runs it: templateDefaults.container applies to container
    templates only, never to script templates."""
    if "container" in template:
        merged = json.loads(json.dumps(wft["spec"]["templateDefaults"]["container"]))
        merged.update(template["container"])
        return merged
    return template["script"]


def test_every_step_is_hardened_for_restricted_pod_security(wft, templates):
    """Defect: the script step got none of templateDefaults.container (no allowPrivilegeEscalation,
    no dropped capabilities, no limits) and a `restricted` namespace rejected it."""
    steps = [t for t in templates.values() if "container" in t or "script" in t]
    assert any("script" in t for t in steps)
    for t in steps:
        spec = effective(wft, t)
        sc = spec.get("securityContext", {})
        assert sc.get("allowPrivilegeEscalation") is False, t["name"]
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], t["name"]
        assert sc.get("readOnlyRootFilesystem") is True, t["name"]
        limits = spec.get("resources", {}).get("limits", {})
        assert {"cpu", "memory"} <= set(limits), t["name"]
    assert wft["spec"]["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert wft["spec"]["securityContext"]["runAsNonRoot"] is True


def test_executor_rbac_for_workflowtaskresults():
    """Defects: Argo 3.4+ executors create/patch workflowtaskresults (the job SA had no Role); the
    token workflow ran as a service account nothing created or bound. Every shipped template's
    service account is created in its namespace and bound to the executor Role."""
    docs = load_docs(ARGO / "rbac.yaml")
    roles = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Role"}
    accounts = {(d["metadata"]["namespace"], d["metadata"]["name"]) for d in docs if d["kind"] == "ServiceAccount"}
    (binding,) = [d for d in docs if d["kind"] == "RoleBinding"]
    role = roles[binding["roleRef"]["name"]]
    assert binding["roleRef"]["kind"] == "Role"
    (rule,) = role["rules"]
    assert rule["apiGroups"] == ["argoproj.io"] and rule["resources"] == ["workflowtaskresults"]
    assert set(rule["verbs"]) == {"create", "patch"}
    bound = {(s["namespace"], s["name"]) for s in binding["subjects"] if s["kind"] == "ServiceAccount"}
    templates = sorted(ARGO.glob("workflowtemplate*.yaml"))
    assert len(templates) >= 2
    for path in templates:
        (t,) = load_docs(path)
        sa = (t["metadata"]["namespace"], t["spec"]["serviceAccountName"])
        assert sa in accounts, f"{path.name}: service account {sa} is not created"
        assert sa in bound, f"{path.name}: service account {sa} is not bound to the executor Role"
        assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == sa[0]
    kv = pytest.importorskip("kubernetes_validate")
    for doc in docs:
        kv.validate(doc, "1.33.0", strict=True)


def _shipped_providers() -> set[str]:
    """Provider names the shipped gateway configs define (egress.*.providers[].name)."""
    from conftest import K8S

    (cm,) = [d for d in load_docs(K8S / "configmap.yaml") if d["kind"] == "ConfigMap"]
    configs = [yaml.safe_load(cm["data"]["config.yaml"]), yaml.safe_load((ARGO.parent / "container-config.yaml").read_text())]
    return {p["name"] if isinstance(p, dict) else p
            for c in configs for prof in (c.get("egress") or {}).values() for p in (prof or {}).get("providers") or []}


def test_preflight_requires_only_providers_a_shipped_config_defines(templates):
    """Defect: the pre-flight asked for provider vendor-x, which no shipped config defines: it failed
    out of the box ("the gateway does not check provider 'vendor-x'")."""
    defined = _shipped_providers()
    for task in templates["main"]["dag"]["tasks"]:
        if task["template"] != "preflight":
            continue
        for p in task["arguments"]["parameters"]:
            if p["name"] == "provider":
                for name in filter(None, (x.strip() for x in p["value"].split(","))):
                    assert name in defined, f"{task['name']}: provider {name!r} is in no shipped config"
