"""The Argo examples' exit handlers, as shipped: each workflow names one (``onExit``), it runs when
the workflow ends, and its script -- run here with the env the template gives it (workflow
parameters, Secret keys, ``workflow.creationTimestamp``) against a real gateway -- stores the job's
signed receipt at the artifact's path: the password workflow one per client it used, the token
workflow its service account's (every pod: the handler runs in a pod of its own). Each stored
receipt verifies with the gateway's public key (``egressgate receipt verify``) and counts the job's
traffic since the workflow was created."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request

import requests
from conftest import ARGO, load_docs

from tests import required
from tests.integration.oidc import Signer
from tests.integration.peers import GatewayProcess, Origin, base_config

PASSWORDS = {"vendor-x": "0123456789abcdef0123", "vendor-y": "fedcba98765432100123"}


def _templates(doc) -> dict:
    return {t["name"]: t for t in doc["spec"]["templates"]}


def _run(tmpl: dict, subst, secrets: dict[str, str], receipt_file) -> subprocess.CompletedProcess:
    """The template's script with its env as Kubernetes would give it (``$(VAR)`` expanded)."""
    curl = required.tool("curl")
    env = {"PATH": os.path.dirname(curl) + os.pathsep + os.environ.get("PATH", "")}
    for e in tmpl["script"]["env"]:
        if "value" in e:
            env[e["name"]] = subst(e["value"])
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = secrets[ref["key"]]
    env = {k: re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], v) for k, v in env.items()}
    (artifact,) = tmpl["outputs"]["artifacts"]
    assert env["RECEIPT_FILE"] == artifact["path"]  # the script writes where the artifact is taken from
    mounts = {m["mountPath"] for m in tmpl["script"]["volumeMounts"]}
    assert os.path.dirname(artifact["path"]) in mounts  # a writable volume (the root file system is read-only)
    env["RECEIPT_FILE"] = str(receipt_file)
    return subprocess.run([shutil.which("sh"), "-c", tmpl["script"]["source"]], env=env, capture_output=True,
                          text=True, timeout=60)


def _public_key(gw) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(gw.admin + "/status", timeout=10) as resp:
        return json.load(resp)["receipts"]["public_key"]


def _verify(path, key) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "egressgate", "receipt", "verify", str(path), "--public-key", key],
                          capture_output=True, text=True, timeout=60)


