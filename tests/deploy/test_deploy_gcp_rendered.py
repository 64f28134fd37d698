"""What the GCP module really renders: terraform (the real binary, tf_standin.py) applies
terraform.tfvars.example, and the tests read the applied arguments - the alert policies' filters,
the instance template's user-data (cloud-init), its scripts and systemd units - and check them with
the real tools: YAML, `bash -n`, `shellcheck`, `systemd-analyze verify`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TF
from test_deploy_terraform_real import HASH, HASHES
from tf_standin import TERRAFORM, apply_and_show, standin_module, terraform, tf_env

from tests import required

# Labels of the monitored resource nat_gateway (Cloud Monitoring, "router.googleapis.com/nat/*").
NAT_GATEWAY_LABELS = {"project_id", "region", "router_id", "gateway_name"}
# Writable on Container-Optimized OS (the root file system is read-only).
COS_WRITABLE = ("/var/lib/", "/home/", "/run/", "/tmp/", "/mnt/stateful_partition/")


def apply_example(tmp: Path, extra: str = "") -> dict[str, dict]:
    """terraform.tfvars.example (+ ``extra`` tfvars) applied to the stand-in module."""
    required.tool(TERRAFORM, "install terraform 1.11 (/usr/local/bin/terraform)")
    tmp.mkdir(parents=True, exist_ok=True)
    env = tf_env(tmp)
    mod = standin_module(TF, tmp / "m")
    (mod / "terraform.tfvars").write_text((TF / "terraform.tfvars.example").read_text())
    (mod / "zz-test.auto.tfvars").write_text(HASHES + extra)
    for args in (["init", "-input=false", "-backend=false"], ["plan", "-input=false", "-lock=false", "-out=p"]):
        r = terraform(args, mod, env)
        assert r.returncode == 0, r.stdout + r.stderr
    return apply_and_show(mod, env, "p")


def gateway_config_of(applied: dict[str, dict]) -> str:
    """The gateway config the VMs get (config.yaml.in of the user-data)."""
    doc = yaml.safe_load(applied["google_compute_instance_template.gateway"]["metadata"]["user-data"])
    (text,) = [f["content"] for f in doc["write_files"] if f["path"] == "/etc/egressgate/config.yaml.in"]
    return text


@pytest.fixture(scope="module")
def applied(tmp_path_factory):
    return apply_example(tmp_path_factory.mktemp("tfapply"))


@pytest.fixture(scope="module")
def cloud_init(applied):
    return applied["google_compute_instance_template.gateway"]["metadata"]["user-data"]


@pytest.fixture(scope="module")
def files(cloud_init):
    doc = yaml.safe_load(cloud_init)
    return {f["path"]: f["content"] for f in doc["write_files"]}


def test_nat_alerts_filter_on_labels_that_exist(applied):
    nat_names = {v["name"] for k, v in applied.items() if k.startswith("google_compute_router_nat.")}
    assert len(nat_names) == 4  # one per member: the example has an active and a standby per profile
    policies = [v for k, v in applied.items() if k.startswith("google_monitoring_alert_policy.")]
    assert len(policies) == 2
    for p in policies:
        (f,) = [c["condition_threshold"][0]["filter"] for c in p["conditions"]]
        labels = set(re.findall(r"resource\.labels\.([a-z_]+)", f))
        assert labels <= NAT_GATEWAY_LABELS, f
        # router_id is the router's numeric id: the router's NAME there never matches anything.
        assert "router_id" not in labels, f
        m = re.search(r'resource\.labels\.gateway_name = one_of\(([^)]*)\)', f)
        assert m and set(re.findall(r'"([^"]+)"', m.group(1))) == nat_names, f
        assert 'resource.labels.region = "europe-west1"' in f


def test_cloud_init_is_valid_yaml(cloud_init):
    assert cloud_init.startswith("#cloud-config\n")
    doc = yaml.safe_load(cloud_init)
    assert set(doc) == {"write_files", "runcmd"}


def _units(files):
    return {Path(p).name: c for p, c in files.items() if p.startswith("/etc/systemd/system/")}


def test_every_unit_that_runs_docker_has_a_writable_home(files):
    """docker-credential-gcr writes $HOME/.docker/config.json; docker pulls with it."""
    units = _units(files)
    assert {"egressgate.service", "egressgate-metrics.service"} <= set(units)
    for name, text in units.items():
        if "docker" not in text:
            continue
        home = re.findall(r"^Environment=HOME=(\S+)$", text, re.M)
        assert home and home[0].startswith(COS_WRITABLE), f"{name}: no writable HOME"
        assert re.search(rf"^ExecStartPre=/bin/mkdir -p .*{re.escape(home[0])}", text, re.M), f"{name}: HOME not created"


def _scripts(files):
    return {p: c for p, c in files.items() if p.endswith(".sh")}


def test_scripts_pass_bash_n_and_shellcheck(files, tmp_path):
    shellcheck = required.tool("shellcheck", "apt-get install shellcheck (make test does)")
    scripts = _scripts(files)
    assert len(scripts) >= 3
    for path, text in scripts.items():
        f = tmp_path / Path(path).name
        f.write_text(text)
        r = subprocess.run(["bash", "-n", str(f)], capture_output=True, text=True)
        assert r.returncode == 0, f"{path}: {r.stderr}"
        r = subprocess.run([shellcheck, "--shell=bash", "--severity=style", str(f)], capture_output=True, text=True)
        assert r.returncode == 0, f"{path}:\n{r.stdout}"


def systemd_verify(units: dict[str, str], root: Path) -> list[str]:
    """`systemd-analyze verify` of each unit, with the programs it names present under ``root`` as
    stand-in executables (docker and docker-credential-gcr are COS's, not this machine's)."""
    analyze = required.tool("systemd-analyze", "apt-get install systemd")
    d = root / "etc" / "systemd" / "system"
    d.mkdir(parents=True, exist_ok=True)
    for name, text in units.items():
        (d / name).write_text(text)
        for exe in re.findall(r"^Exec\w+=[-@:+!]*(/\S+)", text, re.M):
            target = root / exe.lstrip("/")
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text("#!/bin/sh\nexit 0\n")
                target.chmod(0o755)
    failures = []
    for name in units:
        r = subprocess.run([analyze, "verify", f"--root={root}", "--man=no", "--recursive-errors=no", str(d / name)],
                           capture_output=True, text=True, timeout=60)
        if r.returncode != 0 or name in r.stdout + r.stderr:
            failures.append(f"{name}:\n{r.stdout}{r.stderr}")
    return failures


def test_systemd_units_pass_systemd_analyze_verify(files, tmp_path):
    assert not systemd_verify(_units(files), tmp_path / "root")


def test_systemd_verify_reports_a_bad_unit(files, tmp_path):
    units = _units(files)
    bad = units["egressgate-metrics.service"].replace("Restart=always", "Restart=sometimes")
    (failure,) = systemd_verify({"egressgate-metrics.service": bad}, tmp_path / "root")
    assert "restart specifier" in failure


def test_autohealing_watches_liveness_and_the_lb_readiness(applied):
    """Defect: autohealing used /readyz, which fails on every VM at once when the IP-echo service is
    down: the group re-created the whole fleet because of a third party's outage."""
    mig = applied["google_compute_region_instance_group_manager.gateway"]
    (policy,) = mig["auto_healing_policies"]
    autoheal = applied["google_compute_health_check.autoheal"]
    assert policy["health_check"] == "standin-google_compute_health_check-id"
    assert autoheal["http_health_check"][0]["request_path"] == "/healthz"
    ready = applied["google_compute_region_health_check.ready"]
    assert ready["http_health_check"][0]["request_path"] == "/readyz"
    backend = applied["google_compute_region_backend_service.gateway"]
    assert backend["health_checks"] == ["standin-google_compute_region_health_check-id"]


