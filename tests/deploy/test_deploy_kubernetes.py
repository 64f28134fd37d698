"""deploy/kubernetes: schema validation (kubernetes-validate, bundled schemas, strict) and the
security / availability properties the gateway relies on."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest
import yaml
from conftest import ARGO, DEPLOY, K8S, REPO, k8s_objects, load_docs

from tests import required

K8S_VERSION = "1.33.0"
NAMESPACE = "egressgate"


@pytest.fixture(scope="module")
def objs():
    return k8s_objects()


@pytest.fixture(scope="module")
def gateway_config(objs):
    return yaml.safe_load(objs[("ConfigMap", "egressgate-config")]["data"]["config.yaml"])


@pytest.fixture(scope="module")
def pod(objs):
    return objs[("Deployment", "egressgate")]["spec"]["template"]


@pytest.fixture(scope="module")
def container(pod):
    (c,) = pod["spec"]["containers"]
    return c


def all_manifest_files():
    files = [p for p in sorted(K8S.glob("*.yaml")) if p.name != "kustomization.yaml"]
    return files + [ARGO / "secrets.example.yaml"]


@pytest.mark.parametrize("path", all_manifest_files(), ids=lambda p: p.name)
def test_schema_valid_strict(path):
    kv = required.module("kubernetes_validate")
    for doc in load_docs(path):
        try:
            kv.validate(doc, K8S_VERSION, strict=True)
        except kv.ValidationError as err:  # pragma: no cover - the message is the point
            pytest.fail(f"{path.name}: {doc['kind']}/{doc['metadata']['name']}: {err}")


def test_kustomization_lists_every_manifest():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kust["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present
    assert kust["namespace"] == NAMESPACE
    assert any(img["name"] == "egressgate" for img in kust["images"])


def test_everything_in_the_gateway_namespace(objs):
    for (kind, name), obj in objs.items():
        if kind == "Namespace":
            continue
        assert obj["metadata"].get("namespace") == NAMESPACE, f"{kind}/{name}"


def test_probes(container, gateway_config):
    admin_port = int(gateway_config["admin"]["address"].rsplit(":", 1)[1])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["admin"] == admin_port
    proxy_port = int(gateway_config["listen"][0]["address"].rsplit(":", 1)[1])
    assert ports["proxy"] == proxy_port
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] in ("admin", admin_port)
    # admin must listen on all interfaces inside the pod or kubelet probes cannot reach it
    assert gateway_config["admin"]["address"].startswith("0.0.0.0:")


def test_grace_period_covers_prestop_plus_drain(pod, container, gateway_config):
    drain = float(gateway_config["drain"]["timeout"])
    pre_stop = container["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        sleep = float(pre_stop["sleep"]["seconds"])
    else:
        cmd = pre_stop["exec"]["command"]
        assert cmd[0].endswith("sleep"), cmd
        sleep = float(cmd[1])
    assert sleep >= 3, "preStop should give the Service endpoints time to drop the pod"
    assert pod["spec"]["terminationGracePeriodSeconds"] > drain + sleep


def test_resources_set(container):
    res = container["resources"]
    for key in ("cpu", "memory"):
        assert key in res["requests"] and key in res["limits"]


def test_pod_and_container_security(pod, container):
    psc = pod["spec"]["securityContext"]
    assert psc["runAsNonRoot"] is True
    assert psc["runAsUser"] >= 10000
    assert psc["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["spec"]["automountServiceAccountToken"] is False
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc.get("privileged", False) is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert not sc["capabilities"].get("add")
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod["spec"].get(key)


def test_uid_matches_the_image_user(pod):
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    user = re.findall(r"^USER\s+(\d+)", dockerfile, re.M)[-1]
    assert pod["spec"]["securityContext"]["runAsUser"] == int(user)


def secret_generator():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    (gen,) = [g for g in kust.get("secretGenerator", []) if g["name"] == "egressgate-client-passwords"]
    return {f.split("=", 1)[0]: f.split("=", 1)[1] for f in gen["files"]}


def test_base_ships_no_usable_credentials(objs):
    """Defect: `kustomize build` applied a Secret with the password REPLACE-... and the gateway took it.
    Now the Secret is generated from files the operator creates (gitignored): no Secret object with
    literal data in the base, and every generator file lives in secrets/, which holds none."""
    assert not [k for k in objs if k[0] == "Secret"], "the base must not contain a Secret with literal data"
    files = secret_generator()
    assert all(path.startswith("secrets/") for path in files.values())
    ignore = (K8S / "secrets" / ".gitignore").read_text().split()
    assert "*" in ignore
    tracked = subprocess.run(["git", "ls-files", "secrets"], capture_output=True, text=True, cwd=K8S).stdout
    assert tracked.split() in (["secrets/.gitignore"], []), f"credentials committed: {tracked}"


def test_mounts_match_config_paths(pod, container, gateway_config, objs):
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    args = container["args"]
    config_path = args[args.index("--config") + 1]
    config_dir, config_key = config_path.rsplit("/", 1)
    cfg_mount = [m for m in mounts.values() if m["mountPath"] == config_dir]
    assert cfg_mount and volumes[cfg_mount[0]["name"]]["configMap"]["name"] == "egressgate-config"
    assert config_key in objs[("ConfigMap", "egressgate-config")]["data"]
    secret_mounts = [m for m in mounts.values() if "secret" in volumes[m["name"]]]
    assert all(m.get("readOnly") for m in mounts.values() if m["mountPath"] != "/tmp")
    secret_name = volumes[secret_mounts[0]["name"]]["secret"]["secretName"]
    assert secret_name == "egressgate-client-passwords"  # kustomize rewrites it to the generated name
    keys = set(secret_generator())
    files = [c.get("password_file") for c in gateway_config["clients"]]
    files += [p.get("upstream_password_file") for p in gateway_config["egress"].values()]
    for pf in filter(None, files):
        directory, key = pf.rsplit("/", 1)
        assert directory == secret_mounts[0]["mountPath"], pf
        assert key in keys, f"the secretGenerator has no key {key} for {pf}"
    assert "tmp" in volumes and volumes["tmp"]["emptyDir"]["medium"] == "Memory"


def test_config_updates_reach_the_running_pod(pod, container, gateway_config):
    """A ConfigMap mounted with subPath is never updated in a running pod: the config is
    mounted as a directory, nothing else is mounted inside it (the kubelet swaps its ..data
    symlink), and the gateway watches the file (reload.watch, on by default)."""
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    config_mounts = [m for m in container["volumeMounts"] if "configMap" in volumes[m["name"]]]
    assert config_mounts and all("subPath" not in m and "subPathExpr" not in m for m in config_mounts)
    for cm in config_mounts:
        nested = [m["mountPath"] for m in container["volumeMounts"]
                  if m is not cm and m["mountPath"].startswith(cm["mountPath"].rstrip("/") + "/")]
        assert not nested, f"mounted inside the ConfigMap volume {cm['mountPath']}: {nested}"
    assert gateway_config.get("reload", {}).get("watch", True) is True


def test_config_has_no_plaintext_passwords(gateway_config):
    text = json.dumps(gateway_config)
    assert "password:" not in text and '"password"' not in text
    for client in gateway_config["clients"]:
        assert "password_file" in client or "password_hash" in client or "username" not in client


def test_surge_only_rollout(objs):
    strat = objs[("Deployment", "egressgate")]["spec"]["strategy"]
    assert strat["type"] == "RollingUpdate"
    assert strat["rollingUpdate"]["maxUnavailable"] == 0
    assert strat["rollingUpdate"]["maxSurge"] >= 1


def test_service_hpa_pdb_select_the_pods(objs, pod):
    labels = pod["metadata"]["labels"]
    deploy = objs[("Deployment", "egressgate")]
    assert deploy["spec"]["selector"]["matchLabels"].items() <= labels.items()
    svc = objs[("Service", "egressgate")]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert [p["port"] for p in svc["spec"]["ports"]] == [3128]  # the admin port is not published
    hpa = objs[("HorizontalPodAutoscaler", "egressgate")]
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "egressgate",
    }
    assert hpa["spec"]["minReplicas"] >= 2
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300
    pdb = objs[("PodDisruptionBudget", "egressgate")]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert 1 <= pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]


def test_network_policy_limits_who_reaches_the_gateway(objs, pod):
    netpol = objs[("NetworkPolicy", "egressgate")]["spec"]
    assert netpol["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert set(netpol["policyTypes"]) == {"Ingress", "Egress"}
    ports_by_rule = []
    for rule in netpol["ingress"]:
        assert rule.get("from"), "an ingress rule without `from` admits every peer"
        for peer in rule["from"]:
            assert "ipBlock" not in peer, "ingress by IP block is too broad inside a cluster"
            assert peer.get("namespaceSelector", {}).get("matchLabels"), "empty selector = every namespace"
        ports_by_rule.append({p["port"] for p in rule["ports"]})
    assert {3128} in ports_by_rule
    assert all(ports <= {3128, 9128} for ports in ports_by_rule)
    egress_blocks = [
        to["ipBlock"] for rule in netpol["egress"] for to in rule.get("to", []) if "ipBlock" in to
    ]
    for block in egress_blocks:
        if block["cidr"] == "0.0.0.0/0":
            assert {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16"} <= set(block["except"])


def test_namespace_enforces_restricted_pod_security(objs):
    ns = objs[("Namespace", NAMESPACE)]
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_configmap_config_is_valid(check_config, objs, container, pod, tmp_path):
    """check-config on the ConfigMap's config, with the Secret materialised where the pod mounts it
    (password_file is read at load time)."""
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    (mount,) = [m for m in container["volumeMounts"] if "secret" in volumes[m["name"]]]
    secret_dir = tmp_path / "secrets"
    secret_dir.mkdir()
    for key in secret_generator():  # what an operator creates: `openssl rand -hex 24 > secrets/KEY`
        (secret_dir / key).write_text(os.urandom(24).hex())
    text = objs[("ConfigMap", "egressgate-config")]["data"]["config.yaml"]
    assert mount["mountPath"] + "/" in text
    text = text.replace(mount["mountPath"] + "/", f"{secret_dir}/")
    proc = check_config(text)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # ... and the old placeholder secret is refused by check-config
    (secret_dir / "vendor-x").write_text("REPLACE-WITH-openssl-rand-hex-24")
    proc = check_config(text)
    assert proc.returncode == 1 and "placeholder" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_configmap_sets_the_probe(gateway_config):
    """Defect: probe.echo_url was never set, so expect_ip could never be checked."""
    assert gateway_config["probe"]["echo_url"].startswith("https://")
    assert any(p.get("expect_ip") for p in gateway_config["egress"].values())


def test_upstream_credentials_are_not_in_the_configmap(gateway_config):
    """Defect: a chained upstream's credentials could only be in its URL, i.e. in the ConfigMap."""
    from urllib.parse import urlsplit

    for name, profile in gateway_config["egress"].items():
        for url in profile.get("upstream", []):
            assert urlsplit(url).password is None, f"{name}: password in the ConfigMap"
            if urlsplit(url).username:
                assert profile.get("upstream_password_file") or profile.get("upstream_password_env"), name


