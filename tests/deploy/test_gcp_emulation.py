"""The GCP reference architecture of deploy/terraform/gcp, stood up on one machine in network
namespaces from the module's own files, and a job carried through it.

    inet ───────────── the internet: origin (records the client address), IP-echo service,
     │  │  │           the GKE cluster's NAT address (in client_cidrs) and an outsider (not in it)
     │  nat-<member> ── Cloud NAT per profile MEMBER (active or standby): SNAT of that member's slot
     │  │  │           range to its own static IP (LIST_OF_SECONDARY_IP_RANGES); nothing else is
     │  │  │           translated, so every member is a distinct public source address
    vpc ────────────── Google's network: the load balancer's IP routed to the VM (passthrough), the
     │   │             metadata server and DNS at 169.254.169.254, policy routes to each profile's NAT
     vm  google ────── health checkers at 35.191.0.10 (LB) and 130.211.0.10 (autohealing)
     └ "VM": COS's default INPUT chain (established + SSH only), then what cloud-init and the systemd
       unit do before the container starts: firewall.sh, fetch-tls.sh, render-config.sh (alias IPs
       and the profiles' members from the stub metadata server over HTTP with Metadata-Flavor:
       Google), then the gateway itself on the rendered config (the container's command, run from
       this checkout), and egressgate-members.service (render-config.sh --watch, waiting on the
       project metadata with ?wait_for_change=true) beside it.

The config and cloud-init are rendered from the module's templates by tests/deploy/gcp_module.py
(the mirror of locals.tf) for sample variables; "terraform apply" of a variable change is re-rendering
plus what GCP would do with it (a new instance template rolls the VM; a member change - a new
standby, a promotion, a release - changes only the members' NATs and the project metadata item,
which the VM's watcher renders into the config the gateway reloads by itself).
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import ipaddress
import json
import os
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from gcp_module import render, unit_commands, write_files  # noqa: E402
from netns import Netns, link, machine_env, unavailable_reason  # noqa: E402

from tests import required  # noqa: E402
from tests.deploy.conftest import REPO  # noqa: E402
from tests.integration.peers import QuietHandler, read_head  # noqa: E402

pytestmark = [pytest.mark.timeout(600)]

EGRESSGATE = REPO / ".venv" / "bin" / "egressgate"

# Addresses of the emulated world (all inside namespaces this test makes).
LB_IP = "34.140.0.10"
ORIGIN_IP = "34.149.0.80"
ECHO_IP = "34.149.0.53"
GKE_NAT_IP = "35.205.0.7"  # the cluster's Cloud NAT address: client_cidrs
OUTSIDER_IP = "35.205.0.99"
LB_CHECKER_IP = "35.191.0.10"  # load-balancer health checks
AUTOHEAL_CHECKER_IP = "130.211.0.10"  # autohealing health checks
WRONG_IP = "34.77.9.99"  # a NAT mapping nobody allow-listed
VM_IP = "10.10.0.2"
SECONDARY = {"vendor-x": "10.20.1.0/24", "vendor-y": "10.20.2.0/24"}
# The VM's alias IP in each slot range (the module's default 3 slots: /27s of the profile's /24).
SLOT_ALIASES = {"vendor-x": ["10.20.1.5", "10.20.1.37", "10.20.1.69"],
                "vendor-y": ["10.20.2.5", "10.20.2.37", "10.20.2.69"]}
ALIASES = {name: slots[0] for name, slots in SLOT_ALIASES.items()}  # slot 0: the first active member
ADDRESSES = {  # what google_compute_address.nat would allocate
    "vendor-x-a": "34.77.1.10",
    "vendor-x-b": "34.77.1.11",
    "vendor-y-a": "34.77.2.10",
    "vendor-y-b": "34.77.2.11",
}
MEMBER_SLOT = {"vendor-x-a": ("vendor-x", 0), "vendor-x-b": ("vendor-x", 1),
               "vendor-y-a": ("vendor-y", 0), "vendor-y-b": ("vendor-y", 1)}
NAMES = {"api.vendor-x.com": ORIGIN_IP, "data.vendor-y.net": ORIGIN_IP, "echo.example.net": ECHO_IP,
         "metadata.google.internal": "169.254.169.254"}
MEMBERS_KEY = "egressgate-egress-members"
PASSWORDS = {"vendor-x": "4f1e0a9c2b7d", "vendor-y": "9a8b7c6d5e4f"}


def member(ip: str) -> dict:
    return {"ip": ip, "slot": MEMBER_SLOT[ip][1]}


def profile(name: str, active: list[str], standby: list[str] = ()) -> dict:
    return {"secondary_cidr": SECONDARY[name], "active": [member(i) for i in active],
            "standby": [member(i) for i in standby]}


# The gateway settings the scenario needs, through the module's gateway_config (part of the
# instance template: set from the first boot, so member changes never touch it). Providers are
# plain-HTTP endpoints of the origin (which refuses the addresses in Recorder.refused), checked every
# second; vendor-x fails over by itself (switch: auto), vendor-y promotes only what every provider
# accepts (switch: verified). One worker: every decision is taken by the process /status shows.
GATEWAY_CONFIG = {
    "workers": 1,
    "probe": {"interval": "1s"},
    "reload": {"interval": "0.2s"},
    "egress": {
        "vendor-x": {"switch": "auto", "failover_after": 2, "providers": [
            {"name": "vendor-x", "url": "http://api.vendor-x.com/ping", "method": "GET", "required": True,
             "interval": "1s"}]},
        "vendor-y": {"switch": "verified", "providers": [
            {"name": "vendor-y", "url": "http://data.vendor-y.net/ping", "method": "GET", "required": True,
             "interval": "1s"}]},
    },
}


def sample_variables(**profiles_override) -> dict:
    profiles = {
        "vendor-x": profile("vendor-x", ["vendor-x-a"], ["vendor-x-b"]),
        "vendor-y": profile("vendor-y", ["vendor-y-a"]),
    }
    profiles.update(profiles_override)
    return {
        "egress_ips": list(ADDRESSES),
        "project_id": "my-egress-project",
        "region": "europe-west1",
        "image": "europe-west1-docker.pkg.dev/my-egress-project/egressgate/egressgate@sha256:" + "a" * 64,
        "artifact_registry_repository": "egressgate",
        "egress_profiles": profiles,
        "default_profile": "vendor-x",
        "client_cidrs": [f"{GKE_NAT_IP}/32"],
        "clients": [
            {"name": "vendor-x-collector", "username": "vendor-x", "password_hash": HASHES["vendor-x"],
             "egress": ["vendor-x"], "allow": ["*.vendor-x.com"]},
            {"name": "vendor-y-collector", "username": "vendor-y", "password_hash": HASHES["vendor-y"],
             "egress": ["vendor-y"], "allow": ["*.vendor-y.net"]},
        ],
        "probe_echo_url": "http://echo.example.net/",
        "gateway_config": GATEWAY_CONFIG,
    }


def _hash(password: str) -> str:
    proc = subprocess.run([str(EGRESSGATE), "hash-password"], input=password, capture_output=True, text=True,
                          timeout=60, check=True)
    return proc.stdout.strip()


HASHES: dict[str, str] = {}

# ----------------------------------------------------------------------------- small servers


class _Threaded(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def serve_http(ns: Netns, address: tuple[str, int], handler, tls: ssl.SSLContext | None = None):
    with ns.entered():
        server = _Threaded(address, handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class Recorder(QuietHandler):
    """Origin: answers every request with the address it came from, and records it."""

    seen: list[tuple[str, str, str]] = []
    refused: set[str] = set()  # source addresses the provider blocks (403, as an allowlist refusal)

    def do_GET(self):  # noqa: N802
        Recorder.seen.append((self.headers.get("Host", ""), self.path, self.client_address[0]))
        body = json.dumps({"host": self.headers.get("Host"), "source": self.client_address[0]}).encode()
        self.reply(403 if self.client_address[0] in Recorder.refused else 200, body,
                   {"Content-Type": "application/json"})


class Echo(QuietHandler):
    """IP-echo service (what probe.echo_url points at): the caller's address as plain text."""

    protocol_version = "HTTP/1.0"

    def do_GET(self):  # noqa: N802
        self.reply(200, (self.client_address[0] + "\n").encode(), {"Content-Type": "text/plain"})


