"""What `terraform apply` of deploy/terraform/gcp would write onto a VM, computed without terraform.

There is no terraform binary offline, so `locals.tf` is mirrored here, piece by piece, for the
values that end up on the VM: the gateway config, the host firewall script, the collector config and
the cloud-init document, all rendered from the module's own template files with the module's own
scripts. `test_deploy_terraform.test_mirror_matches_locals` keeps this mirror honest by checking
that locals.tf still passes exactly these template variables and builds them from these inputs.

``addresses`` stands for the static IPs GCP would allocate: {NAT IP name: address}.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conftest import TF, load_tf_module, render_tftpl

DEFAULTS = {
    "name_prefix": "egressgate",
    "connect_ports": [443],
    "probe_echo_url": "https://api.ipify.org/",
    # (the module's default has one fallback; the terraform-applied tests render that)
    "probe_fallback_echo_urls": [],
    "gateway_config": {},
    "probe_grace": 600,
    "load_balancer_scheme": "EXTERNAL",
    "tls": None,
    "enable_metrics_collector": True,
    "metrics_collector_image": None,
    "artifact_registry_location": None,
    "fleet_store": None,
}


@dataclass
class Rendered:
    variables: dict[str, Any]
    gateway_config: str
    firewall_script: str
    collector_config: str
    cloud_init: str
    template_vars: dict[str, dict[str, Any]] = field(default_factory=dict)
    members: str = ""  # the project metadata item (metadata.tf) the VMs render the members from


def module_locals() -> dict[str, Any]:
    """The literal values locals.tf sets (ports, ranges, drain numbers)."""
    raw = load_tf_module()["locals"]

    def lit(name: str) -> Any:
        value = raw[name]
        assert not (isinstance(value, str) and "${" in value), f"local.{name} is not a literal: {value}"
        return value

    stop_drain = lit("vm_stop_drain_sec")
    m = re.fullmatch(r"\$\{local\.vm_stop_drain_sec \+ (\d+)\}", raw["docker_stop_sec"])
    docker_stop = stop_drain + int(m.group(1))
    m = re.fullmatch(r"\$\{local\.docker_stop_sec \+ (\d+)\}", raw["systemd_stop_sec"])
    return {
        "proxy_port": lit("proxy_port"),
        "admin_port": lit("admin_port"),
        "external_lb_health_check_ranges": lit("external_lb_health_check_ranges"),
        "internal_lb_health_check_ranges": lit("internal_lb_health_check_ranges"),
        "autohealing_health_check_ranges": lit("autohealing_health_check_ranges"),
        "vm_stop_drain_sec": stop_drain,
        "docker_stop_sec": docker_stop,
        "systemd_stop_sec": docker_stop + int(m.group(1)),
        "gce_shutdown_limit": lit("gce_shutdown_limit"),
    }


def render(variables: dict[str, Any], addresses: dict[str, str]) -> Rendered:
    v = {**DEFAULTS, **variables}
    lc = module_locals()
    internal = v["load_balancer_scheme"] == "INTERNAL"
    lb_ranges = lc["internal_lb_health_check_ranges"] if internal else lc["external_lb_health_check_ranges"]
    registry_host = f"{v['artifact_registry_location'] or v['region']}-docker.pkg.dev"
    registry_path = f"{registry_host}/{v['project_id']}/{v['artifact_registry_repository']}"
    tls = v["tls"]
    tls_from_secret = bool(tls and tls.get("cert_secret"))

    egress = {
        name: {"bind": f"@MEMBERS:{name}:active@", "standby": f"@MEMBERS:{name}:standby@",
               "expect_ip": f"@MEMBERS:{name}:ips@"}
        for name in v["egress_profiles"]
    }
    clients = []
    for c in v["clients"]:
        entry = {
            "name": c["name"],
            "from": v["client_cidrs"],
            "username": c["username"],
            "password_hash": c["password_hash"],
            "egress": c["egress"],
        }
        if c.get("allow") is not None:
            entry["allow"] = c["allow"]
        clients.append(entry)
    for c in v.get("workload_clients", []):
        entry = {
            "name": c["name"],
            "from": v["client_cidrs"],
            "kubernetes": {"issuer": v.get("kubernetes_issuer"), "audiences": ["egressgate"],
                           "service_accounts": c["service_accounts"]},
            "egress": c["egress"],
        }
        if c.get("allow") is not None:
            entry["allow"] = c["allow"]
        clients.append(entry)
    listen = {"address": f"0.0.0.0:{lc['proxy_port']}", "egress": v["default_profile"]}
    if tls:
        listen["tls"] = {"cert": "/etc/egressgate/tls/tls.crt", "key": "/etc/egressgate/tls/tls.key"}

    tv: dict[str, dict[str, Any]] = {}
    user = v.get("gateway_config") or {}
    user_egress = user.get("egress", {})
    merged = ("listen", "admin", "drain", "workers", "probe", "egress", "clients", "security", "fleet")
    config = {k: val for k, val in user.items() if k not in merged}
    config.update(
        listen=[listen, *user.get("listen", [])],
        admin={"address": f"0.0.0.0:{lc['admin_port']}", **user.get("admin", {})},
        drain={"timeout": lc["vm_stop_drain_sec"], **user.get("drain", {})},
        workers=user.get("workers", "auto"),
        # terraform renders a list; without fallbacks one URL as a plain string means the same
        probe={"echo_url": [v["probe_echo_url"], *v["probe_fallback_echo_urls"]] if v["probe_fallback_echo_urls"]
               else v["probe_echo_url"], "interval": "60s",
               "grace": v["probe_grace"], **user.get("probe", {})},
        egress={**{n: {**p, **user_egress.get(n, {})} for n, p in egress.items()},
                **{n: p for n, p in user_egress.items() if n not in egress}},
        clients=[*clients, *user.get("clients", [])],
        security={"connect_ports": v["connect_ports"], **user.get("security", {})},
    )
    # memorystore.tf: a created Memorystore's address and CA come from ``addresses``
    fleet = v["fleet_store"]
    fleet_secret = fleet_ca = None
    if fleet is not None:
        if fleet.get("memorystore") is not None:
            url = f"rediss://{addresses['memorystore_host']}:6378"
            fleet_secret, fleet_ca = f"{v['name_prefix']}-redis-auth", addresses["memorystore_ca"]
        else:
            url, fleet_secret, fleet_ca = fleet["url"], fleet.get("auth_secret"), fleet.get("ca_pem")
        redis = {"url": url}
        if fleet_secret is not None:
            redis["password_file"] = "/etc/egressgate/tls/redis-auth"
        if fleet_ca is not None:
            redis["tls"] = {"ca": "/etc/egressgate/tls/redis-ca.pem",
                            **({"check_hostname": False} if fleet.get("memorystore") is not None else {})}
        config["fleet"] = {**user.get("fleet", {}), "redis": redis}
    tv["gateway_config"] = {"config": config}
    gateway_config = _template("egressgate.yaml.tftpl", tv["gateway_config"])
    admin_sources = list(dict.fromkeys(lb_ranges + lc["autohealing_health_check_ranges"]))
    tv["firewall_script"] = {
        "proxy_port": lc["proxy_port"],
        "admin_port": lc["admin_port"],
        "proxy_sources": " ".join(v["client_cidrs"]),
        "admin_sources": " ".join(admin_sources),
    }
    firewall = _template("firewall.sh.tftpl", tv["firewall_script"])
    tv["collector_config"] = {"admin_port": lc["admin_port"], "project_id": v["project_id"]}
    collector = _template("otel-collector.yaml.tftpl", tv["collector_config"])
    tls_mode = "none" if not tls else ("secret-manager" if tls_from_secret else "files")
    tv["cloud_init"] = {
        "image": v["image"],
        "registry_host": registry_host,
        "gateway_config": gateway_config,
        "render_script": (TF / "files" / "render-config.sh").read_text(),
        "members_key": members_key(v),
        "firewall_script": firewall,
        "tls_script": (TF / "files" / "fetch-tls.sh").read_text(),
        "tls_mode": tls_mode,
        "tls_cert_secret": tls["cert_secret"] if tls_from_secret else "",
        "tls_key_secret": tls["key_secret"] if tls_from_secret else "",
        "tls_cert_pem": tls["cert_pem"] if tls and not tls_from_secret else "",
        "tls_key_pem": tls["key_pem"] if tls and not tls_from_secret else "",
        "fleet_secret": fleet_secret or "",
        "fleet_ca_pem": fleet_ca or "",
        "collector_on": "yes" if v["enable_metrics_collector"] else "no",
        "collector_image": v["metrics_collector_image"]
        or f"{registry_path}/opentelemetry-collector-contrib:0.116.1",
        "collector_config": collector,
        "stop_timeout": lc["docker_stop_sec"],
        "systemd_stop_sec": lc["systemd_stop_sec"],
    }
    cloud_init = _template("cloud-init.yaml.tftpl", tv["cloud_init"])
    return Rendered(v, gateway_config, firewall, collector, cloud_init, tv, members_metadata(v, addresses))


SLOT_NEWBITS = 3  # locals.tf: slot_newbits


def slot_cidr(secondary_cidr: str, slot: int) -> str:
    """cidrsubnet(secondary_cidr, slot_newbits, slot)."""
    net = ipaddress.ip_network(secondary_cidr)
    return str(list(net.subnets(prefixlen_diff=SLOT_NEWBITS))[slot])


def members_key(variables: dict[str, Any]) -> str:
    return f"{variables.get('name_prefix', DEFAULTS['name_prefix'])}-egress-members"


def members_metadata(variables: dict[str, Any], addresses: dict[str, str]) -> str:
    """locals.tf members_metadata: "PROFILE ROLE SLOT_CIDR PUBLIC_IP" per member, sorted."""
    lines = []
    for name, p in variables["egress_profiles"].items():
        for role in ("active", "standby"):
            for m in p.get(role, []):
                lines.append(f"{name} {role} {slot_cidr(p['secondary_cidr'], m['slot'])} {addresses[m['ip']]}")
    return "\n".join(sorted(lines))


def _template(name: str, variables: dict[str, Any]) -> str:
    return render_tftpl((TF / "templates" / name).read_text(), variables)


def write_files(cloud_init: str, root: Path) -> dict[str, Path]:
    """Do what cloud-init's write_files does, under ``root``: {VM path: written file}."""
    import yaml

    doc = yaml.safe_load(cloud_init)
    out = {}
    for f in doc["write_files"]:
        dst = root / f["path"].lstrip("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(f["content"])
        dst.chmod(int(f["permissions"], 8))
        out[f["path"]] = dst
    return out


def unit_commands(cloud_init: str, unit: str = "egressgate.service") -> dict[str, list[str]]:
    """{"ExecStartPre": [...], "ExecStart": [...], ...} of a unit written by the cloud-init."""
    import yaml

    doc = yaml.safe_load(cloud_init)
    (content,) = [f["content"] for f in doc["write_files"] if f["path"] == f"/etc/systemd/system/{unit}"]
    out: dict[str, list[str]] = {}
    for line in content.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.startswith("Exec"):
            out.setdefault(key, []).append(value)
    return out