def test_the_rendered_config_has_several_echo_sources_and_a_grace(files):
    cfg = yaml.safe_load(files["/etc/egressgate/config.yaml.in"])
    assert cfg["probe"]["echo_url"] == ["https://api.ipify.org/", "https://checkip.amazonaws.com/"]
    assert cfg["probe"]["grace"] == 600


# Everything the gateway can do, through the module (issue 33): no fork of the template.
GATEWAY_CONFIG = """
gateway_config = {
  listen = [{ address = "0.0.0.0:1080", protocol = "socks5", egress = "vendor-y" }]
  admin  = { token_env = "EGRESSGATE_ADMIN_TOKEN" }
  egress = {
    vendor-x = {
      protect   = [{ name = "vendor-x-api", destinations = ["api.vendor-x.com"], max_concurrent = 20, max_per_second = 5 }]
      providers = [{ name = "vendor-x", url = "https://api.vendor-x.com/v1/ping", accept = ["200-399", 401], method = "HEAD" }]
      switch    = "immediate"
    }
  }
  clients = [{
    name = "report-job", from = ["198.51.100.8/32"], username = "report", password_hash = "{HASH}",
    egress = ["vendor-y"], deny = ["*.internal.example"], mode = "report", max_connections = 10
  }]
  probe   = { interval = "2m" }
  log     = { format = "squid" }
  workers = 2
}
# protect's limits are exact across workers, per instance without a store (check-config warns)
fleet_store = { url = "redis://10.9.8.7:6379" }
""".replace("{HASH}", HASH)