def test_network_policy_allows_node_local_dns(objs):
    """Defect: NodeLocal DNSCache (169.254.20.10, host network) was blocked by the pod selector and
    by the 169.254.0.0/16 exception."""
    egress = objs[("NetworkPolicy", "egressgate")]["spec"]["egress"]
    dns_rules = [r for r in egress if {p["port"] for p in r.get("ports", [])} == {53}]
    assert dns_rules
    peers = [peer for r in dns_rules for peer in r["to"]]
    assert {"cidr": "169.254.20.10/32"} in [p.get("ipBlock") for p in peers]
    assert any(p.get("podSelector", {}).get("matchLabels") == {"k8s-app": "kube-dns"} for p in peers)
    assert {(p["protocol"], p["port"]) for r in dns_rules for p in r["ports"]} == {("UDP", 53), ("TCP", 53)}


def test_network_policy_admits_the_scrapers(objs):
    ingress = objs[("NetworkPolicy", "egressgate")]["spec"]["ingress"]
    admin = [r for r in ingress if {p["port"] for p in r["ports"]} == {9128}]
    namespaces = {peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
                  for r in admin for peer in r["from"]}
    assert {"gmp-system", "monitoring"} <= namespaces


def test_pod_and_service_monitors():
    pm = load_docs(K8S / "monitoring" / "podmonitoring.yaml")[0]
    assert pm["kind"] == "PodMonitoring" and pm["apiVersion"] == "monitoring.googleapis.com/v1"
    assert pm["metadata"]["name"] == "egressgate"  # GMP's job label = this name = the alerts' job
    assert pm["spec"]["endpoints"][0]["port"] == "admin" and pm["spec"]["endpoints"][0]["path"] == "/metrics"
    docs = {d["kind"]: d for d in load_docs(K8S / "monitoring" / "servicemonitor.yaml")}
    sm, svc = docs["ServiceMonitor"], docs["Service"]
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert svc["metadata"]["labels"][sm["spec"]["jobLabel"]] == "egressgate"
    assert [p["port"] for p in svc["spec"]["ports"]] == [9128]
    kv = pytest.importorskip("kubernetes_validate")
    kv.validate(svc, K8S_VERSION, strict=True)


