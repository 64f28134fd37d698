"""deploy/terraform/gcp parsed with python-hcl2 (no terraform binary is available offline) and its
invariants asserted; its templates rendered and the boot-time config renderer executed."""

from __future__ import annotations

import ipaddress
import re
import subprocess

import pytest
import yaml
from conftest import TF, first_block, load_tf_module, render_tftpl, template_variables, walk_keys

from tests import required

LB_HC_RANGES = {"35.191.0.0/16", "209.85.152.0/22", "209.85.204.0/22"}  # external passthrough NLB
AUTOHEAL_HC_RANGES = {"35.191.0.0/16", "130.211.0.0/22"}  # health checks not tied to an LB
SA_ROLES = {"roles/logging.logWriter", "roles/monitoring.metricWriter", "roles/artifactregistry.reader"}

# Removed/deprecated/legacy things that must not come back.
FORBIDDEN_RESOURCE_TYPES = {
    "google_compute_target_pool",  # legacy target-pool NLB
    "google_compute_http_health_check",  # legacy health check
    "google_compute_https_health_check",
    "google_container_registry",  # Container Registry is shut down
    "google_project_iam_binding",  # authoritative IAM: lock-out risk
    "google_project_iam_policy",
    "google_compute_instance",  # single VMs: use the MIG
}
FORBIDDEN_KEYS = {"access_config", "gce-container-declaration", "enable_flow_logs", "metadata_startup_script"}


@pytest.fixture(scope="module")
def tf():
    return load_tf_module()


def res(tf, rtype, name=None):
    assert rtype in tf["resource"], f"no {rtype}"
    by_name = tf["resource"][rtype]
    if name is None:
        assert len(by_name) == 1, f"{rtype}: expected one, got {list(by_name)}"
        return next(iter(by_name.values()))
    return by_name[name]


def local_list(tf, ref):
    m = re.fullmatch(r"\$\{local\.([a-z_]+)\}", ref)
    assert m, f"expected a reference to a local, got {ref!r}"
    value = tf["locals"][m.group(1)]
    assert isinstance(value, list)
    return value


def test_required_resources_exist(tf):
    for rtype in (
        "google_compute_network",
        "google_compute_subnetwork",
        "google_compute_router",
        "google_compute_router_nat",
        "google_compute_address",
        "google_compute_instance_template",
        "google_compute_region_instance_group_manager",
        "google_compute_region_health_check",
        "google_compute_region_backend_service",
        "google_compute_forwarding_rule",
        "google_compute_firewall",
        "google_service_account",
    ):
        assert rtype in tf["resource"], rtype


