"""deploy/terraform/gcp parsed with python-hcl2 (no terraform binary is available offline) and its
invariants asserted; its templates rendered and the boot-time config renderer executed."""

from __future__ import annotations

import http.server
import ipaddress
import json
import os
import re
import subprocess
import threading

import pytest
import yaml
from conftest import TF, first_block, load_tf_module, template_variables, walk_keys

from tests import required

LB_HC_RANGES = {"35.191.0.0/16", "209.85.152.0/22", "209.85.204.0/22"}  # external passthrough NLB
INTERNAL_LB_HC_RANGES = {"35.191.0.0/16", "130.211.0.0/22"}  # internal passthrough NLB
AUTOHEAL_HC_RANGES = {"35.191.0.0/16", "130.211.0.0/22"}  # health checks not tied to an LB
SA_ROLES = {"roles/logging.logWriter", "roles/monitoring.metricWriter", "roles/artifactregistry.reader"}
TLS_ROLE = "roles/secretmanager.secretAccessor"  # only with var.tls from Secret Manager, per secret

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
    assert dyn["secondary_ip_range"]["for_each"] == "${local.slot_by_key}", "one secondary range per member slot"


def test_nat_is_manual_only_per_member_on_its_slot_range(tf):
    """Every member (active or standby) has its own NAT gateway with exactly its own static IP, on
    exactly its own slot range: a distinct, checkable source address."""
    nat = res(tf, "google_compute_router_nat")
    assert nat["for_each"] == "${local.members}", "one NAT gateway per profile member"
    assert nat["nat_ip_allocate_option"] == "MANUAL_ONLY"
    assert nat["source_subnetwork_ip_ranges_to_nat"] == "LIST_OF_SUBNETWORKS"
    assert nat["nat_ips"] == ["${google_compute_address.nat[each.key].self_link}"]
    assert "drain_nat_ips" not in nat, "an IP is never swapped under a member: members are switched instead"
    sn = first_block(nat, "subnetwork")
    assert sn["source_ip_ranges_to_nat"] == ["LIST_OF_SECONDARY_IP_RANGES"]
    assert sn["secondary_ip_range_names"] == ["${each.value.range_name}"]
    # same naming for the subnet range and the VM alias range
    sub = res(tf, "google_compute_subnetwork")
    assert sub["dynamic"][0]["secondary_ip_range"]["content"][0]["range_name"] == "${secondary_ip_range.value.range_name}"
    members = re.sub(r"\s+", " ", tf["locals"]["members"])
    assert "for m in p.active : m.ip =>" in members and "for m in p.standby : m.ip =>" in members


def test_membership_is_project_metadata_not_the_instance_template(tf):
    item = res(tf, "google_compute_project_metadata_item", "members")
    assert item["key"] == "${local.members_metadata_key}" and item["value"] == "${local.members_metadata}"
    it = res(tf, "google_compute_instance_template")
    assert "members" not in json.dumps(it["metadata"]), "membership in the template would roll the VMs"
    for name in ("cloud_init", "gateway_config_object", "gateway_egress"):
        assert not re.search(r"local\.members(?!_metadata_key)\b", tf["locals"][name]), name


def test_nat_addresses_keyed_and_create_before_destroy(tf):
    addr = res(tf, "google_compute_address", "nat")
    assert "for_each" in addr and "count" not in addr
    assert first_block(addr, "lifecycle")["create_before_destroy"] is True
    assert addr["address_type"] == "EXTERNAL"