def test_hpa_uses_only_metrics_that_need_no_adapter(objs):
    """Defect: a Pods metric served by a custom-metrics adapter that is neither shipped nor
    documented; with one metric unavailable the HPA never scales down. CPU only (decision:
    docs/deploy-kubernetes.md, "Autoscaling")."""
    hpa = objs[("HorizontalPodAutoscaler", "egressgate")]["spec"]
    assert hpa["metrics"] and all(m["type"] == "Resource" for m in hpa["metrics"]), hpa["metrics"]
    assert hpa["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300
    doc = (REPO / "docs" / "deploy-kubernetes.md").read_text()
    assert "### Autoscaling" in doc and "custom-metrics adapter" in doc


def test_runbook_config_paths_match_the_deployment_and_the_image(container):
    """Defect: the runbooks said /etc/egressgate/config.yaml, the Deployment mounts
    /etc/egressgate/config/config.yaml. The runbook's CONFIG names each install's real path."""
    ops = (REPO / "docs" / "operations.md").read_text()
    m = re.search(r"`CONFIG` stands for .*?`(/[^`]+)` in the Kubernetes Deployment.*?`(/[^`]+)` in the container\s+image",
                  ops, re.S)
    assert m, "docs/operations.md: the CONFIG definition is gone"
    k8s_path, image_path = m.groups()
    args = container["args"]
    assert args[args.index("--config") + 1] == k8s_path
    assert any(k8s_path.startswith(v["mountPath"] + "/") for v in container["volumeMounts"])
    assert f'"--config", "{image_path}"' in (REPO / "deploy" / "Dockerfile").read_text()
    for line in ops.splitlines():  # every egressgate command in the runbook uses $CONFIG
        for cmd in re.findall(r"`(egressgate (?:probe|check-config|verify|explain)[^`]*)`", line):
            assert "/etc/egressgate" not in cmd, cmd


def test_kubernetes_doc_says_what_readiness_any_does():
    doc = (REPO / "docs" / "deploy-kubernetes.md").read_text()
    assert "reports not-ready and receives no traffic" not in doc
    assert "probe.readiness: any" in doc
