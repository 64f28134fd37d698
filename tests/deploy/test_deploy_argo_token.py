"""deploy/argo/workflowtemplate-token.yaml: a job identified by its projected service-account
token. Valid against Argo's models; the token volume is audience-bound and short-lived; and the
step's own script, run here with a token minted by a loopback issuer's key, gets through a real
egressgate to a loopback origin (the proxy URL it builds is accepted)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from conftest import ARGO
from test_deploy_argo import assert_valid_workflow, workflow_fixture

from tests import required
from tests.integration.oidc import Signer
from tests.integration.peers import GatewayProcess, Origin, base_config

PATH = ARGO / "workflowtemplate-token.yaml"


wft = workflow_fixture(PATH)


@pytest.fixture(scope="module")
def step(wft):
    return next(t for t in wft["spec"]["templates"] if t["name"] == "collect")


def test_valid_against_argo_models(wft):
    assert_valid_workflow(wft)


def test_projected_token_for_the_gateway_audience(wft, step):
    (vol,) = [v for v in wft["spec"]["volumes"] if v["name"] == "egressgate-token"]
    (source,) = vol["projected"]["sources"]
    token = source["serviceAccountToken"]
    assert token["audience"] == "egressgate"
    assert token["expirationSeconds"] <= 3600  # short-lived: offline verification cannot see revocation
    mounts = {m["name"]: m for m in step["script"]["volumeMounts"]}
    env = {e["name"]: e.get("value") for e in step["script"]["env"]}
    assert env["TOKEN_FILE"] == f"{mounts['egressgate-token']['mountPath']}/{token['path']}"
    assert mounts["egressgate-token"]["readOnly"] is True
    assert wft["spec"]["serviceAccountName"] not in ("", "default")
    sc = step["script"]["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True


def test_the_step_script_gets_through_a_real_gateway(wft, step, tmp_path):
    curl = required.tool("curl")
    signer = Signer("https://container.googleapis.com/v1/projects/p/locations/l/clusters/c")
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(signer.jwks()))
    sa = f"{wft['metadata']['namespace']}/{wft['spec']['serviceAccountName']}"
    params = {p["name"]: p["value"] for p in wft["spec"]["arguments"]["parameters"]}
    origin = Origin()
    cfg = base_config(
        egress={"default": {"direct": {}}, params["profile"]: {"direct": {}}},
        clients=[{"name": "workload", "from": ["127.0.0.0/8"], "egress": ["default", params["profile"]],
                  "kubernetes": {"issuer": signer.url, "service_accounts": [sa], "jwks_file": str(jwks)}}])
    gw = GatewayProcess(cfg, tmp_path)
    try:
        token = tmp_path / "token"
        token.write_text(signer.mint(ns=sa.split("/")[0], sa=sa.split("/")[1]))
        env = {e["name"]: e["value"] for e in step["script"]["env"]}
        env = {k: v.replace("{{workflow.parameters.proxy-scheme}}", "http")
                   .replace("{{workflow.parameters.profile}}", params["profile"])
                   .replace("{{workflow.parameters.proxy-host}}", gw.address)
                   .replace("{{workflow.parameters.url}}", origin.url("/export"))
                   .replace("{{workflow.parameters.no-proxy}}", "") for k, v in env.items()}
        env.update(TOKEN_FILE=str(token), PROXY_CA=str(tmp_path / "no-ca.pem"),
                   PATH=os.path.dirname(curl) + os.pathsep + os.environ.get("PATH", ""))
        sh = shutil.which("sh")
        proc = subprocess.run([sh, "-c", step["script"]["source"]], env=env, capture_output=True, text=True,
                              timeout=30)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == "collect HTTP 200"
        rec = gw.wait_log(lambda r: r["target"].endswith("/export"))
        assert rec["client"] == sa and rec["profile"] == params["profile"]
    finally:
        gw.kill()
        origin.close()


