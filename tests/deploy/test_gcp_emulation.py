"""The GCP reference architecture of deploy/terraform/gcp, stood up on one machine in network
namespaces from the module's own files, and a job carried through it.

    inet ───────────── the internet: origin (records the client address), IP-echo service,
     │  │  │           the GKE cluster's NAT address (in client_cidrs) and an outsider (not in it)
     │  natX natY ──── Cloud NAT per profile: SNAT of that profile's secondary range to its static
     │  │  │           IP (LIST_OF_SECONDARY_IP_RANGES); nothing else is translated
    vpc ────────────── Google's network: the load balancer's IP routed to the VM (passthrough), the
     │   │             metadata server and DNS at 169.254.169.254, policy routes to each profile's NAT
     vm  google ────── health checkers at 35.191.0.10 (LB) and 130.211.0.10 (autohealing)
     └ "VM": COS's default INPUT chain (established + SSH only), then what cloud-init and the systemd
       unit do before the container starts: firewall.sh, fetch-tls.sh, render-config.sh (alias IPs
       from the stub metadata server over HTTP with Metadata-Flavor: Google), then the gateway
       itself on the rendered config (the container's command, run from this checkout).

The config and cloud-init are rendered from the module's templates by tests/deploy/gcp_module.py
(the mirror of locals.tf) for sample variables; "terraform apply" of a variable change is re-rendering
plus what GCP would do with it (a new instance template rolls the VM; a NAT change only changes the
NAT's SNAT rule, keeping established connections on their old IP as Cloud NAT's drain_nat_ips does).
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

from tests.deploy.conftest import REPO  # noqa: E402

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
ALIASES = {"vendor-x": "10.20.1.5", "vendor-y": "10.20.2.5"}
ADDRESSES = {  # what google_compute_address.nat would allocate
    "vendor-x-a": "34.77.1.10",
    "vendor-y-a": "34.77.2.10",
    "vendor-y-b": "34.77.2.11",
}
NAMES = {"api.vendor-x.com": ORIGIN_IP, "data.vendor-y.net": ORIGIN_IP, "echo.example.net": ECHO_IP,
         "metadata.google.internal": "169.254.169.254"}
PASSWORDS = {"vendor-x": "4f1e0a9c2b7d", "vendor-y": "9a8b7c6d5e4f"}


def sample_variables(**profiles_override) -> dict:
    profiles = {
        "vendor-x": {"secondary_cidr": "10.20.1.0/24", "nat_ip_names": ["vendor-x-a"]},
        "vendor-y": {"secondary_cidr": "10.20.2.0/24", "nat_ip_names": ["vendor-y-a"]},
    }
    profiles.update(profiles_override)
    return {
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


class Recorder(http.server.BaseHTTPRequestHandler):
    """Origin: answers every request with the address it came from, and records it."""

    protocol_version = "HTTP/1.1"
    seen: list[tuple[str, str, str]] = []

    def do_GET(self):  # noqa: N802
        Recorder.seen.append((self.headers.get("Host", ""), self.path, self.client_address[0]))
        body = json.dumps({"host": self.headers.get("Host"), "source": self.client_address[0]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Echo(http.server.BaseHTTPRequestHandler):
    """IP-echo service (what probe.echo_url points at): the caller's address as plain text."""

    def do_GET(self):  # noqa: N802
        body = (self.client_address[0] + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Metadata(http.server.BaseHTTPRequestHandler):
    """The GCE metadata server, as much of it as render-config.sh reads."""

    requests: list[tuple[str, str | None]] = []

    def do_GET(self):  # noqa: N802
        Metadata.requests.append((self.path, self.headers.get("Metadata-Flavor")))
        if self.headers.get("Metadata-Flavor") != "Google":
            self.send_error(403, "Missing Metadata-Flavor:Google header.")
            return
        if self.path.startswith("/computeMetadata/v1/instance/network-interfaces/0/ip-aliases/"):
            body = json.dumps([f"{ip}/32" for ip in ALIASES.values()]).encode()
        else:
            self.send_error(404)
            return
        self.send_response(200)
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
        for name in ("vpc", "vm", "google", "inet", "nat-vendor-x", "nat-vendor-y"):
            self.ns[name] = Netns(name)
        vpc, vm, goog, inet = self.ns["vpc"], self.ns["vm"], self.ns["google"], self.ns["inet"]
        link(vpc, "vm0", "10.10.0.1/24", vm, "eth0", f"{VM_IP}/24")
        link(vpc, "goog0", "172.28.0.1/30", goog, "eth0", "172.28.0.2/30")
        link(vpc, "inet0", "172.29.0.1/30", inet, "vpc0", "172.29.0.2/30")
        vpc.sh("sysctl -qw net.ipv4.ip_forward=1; ip addr add 169.254.169.254/32 dev lo")
        vm.sh(f"""
            ip route add default via 10.10.0.1
            # what the guest agent does with alias IP ranges and forwarding-rule addresses
            ip route add to local {ALIASES['vendor-x']}/32 dev eth0 proto 66 table local
            ip route add to local {ALIASES['vendor-y']}/32 dev eth0 proto 66 table local
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
        for i, (profile, cidr) in enumerate((("vendor-x", "10.20.1.0/24"), ("vendor-y", "10.20.2.0/24")), 1):
            nat = self.ns[f"nat-{profile}"]
            link(vpc, f"nat{i}", f"172.30.{i}.1/30", nat, "in0", f"172.30.{i}.2/30")
            link(inet, f"nat{i}", f"172.31.{i}.1/30", nat, "out0", f"172.31.{i}.2/30")
            # the primary range is not NATed: only this profile's secondary range reaches this NAT
            vpc.sh(f"ip rule add from {cidr} lookup {100 + i}; ip route add default via 172.30.{i}.2 table {100 + i}")
            nat.sh(f"""
                sysctl -qw net.ipv4.ip_forward=1
                ip route add default via 172.31.{i}.1
                ip route add {cidr} via 172.30.{i}.1
                iptables -w 5 -P FORWARD DROP
                iptables -w 5 -A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
                iptables -w 5 -A FORWARD -i in0 -s {cidr} -j ACCEPT
                iptables -w 5 -t nat -N CLOUDNAT
                iptables -w 5 -t nat -A POSTROUTING -o out0 -s {cidr} -j CLOUDNAT
            """)
            for ip in [a for n, a in ADDRESSES.items() if n.startswith(profile)] + ([WRONG_IP] if i == 1 else []):
                inet.run(["ip", "route", "add", f"{ip}/32", "via", f"172.31.{i}.2"])
        self.resolv = self.tmp / "resolv.conf"
        self.resolv.write_text("nameserver 169.254.169.254\noptions timeout:1 attempts:2\n")
        self.resolv.chmod(0o644)

    def set_nat(self, profile: str, ip: str) -> None:
        """Cloud NAT's nat_ips for new connections; established ones keep their mapping (conntrack)."""
        nat = self.ns[f"nat-{profile}"]
        nat.sh(f"iptables -w 5 -t nat -F CLOUDNAT; iptables -w 5 -t nat -A CLOUDNAT -j SNAT --to-source {ip}")
        self.nat_ip[profile] = ip

    def apply_nat(self) -> None:
        """The NAT side of `terraform apply`: each profile's first active NAT IP."""
        for profile, p in self.variables["egress_profiles"].items():
            self.set_nat(profile, ADDRESSES[p["nat_ip_names"][0]])

    # ---- servers
    def start_servers(self, certs) -> None:
        self.ca, ctx = certs
        self.origin = serve_http(self.ns["inet"], (ORIGIN_IP, 443), Recorder, tls=ctx)
        self.echo = serve_http(self.ns["inet"], (ECHO_IP, 80), Echo)
        self.metadata = serve_http(self.ns["vpc"], ("169.254.169.254", 80), Metadata)
        self.dns = serve_dns(self.ns["vpc"], "169.254.169.254", NAMES)

    # ---- the VM
    def render(self, variables: dict):
        self.variables = variables
        self.rendered = render(variables, ADDRESSES)
        return self.rendered

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
        for cmd in cmds["ExecStartPre"]:
            optional = cmd.startswith("-")
            argv = cmd.lstrip("-").split()
            if argv[0].endswith(("docker", "docker-credential-gcr")):
                continue  # no container engine here: the image's command runs directly below
            argv = [a.replace("/etc/egressgate", f"{root}/etc/egressgate")
                     .replace("/run/egressgate", f"{root}/run/egressgate")
                     .replace("/var/lib/egressgate", f"{root}/var/lib/egressgate") for a in argv]
            env = machine_env(TLS_DIR=f"{root}/run/egressgate/tls", EGRESSGATE_GID=str(os.getgid()),
                              PATH="/usr/sbin:/usr/bin:/sbin:/bin")
            proc = self.ns["vm"].run(argv, check=not optional, resolv=str(self.resolv), env=env)
            self.ran.append((argv, proc))
        (run,) = cmds["ExecStart"]
        assert "--volume=/run/egressgate/config.yaml:/etc/egressgate/config.yaml:ro" in run
        assert "--network=host" in run
        self.config_path = root / "run" / "egressgate" / "config.yaml"
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
        """`docker stop`: SIGTERM, the gateway drains and exits."""
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
        for server in ("origin", "echo", "metadata"):
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
    if reason:
        pytest.skip(f"GCP emulation skipped: {reason}")
    if not EGRESSGATE.exists():
        pytest.skip(f"{EGRESSGATE} is not installed (make test installs it)")
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
    cfg = yaml.safe_load(site.config_path.read_text())
    assert cfg["egress"]["vendor-x"]["bind"] == [ALIASES["vendor-x"]]
    assert cfg["egress"]["vendor-y"]["bind"] == [ALIASES["vendor-y"]]
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
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = raw.recv(4096)
        assert chunk, head
        head += chunk
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


def test_ip_rotation_runbook(site):
    """docs/deploy-gcp.md "Move a profile to a new egress IP": reserve -> switch -> remove."""
    base = sample_variables()
    y = dict(base["egress_profiles"]["vendor-y"])
    # 1. Reserve vendor-y-b: expect_ip grows, the instance template changes, the VM rolls.
    reserve = sample_variables(**{"vendor-y": {**y, "reserved_nat_ip_names": ["vendor-y-b"]}})
    before = site.rendered.gateway_config
    site.roll(reserve)
    assert site.rendered.gateway_config != before
    site.apply_nat()
    site.wait_observed("vendor-y", ADDRESSES["vendor-y-a"])
    tunnel = open_tunnel(site, "vendor-y", "data.vendor-y.net")
    try:
        assert tunnel_get(tunnel, "data.vendor-y.net") == ADDRESSES["vendor-y-a"]
        # 2. Switch: nat_ip_names = [b], draining = [a]. The gateway config does not change (no roll).
        switch = sample_variables(**{"vendor-y": {**y, "nat_ip_names": ["vendor-y-b"],
                                                  "draining_nat_ip_names": ["vendor-y-a"]}})
        assert render(switch, ADDRESSES).gateway_config == site.rendered.gateway_config
        site.variables = switch
        site.apply_nat()
        site.reload()  # `systemctl reload egressgate`: re-probe now instead of within probe.interval
        site.wait_observed("vendor-y", ADDRESSES["vendor-y-b"])
        assert site.readyz()[0] == 200
        new = site.job("vendor-y", "https://data.vendor-y.net/after-switch")
        assert new.returncode == 0, new.stderr
        assert source_of(new) == ADDRESSES["vendor-y-b"], "new connections leave from the new IP"
        assert tunnel_get(tunnel, "data.vendor-y.net") == ADDRESSES["vendor-y-a"], "the open tunnel is intact"
        other = site.job("vendor-x", "https://api.vendor-x.com/unaffected")
        assert source_of(other) == ADDRESSES["vendor-x-a"]
    finally:
        tunnel.close()
    # 3. Remove vendor-y-a once drained: expect_ip shrinks, the VM rolls once more.
    remove = sample_variables(**{"vendor-y": {**y, "nat_ip_names": ["vendor-y-b"]}})
    site.roll(remove)
    site.apply_nat()
    seen = site.wait_observed("vendor-y", ADDRESSES["vendor-y-b"])
    assert seen["expect_ip"] == [ADDRESSES["vendor-y-b"]]
    assert site.readyz()[0] == 200


def test_wrong_nat_mapping_fails_closed_for_that_profile_only(site):
    """A profile whose NAT hands out an IP nobody allow-listed refuses its traffic (503, the
    hardening issue's fail-closed contract) and shows on /readyz; the other profiles keep serving."""
    site.wait_ready_with(lambda code, body: code == 200)
    good_y = site.nat_ip["vendor-y"]
    site.set_nat("vendor-x", WRONG_IP)
    try:
        site.reload()
        body = site.wait_ready_with(lambda code, body: body.get("profiles", {}).get("vendor-x", {}).get(
            "observed_ip") == WRONG_IP)
        assert body["profiles"]["vendor-x"]["ready"] is False
        assert body["profiles"]["vendor-x"]["reason"]
        assert body["profiles"]["vendor-y"]["ready"] is True
        assert body["ready"] is True  # probe.readiness: any - the VM still serves vendor-y
        refused = site.job("vendor-x", "https://api.vendor-x.com/export")
        assert "HTTP/1.1 503" in refused.stdout, refused.stdout + refused.stderr
        status = [ln for ln in refused.stdout.splitlines() if ln.lower().startswith("proxy-status:")]
        assert status and "destination_unavailable" in status[0] and WRONG_IP in status[0], status
        assert not [s for s in Recorder.seen if s[2] == WRONG_IP], "nothing left from the wrong IP"
        served = site.job("vendor-y", "https://data.vendor-y.net/daily.csv")
        assert served.returncode == 0 and source_of(served) == good_y
    finally:
        site.apply_nat()
        site.reload()
    site.wait_ready_with(lambda code, body: body.get("profiles", {}).get("vendor-x", {}).get("ready") is True)


def test_ipaddresses_are_sane():
    # the emulated static IPs must pass the gateway's address guard as destinations would
    for ip in (ORIGIN_IP, ECHO_IP):
        assert ipaddress.ip_address(ip).is_global