class Metadata(http.server.BaseHTTPRequestHandler):
    """The GCE metadata server, as much of it as render-config.sh reads: the VM's alias IPs and the
    project attribute the module writes (metadata.tf), with its ETag and ?wait_for_change=true
    (the answer comes when the value's ETag differs from last_etag, or after timeout_sec)."""

    requests: list[tuple[str, str | None]] = []
    members = ""
    changed = threading.Condition()

    @classmethod
    def publish(cls, value: str) -> None:
        with cls.changed:
            cls.members = value
            cls.changed.notify_all()

    @staticmethod
    def etag(value: str) -> str:
        import hashlib
        return hashlib.sha256(value.encode()).hexdigest()[:16]

    def do_GET(self):  # noqa: N802
        from urllib.parse import parse_qs, urlsplit

        Metadata.requests.append((self.path, self.headers.get("Metadata-Flavor")))
        if self.headers.get("Metadata-Flavor") != "Google":
            self.send_error(403, "Missing Metadata-Flavor:Google header.")
            return
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        etag = None
        if url.path.startswith("/computeMetadata/v1/instance/network-interfaces/0/ip-aliases/"):
            body = json.dumps([f"{ip}/32" for slots in SLOT_ALIASES.values() for ip in slots]).encode()
        elif url.path == f"/computeMetadata/v1/project/attributes/{MEMBERS_KEY}":
            with Metadata.changed:
                if query.get("wait_for_change") == "true":
                    last = query.get("last_etag")
                    Metadata.changed.wait_for(lambda: Metadata.etag(Metadata.members) != last,
                                              timeout=min(float(query.get("timeout_sec", 60)), 60))
                value = Metadata.members
            body, etag = value.encode(), Metadata.etag(value)
        else:
            self.send_error(404)
            return
        self.send_response(200)
        if etag:
            self.send_header("ETag", etag)
        self.send_header("Metadata-Flavor", "Google")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def serve_dns(ns: Netns, host: str, records: dict[str, str]) -> socket.socket:
    import dns.flags
    import dns.message
    import dns.rcode
    import dns.rdatatype
    import dns.rrset

    with ns.entered():
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((host, 53))

    def run():
        while True:
            try:
                data, peer = sock.recvfrom(4096)
                query = dns.message.from_wire(data)
            except OSError:
                return
            except Exception:
                continue
            reply = dns.message.make_response(query)
            reply.flags |= dns.flags.AA
            q = query.question[0]
            name = q.name.to_text().rstrip(".").lower()
            if name not in records:
                reply.set_rcode(dns.rcode.NXDOMAIN)
            elif q.rdtype == dns.rdatatype.A:
                reply.answer.append(dns.rrset.from_text(q.name, 30, "IN", "A", records[name]))
            sock.sendto(reply.to_wire(), peer)

    threading.Thread(target=run, daemon=True).start()
    return sock


