"""The config tooling as a user runs it (``python -m egressgate ...`` in a subprocess):
check-config reports every error of a file in one run with a suggestion for a typo, warns about
dangerous configs (``--strict`` fails on warnings), ``probe`` resolves through ``dns.servers``
and ``explain --profile`` decides for the profile a client asks for."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

from .dnsserver import DnsServer

LINE = re.compile(r"^(?P<file>.+?):(?P<line>[0-9]+): (?P<key>[A-Za-z_][\w.\[\]-]*): (?P<what>\S.*)$")


def egressgate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "egressgate", *args], capture_output=True, text=True, timeout=60)


def write(tmp_path: Path, text: str, name: str = "gw.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_check_config_reports_every_mistake_in_one_run(tmp_path):
    path = write(tmp_path, """\
        listen:
          - address: 0.0.0.0:3128
            egress: default
        egress:
          vendor-x:
            direct: {}
            expected_ip: [203.0.113.10]
        clients:
          - name: a
            from: [10.0.0.0/8, 10.0.0.300/16]
            egress: [vendor-z]
          - name: b
            from: [10.1.0.0/16]
            username: b
            password_file: /nonexistent/egressgate/b
        timeouts:
          dns: soon
        """)
    r = egressgate("check-config", path)
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stderr.splitlines()
    # schema errors and compile-time errors (unknown profile, unreadable secret) together
    assert lines == [
        f"{path}:7: egress.vendor-x.expected_ip: unknown key; did you mean `expect_ip`?",
        f"{path}:10: clients[0].from[1]: not an IP address or CIDR: '10.0.0.300/16'",
        f"{path}:11: clients[0].egress[0]: unknown egress profile 'vendor-z'",
        f"{path}:15: clients[1].password_file: file not found: /nonexistent/egressgate/b",
        f"{path}:17: timeouts.dns: expected a duration such as 30, '30s', '500ms' or '5m'",  # (source order)
    ], r.stderr
    assert all(LINE.match(line) for line in lines)


def test_offline_checks_secrets_are_named_not_present(tmp_path):
    path = write(tmp_path, """\
        clients:
          - {name: job, from: [10.0.0.0/8], username: job, password_file: /run/secrets/not-here}
          - {name: env, from: [10.1.0.0/16], username: env, password_env: EGRESSGATE_NOT_SET_IN_CI}
        """)
    r = egressgate("check-config", path)
    assert r.returncode == 1 and "clients[0].password_file: file not found" in r.stderr, r.stderr
    assert "clients[1].password_env: environment variable EGRESSGATE_NOT_SET_IN_CI is not set" in r.stderr
    r = egressgate("check-config", "--offline", path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == f"{path}: OK" and r.stderr == ""


def test_warnings_and_strict(tmp_path):
    path = write(tmp_path, """\
        admin:
          address: 0.0.0.0:0
        egress:
          far: {bind: [192.0.2.77]}
        clients:
          - name: everyone
            from: [0.0.0.0/0]
          - name: office
            from: [10.1.2.3/16]
            username: office
            password_env: OFFICE_SECRET
        security:
          allow_private: ["::/0"]
        """)
    r = egressgate("check-config", "--offline", path)  # offline: bind addresses are not checked
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == f"{path}: OK (4 warnings)"
    warned = {}
    for line in r.stderr.splitlines():
        m = LINE.match(line)
        assert m and m["what"].startswith("warning: "), line
        warned[m["key"]] = int(m["line"])
    assert warned == {"admin.address": 2, "clients[0].from[0]": 7, "security.allow_private[0]": 13,
                      "clients[1].from[0]": 9}
    assert "10.1.2.3/16 has host bits set; it means 10.1.0.0/16" in r.stderr

    r = egressgate("check-config", "--offline", "--strict", path)
    assert r.returncode == 1 and r.stdout == "" and r.stderr.count(": warning: ") == 4

    # on this host: 192.0.2.77 is none of its addresses (secrets now present, too)
    env_path = write(tmp_path, Path(path).read_text().replace("password_env: OFFICE_SECRET",
                                                              f"password_file: {tmp_path / 'office'}"), "host.yaml")
    (tmp_path / "office").write_text("a-real-secret-9f8e7d")
    r = egressgate("check-config", env_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{env_path}:4: egress.far.bind[0]: warning: 192.0.2.77 is not an address of this host" in r.stderr


def test_a_clean_config_has_no_warnings_even_strict(tmp_path):
    path = write(tmp_path, """\
        listen: [{address: 127.0.0.1:3128}]
        egress:
          lo: {bind: [127.0.0.2]}
        clients: [{name: local, from: [127.0.0.0/8], egress: [lo]}]
        """)
    r = egressgate("check-config", "--strict", path)
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_probe_resolves_the_echo_service_through_dns_servers(tmp_path, origin):
    # The echo service's name exists only on the configured name server, as for the server itself.
    with DnsServer({"echo.probe.test": ["127.0.0.1"]}) as dns:
        path = tmp_path / "probe.yaml"
        path.write_text(yaml.safe_dump({
            "dns": {"servers": [dns.address]},
            "egress": {"lo": {"bind": ["127.0.0.2"], "expect_ip": ["127.0.0.2"]}},
            "probe": {"echo_url": f"http://echo.probe.test:{origin.port}/ip"},
        }))
        r = egressgate("probe", "--config", str(path), "--profile", "lo")
        assert "echo.probe.test" in dns.queries, r.stdout + r.stderr
    assert r.returncode == 0, r.stdout + r.stderr
    (row,) = [line for line in r.stdout.splitlines() if line.startswith("lo ")]
    assert "127.0.0.2" in row and row.rstrip().endswith("OK")


def test_explain_with_the_profile_a_client_asks_for(tmp_path):
    path = tmp_path / "explain.yaml"
    path.write_text(yaml.safe_dump({
        "egress": {"a": {"bind": ["127.0.0.2"]}, "b": {"bind": ["127.0.0.3"]}, "c": {"direct": {}}},
        "clients": [{"name": "job", "from": ["127.0.0.0/8"], "egress": ["a", "b"]}],
        "security": {"allow_private": ["198.51.100.0/24"]},
    }))
    cmd = ["explain", "--config", str(path), "--client", "job"]
    r = egressgate(*cmd, "198.51.100.7:443")
    assert "profile:     a (bind: 127.0.0.2)" in r.stdout, r.stdout + r.stderr
    r = egressgate(*cmd, "--profile", "b", "198.51.100.7:443")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "asks for:    profile b\n" in r.stdout and "profile:     b (bind: 127.0.0.3)" in r.stdout
    r = egressgate(*cmd, "--profile", "c", "198.51.100.7:443")
    assert r.returncode == 1 and "DENY: profile_not_allowed" in r.stdout, r.stdout


def test_explain_names_the_shared_ip_limits_a_request_counts_against(tmp_path):
    path = tmp_path / "explain.yaml"
    path.write_text(yaml.safe_dump({
        "egress": {"a": {"bind": ["127.0.0.2"], "protect": [
            {"name": "vendor", "destinations": ["198.51.100.0/24"], "max_concurrent": 20, "max_per_second": 5}]}},
        "clients": [{"name": "job", "from": ["127.0.0.0/8"], "egress": ["a"]}],
        "security": {"allow_private": ["198.51.100.0/24", "203.0.113.0/24"]},
    }))
    cmd = ["explain", "--config", str(path), "--client", "job"]
    r = egressgate(*cmd, "198.51.100.7:443")
    assert "protect:     vendor per egress member, all clients: max_concurrent 20, max_per_second 5, " \
           "Retry-After holds up to 300s\n" in r.stdout, r.stdout + r.stderr
    assert "protect:" not in egressgate(*cmd, "203.0.113.7:443").stdout