def test_instance_template_hardening(tf):
    it = res(tf, "google_compute_instance_template")
    assert it["can_ip_forward"] is False
    # The image is resolved at plan time (data source) or pinned, never a family resolved at VM creation.
    assert it["disk"][0]["source_image"] == (
        "${var.cos_image != null ? var.cos_image : data.google_compute_image.cos[0].self_link}"
    )
    cos = tf["data"]["google_compute_image"]["cos"]
    assert cos["project"] == "cos-cloud" and cos["family"] == "${var.cos_image_family}"
    assert tf["variable"]["cos_image"]["default"] is None
    assert tf["variable"]["cos_image_family"]["default"].startswith("cos-")
    nic = first_block(it, "network_interface")
    assert "access_config" not in nic, "the VMs must not get an external IP"
    alias = nic["dynamic"][0]["alias_ip_range"]
    assert alias["for_each"] == "${local.slot_by_key}"
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
            if body["role"] == TLS_ROLE:
                assert rtype == "google_secret_manager_secret_iam_member", "secret-scoped only"
                assert body.get("for_each") == "${local.tls_secrets}" or (  # the TLS secrets, or the fleet
                    "google_secret_manager_secret.fleet_auth[0].secret_id" in body["secret_id"]  # store's AUTH
                    and "var.fleet_store.auth_secret" in body["secret_id"])
                continue
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
    assert allow_rules["lb_health_checks"]["source_ranges"] == "${local.lb_health_check_ranges}"
    assert tf["locals"]["lb_health_check_ranges"] == (
        "${local.internal_lb ? local.internal_lb_health_check_ranges : local.external_lb_health_check_ranges}"
    )
    assert set(tf["locals"]["external_lb_health_check_ranges"]) == LB_HC_RANGES
    assert set(tf["locals"]["internal_lb_health_check_ranges"]) == INTERNAL_LB_HC_RANGES
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
    assert bes["load_balancing_scheme"] == "${var.load_balancer_scheme}" and bes["protocol"] == "TCP"
    assert bes["health_checks"] == ["${google_compute_region_health_check.ready.id}"]
    assert first_block(bes, "backend")["balancing_mode"] == "CONNECTION"
    assert bes["connection_draining_timeout_sec"] == "${var.drain_timeout_sec}"
    fr = res(tf, "google_compute_forwarding_rule")
    assert fr["load_balancing_scheme"] == "${var.load_balancer_scheme}" and fr["ip_protocol"] == "TCP"
    assert fr["ports"] == ["${tostring(local.proxy_port)}"]
    assert fr["ip_address"] == "${google_compute_address.lb.address}"
    assert fr["backend_service"] == "${google_compute_region_backend_service.gateway.id}"
    assert not {"port_range", "all_ports", "target"} & set(fr)


def test_mig_autohealing_and_surge_only_updates(tf):
    mig = res(tf, "google_compute_region_instance_group_manager")
    heal = first_block(mig, "auto_healing_policies")
    # Autohealing on liveness (issue 33, item 11): /readyz depends on outside IP-echo services, and
    # autohealing on it re-created the whole fleet when they were down. Readiness steers the LB only
    # (test_deploy_gcp_rendered.py::test_autohealing_watches_liveness_and_the_lb_readiness).
    assert heal["health_check"] == "${google_compute_health_check.autoheal.id}"
    heal_check = res(tf, "google_compute_health_check", "autoheal")
    assert first_block(heal_check, "http_health_check")["request_path"] == "/healthz"
    # slow enough that a short echo-service outage does not recreate VMs
    assert heal_check["unhealthy_threshold"] * heal_check["check_interval_sec"] >= 300
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
        "probe_echo_url",
        "load_balancer_scheme",
        "tls",
        "autoscaling",
        "cos_image",
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


def test_members_are_placeholders_in_the_template(tf):
    egress = re.sub(r"\s+", " ", tf["locals"]["gateway_egress"])
    for piece in ('bind = "@MEMBERS:${name}:active@"', 'standby = "@MEMBERS:${name}:standby@"',
                  'expect_ip = "@MEMBERS:${name}:ips@"'):
        assert piece in egress, piece


def test_outputs(tf):
    outs = tf["output"]
    for name in ("lb_ip_address", "egress_ips_by_profile", "proxy_url", "standby_egress_ips_by_profile",
                 "unassigned_egress_ips", "member_ranges"):
        assert name in outs and outs[name].get("description")
    assert "google_compute_address.lb.address" in outs["lb_ip_address"]["value"]
    assert "google_compute_address.nat[m.ip].address" in outs["egress_ips_by_profile"]["value"]


def test_provider_pinned_to_google(tf):
    """The version range itself is the schema test's (test_deploy_google_schema.py: both ends checked)."""
    (block,) = tf["terraform"]
    google = block["required_providers"][0]["google"]
    assert google["source"] == "hashicorp/google"
    assert "<" in google["version"] and ">=" in google["version"]


# ------------------------------------------------------------------------------ templates + boot

import gcp_module  # noqa: E402  (tests/deploy is on sys.path through conftest)

HASH = "scrypt$16384$8$1$+lEPnoX3MO3uhiHC3EDIlA==$g9k3kEzpdIM4G+w7RZLYX55Xf3qChYNlTntSyFdrzJA="
SAMPLE_VARS = {
    "project_id": "my-egress-project",
    "region": "europe-west1",
    "image": "europe-west1-docker.pkg.dev/my-egress-project/egressgate/egressgate@sha256:" + "0" * 64,
    "artifact_registry_repository": "egressgate",
    "egress_ips": ["vendor-x-a", "vendor-y-a", "vendor-y-b"],
    "egress_profiles": {
        "vendor-x": {"secondary_cidr": "10.20.1.0/24", "active": [{"ip": "vendor-x-a", "slot": 0}]},
        "vendor-y": {"secondary_cidr": "10.20.2.0/24", "active": [{"ip": "vendor-y-a", "slot": 0}],
                     "standby": [{"ip": "vendor-y-b", "slot": 1}]},
    },
    "default_profile": "vendor-x",
    "client_cidrs": ["198.51.100.7/32"],
    "clients": [
        {"name": "vendor-x-collector", "username": "vendor-x", "password_hash": HASH,
         "egress": ["vendor-x"], "allow": ["*.vendor-x.com"]},
        {"name": "vendor-y-collector", "username": "vendor-y", "password_hash": HASH, "egress": ["vendor-y"]},
    ],
}
SAMPLE_ADDRESSES = {"vendor-x-a": "203.0.113.10", "vendor-y-a": "203.0.113.20", "vendor-y-b": "203.0.113.21"}


