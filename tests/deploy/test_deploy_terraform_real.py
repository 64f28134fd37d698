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


def test_drain_on_a_new_nat_or_of_a_never_active_ip_is_refused(root, env):
    """Cloud NAT drains only IPs active on an existing NAT; the provider refuses the rest at plan, so
    the module refuses them first, with the fix in the message."""
    profiles = """
egress_profiles = {
  vendor-x = { secondary_cidr = "10.20.1.0/24", nat_ip_names = ["vendor-x-a"] }
  vendor-y = { secondary_cidr = "10.20.2.0/24", nat_ip_names = ["vendor-y-b"], draining_nat_ip_names = ["vendor-y-a"] %s }
}
"""
    r = _plan(root, env, profiles % "")
    assert r.returncode != 0
    assert "can only drain an IP that was active" in r.stderr, r.stderr
    r = _plan(root, env, profiles % ', nat_ip_names_before = ["vendor-y-b"]')
    assert r.returncode != 0 and "can only drain an IP that was active" in r.stderr, r.stderr
    # The runbook's step 2: a was active before, b was reserved before.
    _ok(_plan(root, env, profiles % ', nat_ip_names_before = ["vendor-y-a"]'))


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