def _creation_timestamp() -> str:
    """``{{workflow.creationTimestamp}}`` as Argo renders it (RFC 3339, whole seconds)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(time.time())))


def test_password_workflow_stores_each_clients_receipt(tmp_path):
    (wft,) = load_docs(ARGO / "workflowtemplate.yaml")
    templates = _templates(wft)
    handler = templates[wft["spec"]["onExit"]]
    steps = [s for group in handler["steps"] for s in group]
    assert {s["template"] for s in steps} == {"receipt"}
    secrets = {s["arguments"]["parameters"][0]["value"] for s in steps}
    assert secrets == {"egressgate-client-vendor-x", "egressgate-client-vendor-y"}  # every client the DAG uses
    origin = Origin()
    pw = tmp_path / "pw"
    pw.mkdir()
    for name, secret in PASSWORDS.items():
        (pw / name).write_text(secret)
    gw = GatewayProcess(base_config(
        security={"allow_private": ["127.0.0.0/8"]},
        clients=[{"name": name, "from": ["127.0.0.0/8"], "username": name, "password_file": str(pw / name)}
                 for name in PASSWORDS]), tmp_path)
    try:
        created = _creation_timestamp()
        for _ in range(3):
            r = requests.get(origin.url("/collect"), timeout=10,
                             proxies={"http": f"http://vendor-x:{PASSWORDS['vendor-x']}@{gw.address}"})
            assert r.status_code == 200
        params = {p["name"]: p.get("value") for p in wft["spec"]["arguments"]["parameters"]}
        params.update({"proxy-scheme": "http", "proxy-host": gw.address})
        key = _public_key(gw)
        for step in steps:
            secret = step["arguments"]["parameters"][0]["value"]
            user = secret.removeprefix("egressgate-client-")

            def subst(value: str, secret=secret) -> str:
                value = value.replace("{{inputs.parameters.secret}}", secret)
                value = value.replace("{{workflow.creationTimestamp}}", created)
                return re.sub(r"\{\{workflow\.parameters\.([\w-]+)\}\}", lambda m: params[m.group(1)], value)

            out = tmp_path / f"{step['name']}.json"
            proc = _run(templates["receipt"], subst, {"username": user, "password": PASSWORDS[user]}, out)
            assert proc.returncode == 0, proc.stdout + proc.stderr
            assert _verify(out, key).returncode == 0
            receipt = json.loads(out.read_text())["receipt"]
            assert receipt["subject"]["client"] == user
            assert receipt["totals"]["requests"] == (3 if user == "vendor-x" else 0), receipt["totals"]
            # counted since the workflow's creation (from the start of the tally bucket holding it)
            assert receipt["window"]["since_iso"].removesuffix(".000Z") == created.removesuffix("Z")
            if user == "vendor-x":
                assert receipt["window"]["counted_from"] <= receipt["window"]["since"]
    finally:
        gw.kill()
        origin.close()


def test_token_workflow_stores_its_service_accounts_receipt(tmp_path):
    (wft,) = load_docs(ARGO / "workflowtemplate-token.yaml")
    templates = _templates(wft)
    handler = templates[wft["spec"]["onExit"]]
    signer = Signer("https://container.googleapis.com/v1/projects/p/locations/l/clusters/c")
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(signer.jwks()))
    ns, name = wft["metadata"]["namespace"], wft["spec"]["serviceAccountName"]
    params = {p["name"]: p["value"] for p in wft["spec"]["arguments"]["parameters"]}
    origin = Origin()
    gw = GatewayProcess(base_config(
        security={"allow_private": ["127.0.0.0/8"]},
        egress={"default": {"direct": {}}, params["profile"]: {"direct": {}}},
        clients=[{"name": "workload", "from": ["127.0.0.0/8"], "egress": ["default", params["profile"]],
                  "kubernetes": {"issuer": signer.url, "service_accounts": [f"{ns}/{name}"],
                                 "jwks_file": str(jwks)}}]), tmp_path)
    try:
        created = _creation_timestamp()
        collector = signer.mint(ns=ns, sa=name, pod="collect-pod")  # the collect step's pod
        for _ in range(2):
            r = requests.get(origin.url("/export"), timeout=10,
                             proxies={"http": f"http://k8s+{params['profile']}:{collector}@{gw.address}"})
            assert r.status_code == 200
        token = tmp_path / "token"  # the exit handler's pod: the same service account, another pod
        token.write_text(signer.mint(ns=ns, sa=name, pod="exit-handler-pod"))

        def subst(value: str) -> str:
            value = value.replace("{{workflow.creationTimestamp}}", created)
            value = value.replace("{{workflow.parameters.proxy-scheme}}", "http")
            return value.replace("{{workflow.parameters.proxy-host}}", gw.address)

        handler = {**handler, "script": {**handler["script"], "env": [
            {**e, "value": str(token)} if e["name"] == "TOKEN_FILE" else e for e in handler["script"]["env"]]}}
        out = tmp_path / "receipt.json"
        proc = _run(handler, subst, {}, out)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert _verify(out, _public_key(gw)).returncode == 0
        receipt = json.loads(out.read_text())["receipt"]
        assert receipt["subject"] == {"client": f"{ns}/{name}", "pod": None, "asked_by": "job"}
        assert [i["pod"] for i in receipt["identities"]] == ["collect-pod"]
        assert receipt["totals"]["requests"] == 2
    finally:
        gw.kill()
        origin.close()