def rendered(**overrides):
    return gcp_module.render({**SAMPLE_VARS, **overrides}, SAMPLE_ADDRESSES)


def templatefile_keys(tf, local_name):
    """The variable names passed by `templatefile(..., {k = v, ...})` in a local."""
    expr = tf["locals"][local_name]
    assert expr.startswith("${templatefile(")
    return set(re.findall(r"[{,]\s*([a-z_]+)\s*=", expr.split(",", 1)[1]))


def test_templates_get_exactly_the_variables_they_use(tf):
    r = rendered()
    for local_name, template in (("gateway_config", "egressgate.yaml.tftpl"), ("cloud_init", "cloud-init.yaml.tftpl"),
                                 ("firewall_script", "firewall.sh.tftpl"), ("collector_config", "otel-collector.yaml.tftpl")):
        used = template_variables((TF / "templates" / template).read_text())
        assert used == templatefile_keys(tf, local_name) == set(r.template_vars[local_name]), template


def test_mirror_matches_locals(tf):
    """tests/deploy/gcp_module.py mirrors locals.tf; the expressions it mirrors must not drift."""
    loc = tf["locals"]
    gw = loc["gateway_config"]
    assert re.sub(r"\s+", " ", gw) == '${templatefile("${path.module}/templates/egressgate.yaml.tftpl", {config = local.gateway_config_object})}'
    obj = re.sub(r"\s+", " ", loc["gateway_config_object"])
    for piece in ("listen = concat(local.gateway_listen, try(local.gateway_user.listen, []))",
                  "drain = merge({timeout = local.vm_stop_drain_sec}, try(local.gateway_user.drain, {}))",
                  "clients = concat(local.gateway_clients, try(local.gateway_user.clients, []))",
                  "security = merge({connect_ports = var.connect_ports}, try(local.gateway_user.security, {}))",
                  "echo_url = concat([var.probe_echo_url], var.probe_fallback_echo_urls)",
                  "grace = var.probe_grace"):
        assert re.sub(r"\s+", " ", piece) in obj, (piece, obj)
    assert re.sub(r"\s+", " ", loc["members_metadata"]) == (
        '${join("\\n", sort([for ip, m in local.members : "${m.profile} ${m.role} ${m.cidr} '
        '${google_compute_address.nat[ip].address}"]))}'), loc["members_metadata"]
    assert loc["slot_newbits"] == gcp_module.SLOT_NEWBITS
    assert "cidrsubnet(p.secondary_cidr, local.slot_newbits, i)" in loc["slots"]
    assert loc["members_metadata_key"] == "${var.name_prefix}-egress-members"
    fw = loc["firewall_script"]
    assert 'join(" ", var.client_cidrs)' in fw
    assert "distinct(concat(local.lb_health_check_ranges, local.autohealing_health_check_ranges))" in fw
    ci = re.sub(r"\s+", " ", loc["cloud_init"])
    for piece in ("stop_timeout = local.docker_stop_sec", "systemd_stop_sec = local.systemd_stop_sec",
                  'render_script = file("${path.module}/files/render-config.sh")',
                  'tls_script = file("${path.module}/files/fetch-tls.sh")', "firewall_script = local.firewall_script"):
        assert piece in ci, piece


def test_a_promotion_changes_only_the_members_metadata():
    """The rotation runbook's steps (add a standby, promote, release) must not change the instance
    template (no VM roll): only the project metadata the VMs watch."""
    y = SAMPLE_VARS["egress_profiles"]["vendor-y"]
    before = rendered()
    promoted = rendered(egress_profiles={**SAMPLE_VARS["egress_profiles"], "vendor-y": {
        **y, "active": [{"ip": "vendor-y-b", "slot": 1}], "standby": [{"ip": "vendor-y-a", "slot": 0}]}})
    released = rendered(egress_profiles={**SAMPLE_VARS["egress_profiles"], "vendor-y": {
        **y, "active": [{"ip": "vendor-y-b", "slot": 1}], "standby": []}})
    assert before.cloud_init == promoted.cloud_init == released.cloud_init
    assert before.members != promoted.members != released.members
    assert "vendor-y active 10.20.2.32/27 203.0.113.21" in promoted.members.splitlines()