def test_no_forbidden_resources_or_arguments(tf):
    assert not FORBIDDEN_RESOURCE_TYPES & set(tf["resource"])
    keys = set(walk_keys(tf["resource"]))
    assert not FORBIDDEN_KEYS & keys, FORBIDDEN_KEYS & keys
    for path in list(TF.glob("templates/*")) + list(TF.glob("files/*")):
        code = [ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")]
        assert not [ln for ln in code if "gce-container-declaration" in ln], path


def test_custom_vpc_and_subnet(tf):
    net = res(tf, "google_compute_network")
    assert net["auto_create_subnetworks"] is False
    sub = res(tf, "google_compute_subnetwork")
    assert sub["private_ip_google_access"] is True
    assert first_block(sub, "log_config")
    (dyn,) = sub["dynamic"]
    assert dyn["secondary_ip_range"]["for_each"] == "${var.egress_profiles}"


def test_nat_is_manual_only_per_profile_on_secondary_ranges(tf):
    nat = res(tf, "google_compute_router_nat")
    assert nat["for_each"] == "${var.egress_profiles}", "one NAT gateway per egress profile"
    assert nat["nat_ip_allocate_option"] == "MANUAL_ONLY"
    assert nat["source_subnetwork_ip_ranges_to_nat"] == "LIST_OF_SUBNETWORKS"
    assert "google_compute_address.nat[n].self_link" in nat["nat_ips"]
    assert "each.value.nat_ip_names" in nat["nat_ips"]
    assert "each.value.draining_nat_ip_names" in nat["drain_nat_ips"]
    assert "reserved" not in nat["nat_ips"] + nat["drain_nat_ips"], "reserved IPs must not carry traffic"
    sn = first_block(nat, "subnetwork")
    assert sn["source_ip_ranges_to_nat"] == ["LIST_OF_SECONDARY_IP_RANGES"]
    assert sn["secondary_ip_range_names"] == ["${local.secondary_range_name[each.key]}"]
    # same naming for the subnet range and the VM alias range
    sub = res(tf, "google_compute_subnetwork")
    assert (
        sub["dynamic"][0]["secondary_ip_range"]["content"][0]["range_name"]
        == "${local.secondary_range_name[secondary_ip_range.key]}"
    )


def test_nat_addresses_keyed_and_create_before_destroy(tf):
    addr = res(tf, "google_compute_address", "nat")
    assert "for_each" in addr and "count" not in addr
    assert first_block(addr, "lifecycle")["create_before_destroy"] is True
    assert addr["address_type"] == "EXTERNAL"


def test_instance_template_hardening(tf):
    it = res(tf, "google_compute_instance_template")
    assert it["can_ip_forward"] is False
    assert "cos-cloud/" in tf["variable"]["cos_image"]["default"]
    assert it["disk"][0]["source_image"] == "${var.cos_image}"
    nic = first_block(it, "network_interface")
    assert "access_config" not in nic, "the VMs must not get an external IP"
    alias = nic["dynamic"][0]["alias_ip_range"]
    assert alias["for_each"] == "${var.egress_profiles}"
    assert alias["content"][0]["ip_cidr_range"] == "/32"
    shielded = first_block(it, "shielded_instance_config")
    assert shielded["enable_secure_boot"] is True
    assert shielded["enable_vtpm"] is True and shielded["enable_integrity_monitoring"] is True
    md = it["metadata"]
    assert md["enable-oslogin"] == "TRUE"
    assert md["block-project-ssh-keys"] == "TRUE"
    assert md["serial-port-enable"] == "FALSE"
    assert md["user-data"] == "${local.cloud_init}"
    assert "gce-container-declaration" not in md
    sa = first_block(it, "service_account")
    assert sa["email"] == "${google_service_account.gateway.email}"
    assert sa["scopes"] == ["cloud-platform"]


def test_service_account_has_exactly_three_roles(tf):
    roles = set()
    for rtype, by_name in tf["resource"].items():
        if "iam" not in rtype:
            continue
        assert rtype.endswith("_iam_member"), f"{rtype}: use additive *_iam_member"
        for body in by_name.values():
            assert body["member"] == "serviceAccount:${google_service_account.gateway.email}"
            if body["role"] == "${each.value}":
                m = re.fullmatch(r"\$\{toset\(local\.([a-z_]+)\)\}", body["for_each"])
                roles.update(tf["locals"][m.group(1)])
            else:
                roles.add(body["role"])
    assert roles == SA_ROLES
    ar = res(tf, "google_artifact_registry_repository_iam_member")
    assert ar["role"] == "roles/artifactregistry.reader"
    assert ar["repository"] == "${var.artifact_registry_repository}", (
        "reader on one repository, not the project"
    )


def test_firewall_rules(tf):
    fws = tf["resource"]["google_compute_firewall"]
    allow_rules = {n: b for n, b in fws.items() if "allow" in b}
    for name, body in fws.items():
        assert body["direction"] == "INGRESS", name
        assert body["network"] == "${google_compute_network.gateway.id}"
    for name, body in allow_rules.items():
        assert body["target_service_accounts"] == ["${google_service_account.gateway.email}"], name
        assert "0.0.0.0/0" not in str(body["source_ranges"]), f"{name} opens to the world"
        assert all(a["protocol"] == "tcp" for a in body["allow"]), name
    clients = allow_rules["clients"]
    assert clients["source_ranges"] == "${var.client_cidrs}"
    assert clients["allow"][0]["ports"] == ["${tostring(local.proxy_port)}"]
    assert set(local_list(tf, allow_rules["lb_health_checks"]["source_ranges"])) == LB_HC_RANGES
    assert (
        set(local_list(tf, allow_rules["autohealing_health_checks"]["source_ranges"])) == AUTOHEAL_HC_RANGES
    )
    for hc in ("lb_health_checks", "autohealing_health_checks"):
        assert allow_rules[hc]["allow"][0]["ports"] == ["${tostring(local.admin_port)}"]
    # anything else must be optional and off by default
    for name in set(allow_rules) - {"clients", "lb_health_checks", "autohealing_health_checks"}:
        cond = allow_rules[name].get("count", "")
        m = re.search(r"var\.([a-z_]+)", cond)
        assert m and tf["variable"][m.group(1)]["default"] is False, f"{name} must be opt-in"
    deny = [b for b in fws.values() if "deny" in b]
    assert deny and deny[0]["source_ranges"] == ["0.0.0.0/0"] and deny[0]["deny"][0]["protocol"] == "all"
    assert tf["locals"]["proxy_port"] == 3128 and tf["locals"]["admin_port"] == 9128


def test_load_balancer_and_health_checks(tf):
    hc = res(tf, "google_compute_region_health_check")
    http = first_block(hc, "http_health_check")
    assert http["request_path"] == "/readyz"
    assert http["port"] == "${local.admin_port}"
    bes = res(tf, "google_compute_region_backend_service")
    assert bes["load_balancing_scheme"] == "EXTERNAL" and bes["protocol"] == "TCP"
    assert bes["health_checks"] == ["${google_compute_region_health_check.ready.id}"]
    assert first_block(bes, "backend")["balancing_mode"] == "CONNECTION"
    assert "drain_timeout_sec" in bes["connection_draining_timeout_sec"]
    fr = res(tf, "google_compute_forwarding_rule")
    assert fr["load_balancing_scheme"] == "EXTERNAL" and fr["ip_protocol"] == "TCP"
    assert fr["ports"] == ["${tostring(local.proxy_port)}"]
    assert fr["ip_address"] == "${google_compute_address.lb.address}"
    assert fr["backend_service"] == "${google_compute_region_backend_service.gateway.id}"
    assert not {"port_range", "all_ports", "target"} & set(fr)


def test_mig_autohealing_and_surge_only_updates(tf):
    mig = res(tf, "google_compute_region_instance_group_manager")
    heal = first_block(mig, "auto_healing_policies")
    assert heal["health_check"] == "${google_compute_health_check.live.id}"
    live = res(tf, "google_compute_health_check", "live")
    assert first_block(live, "http_health_check")["request_path"] == "/healthz"
    up = first_block(mig, "update_policy")
    assert up["max_unavailable_fixed"] == 0
    assert up["type"] == "PROACTIVE" and up["minimal_action"] == "REPLACE"
    assert up["max_surge_fixed"] == "${local.max_surge}"
    assert tf["locals"]["max_surge"] == "${max(3, length(var.zones))}"  # >= zones, as regional MIGs require
    assert (
        first_block(mig, "version")["instance_template"] == "${google_compute_instance_template.gateway.id}"
    )


def test_variables_documented_typed_and_validated(tf):
    variables = tf["variable"]
    for name, body in variables.items():
        assert body.get("description"), f"variable {name} has no description"
        assert body.get("type"), f"variable {name} has no type"
    must_validate = {
        "project_id",
        "region",
        "egress_profiles",
        "client_cidrs",
        "clients",
        "image",
        "instance_count",
        "drain_timeout_sec",
        "nat_min_ports_per_vm",
        "subnet_cidr",
        "name_prefix",
    }
    missing = {n for n in must_validate if not variables[n].get("validation")}
    assert not missing, f"variables without validation: {missing}"


def test_example_tfvars_sets_every_required_variable(tf):
    hcl2 = required.module("hcl2")
    from conftest import unquote

    example = unquote(hcl2.load((TF / "terraform.tfvars.example").open()))
    example = {k: v for k, v in example.items() if not k.startswith("__")}
    needed = {n for n, b in tf["variable"].items() if "default" not in b}
    assert needed <= set(example), f"example misses {needed - set(example)}"
    assert set(example) <= set(tf["variable"]), f"unknown variables {set(example) - set(tf['variable'])}"
    assert example["default_profile"] in example["egress_profiles"]
    for c in example["clients"]:
        assert set(c["egress"]) <= set(example["egress_profiles"])
    for cidr in example["client_cidrs"]:
        assert ipaddress.ip_network(cidr).prefixlen == 32


def test_expect_ip_covers_every_address_of_the_profile(tf):
    egress = tf["locals"]["gateway_egress"]
    for field in ("p.nat_ip_names", "p.draining_nat_ip_names", "p.reserved_nat_ip_names"):
        assert field in egress, f"expect_ip must include {field} so an IP switch does not roll the VMs"
    assert "@ALIAS_IN:${p.secondary_cidr}@" in egress


def test_outputs(tf):
    outs = tf["output"]
    for name in ("lb_ip_address", "egress_ips_by_profile", "proxy_url", "reserved_egress_ips_by_profile"):
        assert name in outs and outs[name].get("description")
    assert "google_compute_address.lb.address" in outs["lb_ip_address"]["value"]
    assert "google_compute_address.nat[n].address" in outs["egress_ips_by_profile"]["value"]


def test_provider_pinned_to_google_6_or_7(tf):
    (block,) = tf["terraform"]
    google = block["required_providers"][0]["google"]
    assert google["source"] == "hashicorp/google"
    assert "< 8.0" in google["version"]


# ------------------------------------------------------------------------------ templates + boot

SAMPLE = {
    "default_profile": "vendor-x",
    "proxy_port": 3128,
    "admin_port": 9128,
    "drain_timeout": 30,
    "egress": {
        "vendor-x": {"bind": ["@ALIAS_IN:10.20.1.0/24@"], "expect_ip": ["203.0.113.10"]},
        "vendor-y": {"bind": ["@ALIAS_IN:10.20.2.0/24@"], "expect_ip": ["203.0.113.20", "203.0.113.21"]},
    },
    "clients": [
        {
            "name": "vendor-x-collector",
            "from": ["198.51.100.7/32"],
            "username": "vendor-x",
            "password_hash": "scrypt$placeholder",
            "egress": ["vendor-x"],
            "allow": ["*.vendor-x.com"],
        },
        {
            "name": "vendor-y-collector",
            "from": ["198.51.100.7/32"],
            "username": "vendor-y",
            "password_hash": "scrypt$placeholder",
            "egress": ["vendor-y"],
        },
    ],
    "connect_ports": [443],
}


def templatefile_keys(tf, local_name):
    """The variable names passed by `templatefile(..., {k = v, ...})` in a local."""
    expr = tf["locals"][local_name]
    assert expr.startswith("${templatefile(")
    return set(re.findall(r"[{,]\s*([a-z_]+)\s*=", expr.split(",", 1)[1]))


def test_templates_get_exactly_the_variables_they_use(tf):
    gw = (TF / "templates" / "egressgate.yaml.tftpl").read_text()
    ci = (TF / "templates" / "cloud-init.yaml.tftpl").read_text()
    assert template_variables(gw) == templatefile_keys(tf, "gateway_config") == set(SAMPLE)
    assert template_variables(ci) == templatefile_keys(tf, "cloud_init")


def render_gateway_config():
    return render_tftpl((TF / "templates" / "egressgate.yaml.tftpl").read_text(), SAMPLE)


def render_cloud_init():
    return render_tftpl(
        (TF / "templates" / "cloud-init.yaml.tftpl").read_text(),
        {
            "image": "europe-west1-docker.pkg.dev/p/egressgate/egressgate@sha256:" + "0" * 64,
            "registry_host": "europe-west1-docker.pkg.dev",
            "gateway_config": render_gateway_config(),
            "render_script": (TF / "files" / "render-config.sh").read_text(),
            "stop_timeout": 40,
            "systemd_stop_sec": 60,
        },
    )


def test_cloud_init_runs_the_container_hardened():
    text = render_cloud_init()
    assert text.startswith("#cloud-config\n")
    doc = yaml.safe_load(text)
    files = {f["path"]: f for f in doc["write_files"]}
    unit = files["/etc/systemd/system/egressgate.service"]["content"]
    (run,) = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    for flag in (
        "--read-only",
        "--cap-drop=ALL",
        "--security-opt=no-new-privileges",
        "--network=host",
        "--user=10001:10001",
        "--volume=/run/egressgate/config.yaml:/etc/egressgate/config.yaml:ro",
    ):
        assert flag in run, flag
    assert "--privileged" not in run and "--cap-add" not in run
    assert run.rstrip().endswith("@sha256:" + "0" * 64)
    assert "docker-credential-gcr configure-docker --registries europe-west1-docker.pkg.dev" in unit
    assert "render-config.sh /etc/egressgate/config.yaml.in /run/egressgate/config.yaml" in unit
    stop = re.search(r"docker stop --time=(\d+)", unit)
    assert stop and int(stop.group(1)) > SAMPLE["drain_timeout"], "docker stop must outwait the drain"
    assert int(re.search(r"TimeoutStopSec=(\d+)", unit).group(1)) > int(stop.group(1))
    assert "systemctl enable --now egressgate.service" in doc["runcmd"]
    # the embedded config and script survive the YAML round trip byte for byte
    assert files["/etc/egressgate/config.yaml.in"]["content"].rstrip("\n") == render_gateway_config().rstrip(
        "\n"
    )
    assert (
        files["/etc/egressgate/render-config.sh"]["content"]
        == (TF / "files" / "render-config.sh").read_text()
    )


def run_render(tmp_path, aliases):
    src = tmp_path / "config.yaml.in"
    src.write_text(render_gateway_config())
    dst = tmp_path / "config.yaml"
    proc = subprocess.run(
        ["bash", str(TF / "files" / "render-config.sh"), str(src), str(dst)],
        env={"PATH": "/usr/bin:/bin", "ALIAS_IPS": aliases, "EGRESSGATE_GID": str(__import__("os").getgid())},
        capture_output=True,
        text=True,
        timeout=30,
    )
    return proc, dst


def test_render_config_binds_each_profile_to_its_alias(tmp_path):
    proc, dst = run_render(tmp_path, '["10.20.2.17/32","10.20.1.5/32"]')  # metadata JSON, any order
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(dst.read_text())
    assert cfg["egress"]["vendor-x"]["bind"] == ["10.20.1.5"]
    assert cfg["egress"]["vendor-y"]["bind"] == ["10.20.2.17"]
    assert cfg["egress"]["vendor-y"]["expect_ip"] == ["203.0.113.20", "203.0.113.21"]
    assert cfg["listen"][0] == {"address": "0.0.0.0:3128", "egress": "vendor-x"}
    assert "@ALIAS_IN" not in dst.read_text()
    assert oct(dst.stat().st_mode & 0o777) == "0o640"


def test_render_config_fails_without_an_alias_in_range(tmp_path):
    proc, dst = run_render(tmp_path, "10.20.1.5/32\n10.99.0.1/32\n")  # nothing in 10.20.2.0/24
    assert proc.returncode == 1
    assert "10.20.2.0/24" in proc.stderr
    assert not dst.exists()


def test_rendered_gateway_config_is_valid(tmp_path, check_config):
    proc, dst = run_render(tmp_path, "10.20.1.5/32\n10.20.2.17/32\n")
    assert proc.returncode == 0, proc.stderr
    result = check_config(dst.read_text(), name="gcp-config.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
