"""deploy/terraform/gcp checked by the REAL terraform binary: `fmt -check`, and `init` + `validate`
+ `plan` (+ `apply` of the stand-ins) as a root module with the shipped terraform.tfvars.example and
as a child module, through tests/deploy/tf_standin.py (google resources stood in by terraform_data,
every expression, for_each, output, validation and template kept)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import TF
from tf_standin import TERRAFORM, standin_module, terraform, tf_env

from tests import required


@pytest.fixture(scope="module", autouse=True)
def _terraform_binary():
    required.tool(TERRAFORM, "install terraform 1.11 (/usr/local/bin/terraform)")

# Real hashes (`egressgate hash-password`): the example's placeholders are refused by the module on purpose.
HASH = "scrypt$16384$8$1$BXw8D1Aev9szKbtM1Zvfwg==$lPHRMxrz8Fihj9iCpdS7wE1jsQZTv2HdzHsKqRDV76c="
HASHES = """
clients = [
  { name = "vendor-x-collector", username = "vendor-x", password_hash = "{HASH}", egress = ["vendor-x"], allow = ["*.vendor-x.com", "api.vendor-x.com:8443"] },
  { name = "vendor-y-collector", username = "vendor-y", password_hash = "{HASH}", egress = ["vendor-y"], allow = ["*.vendor-y.net"] },
]
""".replace("{HASH}", HASH)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("tf")


@pytest.fixture(scope="module")
def env(workdir):
    return tf_env(workdir)


@pytest.fixture(scope="module")
def root(workdir, env):
    """The module as a ROOT module (the README's path: tfvars.example, then apply), initialised."""
    mod = standin_module(TF, workdir / "root")
    r = terraform(["init", "-input=false", "-backend=false"], mod, env)
    assert r.returncode == 0, r.stdout + r.stderr
    return mod


def _ok(r):
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def _plan(mod: Path, env, extra: str = "", name: str = "case") -> object:
    (mod / "terraform.tfvars").write_text((TF / "terraform.tfvars.example").read_text())
    (mod / "zz-test.auto.tfvars").write_text(HASHES + extra)
    return terraform(["plan", "-input=false", "-lock=false", f"-out={name}.plan"], mod, env)


def test_fmt_check_is_clean(env, workdir):
    r = terraform(["fmt", "-check", "-recursive", "-diff", str(TF.parent)], workdir, env)
    assert r.returncode == 0, "terraform fmt -check wants changes:\n" + r.stdout + r.stderr


def test_validate_as_root_module(root, env):
    _ok(terraform(["validate"], root, env))


@pytest.mark.parametrize(
    "tls",
    [
        'tls = { cert_secret = "egressgate-tls-crt", key_secret = "egressgate-tls-key" }',  # the example's
        'tls = { cert_pem = "-----BEGIN CERTIFICATE-----", key_pem = "-----BEGIN PRIVATE KEY-----" }',
        "tls = null",
    ],
)
def test_plan_and_apply_as_root_module_with_the_example(root, env, tls):
    """Sensitive for_each (the TLS secrets' IAM members) and the sensitive proxy_url output are refused
    by Terraform at plan time in a root module; apply evaluates every output."""
    _ok(_plan(root, env, "\n" + tls + "\n"))
    _ok(terraform(["apply", "-input=false", "-lock=false", "-auto-approve", "case.plan"], root, env))
    out = _ok(terraform(["output", "-raw", "proxy_url"], root, env)).stdout
    assert out.startswith("http://" if tls == "tls = null" else "https://")
    (root / "terraform.tfstate").unlink()


def test_validate_and_plan_as_child_module(workdir, env):
    base = workdir / "child"
    standin_module(TF, base / "gcp")
    example = (TF / "terraform.tfvars.example").read_text()
    outputs = "\n".join(
        f'output "{n}" {{\n  value = module.gateway.{n}\n}}'
        for n in ("proxy_url", "egress_ips_by_profile", "lb_ip_address", "instance_group")
    )
    (base / "main.tf").write_text(
        'module "gateway" {\n  source = "./gcp"\n'
        + example.replace("clients = [", "clients_unused = [", 1).split("clients_unused = [")[0]
        + _after_clients(example)
        + HASHES
        + "}\n"
        + outputs
        + "\n"
    )
    _ok(terraform(["init", "-input=false", "-backend=false"], base, env))
    _ok(terraform(["validate"], base, env))
    _ok(terraform(["plan", "-input=false", "-lock=false"], base, env))


def _after_clients(example: str) -> str:
    """The example's text after its `clients = [...]` list (that list is replaced by HASHES)."""
    start = example.index("\nclients = [")
    end = example.index("\n]\n", start) + 3
    return example[end:]


MEMBER_CASES = {
    "a member in both lists": (
        'vendor-y = { secondary_cidr = "10.20.2.0/24", active = [{ ip = "vendor-y-a", slot = 0 }], '
        'standby = [{ ip = "vendor-y-a", slot = 1 }] }',
        "both active and standby"),
    "an IP used by two profiles": (
        'vendor-y = { secondary_cidr = "10.20.2.0/24", active = [{ ip = "vendor-x-a", slot = 0 }] }',
        "used by two members"),
    "two members in one slot": (
        'vendor-y = { secondary_cidr = "10.20.2.0/24", active = [{ ip = "vendor-y-a", slot = 0 }], '
        'standby = [{ ip = "vendor-y-b", slot = 0 }] }',
        "share a slot"),
    "a slot the VMs do not have": (
        'vendor-y = { secondary_cidr = "10.20.2.0/24", slots = 2, active = [{ ip = "vendor-y-a", slot = 0 }], '
        'standby = [{ ip = "vendor-y-b", slot = 2 }] }',
        "slots - 1"),
    "a released IP still in use": (
        'vendor-y = { secondary_cidr = "10.20.2.0/24", active = [{ ip = "vendor-y-a", slot = 0 }], '
        'standby = [{ ip = "vendor-y-c", slot = 1 }] }',
        "not in egress_ips"),
    "no active member": (
        'vendor-y = { secondary_cidr = "10.20.2.0/24", active = [], standby = [{ ip = "vendor-y-a", slot = 1 }] }',
        "at least one active member"),
}


@pytest.mark.parametrize("case", sorted(MEMBER_CASES))
def test_member_mistakes_are_refused_with_a_clear_message(root, env, case):
    """Each member mistake is refused at plan by the real terraform, with the message that says what
    to fix (terraform wraps long messages, hence the whitespace-insensitive match)."""
    profile, message = MEMBER_CASES[case]
    extra = ('\negress_profiles = {\n  vendor-x = { secondary_cidr = "10.20.1.0/24", active = [{ ip = "vendor-x-a", slot = 0 }] }\n  '
             + profile + "\n}\n")
    r = _plan(root, env, extra)
    assert r.returncode != 0, f"{case}: accepted"
    assert " ".join(message.split()) in " ".join(r.stderr.replace("│", " ").split()), r.stderr


def test_slot_ranges_too_small_for_the_group_are_refused(root, env):
    """A /26 profile block gives /29 slots (8 addresses): 10 VMs + a surge of 3 do not fit."""
    profiles = ('\negress_profiles = {\n  vendor-x = { secondary_cidr = "10.20.1.0/26", active = [{ ip = "vendor-x-a", slot = 0 }] }\n'
                '  vendor-y = { secondary_cidr = "10.20.2.0/24", active = [{ ip = "vendor-y-a", slot = 0 }] }\n}\n')
    r = _plan(root, env, profiles + "instance_count = 10\n")
    assert r.returncode != 0 and "slot ranges" in r.stderr and "too small" in " ".join(r.stderr.split()), r.stderr
    _ok(_plan(root, env, profiles + "instance_count = 5\n"))


def _profiles(y_active: str, y_standby: str) -> str:
    x = ('vendor-x = { secondary_cidr = "10.20.1.0/24", active = [{ ip = "vendor-x-a", slot = 0 }], '
         'standby = [{ ip = "vendor-x-b", slot = 1 }] }')
    y = f'vendor-y = {{ secondary_cidr = "10.20.2.0/24", active = [{y_active}], standby = [{y_standby}] }}'
    return f"\negress_profiles = {{\n  {x}\n  {y}\n}}\n"


Y_A, Y_B, Y_C = ('{ ip = "vendor-y-a", slot = 0 }', '{ ip = "vendor-y-b", slot = 1 }', '{ ip = "vendor-y-c", slot = 2 }')
IPS = 'egress_ips = ["vendor-x-a", "vendor-x-b", "vendor-y-a", "vendor-y-b"%s]\n'
META = "terraform_data.google_compute_project_metadata_item__members"
NAT = 'terraform_data.google_compute_router_nat__member["%s"]'
# the Cloud NAT alert policies name every NAT gateway: a member's NAT coming or going updates them
ALERTS = {f"terraform_data.google_monitoring_alert_policy__{n}": ["update"]
          for n in ("nat_allocation_failed", "nat_dropped_out_of_resources")}
ADDRESS = 'terraform_data.google_compute_address__nat["%s"]'
# The rotation runbook (docs/deploy-gcp.md) from the example's state, step by step: what each apply
# changes. Never the instance template, the subnet's ranges or the group: running VMs take it live.
RUNBOOK = [
    ("reserve vendor-y-c", IPS % ', "vendor-y-c"' + _profiles(Y_A, Y_B),
     {ADDRESS % "vendor-y-c": ["create"]}),
    ("add it as a standby in slot 2", IPS % ', "vendor-y-c"' + _profiles(Y_A, Y_B + ", " + Y_C),
     {NAT % "vendor-y-c": ["create"], META: ["update"], **ALERTS}),
    ("promote it, demote vendor-y-a", IPS % ', "vendor-y-c"' + _profiles(Y_C, Y_B + ", " + Y_A),
     {META: ["update"]}),
    ("release vendor-y-a from the profile", IPS % ', "vendor-y-c"' + _profiles(Y_C, Y_B),
     {NAT % "vendor-y-a": ["delete"], META: ["update"], **ALERTS}),
    ("release the address", 'egress_ips = ["vendor-x-a", "vendor-x-b", "vendor-y-b", "vendor-y-c"]\n' + _profiles(Y_C, Y_B),
     {ADDRESS % "vendor-y-a": ["delete"]}),
]


def test_every_rotation_step_changes_only_nats_addresses_and_metadata(root, env):
    """Each step of the rotation runbook is one apply that touches no VM: the instance template, the
    subnet's ranges and the MIG stay; only addresses, member NATs and the project metadata the VMs
    watch change (a promotion: the metadata alone)."""
    import json

    _ok(_plan(root, env, ""))
    _ok(terraform(["apply", "-input=false", "-lock=false", "-auto-approve", "case.plan"], root, env))
    try:
        for step, tfvars, expected in RUNBOOK:
            _ok(_plan(root, env, "\n" + tfvars))
            show = json.loads(_ok(terraform(["show", "-json", "case.plan"], root, env)).stdout)
            changes = {c["address"]: c["change"]["actions"] for c in show["resource_changes"]
                       if c["change"]["actions"] != ["no-op"]}
            assert changes == expected, step
            if META in changes:
                meta = next(c for c in show["resource_changes"] if c["address"] == META)["change"]["after"]["input"]["value"]
                if step.startswith("promote"):
                    assert "vendor-y active 10.20.2.64/27 " in meta and "vendor-y standby 10.20.2.0/27 " in meta, meta
            _ok(terraform(["apply", "-input=false", "-lock=false", "-auto-approve", "case.plan"], root, env))
    finally:
        (root / "terraform.tfstate").unlink()


def test_harness_reports_what_terraform_reports(workdir, env):
    """The stand-in keeps the language checks: a sensitive for_each injected into a copy fails."""
    bad = workdir / "bad-src"
    shutil.copytree(TF, bad)
    iam = bad / "iam.tf"
    iam.write_text(iam.read_text().replace("for_each  = local.tls_secrets", "for_each  = toset([var.tls.cert_secret])"))
    mod = standin_module(bad, workdir / "bad")
    _ok(terraform(["init", "-input=false", "-backend=false"], mod, env))
    r = terraform(["validate"], mod, env)
    assert r.returncode != 0 and "Invalid for_each argument" in r.stderr, r.stdout + r.stderr


def test_every_documented_terraform_output_command_runs(root, env):
    """Each `terraform output [...] NAME` the docs tell an operator to type, run as written on the
    applied example (a renamed output would leave the runbook pointing at nothing)."""
    import re

    docs = [TF.parent.parent.parent / "docs" / "deploy-gcp.md", TF / "README.md", TF.parent.parent.parent / "README.md"]
    commands = sorted({m for d in docs for m in re.findall(r"terraform output(?: -raw| -json)? [a-z_]+", d.read_text())})
    assert len(commands) >= 3, commands
    _ok(_plan(root, env, "\n"))
    _ok(terraform(["apply", "-input=false", "-lock=false", "-auto-approve", "case.plan"], root, env))
    try:
        for cmd in commands:
            r = terraform(cmd.split()[1:], root, env)
            assert r.returncode == 0, f"{cmd}: {r.stderr}"
    finally:
        (root / "terraform.tfstate").unlink()


def _user_data(mod: Path, env) -> str:
    """The cloud-init the applied stand-in instance template carries."""
    import json

    state = json.loads(_ok(terraform(["show", "-json"], mod, env)).stdout)
    for res in state["values"]["root_module"]["resources"]:
        if res["address"].startswith("terraform_data.google_compute_instance_template__"):
            return res["values"]["input"]["metadata"]["user-data"]
    raise AssertionError("no instance template in the state")


@pytest.mark.parametrize("store", ["memorystore", "existing"])
def test_a_fleet_store_is_created_or_taken_and_rendered_into_every_vm(root, env, store):
    """fleet_store: a Memorystore (private services access, AUTH, in-transit encryption; its AUTH
    string in a Secret Manager secret only the VMs read) or an existing Redis: either way the VMs'
    config gets fleet.redis with the password file and the server CA, and fetch-tls fetches them."""
    import yaml

    spec = ('fleet_store = { memorystore = { tier = "BASIC" } }' if store == "memorystore" else
            'fleet_store = { url = "rediss://10.9.8.7:6378", auth_secret = "team-redis-auth", '
            'ca_pem = "-----BEGIN CERTIFICATE-----\\nX\\n-----END CERTIFICATE-----" }')
    _ok(_plan(root, env, "\n" + spec + "\n"))
    _ok(terraform(["apply", "-input=false", "-lock=false", "-auto-approve", "case.plan"], root, env))
    try:
        url = _ok(terraform(["output", "-raw", "fleet_store_url"], root, env)).stdout
        doc = yaml.safe_load(_user_data(root, env))
        files = {f["path"]: f["content"] for f in doc["write_files"]}
        config = yaml.safe_load(files["/etc/egressgate/config.yaml.in"])
        unit = files["/etc/systemd/system/egressgate.service"]
        redis = config["fleet"]["redis"]
        assert redis["url"] == url and url.startswith("rediss://")
        assert redis["password_file"] == "/etc/egressgate/tls/redis-auth"
        assert redis["tls"] == {"ca": "/etc/egressgate/tls/redis-ca.pem",  # (Memorystore's certificate
                                **({"check_hostname": False} if store == "memorystore" else {})}  # names no IP)
        secret = "egressgate-redis-auth" if store == "memorystore" else "team-redis-auth"
        assert f"Environment=FLEET_AUTH_SECRET={secret}" in unit
        import json

        state = json.loads(_ok(terraform(["show", "-json"], root, env)).stdout)
        created = {r["address"] for r in state["values"]["root_module"]["resources"]
                   if "google_redis_instance__" in r["address"] or "google_secret_manager_secret__" in r["address"]}
        assert created == ({"terraform_data.google_redis_instance__fleet[0]",
                            "terraform_data.google_secret_manager_secret__fleet_auth[0]"}
                           if store == "memorystore" else set())
        if store == "existing":
            assert url == "rediss://10.9.8.7:6378" and "BEGIN CERTIFICATE" in files["/etc/egressgate/tls.in/redis-ca.pem"]
    finally:
        (root / "terraform.tfstate").unlink()


def test_fleet_store_mistakes_are_refused_at_plan(root, env):
    cases = {
        'fleet_store = { memorystore = {}, url = "rediss://10.0.0.1:6378" }': "not both",
        'fleet_store = { url = "http://10.0.0.1:6378" }': "expected redis://HOST:PORT",
        'fleet_store = { url = "redis://10.0.0.1:6379", ca_pem = "x" }': "must start with rediss://",
        'fleet_store = { memorystore = { tier = "PREMIUM" } }': "tier BASIC or STANDARD_HA",
    }
    for spec, message in cases.items():
        r = _plan(root, env, "\n" + spec + "\n")
        assert r.returncode != 0 and message in " ".join(r.stderr.split()), (spec, r.stderr)