def cloud_init_doc(r=None):
    r = r or rendered()
    text = r.cloud_init
    assert text.startswith("#cloud-config\n")
    doc = yaml.safe_load(text)
    return doc, {f["path"]: f for f in doc["write_files"]}


def test_cloud_init_runs_the_container_hardened():
    r = rendered()
    doc, files = cloud_init_doc(r)
    unit = files["/etc/systemd/system/egressgate.service"]["content"]
    (run,) = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    for flag in (
        "--read-only",
        "--cap-drop=ALL",
        "--security-opt=no-new-privileges",
        "--network=host",
        "--user=10001:10001",
        # the directory, not the file: a file bind mount keeps the old inode after a rename
        "--volume=/run/egressgate/conf:/etc/egressgate/conf:ro",
    ):
        assert flag in run, flag
    assert "--privileged" not in run and "--cap-add" not in run
    assert run.rstrip().endswith("@sha256:" + "0" * 64 + " serve --config /etc/egressgate/conf/config.yaml")
    assert "docker-credential-gcr configure-docker --registries europe-west1-docker.pkg.dev" in unit
    assert ("render-config.sh /etc/egressgate/config.yaml.in /run/egressgate/conf/config.yaml "
            "egressgate-egress-members") in unit
    assert "systemctl enable --now egressgate.service" in doc["runcmd"]
    watcher = files["/etc/systemd/system/egressgate-members.service"]["content"]
    assert ("render-config.sh --watch /etc/egressgate/config.yaml.in /run/egressgate/conf/config.yaml "
            "egressgate-egress-members") in watcher
    assert "systemctl enable --now egressgate-members.service" in doc["runcmd"]
    # the embedded config and scripts survive the YAML round trip byte for byte
    assert files["/etc/egressgate/config.yaml.in"]["content"].rstrip("\n") == r.gateway_config.rstrip("\n")
    for name in ("render-config.sh", "fetch-tls.sh"):
        assert files[f"/etc/egressgate/{name}"]["content"] == (TF / "files" / name).read_text()
    assert files["/etc/egressgate/firewall.sh"]["content"].rstrip("\n") == r.firewall_script.rstrip("\n")


def test_cloud_init_opens_the_host_firewall_before_the_service():
    """Defect: COS accepts only SSH; nothing opened the proxy and admin ports for --network=host."""
    r = rendered()
    _, files = cloud_init_doc(r)
    unit = files["/etc/systemd/system/egressgate.service"]["content"].splitlines()
    pre = [i for i, line in enumerate(unit) if line.startswith("ExecStartPre=")]
    fw = [i for i in pre if "/etc/egressgate/firewall.sh" in unit[i]]
    start = [i for i, line in enumerate(unit) if line.startswith("ExecStart=")]
    assert fw and fw[0] < start[0], "the firewall must be opened before every start (restarts reset nothing)"
    script = r.firewall_script
    assert "iptables-restore --wait 10 --noflush" in script
    assert 'proxy_sources="198.51.100.7/32"' in script
    assert 'admin_sources="35.191.0.0/16 209.85.152.0/22 209.85.204.0/22 130.211.0.0/22"' in script
    internal = rendered(load_balancer_scheme="INTERNAL").firewall_script
    assert 'admin_sources="35.191.0.0/16 130.211.0.0/22"' in internal


