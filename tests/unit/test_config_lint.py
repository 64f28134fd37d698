"""config/lint.py: the warnings ``check-config`` prints for valid but dangerous or useless
configs. Each case is a config text and the (location, words) of every warning it must get."""

from __future__ import annotations

import textwrap

import pytest
import yaml

from egressgate.config import load_config_text
from egressgate.config.lint import Finding, host_bits, lint

LINT_CASES = [
    # (id, config text, [(loc, a phrase of the message)])
    ("default-is-quiet", "", []),
    # issue 26 item 2: a shared, external condition must not evict every replica at once
    ("readiness-all-evicts-every-replica", """\
        probe: {echo_url: "http://127.0.0.1:9/ip", readiness: all}
        egress:
          a: {bind: [127.0.0.2], expect_ip: [127.0.0.2]}
          b: {bind: [127.0.0.3], expect_ip: [127.0.0.3]}
        """, [(("probe", "readiness"), "every replica")]),
    ("readiness-any-is-quiet", """\
        probe: {echo_url: "http://127.0.0.1:9/ip"}
        egress:
          a: {bind: [127.0.0.2], expect_ip: [127.0.0.2]}
          b: {bind: [127.0.0.3], expect_ip: [127.0.0.3]}
        """, []),
    ("socks5-with-certificate-clients-only", """\
        listen:
          - {address: "127.0.0.1:3128", tls: {cert: a.crt, key: a.key, client_ca: ca.crt}}
          - {address: "127.0.0.1:1080", protocol: socks5}
        clients:
          - {name: job, from: [10.0.0.0/8], cert_subject: job}
        """, [(("listen", 1, "protocol"), "cert_subject never match SOCKS5")]),
    ("socks5-with-a-password-client", """\
        listen:
          - {address: "127.0.0.1:1080", protocol: socks5}
        clients:
          - {name: job, from: [10.0.0.0/8], username: job, password_env: JOB_SECRET}
        """, []),
    ("open-client-v4", """\
        clients:
          - {name: anyone, from: [0.0.0.0/0]}
        """, [(("clients", 0, "from", 0), "open proxy")]),
    ("open-client-v6-second-cidr", """\
        clients:
          - {name: anyone, from: [10.0.0.0/8, "::/0"]}
        """, [(("clients", 0, "from", 1), "open proxy")]),
    ("everywhere-with-credentials-is-fine", """\
        clients:
          - name: job
            from: [0.0.0.0/0]
            username: job
            password_env: JOB_SECRET
        """, []),
    ("admin-off-loopback-no-token", """\
        admin: {address: 0.0.0.0:9128}
        """, [(("admin", "address"), "POST /-/reload")]),
    ("admin-off-loopback-with-token-env", """\
        admin: {address: 0.0.0.0:9128, token_env: ADMIN_TOKEN}
        """, []),
    ("admin-ipv6-loopback", """\
        admin: {address: "[::1]:9128"}
        """, []),
    ("admin-off", """\
        admin: {address: null}
        """, []),
    ("allow-private-everything", """\
        security: {allow_private: [10.0.0.0/8, "::/0", 0.0.0.0/0]}
        """, [(("security", "allow_private", 1), "metadata"), (("security", "allow_private", 2), "metadata")]),
    ("allow-private-one-range", """\
        security: {allow_private: [10.0.0.0/8]}
        """, []),
    ("client-from-nobody", """\
        clients:
          - {name: nobody, from: []}
        """, [(("clients", 0, "from"), "never matches")]),
    ("cert-subject-without-mtls-listener", """\
        clients:
          - {name: by-cert, cert_subject: job-a}
        """, [(("clients", 0, "cert_subject"), "never matches")]),
    # issue 28: workers share exact counts through worker 0; instances do not without fleet.redis
    ("protect-without-a-fleet-store-one-worker", """\
        egress:
          px: {bind: [10.0.0.1], protect: [{destinations: [a.test], max_concurrent: 5}]}
        """, [(("egress", "px", "protect"), "per instance")]),
    ("protect-without-a-fleet-store-several-workers", """\
        workers: 3
        egress:
          px: {bind: [10.0.0.1], protect: [{destinations: [a.test], max_per_second: 5}]}
          py: {bind: [10.0.0.2], protect: [{destinations: [b.test]}]}
          pz: {bind: [10.0.0.3], protect: [{destinations: [c.test], max_hold: 0}]}
          pw: {bind: [10.0.0.4]}
        """, [(("egress", "px", "protect"), "set fleet.redis"),
              (("egress", "py", "protect"), "limits and holds are counted per instance")]),
    ("protect-with-a-fleet-store", """\
        workers: 3
        fleet: {redis: {url: "redis://10.0.0.9:6379"}}
        egress:
          px: {bind: [10.0.0.1], protect: [{destinations: [a.test], max_per_second: 5}]}
        """, []),
    ("protect-with-a-fleet-store-one-worker", """\
        fleet: {redis: {url: "redis://10.0.0.9:6379"}}
        egress:
          px: {bind: [10.0.0.1], protect: [{destinations: [a.test], max_concurrent: 5}]}
        """, []),
]


