"""The shipped collect-with-egressgate WorkflowTemplate's pre-flight, AS SHIPPED (its script, its env
wiring and every pre-flight task's arguments from the DAG), against a real gateway that runs the
shipped ConfigMap's config (deploy/kubernetes/configmap.yaml). Only what cannot exist on this machine
is moved to loopback: listen/admin addresses, the secret files, the IP-echo service, the chained
proxy of vendor-y (a second real gateway), the clients' pod range and the documentation egress IPs
(both profiles leave from 127.0.0.1 here). The workload-identity client is covered by
test_deploy_argo_token.py (it needs a signer)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import yaml
from conftest import ARGO, K8S, load_docs

from tests.integration.peers import GatewayProcess, Origin, base_config, wait_for

PASSWORDS = {"vendor-x": "0123456789abcdef0123", "vendor-y": "fedcba98765432100123", "vendor-y-chain": "c0ffee00c0ffee00"}


def _shipped_config() -> dict:
    (cm,) = [d for d in load_docs(K8S / "configmap.yaml") if d["kind"] == "ConfigMap"]
    return yaml.safe_load(cm["data"]["config.yaml"])


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("argo-shipped")
    origin = Origin()
    secrets = tmp / "secrets"
    secrets.mkdir()
    for name, pw in PASSWORDS.items():
        (secrets / name).write_text(pw + "\n")
    (secrets / "upstream-vendor-y").write_text(PASSWORDS["vendor-y-chain"] + "\n")
    (secrets / "admin-token").write_text("admin-token-for-tests\n")
    # vendor-y's chained gateway (egress-b.example.net in the shipped config)
    chain = GatewayProcess(base_config(clients=[{"name": "chain", "from": ["127.0.0.0/8"], "username": "vendor-y-chain",
                                                 "password_file": str(secrets / "vendor-y-chain")}],
                                       security={"allow_private": ["127.0.0.0/8"], "connect_ports": [443, origin.port]}),
                           tmp)
    cfg = _shipped_config()
    text = yaml.safe_dump(cfg)
    text = text.replace("/etc/egressgate/secrets/", f"{secrets}/")
    text = text.replace("egress-b.example.net:3128", chain.address)
    text = re.sub(r"203\.0\.113\.\d+", "127.0.0.1", text)
    cfg = yaml.safe_load(text)
    cfg["listen"] = [{**cfg["listen"][0], "address": "127.0.0.1:0"}]
    cfg["admin"]["address"] = "127.0.0.1:0"
    cfg["probe"]["echo_url"] = origin.url("/ip")
    cfg["clients"] = [{**c, "from": ["127.0.0.0/8"]} for c in cfg["clients"] if "kubernetes" not in c]
    cfg["security"]["allow_private"] = ["127.0.0.0/8"]
    gw = GatewayProcess(cfg, tmp)
    yield gw
    gw.kill()
    chain.kill()
    origin.close()


@pytest.fixture(scope="module")
def wft():
    (doc,) = load_docs(ARGO / "workflowtemplate.yaml")
    return doc


def _run_preflight(wft, task, gw, expected_ip):
    params = {p["name"]: p.get("value") for p in wft["spec"]["arguments"]["parameters"]}
    params.update({"proxy-scheme": "http", "proxy-host": gw.address})
    tmpl = {t["name"]: t for t in wft["spec"]["templates"]}[task["template"]]
    inputs = {p["name"]: p.get("value", "") for p in tmpl["inputs"]["parameters"]}
    for a in task["arguments"]["parameters"]:
        inputs[a["name"]] = a["value"]
    params[f"{inputs['profile']}-expected-ip"] = expected_ip

    def subst(value: str) -> str:
        value = re.sub(r"\{\{workflow\.parameters\.([\w-]+)\}\}", lambda m: params[m.group(1)], value)
        return re.sub(r"\{\{inputs\.parameters\.([\w-]+)\}\}", lambda m: subst(inputs[m.group(1)]), value)

    env = {"PATH": os.environ.get("PATH", "")}
    for e in tmpl["script"]["env"]:
        if "value" in e:
            env[e["name"]] = subst(e["value"])
        else:  # secretKeyRef: the Secret the task names (secrets.example.yaml: username, password)
            ref = e["valueFrom"]["secretKeyRef"]
            user = subst(ref["name"]).removeprefix("egressgate-client-")
            env[e["name"]] = user if ref["key"] == "username" else PASSWORDS[user]
    # $(VAR) references between env entries are expanded by Kubernetes
    env = {k: re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], v) for k, v in env.items()}
    return subprocess.run([sys.executable, "-c", tmpl["script"]["source"]], env=env, capture_output=True,
                          text=True, timeout=60)


def _preflights(wft):
    main = {t["name"]: t for t in wft["spec"]["templates"]}["main"]
    tasks = [t for t in main["dag"]["tasks"] if t["template"] == "preflight"]
    assert len(tasks) == 2
    return tasks


def test_every_shipped_preflight_passes_against_the_shipped_config(wft, stack):
    for task in _preflights(wft):
        proc = _run_preflight(wft, task, stack, "127.0.0.1")
        assert proc.returncode == 0, f"{task['name']}: {proc.stdout}{proc.stderr}"
        assert "pre-flight ok" in proc.stdout


def test_every_shipped_preflight_fails_on_the_wrong_ip(wft, stack):
    for task in _preflights(wft):
        proc = _run_preflight(wft, task, stack, "198.51.100.99")
        assert proc.returncode == 1 and "PRE-FLIGHT FAILED" in proc.stderr, proc.stderr


def test_the_deployments_probes_answer_on_the_shipped_config(stack):
    """The Deployment's startup/liveness/readiness probes, as shipped, against the gateway running the
    shipped config: each path answers 200 on the admin port (every profile attested here)."""
    import urllib.error
    import urllib.request

    from conftest import k8s_objects

    dep = k8s_objects()[("Deployment", "egressgate")]
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    def status(path: str) -> int:
        try:
            with opener.open(stack.admin + path, timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = container[probe]["httpGet"]
        assert ports[get["port"]] == 9128  # the shipped config's admin port
        # (readiness waits for the first egress checks)
        wait_for(lambda get=get: status(get["path"]) == 200, f"{probe} {get['path']} answering 200")


def test_the_runbooks_config_commands_work_on_the_shipped_config(stack):
    """docs/operations.md's `egressgate probe --config $CONFIG --profile NAME` and
    `egressgate check-config $CONFIG`, as written, with CONFIG = the (loopback-adapted) shipped config."""
    ops = (ARGO.parent.parent / "docs" / "operations.md").read_text()
    commands = re.findall(r"`(egressgate (?:probe|check-config) [^`]*\$CONFIG[^`]*)`", ops)
    assert {c.split()[1] for c in commands} == {"probe", "check-config"}, commands
    env = {**os.environ, "CONFIG": str(stack.config_path), "NAME": "vendor-x"}
    env = {k: v for k, v in env.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    bindir = os.path.dirname(sys.executable)
    for cmd in commands:
        shell = f'PATH="{bindir}:$PATH"; ' + cmd.replace("NAME", "$NAME")
        proc = subprocess.run(["sh", "-c", shell], env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"{cmd}:\n{proc.stdout}{proc.stderr}"