# ----------------------------------------------------------------------------------- the site


class Site:
    """The emulated deployment: namespaces, servers, the VM's files and its gateway process."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ns: dict[str, Netns] = {}
        self.gateway: subprocess.Popen | None = None
        self.variables: dict = {}
        self.rendered = None
        self.nat_ip: dict[str, str] = {}

    # ---- network
    def build(self) -> None:
        for name in ("vpc", "vm", "google", "inet", *(f"nat-{ip}" for ip in ADDRESSES)):
            self.ns[name] = Netns(name)
        vpc, vm, goog, inet = self.ns["vpc"], self.ns["vm"], self.ns["google"], self.ns["inet"]
        link(vpc, "vm0", "10.10.0.1/24", vm, "eth0", f"{VM_IP}/24")
        link(vpc, "goog0", "172.28.0.1/30", goog, "eth0", "172.28.0.2/30")
        link(vpc, "inet0", "172.29.0.1/30", inet, "vpc0", "172.29.0.2/30")
        vpc.sh("sysctl -qw net.ipv4.ip_forward=1; ip addr add 169.254.169.254/32 dev lo")
        vm.sh(f"""
            ip route add default via 10.10.0.1
            # what the guest agent does with alias IP ranges and forwarding-rule addresses
            for a in {" ".join(a for slots in SLOT_ALIASES.values() for a in slots)}; do
              ip route add to local $a/32 dev eth0 proto 66 table local
            done
            ip route add to local {LB_IP}/32 dev eth0 proto 66 table local
            # Container-Optimized OS's default host firewall
            iptables -w 5 -P INPUT DROP
            iptables -w 5 -A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
            iptables -w 5 -A INPUT -i lo -j ACCEPT
            iptables -w 5 -A INPUT -p icmp -j ACCEPT
            iptables -w 5 -A INPUT -p tcp --dport 22 -j ACCEPT
        """)
        goog.sh(f"""
            ip addr add {LB_CHECKER_IP}/32 dev eth0
            ip addr add {AUTOHEAL_CHECKER_IP}/32 dev eth0
            ip route add default via 172.28.0.1
        """)
        inet.sh(f"""
            sysctl -qw net.ipv4.ip_forward=1
            for a in {ORIGIN_IP} {ECHO_IP} {GKE_NAT_IP} {OUTSIDER_IP}; do ip addr add $a/32 dev lo; done
            ip route add {LB_IP}/32 via 172.29.0.1
        """)
        vpc.sh(f"""
            ip route add {LB_IP}/32 via {VM_IP}
            ip route add 10.20.0.0/16 via {VM_IP}
            ip route add {GKE_NAT_IP}/32 via 172.29.0.2
            ip route add {OUTSIDER_IP}/32 via 172.29.0.2
            ip route add {LB_CHECKER_IP}/32 via 172.28.0.2
            ip route add {AUTOHEAL_CHECKER_IP}/32 via 172.28.0.2
        """)
        # One Cloud NAT per member: its slot range only, to its own static IP. The MEMBER chain
        # accepts the slot's traffic while the member exists (a NAT gateway of the module).
        for i, ip_name in enumerate(ADDRESSES, 1):
            prof, slot = MEMBER_SLOT[ip_name]
            cidr = str(list(ipaddress.ip_network(SECONDARY[prof]).subnets(prefixlen_diff=3))[slot])
            nat = self.ns[f"nat-{ip_name}"]
            link(vpc, f"nat{i}", f"172.30.{i}.1/30", nat, "in0", f"172.30.{i}.2/30")
            link(inet, f"nat{i}", f"172.31.{i}.1/30", nat, "out0", f"172.31.{i}.2/30")
            # the primary range is not NATed: only this member's slot range reaches this NAT
            vpc.sh(f"ip rule add from {cidr} lookup {100 + i}; ip route add default via 172.30.{i}.2 table {100 + i}")
            nat.sh(f"""
                sysctl -qw net.ipv4.ip_forward=1
                ip route add default via 172.31.{i}.1
                ip route add {cidr} via 172.30.{i}.1
                iptables -w 5 -P FORWARD DROP
                iptables -w 5 -A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
                iptables -w 5 -N MEMBER
                iptables -w 5 -A FORWARD -i in0 -s {cidr} -j MEMBER
                iptables -w 5 -t nat -N CLOUDNAT
                iptables -w 5 -t nat -A POSTROUTING -o out0 -s {cidr} -j CLOUDNAT
            """)
            for ip in [ADDRESSES[ip_name]] + ([WRONG_IP] if ip_name == "vendor-y-a" else []):
                inet.run(["ip", "route", "add", f"{ip}/32", "via", f"172.31.{i}.2"])
        self.resolv = self.tmp / "resolv.conf"
        self.resolv.write_text("nameserver 169.254.169.254\noptions timeout:1 attempts:2\n")
        self.resolv.chmod(0o644)

    def set_nat(self, ip_name: str, ip: str | None) -> None:
        """The NAT gateway of member ``ip_name``: SNAT to ``ip`` for new connections (established ones
        keep their mapping, conntrack), or None: no NAT gateway (the member was released)."""
        nat = self.ns[f"nat-{ip_name}"]
        nat.sh("iptables -w 5 -t nat -F CLOUDNAT; iptables -w 5 -F MEMBER" + (
            f"; iptables -w 5 -A MEMBER -j ACCEPT; iptables -w 5 -t nat -A CLOUDNAT -j SNAT --to-source {ip}"
            if ip else ""))
        self.nat_ip[ip_name] = ip

    def apply_nat(self) -> None:
        """The NAT side of `terraform apply`: a NAT gateway for every member, active or standby."""
        members = {m["ip"] for p in self.variables["egress_profiles"].values() for m in p["active"] + p["standby"]}
        for ip_name in ADDRESSES:
            if (ip_name in members) != bool(self.nat_ip.get(ip_name)):
                self.set_nat(ip_name, ADDRESSES[ip_name] if ip_name in members else None)

    def apply(self, variables: dict) -> None:
        """`terraform apply` of a member change (a new standby, a promotion, a release): the instance
        template must not change (no VM is replaced); the NATs change and the project metadata item
        the VM's watcher waits on gets the new member list."""
        before = self.rendered.cloud_init
        self.render(variables)
        assert self.rendered.cloud_init == before, "a member change must not change the instance template"
        self.apply_nat()
        Metadata.publish(self.rendered.members)

    # ---- servers
    def start_servers(self, certs) -> None:
        self.ca, ctx = certs
        self.origin = serve_http(self.ns["inet"], (ORIGIN_IP, 443), Recorder, tls=ctx)
        self.provider = serve_http(self.ns["inet"], (ORIGIN_IP, 80), Recorder)  # the providers' check URLs
        self.echo = serve_http(self.ns["inet"], (ECHO_IP, 80), Echo)
        self.metadata = serve_http(self.ns["vpc"], ("169.254.169.254", 80), Metadata)
        self.dns = serve_dns(self.ns["vpc"], "169.254.169.254", NAMES)

    # ---- the VM
    def render(self, variables: dict):
        self.variables = variables
        self.rendered = render(variables, ADDRESSES)
        return self.rendered

    def vm_argv(self, cmd: str) -> list[str]:
        root = self.root
        return [a.replace("/etc/egressgate", f"{root}/etc/egressgate")
                .replace("/run/egressgate", f"{root}/run/egressgate")
                .replace("/var/lib/egressgate", f"{root}/var/lib/egressgate") for a in cmd.lstrip("-").split()]

    def vm_env(self) -> dict[str, str]:
        return machine_env(TLS_DIR=f"{self.root}/run/egressgate/tls", EGRESSGATE_GID=str(os.getgid()),
                           PATH="/usr/sbin:/usr/bin:/sbin:/bin")

    def boot(self) -> None:
        """What the VM does with the rendered cloud-init: write_files, then the unit's
        ExecStartPre commands as written (paths under a scratch root), then the container's
        command with the rendered config."""
        root = self.tmp / f"vm-{time.monotonic_ns()}"
        self.root = root
        files = write_files(self.rendered.cloud_init, root)
        assert "/etc/egressgate/firewall.sh" in files
        cmds = unit_commands(self.rendered.cloud_init)
        self.ran = []
        Metadata.publish(self.rendered.members)  # terraform apply wrote the project metadata item
        for cmd in cmds["ExecStartPre"]:
            optional = cmd.startswith("-")
            argv = self.vm_argv(cmd)
            if argv[0].endswith(("docker", "docker-credential-gcr")):
                continue  # no container engine here: the image's command runs directly below
            proc = self.ns["vm"].run(argv, check=not optional, resolv=str(self.resolv), env=self.vm_env())
            self.ran.append((argv, proc))
        (run,) = cmds["ExecStart"]
        assert "--volume=/run/egressgate/conf:/etc/egressgate/conf:ro" in run
        assert run.endswith(" serve --config /etc/egressgate/conf/config.yaml")
        assert "--network=host" in run
        self.config_path = root / "run" / "egressgate" / "conf" / "config.yaml"
        # egressgate-members.service: takes member changes (project metadata) live
        (watch,) = unit_commands(self.rendered.cloud_init, "egressgate-members.service")["ExecStart"]
        self.watch_log = open(self.tmp / f"watcher-{time.monotonic_ns()}.log", "w")  # noqa: SIM115
        self.watcher = self.ns["vm"].popen(self.vm_argv(watch), resolv=str(self.resolv), env=self.vm_env(),
                                           stdout=self.watch_log, stderr=subprocess.STDOUT)
        self.log = open(self.tmp / f"gateway-{time.monotonic_ns()}.log", "w")  # noqa: SIM115
        self.gateway = self.ns["vm"].popen(
            [str(EGRESSGATE), "serve", "--config", str(self.config_path)], resolv=str(self.resolv),
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        self.wait_admin()

    def wait_admin(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.gateway.poll() is None, self.gateway_log()
            proc = self.ns["vm"].run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                      "http://127.0.0.1:9128/healthz"], check=False)
            if proc.stdout == "200":
                return
            time.sleep(0.2)
        raise AssertionError("gateway admin never answered\n" + self.gateway_log())

    def gateway_log(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-4000:]

    def stop(self) -> None:
        """`docker stop`: SIGTERM, the gateway drains and exits (and the VM's watcher stops)."""
        watcher = getattr(self, "watcher", None)
        if watcher is not None and watcher.poll() is None:
            watcher.terminate()
            watcher.wait(10)
        if self.gateway and self.gateway.poll() is None:
            self.gateway.send_signal(signal.SIGTERM)
            try:
                self.gateway.wait(self.rendered.template_vars["cloud_init"]["stop_timeout"])
            except subprocess.TimeoutExpired:
                self.gateway.kill()
                self.gateway.wait(5)

    def reload(self) -> None:
        """`systemctl reload egressgate` (ExecReload sends SIGHUP): re-read, re-probe."""
        os.kill(self.gateway.pid, signal.SIGHUP)

    def roll(self, variables: dict) -> None:
        """A new instance template: the MIG replaces the VM (here: the same namespace, restarted;
        the firewall script runs again, as it does on every start)."""
        self.stop()
        self.render(variables)
        self.boot()

    # ---- clients
    def readyz(self, checker: str = LB_CHECKER_IP, target: str = LB_IP) -> tuple[int, dict]:
        proc = self.ns["google"].run(["curl", "-sS", "--interface", checker, "--max-time", "5",
                                      "-w", "\n%{http_code}", f"http://{target}:9128/readyz"], check=False)
        if proc.returncode != 0:
            return 0, {"curl": proc.returncode, "stderr": proc.stderr}
        body, _, code = proc.stdout.rpartition("\n")
        return int(code), json.loads(body)

    def status(self) -> dict:
        """GET /status on the VM (an operator on the VM: curl localhost:9128/status)."""
        proc = self.ns["vm"].run(["curl", "-sS", "--max-time", "5", "http://127.0.0.1:9128/status"])
        return json.loads(proc.stdout)

    def wait_observed(self, profile: str, ip: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = self.status()["profiles"].get(profile, {})
            if last.get("observed_ip") == ip:
                return last
            time.sleep(0.5)
        raise AssertionError(f"{profile} never observed {ip}: {last}\n{self.gateway_log()}")

    def wait_ready_with(self, check, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = self.readyz()
            if check(*last):
                return last[1]
            time.sleep(0.5)
        raise AssertionError(f"readyz never satisfied the check: {last}\n{self.gateway_log()}")

    def job(self, user: str, url: str, source: str = GKE_NAT_IP, timeout: float = 10):
        """A job in the GKE cluster, leaving through its Cloud NAT address, using HTTPS_PROXY."""
        proxy = f"http://{user}:{PASSWORDS[user.split('+')[0]]}@{LB_IP}:3128"
        return self.ns["inet"].run(
            ["curl", "-sS", "--interface", source, "--max-time", str(timeout), "--connect-timeout", "3",
             "--cacert", str(self.ca), "-x", proxy, "-D", "-", url], check=False)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()
        for server in ("origin", "provider", "echo", "metadata"):
            if hasattr(self, server):
                getattr(self, server).shutdown()
        if hasattr(self, "dns"):
            self.dns.close()
        for ns in self.ns.values():
            ns.close()


def source_of(proc) -> str:
    body = proc.stdout.replace("\r\n", "\n").split("\n\n")[-1]
    return json.loads(body)["source"]


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("api.vendor-x.com", "data.vendor-y.net")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    path.chmod(0o644)
    return path, ctx


@pytest.fixture(scope="module")
def site(tmp_path_factory, certs):
    reason = unavailable_reason()
    if reason:  # under CI a failure, not a skip (tests/conftest.py): make test runs it as root
        required.missing(f"the GCP emulation's network namespaces: {reason}", "run `make test` as root")
    if not EGRESSGATE.exists():
        required.missing(f"{EGRESSGATE} (the gateway the emulated VM runs)")
    for user, pw in PASSWORDS.items():
        HASHES[user] = _hash(pw)
    tmp = tmp_path_factory.mktemp("gcp-site")
    tmp.chmod(0o755)
    s = Site(tmp)
    try:
        s.build()
        s.start_servers(certs)
        s.render(sample_variables())
        s.apply_nat()
        # Before the VM's service runs, COS's firewall lets no health check in.
        probe = s.ns["google"].run(["curl", "-sS", "--interface", LB_CHECKER_IP, "--connect-timeout", "2",
                                    f"http://{LB_IP}:9128/readyz"], check=False)
        s.closed_before_boot = probe.returncode
        s.boot()
        yield s
    finally:
        s.close()


# ------------------------------------------------------------------------------------- tests


def test_cos_default_firewall_blocks_until_the_unit_opens_it(site):
    assert site.closed_before_boot != 0, "COS's default INPUT chain should drop the health check"
    rules = site.ns["vm"].run(["iptables", "-w", "5", "-S"]).stdout
    assert "-A INPUT -j EGRESSGATE" in rules
    assert f"-A EGRESSGATE -s {GKE_NAT_IP}/32 -p tcp -m tcp --dport 3128 -j ACCEPT" in rules
    for hc in ("35.191.0.0/16", "209.85.152.0/22", "209.85.204.0/22", "130.211.0.0/22"):
        assert f"-A EGRESSGATE -s {hc} -p tcp -m tcp --dport 9128 -j ACCEPT" in rules
    # exactly the two ports: nothing else was opened
    opened = {line.split("--dport ")[1].split()[0] for line in rules.splitlines() if line.startswith("-A EGRESSGATE")}
    assert opened == {"3128", "9128"}
    # the firewall step ran before the gateway (ExecStartPre order) and is idempotent
    steps = [Path(argv[1]).name if argv[0].endswith("bash") else Path(argv[0]).name for argv, _ in site.ran]
    assert steps.index("firewall.sh") < steps.index("render-config.sh")
    again = site.ns["vm"].run(["bash", f"{site.root}/etc/egressgate/firewall.sh"])
    assert again.returncode == 0
    assert site.ns["vm"].run(["iptables", "-w", "5", "-S"]).stdout == rules


def test_render_config_used_the_metadata_server(site):
    assert any(path.startswith("/computeMetadata/v1/instance/network-interfaces/0/ip-aliases/")
               and flavor == "Google" for path, flavor in Metadata.requests), Metadata.requests
    assert any(path == f"/computeMetadata/v1/project/attributes/{MEMBERS_KEY}" and flavor == "Google"
               for path, flavor in Metadata.requests), Metadata.requests
    cfg = yaml.safe_load(site.config_path.read_text())
    assert cfg["egress"]["vendor-x"]["bind"] == [SLOT_ALIASES["vendor-x"][0]]
    assert cfg["egress"]["vendor-x"]["standby"] == [SLOT_ALIASES["vendor-x"][1]]
    assert cfg["egress"]["vendor-x"]["expect_ip"] == [ADDRESSES["vendor-x-a"], ADDRESSES["vendor-x-b"]]
    assert cfg["egress"]["vendor-y"]["bind"] == [SLOT_ALIASES["vendor-y"][0]]
    assert cfg["egress"]["vendor-y"]["standby"] == []
    assert cfg["probe"]["echo_url"] == "http://echo.example.net/"


def test_health_checkers_see_ready_with_every_profile_attested(site):
    body = site.wait_ready_with(lambda code, body: code == 200 and body.get("profiles") and all(
        p.get("observed_ip") for p in body["profiles"].values() if p["attested"]))
    assert body["ready"] is True
    assert body["profiles"]["vendor-x"]["observed_ip"] == ADDRESSES["vendor-x-a"]
    assert body["profiles"]["vendor-y"]["observed_ip"] == ADDRESSES["vendor-y-a"]
    assert all(p["ready"] for p in body["profiles"].values())
    # the autohealing checker reaches the VM's own address
    code, _ = site.readyz(AUTOHEAL_CHECKER_IP, VM_IP)
    assert code == 200


@pytest.mark.parametrize("user,url,nat", [
    ("vendor-x", "https://api.vendor-x.com/export", "vendor-x-a"),
    ("vendor-y", "https://data.vendor-y.net/daily.csv", "vendor-y-a"),
])
def test_gke_job_leaves_from_its_profiles_static_ip(site, user, url, nat):
    site.wait_ready_with(lambda code, body: code == 200)
    proc = site.job(user, url)
    assert proc.returncode == 0, proc.stderr + site.gateway_log()
    assert source_of(proc) == ADDRESSES[nat]


def test_primary_range_is_not_nated(site):
    """A connection not bound to a profile address has no way out (the gateway never makes one)."""
    proc = site.ns["vm"].run(["curl", "-sS", "--connect-timeout", "2", "--interface", VM_IP,
                              f"http://{ECHO_IP}/"], check=False)
    assert proc.returncode != 0


def test_outsider_gets_nothing(site):
    for port in (3128, 9128):
        proc = site.ns["inet"].run(["curl", "-sS", "--interface", OUTSIDER_IP, "--connect-timeout", "2",
                                    f"http://{LB_IP}:{port}/"], check=False)
        assert proc.returncode == 28, (port, proc.returncode, proc.stderr)  # dropped: connect timeout


def open_tunnel(site, user: str, host: str) -> ssl.SSLSocket:
    """A long CONNECT tunnel from the GKE client, TLS to the origin inside it."""
    with site.ns["inet"].entered():
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.bind((GKE_NAT_IP, 0))
    raw.settimeout(10)
    raw.connect((LB_IP, 3128))
    auth = base64.b64encode(f"{user}:{PASSWORDS[user]}".encode()).decode()
    raw.sendall(f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\nProxy-Authorization: Basic {auth}\r\n\r\n".encode())
    head = read_head(raw)
    assert head.startswith(b"HTTP/1.1 200"), head
    ctx = ssl.create_default_context(cafile=str(site.ca))
    return ctx.wrap_socket(raw, server_hostname=host)


def tunnel_get(tls: ssl.SSLSocket, host: str) -> str:
    tls.sendall(f"GET /stream HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        data += tls.recv(4096)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int([ln for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length")][0].split(b":")[1])
    while len(body) < length:
        body += tls.recv(4096)
    return json.loads(body)["source"]


def test_wrong_nat_mapping_fails_closed_for_that_profile_only(site):
    """A profile whose NAT hands out an IP nobody allow-listed refuses its traffic (503, the
    hardening issue's fail-closed contract) and shows on /readyz; the other profiles keep serving."""
    site.wait_ready_with(lambda code, body: code == 200)
    good_x = site.nat_ip["vendor-x-a"]
    site.set_nat("vendor-y-a", WRONG_IP)  # vendor-y has no standby: nothing to fail over to
    try:
        site.reload()
        body = site.wait_ready_with(lambda code, body: body.get("profiles", {}).get("vendor-y", {}).get(
            "observed_ip") == WRONG_IP)
        assert body["profiles"]["vendor-y"]["ready"] is False
        assert body["profiles"]["vendor-y"]["reason"]
        assert body["profiles"]["vendor-x"]["ready"] is True
        assert body["ready"] is True  # probe.readiness: any - the VM still serves vendor-x
        refused = site.job("vendor-y", "https://data.vendor-y.net/daily.csv")
        assert "HTTP/1.1 503" in refused.stdout, refused.stdout + refused.stderr
        status = [ln for ln in refused.stdout.splitlines() if ln.lower().startswith("proxy-status:")]
        assert status and "destination_unavailable" in status[0] and WRONG_IP in status[0], status
        # no job traffic left from the wrong IP (the providers' own checks, /ping, still run there)
        assert not [s for s in Recorder.seen if s[2] == WRONG_IP and s[1] != "/ping"], "a job left from the wrong IP"
        served = site.job("vendor-x", "https://api.vendor-x.com/export")
        assert served.returncode == 0 and source_of(served) == good_x
    finally:
        site.set_nat("vendor-y-a", ADDRESSES["vendor-y-a"])
        site.reload()
    site.wait_ready_with(lambda code, body: body.get("profiles", {}).get("vendor-y", {}).get("ready") is True)


def test_ipaddresses_are_sane():
    # the emulated static IPs must pass the gateway's address guard as destinations would
    for ip in (ORIGIN_IP, ECHO_IP):
        assert ipaddress.ip_address(ip).is_global


def wait_for(what: str, check, site, timeout: float = 60):
    """Poll ``check()`` until it returns something truthy (bounded); fail with the gateway's log."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.3)
    raise AssertionError(f"never: {what} (last: {last})\n{site.gateway_log()}\n{Path(site.watch_log.name).read_text()[-2000:]}")


def row(site, profile: str, member: str) -> dict | None:
    """The provider-check row of one member of a profile on /status."""
    view = site.status()["profiles"][profile]["providers"] or {}
    return next((r for r in view.get("checks", []) if r.get("member") == member), None)


def job_source(site, user: str, url: str) -> str | None:
    proc = site.job(user, url)
    if proc.returncode != 0 or "HTTP/1.1 200" not in proc.stdout:
        return None
    return source_of(proc)


def test_rotation_runbook_standby_verify_promote_drain_release(site):
    """docs/deploy-gcp.md "Move a profile to a new egress IP": reserve -> add as a standby -> every
    provider accepts it -> promote -> drain -> release. Each step is one `terraform apply` of
    egress_profiles that the running VM takes live (no instance-template change, no restart): the
    watcher renders the project metadata, the gateway reloads by itself. A provider refusing the
    standby's address holds the promotion (switch: verified) while traffic keeps leaving from the
    active member; once it accepts, the promotion happens and a tunnel opened before keeps moving
    bytes on the old address."""
    a, b = SLOT_ALIASES["vendor-y"][0], SLOT_ALIASES["vendor-y"][1]
    site.wait_ready_with(lambda code, body: code == 200)
    gateway_pid = site.gateway.pid
    Recorder.refused = {ADDRESSES["vendor-y-b"]}  # the provider has not allow-listed b yet
    try:
        # 1-2. Reserve vendor-y-b (egress_ips) and add it as a standby: its own slot, NAT and IP.
        site.apply(sample_variables(**{"vendor-y": profile("vendor-y", ["vendor-y-a"], ["vendor-y-b"])}))
        wait_for("b is a standby on the VM", lambda: site.status()["profiles"]["vendor-y"]["standby"] == [b], site)
        # 3. See every provider: b is attested (its own public IP) but refused by the provider.
        seen = wait_for("b refused by the provider", lambda: (r := row(site, "vendor-y", b)) and r.get("ok") is False
                        and r, site)
        assert seen.get("role") == "standby", seen
        att = {x["member"]: x for x in site.status()["profiles"]["vendor-y"]["attestation"]}
        wait_for("b attested", lambda: {x["member"]: x for x in site.status()["profiles"]["vendor-y"]["attestation"]}
                 .get(b, {}).get("observed_ip") == ADDRESSES["vendor-y-b"], site)
        assert att[a]["observed_ip"] == ADDRESSES["vendor-y-a"]
        assert job_source(site, "vendor-y", "https://data.vendor-y.net/while-standby") == ADDRESSES["vendor-y-a"]
        tunnel = open_tunnel(site, "vendor-y", "data.vendor-y.net")
        try:
            assert tunnel_get(tunnel, "data.vendor-y.net") == ADDRESSES["vendor-y-a"]
            # 4. Promote while the provider still refuses b: held, traffic stays on a.
            promote = sample_variables(**{"vendor-y": profile("vendor-y", ["vendor-y-b"], ["vendor-y-a"])})
            site.apply(promote)
            held = wait_for("the promotion is held", lambda: (site.status()["profiles"]["vendor-y"]["providers"] or {})
                            .get("pending_switch"), site)
            assert b in json.dumps(held), held
            for i in range(3):
                assert job_source(site, "vendor-y", f"https://data.vendor-y.net/held-{i}") == ADDRESSES["vendor-y-a"]
            assert not [s for s in Recorder.seen if s[2] == ADDRESSES["vendor-y-b"] and not s[1].startswith("/ping")]
            # The provider accepts b: the gateway promotes by itself, new connections leave from b.
            Recorder.refused = set()
            wait_for("new connections leave from b", lambda: job_source(
                site, "vendor-y", "https://data.vendor-y.net/after") == ADDRESSES["vendor-y-b"], site)
            assert site.status()["profiles"]["vendor-y"]["carrying"] == [b]
            # the tunnel opened before the promotion keeps moving bytes, on a
            for _ in range(3):
                assert tunnel_get(tunnel, "data.vendor-y.net") == ADDRESSES["vendor-y-a"]
        finally:
            tunnel.close()
        # 5. Drain: nothing is left open on a.
        wait_for("nothing open on a", lambda: not [c for c in site.status()["connections"]["open"]
                                                   if c.get("egress_addr") == a], site)
        # 6. Release a: out of the profile (its NAT goes), then out of egress_ips.
        released = sample_variables(**{"vendor-y": profile("vendor-y", ["vendor-y-b"])})
        released["egress_ips"] = [n for n in ADDRESSES if n != "vendor-y-a"]
        site.apply(released)
        wait_for("a is gone", lambda: site.status()["profiles"]["vendor-y"]["standby"] == [], site)
        assert job_source(site, "vendor-y", "https://data.vendor-y.net/released") == ADDRESSES["vendor-y-b"]
        assert site.gateway.pid == gateway_pid and site.gateway.poll() is None, "the VM was never restarted"
        cfg = yaml.safe_load(site.config_path.read_text())
        assert cfg["egress"]["vendor-y"]["bind"] == [b] and cfg["egress"]["vendor-y"]["expect_ip"] == [
            ADDRESSES["vendor-y-b"]]
    finally:
        Recorder.refused = set()


def test_auto_failover_moves_new_connections_to_the_standby(site):
    """switch: auto on vendor-x (active vendor-x-a, standby vendor-x-b, each its own NAT and IP):
    the provider blocks the active address; after failover_after rounds new connections leave from
    the standby, while a tunnel opened before stays on the active address."""
    a, b = SLOT_ALIASES["vendor-x"][0], SLOT_ALIASES["vendor-x"][1]
    site.wait_ready_with(lambda code, body: code == 200)
    wait_for("b checked and accepted", lambda: (r := row(site, "vendor-x", b)) and r.get("ok") is True, site)
    assert job_source(site, "vendor-x", "https://api.vendor-x.com/before") == ADDRESSES["vendor-x-a"]
    tunnel = open_tunnel(site, "vendor-x", "api.vendor-x.com")
    try:
        assert tunnel_get(tunnel, "api.vendor-x.com") == ADDRESSES["vendor-x-a"]
        Recorder.refused = {ADDRESSES["vendor-x-a"]}  # provider vendor-x blocks a at 3 a.m.
        wait_for("new connections fail over to b", lambda: job_source(
            site, "vendor-x", "https://api.vendor-x.com/after") == ADDRESSES["vendor-x-b"], site)
        status = site.status()["profiles"]["vendor-x"]
        assert status["carrying"] == [b] and status["members"] == [a], status
        for i in range(3):
            assert job_source(site, "vendor-x", f"https://api.vendor-x.com/again-{i}") == ADDRESSES["vendor-x-b"]
        # the open tunnel was not moved (the origin answers it from a, refused or not)
        assert tunnel_get(tunnel, "api.vendor-x.com") == ADDRESSES["vendor-x-a"]
    finally:
        tunnel.close()
        Recorder.refused = set()