def test_firewall_script_is_idempotent_and_exact(tmp_path):
    """Run the rendered script twice in a scratch network namespace with COS's default INPUT chain."""
    from netns import unavailable_reason

    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    script = tmp_path / "firewall.sh"
    script.write_text(rendered().firewall_script)
    runner = (
        "iptables -w 5 -P INPUT DROP; iptables -w 5 -A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT;"
        f" iptables -w 5 -A INPUT -p tcp --dport 22 -j ACCEPT; bash {script} && bash {script} && iptables -w 5 -S"
    )
    proc = subprocess.run(["unshare", "--net", "sh", "-ec", runner], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines.count("-A INPUT -j EGRESSGATE") == 1
    chain = [ln for ln in lines if ln.startswith("-A EGRESSGATE")]
    assert chain == [
        "-A EGRESSGATE -i lo -p tcp -m tcp --dport 9128 -j ACCEPT",
        "-A EGRESSGATE -s 198.51.100.7/32 -p tcp -m tcp --dport 3128 -j ACCEPT",
        "-A EGRESSGATE -s 35.191.0.0/16 -p tcp -m tcp --dport 9128 -j ACCEPT",
        "-A EGRESSGATE -s 209.85.152.0/22 -p tcp -m tcp --dport 9128 -j ACCEPT",
        "-A EGRESSGATE -s 209.85.204.0/22 -p tcp -m tcp --dport 9128 -j ACCEPT",
        "-A EGRESSGATE -s 130.211.0.0/22 -p tcp -m tcp --dport 9128 -j ACCEPT",
    ]


def test_rendered_config_sets_the_probe(tf):
    """Defect: probe.echo_url was never rendered, so expect_ip could never be checked."""
    cfg = yaml.safe_load(rendered().gateway_config)
    assert cfg["probe"]["echo_url"] == tf["variable"]["probe_echo_url"]["default"]
    assert tf["variable"]["probe_echo_url"]["default"].startswith("https://")
    assert all(p["expect_ip"] for p in cfg["egress"].values())
    assert yaml.safe_load(rendered(probe_echo_url="http://echo.internal/").gateway_config)["probe"]["echo_url"] == (
        "http://echo.internal/")


def test_draining_numbers_are_consistent(tf):
    """Defect: the LB's draining ended before the VM was stopped, and TimeoutStopSec could exceed
    GCE's shutdown window. Now: the LB drains for drain_timeout_sec while the VM runs; then a short
    SIGTERM drain that fits inside GCE's ~90 s."""
    lc = gcp_module.module_locals()
    r = rendered()
    cfg = yaml.safe_load(r.gateway_config)
    assert cfg["drain"]["timeout"] == lc["vm_stop_drain_sec"]
    _, files = cloud_init_doc(r)
    unit = files["/etc/systemd/system/egressgate.service"]["content"]
    stop = int(re.search(r"docker stop --time=(\d+)", unit).group(1))
    assert int(re.search(r"--stop-timeout=(\d+)", unit).group(1)) == stop
    systemd = int(re.search(r"TimeoutStopSec=(\d+)", unit).group(1))
    assert lc["vm_stop_drain_sec"] < stop < systemd <= lc["gce_shutdown_limit"] == 90
    bes = res(tf, "google_compute_region_backend_service")
    assert bes["connection_draining_timeout_sec"] == "${var.drain_timeout_sec}"
    cond = tf["variable"]["drain_timeout_sec"]["validation"][0]["condition"]
    assert "<= 3600" in cond


def test_tls_listener_option():
    secret = rendered(tls={"cert_secret": "egressgate-tls-crt", "key_secret": "egressgate-tls-key"})
    cfg = yaml.safe_load(secret.gateway_config)
    assert cfg["listen"][0]["tls"] == {"cert": "/etc/egressgate/tls/tls.crt", "key": "/etc/egressgate/tls/tls.key"}
    _, files = cloud_init_doc(secret)
    unit = files["/etc/systemd/system/egressgate.service"]["content"]
    assert "fetch-tls.sh secret-manager egressgate-tls-crt egressgate-tls-key" in unit
    assert "--volume=/run/egressgate/tls:/etc/egressgate/tls:ro" in unit
    plain = yaml.safe_load(rendered().gateway_config)
    assert "tls" not in plain["listen"][0]


def test_fetch_tls_from_secret_manager_and_files(tmp_path):
    """fetch-tls.sh against loopback stubs of the metadata server and the Secret Manager API."""
    payload = {"egressgate-tls-crt": b"-----BEGIN CERTIFICATE-----\nX\n", "egressgate-tls-key": b"KEY\n"}
    seen = []

    class Stub(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            seen.append((self.path, self.headers.get("Metadata-Flavor"), self.headers.get("Authorization")))
            if self.path.endswith("/project/project-id"):
                body = b"my-egress-project"
            elif self.path.endswith("/service-accounts/default/token"):
                body = b'{"access_token":"ya29.tok","expires_in":3599,"token_type":"Bearer"}'
            else:
                name = self.path.split("/secrets/")[1].split("/")[0]
                import base64

                body = json.dumps({"name": name, "payload": {"data": base64.b64encode(payload[name]).decode()}},
                                  indent=2).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Stub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    env = {"PATH": "/usr/bin:/bin", "TLS_DIR": str(tmp_path / "tls"), "EGRESSGATE_GID": str(os.getgid()),
           "METADATA_URL": f"{base}/computeMetadata/v1", "SECRET_MANAGER_URL": base}
    try:
        proc = subprocess.run(["bash", str(TF / "files" / "fetch-tls.sh"), "secret-manager", "egressgate-tls-crt",
                               "projects/other/secrets/egressgate-tls-key"],
                              env=env, capture_output=True, text=True, timeout=60)
    finally:
        server.shutdown()
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "tls" / "tls.crt").read_bytes() == payload["egressgate-tls-crt"]
    assert (tmp_path / "tls" / "tls.key").read_bytes() == payload["egressgate-tls-key"]
    assert oct((tmp_path / "tls" / "tls.key").stat().st_mode & 0o777) == "0o640"
    paths = [p for p, _, _ in seen]
    assert "/v1/projects/my-egress-project/secrets/egressgate-tls-crt/versions/latest:access" in paths
    assert "/v1/projects/other/secrets/egressgate-tls-key/versions/latest:access" in paths
    assert all(auth == "Bearer ya29.tok" for p, _, auth in seen if "/secrets/" in p)
    assert all(flavor == "Google" for p, flavor, _ in seen if "computeMetadata" in p)


def test_internal_load_balancer_variant(tf):
    addr = res(tf, "google_compute_address", "lb")
    assert addr["address_type"] == "${var.load_balancer_scheme}"
    assert addr["subnetwork"] == "${local.internal_lb ? google_compute_subnetwork.gateway.id : null}"
    fr = res(tf, "google_compute_forwarding_rule")
    assert fr["subnetwork"] == "${local.internal_lb ? google_compute_subnetwork.gateway.id : null}"
    assert fr["network_tier"] == "${local.internal_lb ? null : \"PREMIUM\"}"
    assert tf["locals"]["internal_lb"] == '${var.load_balancer_scheme == "INTERNAL"}'
    out = tf["output"]["proxy_url"]["value"]
    assert "local.tls_enabled ? \"https\" : \"http\"" in out


def test_autoscaler_on_the_mig(tf):
    auto = res(tf, "google_compute_region_autoscaler")
    assert auto["target"] == "${google_compute_region_instance_group_manager.gateway.id}"
    policy = first_block(auto, "autoscaling_policy")
    assert first_block(policy, "cpu_utilization")["target"] == "${var.autoscaling.cpu_target}"
    mig = res(tf, "google_compute_region_instance_group_manager")
    assert mig["target_size"] == "${var.autoscaling == null ? var.instance_count : null}"
    nat = res(tf, "google_compute_router_nat")
    assert "local.max_instances" in first_block(nat, "lifecycle")["precondition"][0]["condition"]


def test_monitoring_path_on_gce(tf):
    """Defect: nothing shipped metrics off COS. A collector unit scrapes loopback and writes to
    Managed Service for Prometheus; Cloud NAT has alert policies."""
    r = rendered()
    _, files = cloud_init_doc(r)
    unit = files["/etc/systemd/system/egressgate-metrics.service"]["content"]
    assert "--network=host" in unit and "--read-only" in unit and "--cap-drop=ALL" in unit
    assert "europe-west1-docker.pkg.dev/my-egress-project/egressgate/opentelemetry-collector-contrib" in unit
    coll = yaml.safe_load(r.collector_config)
    (job,) = coll["receivers"]["prometheus"]["config"]["scrape_configs"]
    assert job["job_name"] == "egressgate"
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:9128"]
    assert job["relabel_configs"][0]["replacement"] == "${env:HOSTNAME}:9128"
    assert coll["exporters"]["googlemanagedprometheus"]["project"] == "my-egress-project"
    assert "lo" in r.firewall_script and "-i lo -p tcp --dport $admin_port" in r.firewall_script
    policies = tf["resource"]["google_monitoring_alert_policy"]
    filters = " ".join(p["conditions"][0]["condition_threshold"][0]["filter"] for p in policies.values())
    assert "router.googleapis.com/nat/dropped_sent_packets_count" in filters and "OUT_OF_RESOURCES" in filters
    assert "router.googleapis.com/nat/nat_allocation_failed" in filters


def run_render(tmp_path, aliases, config_text=None, members=None):
    src = tmp_path / "config.yaml.in"
    src.write_text(config_text or rendered().gateway_config)
    dst = tmp_path / "conf" / "config.yaml"
    proc = subprocess.run(
        ["bash", str(TF / "files" / "render-config.sh"), str(src), str(dst), "egressgate-egress-members"],
        env={"PATH": "/usr/bin:/bin", "ALIAS_IPS": aliases, "EGRESSGATE_GID": str(os.getgid()),
             "EGRESS_MEMBERS": rendered().members if members is None else members},
        capture_output=True,
        text=True,
        timeout=30,
    )
    return proc, dst


ALIASES = "10.20.1.5/32\n10.20.2.17/32\n10.20.2.40/32\n10.20.2.70/32\n"  # one per slot of vendor-y (3)


def test_render_config_binds_each_member_to_its_alias(tmp_path):
    proc, dst = run_render(tmp_path, '["10.20.2.40/32","10.20.1.5/32","10.20.2.17/32"]')  # metadata JSON, any order
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(dst.read_text())
    assert cfg["egress"]["vendor-x"]["bind"] == ["10.20.1.5"]
    assert cfg["egress"]["vendor-x"]["standby"] == []
    assert cfg["egress"]["vendor-y"]["bind"] == ["10.20.2.17"]  # slot 0: 10.20.2.0/27
    assert cfg["egress"]["vendor-y"]["standby"] == ["10.20.2.40"]  # slot 1: 10.20.2.32/27
    assert cfg["egress"]["vendor-y"]["expect_ip"] == ["203.0.113.20", "203.0.113.21"]
    assert cfg["listen"][0] == {"address": "0.0.0.0:3128", "egress": "vendor-x"}
    assert "@MEMBERS" not in dst.read_text()
    assert oct(dst.stat().st_mode & 0o777) == "0o640"


def test_render_config_fails_without_an_alias_in_a_members_slot(tmp_path):
    proc, dst = run_render(tmp_path, "10.20.1.5/32\n10.20.2.17/32\n10.99.0.1/32\n")  # nothing in slot 1 of vendor-y
    assert proc.returncode == 1
    assert "10.20.2.32/27" in proc.stderr
    assert not dst.exists()


@pytest.mark.parametrize("members,message", [
    ("vendor-x active 10.20.1.0/27 203.0.113.10\nvendor-y standby 10.20.2.0/27 203.0.113.20",
     "profile vendor-y has no active member"),
    ("vendor-x active 10.20.1.0/27 203.0.113.10\nvendor-y active 10.20.2.0/27 203.0.113.20\n"
     "vendor-z active 10.20.3.0/27 203.0.113.30", "profile vendor-z is not in"),
    ("vendor-x active 10.20.1.0/27 203.0.113.10\nvendor-y primary 10.20.2.0/27 203.0.113.20",
     "member line 2 is not"),
    ("vendor-x active 10.20.1.0/27 203.0.113.10\nvendor-y active 10.20.2.0/27 not-an-ip", "member line 2 is not"),
    ("", "profile vendor-"),
])
def test_render_config_refuses_a_bad_member_list_and_keeps_the_old_file(tmp_path, members, message):
    """The watcher validates before it replaces: a bad member list changes nothing."""
    proc, dst = run_render(tmp_path, ALIASES)
    assert proc.returncode == 0, proc.stderr
    good = dst.read_text()
    proc, dst = run_render(tmp_path, ALIASES, members=members)
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr
    assert dst.read_text() == good
    assert [p.name for p in dst.parent.iterdir()] == ["config.yaml"], "no temporary file left behind"


@pytest.mark.parametrize("variant", ["plain", "tls"])
def test_rendered_gateway_config_is_valid(tmp_path, check_config, variant):
    text = rendered().gateway_config
    if variant == "tls":
        trustme = pytest.importorskip("trustme")
        cert = trustme.CA().issue_cert("gateway.example.internal")
        cert.cert_chain_pems[0].write_to_path(str(tmp_path / "tls.crt"))
        cert.private_key_pem.write_to_path(str(tmp_path / "tls.key"))
        text = rendered(tls={"cert_secret": "c", "key_secret": "k"}).gateway_config
        text = text.replace("/etc/egressgate/tls/", f"{tmp_path}/")
    proc, dst = run_render(tmp_path, ALIASES, text)
    assert proc.returncode == 0, proc.stderr
    result = check_config(dst.read_text(), name="gcp-config.yaml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_workload_clients_render_a_kubernetes_block(tf, tmp_path, check_config):
    """kubernetes_issuer + workload_clients: token clients from the cluster issuer, audience egressgate."""
    loc = re.sub(r"\s+", " ", tf["locals"]["gateway_clients"])
    for piece in ("for c in var.workload_clients", "issuer = var.kubernetes_issuer", 'audiences = ["egressgate"]',
                  "service_accounts = c.service_accounts", "from = var.client_cidrs"):
        assert piece in loc, piece
    issuer = "https://container.googleapis.com/v1/projects/p/locations/europe-west1/clusters/jobs"
    text = rendered(kubernetes_issuer=issuer, workload_clients=[
        {"name": "vx-workload", "service_accounts": ["data-jobs/vendor-x-collector", "batch/*"],
         "egress": ["vendor-x"]}]).gateway_config
    proc, dst = run_render(tmp_path, ALIASES, text)
    assert proc.returncode == 0, proc.stderr
    config = yaml.safe_load(dst.read_text())
    (client,) = [c for c in config["clients"] if c["name"] == "vx-workload"]
    assert client["kubernetes"] == {"issuer": issuer, "audiences": ["egressgate"],
                                    "service_accounts": ["data-jobs/vendor-x-collector", "batch/*"]}
    result = check_config(dst.read_text(), name="gcp-config.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    pattern = tf_regex(tf, "workload_clients", "regex")
    assert pattern.match("data-jobs/vendor-x-collector") and pattern.match("batch/*")
    assert not pattern.match("vendor-x") and not pattern.match("Data/x")
    assert tf_regex(tf, "kubernetes_issuer", "regex").match(issuer)


# ------------------------------------------------------------------- variable validation (smaller)


def _validation(tf, var, needle):
    for v in tf["variable"][var]["validation"]:
        if needle in v["condition"]:
            return v["condition"]
    raise AssertionError(f"no validation of {var} mentions {needle}")


def tf_regex(tf, var, needle):
    """The regex of a `can(regex("...", ...))` validation, unescaped to a Python pattern."""
    cond = _validation(tf, var, needle)
    m = re.search(r'regex\("((?:[^"\\]|\\.)*)"', cond)
    return re.compile(m.group(1).replace("\\\\", "\\"))


def test_name_prefix_fits_the_service_account_id(tf):
    pattern = tf_regex(tf, "name_prefix", "regex")
    for prefix in ("egressgate", "egw1", "a" * 20):
        assert pattern.fullmatch(prefix), prefix
        assert 6 <= len(f"{prefix}-vm") <= 30
    for prefix in ("a", "ab", "abc", "eg-", "Egress", "a" * 21):
        assert not pattern.fullmatch(prefix), prefix


def test_password_hash_placeholders_are_refused(tf):
    """Defect: "scrypt$REPLACE-WITH-hash-password-OUTPUT" passed validation."""
    pattern = tf_regex(tf, "clients", "scrypt")
    assert pattern.fullmatch(HASH)
    proc = subprocess.run([os.environ.get("EGRESSGATE_BIN") or str(gcp_module.TF.parents[2] / ".venv/bin/egressgate"),
                           "hash-password", "--allow-short"], input="s3cret", capture_output=True, text=True, timeout=60)
    if proc.returncode == 0:
        assert pattern.fullmatch(proc.stdout.strip()), proc.stdout
    for bad in ("scrypt$REPLACE-WITH-hash-password-OUTPUT", "scrypt$placeholder", "changeme", ""):
        assert not pattern.fullmatch(bad), bad
    assert "replace|changeme|example|placeholder" in _validation(tf, "clients", "regexall")
    hcl2 = pytest.importorskip("hcl2")
    from conftest import unquote

    example = unquote(hcl2.load((TF / "terraform.tfvars.example").open()))
    assert all(not pattern.fullmatch(c["password_hash"]) for c in example["clients"]), (
        "the example must not carry a hash that validates (it would deploy as a real one)")


def _overlaps(a: str, b: str) -> bool:
    """The HCL formula of the secondary-range validation, in Python."""
    na, nb = ipaddress.ip_network(a, strict=False), ipaddress.ip_network(b, strict=False)
    p = min(na.prefixlen, nb.prefixlen)
    return ipaddress.ip_network(f"{na.network_address}/{p}", strict=False) == ipaddress.ip_network(
        f"{nb.network_address}/{p}", strict=False)


def test_overlapping_ranges_are_refused(tf):
    cond = _validation(tf, "egress_profiles", "cidrhost(\"${cidrhost(pa.secondary_cidr, 0)}/${min(")
    assert "a == b ||" in cond
    cases = {("10.20.1.0/24", "10.20.2.0/24"): False, ("10.20.0.0/16", "10.20.2.0/24"): True,
             ("10.20.2.0/24", "10.20.2.128/25"): True, ("10.20.1.0/24", "10.20.1.0/24"): True}
    for (a, b), want in cases.items():
        assert _overlaps(a, b) is want and _overlaps(b, a) is want
        assert ipaddress.ip_network(a).overlaps(ipaddress.ip_network(b)) is want
    sub = res(tf, "google_compute_subnetwork")
    assert "var.subnet_cidr" in first_block(sub, "lifecycle")["precondition"][0]["condition"]


def test_broad_client_cidrs_need_an_explicit_opt_in(tf):
    it = res(tf, "google_compute_instance_template")
    conds = [p["condition"] for p in first_block(it, "lifecycle")["precondition"]]
    assert any("var.allow_broad_client_cidrs ||" in c and ">= 16" in c for c in conds)
    assert tf["variable"]["allow_broad_client_cidrs"]["default"] is False


def test_image_host_must_match_the_registry(tf):
    it = res(tf, "google_compute_instance_template")
    conds = [p["condition"] for p in first_block(it, "lifecycle")["precondition"]]
    assert '${startswith(var.image, "${local.registry_path}/")}' in conds
    assert tf["locals"]["registry_path"] == (
        "${local.registry_host}/${var.project_id}/${var.artifact_registry_repository}")


# terraform fmt: the real binary, tests/deploy/test_deploy_terraform_real.py::test_fmt_check_is_clean