# One alias IP per slot range of the example's profiles (3 slots of /27 in each /24): what the
# metadata server lists for a VM.
VM_ALIASES = "10.20.1.5/32\n10.20.1.37/32\n10.20.1.69/32\n10.20.2.5/32\n10.20.2.37/32\n10.20.2.69/32\n"


def render_on_vm(applied: dict[str, dict], tmp: Path) -> str:
    """What files/render-config.sh (from the applied user-data) writes on a VM, from the applied
    project metadata item (the members) and the VM's alias IPs."""
    doc = yaml.safe_load(applied["google_compute_instance_template.gateway"]["metadata"]["user-data"])
    files = {f["path"]: f["content"] for f in doc["write_files"]}
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "render-config.sh").write_text(files["/etc/egressgate/render-config.sh"])
    (tmp / "config.yaml.in").write_text(files["/etc/egressgate/config.yaml.in"])
    item = applied["google_compute_project_metadata_item.members"]
    r = subprocess.run(["bash", str(tmp / "render-config.sh"), str(tmp / "config.yaml.in"), str(tmp / "out" / "config.yaml"),
                        item["key"]],
                       env={"PATH": "/usr/bin:/bin", "ALIAS_IPS": VM_ALIASES, "EGRESS_MEMBERS": item["value"],
                            "EGRESSGATE_GID": str(os.getgid())},
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return (tmp / "out" / "config.yaml").read_text()


def _check_config_offline_strict(text: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    """`egressgate check-config --offline --strict` on a rendered config, with the VM's alias IPs
    (10.20.x.y) standing for loopback addresses this machine has."""
    config = re.sub(r'"10\.20\.(\d)\.(\d+)"', lambda m: f'"127.0.{m.group(1)}.{m.group(2)}"', text)
    path = tmp / "config.yaml"
    path.write_text(config)
    return subprocess.run([sys.executable, "-m", "egressgate", "check-config", "--offline", "--strict", str(path)],
                          capture_output=True, text=True, timeout=60)


def test_the_example_renders_an_active_and_a_standby_member_per_profile(applied, tmp_path):
    """terraform.tfvars.example, applied, then rendered on a VM: every profile has an active member
    (bind) and a standby member, each its own alias IP, and expect_ip names both public IPs."""
    item = applied["google_compute_project_metadata_item.members"]
    assert item["key"] == "egressgate-egress-members"
    cfg = yaml.safe_load(render_on_vm(applied, tmp_path))
    for name in ("vendor-x", "vendor-y"):
        p = cfg["egress"][name]
        assert len(p["bind"]) == 1 and len(p["standby"]) == 1, p
        assert p["bind"] != p["standby"]
        assert len(p["expect_ip"]) == 2
    assert cfg["egress"]["vendor-x"]["bind"] == ["10.20.1.5"] and cfg["egress"]["vendor-x"]["standby"] == ["10.20.1.37"]


def test_gateway_config_passes_everything_through_and_check_config_accepts_it(tmp_path):
    applied = apply_example(tmp_path / "tf", GATEWAY_CONFIG)
    assert gateway_config_of(applied).count("@MEMBERS:vendor-x:") == 3  # the module's part stays
    text = render_on_vm(applied, tmp_path / "vm")
    cfg = yaml.safe_load(text)
    assert [entry.get("protocol") for entry in cfg["listen"]] == [None, "socks5"]
    x = cfg["egress"]["vendor-x"]
    assert x["bind"] == ["10.20.1.5"] and x["standby"] == ["10.20.1.37"] and len(x["expect_ip"]) == 2
    assert x["providers"][0]["name"] == "vendor-x" and x["protect"][0]["max_concurrent"] == 20
    assert [c["name"] for c in cfg["clients"]][-1] == "report-job"
    assert cfg["probe"]["interval"] == "2m" and cfg["probe"]["grace"] == 600  # merged key by key
    assert cfg["log"] == {"format": "squid"} and cfg["admin"]["address"] == "0.0.0.0:9128"
    assert cfg["workers"] == 2 and cfg["fleet"]["redis"] == {"url": "redis://10.9.8.7:6379"}
    r = _check_config_offline_strict(text, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    # without the fleet store the autoscaled group's limits are per VM: check-config says so
    alone = yaml.safe_load(text)
    del alone["fleet"]
    r = _check_config_offline_strict(yaml.safe_dump(alone), tmp_path)
    assert r.returncode == 1 and "egress.vendor-x.protect: warning: limits and holds are counted per instance" in r.stdout + r.stderr, \
        r.stdout + r.stderr