def _load(text: str):
    text = textwrap.dedent(text)
    return load_config_text(text, "gw.yaml", offline=True), yaml.safe_load(text) or {}


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in LINT_CASES], ids=[c[0] for c in LINT_CASES])
def test_lint_rules(text: str, expected: list[tuple[tuple, str]]) -> None:
    config, _ = _load(text)
    found = lint(config)
    assert [f.loc for f in found] == [loc for loc, _ in expected], found
    for finding, (_, phrase) in zip(found, expected, strict=True):
        assert phrase in finding.message


def test_cert_subject_with_an_mtls_listener_is_quiet(tmp_path) -> None:
    for name in ("c.pem", "k.pem", "ca.pem"):
        (tmp_path / name).write_text("x")
    config, _ = _load(f"""\
        listen:
          - address: 127.0.0.1:3128
            tls: {{cert: {tmp_path}/c.pem, key: {tmp_path}/k.pem, client_ca: {tmp_path}/ca.pem}}
        clients:
          - {{name: by-cert, cert_subject: job-a}}
        """)
    assert lint(config) == []


HOST_BITS_CASES = [
    ("clean", "clients: [{name: a, from: [10.0.0.0/8]}]\n", []),
    ("client-from", "clients: [{name: a, from: [10.1.2.3/8, 192.168.1.0/24]}]\n",
     [Finding(("clients", 0, "from", 0), "10.1.2.3/8 has host bits set; it means 10.0.0.0/8")]),
    ("trusted-proxies", "listen: [{address: 127.0.0.1:3128, proxy_protocol: true, trusted_proxies: [10.0.0.1/24]}]\n",
     [Finding(("listen", 0, "trusted_proxies", 0), "10.0.0.1/24 has host bits set; it means 10.0.0.0/24")]),
    ("allow-private-v6", "security: {allow_private: ['fd00::1/64']}\n",
     [Finding(("security", "allow_private", 0), "fd00::1/64 has host bits set; it means fd00::/64")]),
    ("plain-address-is-not-a-cidr", "clients: [{name: a, from: [10.1.2.3]}]\n", []),
    ("not-an-address-is-left-to-validation", "clients: [{name: a, from: [nope/8]}]\n", []),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in HOST_BITS_CASES], ids=[c[0] for c in HOST_BITS_CASES])
def test_host_bits(text: str, expected: list[Finding]) -> None:
    assert host_bits(yaml.safe_load(text)) == expected


BIND_CASES = [
    # (id, bind entries, this host's addresses, warned indices)
    ("own-address", ["10.0.1.5"], ["10.0.1.5", "127.0.0.1"], []),
    ("foreign-address", ["10.0.1.5", "10.0.1.6"], ["10.0.1.5"], [1]),
    ("loopback-is-always-bindable", ["127.0.0.2"], ["10.0.1.5"], []),
    ("cidr-with-an-own-address", ["10.0.1.0/24"], ["10.0.1.7"], []),
    ("cidr-without", ["10.0.2.0/24"], ["10.0.1.7"], [0]),
    ("ipv6", ["2001:db8::5"], ["2001:db8:0:0::5"], []),
]


@pytest.mark.parametrize(("bind", "mine", "warned"), [c[1:] for c in BIND_CASES], ids=[c[0] for c in BIND_CASES])
def test_bind_not_on_this_host(bind: list[str], mine: list[str], warned: list[int]) -> None:
    config, _ = _load(f"egress:\n  x: {{bind: {bind}}}\n")
    assert [f.loc for f in lint(config, local_addresses=mine)] == [("egress", "x", "bind", j) for j in warned]
    assert lint(config) == []  # offline: not checked
