"""config/loader.py + config/schema.py: defaults, durations, and ``FILE:LINE: key: what`` errors."""

from __future__ import annotations

import re
import textwrap

import pydantic
import pytest

from egressgate.config import Config, load_config, load_config_text
from egressgate.errors import ConfigError

FILE = "gw.yaml"


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config_text(textwrap.dedent(text), FILE)
    assert str(info.value) == "\n".join(info.value.errors)
    return info.value.errors


def load(text: str) -> Config:
    return load_config_text(textwrap.dedent(text), FILE)


# ------------------------------------------------------------------------------ defaults

@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "---\n", "{}\n", "~\n"])
def test_empty_document_is_the_default(text: str) -> None:
    assert load_config_text(text, FILE) == Config()


def test_default_values_match_the_contract() -> None:
    cfg = load_config_text("", FILE)
    assert [listener.address for listener in cfg.listen] == ["127.0.0.1:3128"]
    assert cfg.listen[0].egress == "default"
    assert cfg.listen[0].tls is None
    assert cfg.admin.address == "127.0.0.1:9128"
    assert list(cfg.egress) == ["default"]
    assert cfg.egress["default"].kind == "direct"
    assert [c.name for c in cfg.clients] == ["local"]
    assert cfg.clients[0].from_ == ["127.0.0.0/8", "::1/128"]
    assert cfg.clients[0].username is None
    assert cfg.security.connect_ports == [443]
    assert cfg.security.allow_private == []


def test_config_is_frozen() -> None:
    cfg = load_config_text("", FILE)
    with pytest.raises(pydantic.ValidationError):
        cfg.workers = 4  # type: ignore[misc]


def test_default_profile_is_added_next_to_named_ones() -> None:
    cfg = load("""
        egress:
          vendor-x:
            bind: [10.0.1.5, 10.0.1.0/24]
            expect_ip: [203.0.113.10]
          vendor-y:
            upstream: ["http://user:pass@egress-b.internal:3128"]
            pick: round_robin
        probe:
          echo_url: http://echo.example/ip
    """)
    assert list(cfg.egress) == ["default", "vendor-x", "vendor-y"]
    assert cfg.egress["vendor-x"].kind == "bind"
    assert cfg.egress["vendor-x"].bind == ["10.0.1.5", "10.0.1.0/24"]
    assert cfg.egress["vendor-y"].kind == "upstream"
    assert cfg.egress["vendor-y"].pick == "round_robin"


def test_design_example_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load("""
        listen:
          - address: 0.0.0.0:3128
            egress: default
          - address: "[::]:3129"
        admin:
          address: 127.0.0.1:9128
        egress:
          default: {direct: {}}
          vendor-x:
            bind: [10.0.1.5, 10.0.1.6]
            expect_ip: [203.0.113.10]
        clients:
          - name: vendor-x-collector
            from: [10.8.0.0/16]
            username: vendor-x
            password_hash: "scrypt$16384$8$1$c2FsdHNhbHRzYWx0c2FsdA==$AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
            egress: [vendor-x]
            allow: ["*.vendor-x.com", "api.vendor-x.com:8443"]
        security:
          connect_ports: [443]
          allow_private: [10.99.0.0/16]
        probe:
          echo_url: https://ifconfig.me/ip
    """)
    assert [listener.address for listener in cfg.listen] == ["0.0.0.0:3128", "[::]:3129"]
    assert cfg.clients[0].from_ == ["10.8.0.0/16"]
    assert cfg.clients[0].allow == ["*.vendor-x.com", "api.vendor-x.com:8443"]


# ------------------------------------------------------------------------------ durations

DURATIONS = [
    ("30", 30.0),
    ("0", 0.0),
    ("1.5", 1.5),
    ("'30s'", 30.0),
    ("'500ms'", 0.5),
    ("'5m'", 300.0),
    ("'1h'", 3600.0),
    ("'2.5s'", 2.5),
    ("' 7 s '", 7.0),
    ("'45'", 45.0),
]


@pytest.mark.parametrize(("yaml_value", "seconds"), DURATIONS, ids=[c[0] for c in DURATIONS])
def test_durations(yaml_value: str, seconds: float) -> None:
    cfg = load_config_text(f"timeouts:\n  client_head: {yaml_value}\n", FILE)
    assert cfg.timeouts.client_head == pytest.approx(seconds)


BAD_DURATIONS = ["'5 minutes'", "-1", "'-1s'", "'ms'", "true", "''", "[1]", "'5d'", "'1e3s'"]


@pytest.mark.parametrize("yaml_value", BAD_DURATIONS)
def test_bad_durations_name_the_key(yaml_value: str) -> None:
    errors = errors_of(f"""\
        timeouts:
          client_idle: 5
          client_head: {yaml_value}
    """)
    assert len(errors) == 1
    assert errors[0].startswith(f"{FILE}:3: timeouts.client_head: ")


@pytest.mark.parametrize("yaml_value", [".nan", ".inf"])
def test_non_finite_durations_are_refused(yaml_value: str) -> None:
    errors = errors_of(f"timeouts:\n  client_head: {yaml_value}\n")
    assert errors[0].startswith(f"{FILE}:2: timeouts.client_head: ")


# ------------------------------------------------------------------------------ sizes and limits (issue 12)

SIZES = [("65536", 65536), ("'512KiB'", 512 << 10), ("'8MiB'", 8 << 20), ("'1 GiB'", 1 << 30), ("'100KB'", 100_000),
         ("'2MB'", 2_000_000), ("'70000B'", 70000)]


@pytest.mark.parametrize(("yaml_value", "size"), SIZES, ids=[c[0] for c in SIZES])
def test_sizes(yaml_value: str, size: int) -> None:
    assert load_config_text(f"log:\n  max_queue: {yaml_value}\n", FILE).log.max_queue == size


BAD_LIMITS = [("log", "max_queue", "'8 mebibytes'"), ("log", "max_queue", "1024"), ("log", "max_queue", "true"),
              ("log", "max_queue", "'-1MiB'"), ("admin", "idle_timeout", "0"), ("admin", "idle_timeout", "'-1s'"),
              ("admin", "max_connections", "0"), ("admin", "max_connections", "'many'")]


@pytest.mark.parametrize(("section", "key", "yaml_value"), BAD_LIMITS)
def test_bad_limits_name_the_key(section: str, key: str, yaml_value: str) -> None:
    errors = errors_of(f"{section}:\n  {key}: {yaml_value}\n")
    assert len(errors) == 1 and errors[0].startswith(f"{FILE}:2: {section}.{key}: "), errors


def test_limit_defaults() -> None:
    cfg = load_config_text("", FILE)
    assert (cfg.log.max_queue, cfg.admin.idle_timeout, cfg.admin.max_connections) == (8 << 20, 10.0, 64)


def test_forwarding_defaults_leak_no_client_address() -> None:
    cfg = load_config_text("", FILE)
    assert (cfg.forwarding.via, cfg.forwarding.x_forwarded_for) == (True, "strip")
    cfg = load("forwarding: {via: false, x_forwarded_for: keep}\n")
    assert (cfg.forwarding.via, cfg.forwarding.x_forwarded_for) == (False, "keep")


@pytest.mark.parametrize(("key", "yaml_value"), [("x_forwarded_for", "drop"), ("x_forwarded_for", "true"),
                                                  ("via", "'sometimes'"), ("client_ip", "strip")])
def test_bad_forwarding_names_the_key(key: str, yaml_value: str) -> None:
    errors = errors_of(f"forwarding:\n  {key}: {yaml_value}\n")
    assert len(errors) == 1 and errors[0].startswith(f"{FILE}:2: forwarding.{key}: "), errors


# ------------------------------------------------------------------------------ error format and lines

ERRORS = [
    pytest.param(
        """\
        listen:
          - address: 0.0.0.0:3128
            bogus: 1
        """,
        [f"{FILE}:3: listen[0].bogus: unknown key"], id="unknown-key-in-list-item"),
    pytest.param(
        """\
        workers: 2
        bogus_top: 1
        """,
        [f"{FILE}:2: bogus_top: unknown key"], id="unknown-top-level-key"),
    pytest.param(
        """\
        timeouts:
          client_head: 5
          cleint_idle: 5
        """,
        [f"{FILE}:3: timeouts.cleint_idle: unknown key; did you mean `client_idle`?"], id="unknown-nested-key"),
    pytest.param("admin:\n  token: a\n  token_file: /x\n",
                 [f"{FILE}:1: admin: give one of token, token_env, token_file, not token, token_file"],
                 id="admin-two-tokens"),
    pytest.param(
        """\
        listen:
          - address: 127.0.0.1:3128
          - address: nope
        """,
        [f"{FILE}:3: listen[1].address: expected HOST:PORT or [IPv6]:PORT, got 'nope'"],
        id="second-list-item"),
    pytest.param(
        """\
        admin:
          address: example.com:9128
        """,
        [f"{FILE}:2: admin.address: listen on an IP address, not a name: 'example.com:9128'"],
        id="admin-name-not-ip"),
    pytest.param(
        """\
        security:
          connect_ports:
            - 443
            - 0
        """,
        [f"{FILE}:4: security.connect_ports[1]: must be greater than 0, got 0"], id="block-list-item"),
    pytest.param(
        """\
        clients:
          - name: a
            from:
              - 10.0.0.0/8
              - bogus
        """,
        [f"{FILE}:5: clients[0].from[1]: not an IP address or CIDR: 'bogus'"], id="alias-key-list-item"),
    pytest.param(
        """\
        admin:
          address: 127.0.0.1:9128
        admin:
          address: 127.0.0.1:9129
        """,
        [f"{FILE}:3: admin: duplicate key"], id="duplicate-top-level-key"),
    pytest.param(
        """\
        egress:
          a: {direct: {}}
          b: {direct: {}}
          a: {direct: {}}
        """,
        [f"{FILE}:4: egress.a: duplicate key"], id="duplicate-nested-key"),
    pytest.param(
        """\
        clients:
          - name: a
            from: [10.0.0.0/8]
            from: [10.0.0.0/8]
        """,
        [f"{FILE}:4: clients[0].from: duplicate key"], id="duplicate-key-in-list-item"),
    pytest.param(
        """\
        clients:
          - name: a
            from: [10.0.0.0/8]
            egress: [default, nope]
        """,
        [f"{FILE}:4: clients[0].egress[1]: unknown egress profile 'nope'"], id="unknown-client-profile"),
    pytest.param(
        """\
        listen:
          - address: 127.0.0.1:3128
          - address: 127.0.0.1:3129
            egress: ghost
        """,
        [f"{FILE}:4: listen[1].egress: unknown egress profile 'ghost'"], id="unknown-listener-profile"),
    pytest.param(
        """\
        clients:
          - name: open
            egress: [default]
        """,
        [f"{FILE}:2: clients[0]: a client needs 'from' CIDRs or credentials; otherwise the gateway is "
         "an open proxy"], id="client-without-from-or-credentials"),
    pytest.param(
        """\
        clients:
          - name: a
            username: u
        """,
        [f"{FILE}:2: clients[0]: username needs password_hash, password_file or password_env"],
        id="username-without-secret"),
    pytest.param(
        """\
        clients:
          - name: a
            from: [10.0.0.0/8]
            password_hash: "scrypt$16384$8$1$c2FsdHNhbHRzYWx0c2FsdA==$AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
        """,
        [f"{FILE}:2: clients[0]: password_hash needs a username"], id="secret-without-username"),
    pytest.param(
        """\
        clients:
          - name: a
            username: u
            password_hash: "md5$abc"
        """,
        [f"{FILE}:4: clients[0].password_hash: not a hash from `egressgate hash-password` "
         "(expected scrypt$N$r$p$salt$digest)"],
        id="password-hash-not-scrypt"),
    pytest.param(
        """\
        egress:
          vendor-x:
            bind: [10.0.1.5]
            expect_ip: [203.0.113.10]
        """,
        [f"{FILE}:4: egress.vendor-x.expect_ip: needs probe.echo_url: without an IP-echo service nothing "
         "can check it, and the profile would refuse all its traffic"],
        id="expect-ip-without-echo-url"),
    pytest.param(
        """\
        clients:
          - name: local
            from: [127.0.0.0/8]
          - name: job-x
            from: [127.0.0.0/8]
            username: job-x
            password_env: HOME
          - name: narrower
            from: [127.0.0.0/16]
          - name: elsewhere
            from: [10.0.0.0/8]
        """,
        [f"{FILE}:9: clients[2].from: can never match: clients[0] (local) admits these sources first "
         "and asks for no credentials"],
        id="client-entry-shadowed"),
    pytest.param(
        """\
        clients:
          - name: a
            username: u
            password_hash: "scrypt$16384$8$1$c2FsdHNhbHRzYWx0c2FsdA==$AA=="
        """,
        [f"{FILE}:4: clients[0].password_hash: the digest must be 32 bytes, not 1"],
        id="password-hash-one-byte-digest"),
    pytest.param(
        """\
        clients:
          - name: a
            username: u
            password_hash: "scrypt$2$8$1$c2FsdHNhbHRzYWx0c2FsdA==$AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
        """,
        [f"{FILE}:4: clients[0].password_hash: scrypt N must be a power of two of at least 16384, not 2"],
        id="password-hash-cheap-n"),
    pytest.param(
        """\
        clients:
          - name: a
            username: u
            password_hash: "scrypt$16384$8$1$c2FsdHNhbHRzYWx0c2FsdA==$not*base64"
        """,
        [f"{FILE}:4: clients[0].password_hash: the digest is not valid base64"],
        id="password-hash-not-base64"),
    pytest.param(
        """\
        clients:
          - name: a
            from: [10.0.0.0/8]
          - name: a
            from: [192.0.2.0/24]
        """,
        [f"{FILE}:4: clients[1].name: duplicate client name (first at clients[0])"], id="duplicate-client-name"),
    pytest.param(
        """\
        listen:
          - address: 127.0.0.1:3128
          - address: 127.0.0.1:3128
        """,
        [f"{FILE}:3: listen[1].address: listed twice: 127.0.0.1:3128"], id="listener-twice"),
    pytest.param(
        """\
        listen:
          - proxy_protocol: true
        """,
        [f"{FILE}:2: listen[0].trusted_proxies: proxy_protocol needs trusted_proxies (the load balancer's "
         "CIDRs)"], id="proxy-protocol-untrusted"),
    pytest.param(
        """\
        clients:
          - name: a
            from: [10.0.0.0/8]
            allow:
              - ok.example
              - foo.*.example
        """,
        [f"{FILE}:6: clients[0].allow[1]: '*' is allowed only as a leading '*.' label: 'foo.*.example'"],
        id="bad-allow-pattern"),
    pytest.param(
        """\
        egress:
          x:
            upstream:
              - http://a.example:3128
              - https://b.example:3128
        """,
        [f"{FILE}:5: egress.x.upstream[1]: upstream proxies are http://host:port URLs, got "
         "'https://b.example:3128'"], id="bad-upstream-url"),
    pytest.param(
        """\
        egress:
          x:
            direct: {}
            bind: [10.0.0.1]
        """,
        [f"{FILE}:2: egress.x: a profile is one of direct, bind or upstream, not direct and bind"],
        id="profile-two-kinds"),
    pytest.param(
        """\
        egress:
          x: {upstream: []}
        """,
        [f"{FILE}:2: egress.x: upstream needs at least one proxy URL"], id="empty-upstream"),
    pytest.param(
        """\
        - a
        - b
        """,
        [f"{FILE}:1: (top level): expected a mapping of keys, got list"], id="top-level-list"),
    pytest.param(
        """\
        listen: [
        """,
        [f"{FILE}:2: (yaml): not valid YAML (expected the node content, but found '<stream end>'): the file ends "
         "inside a value: a [list], {mapping} or quote is not closed"], id="yaml-unclosed-flow"),
    pytest.param(
        """\
        workers: 1
        admin: b: c
        """,
        [f"{FILE}:2: (yaml): not valid YAML (mapping values are not allowed here): a value holding ': ' must be "
         "quoted (\"a: b\"), or a key is indented under a value"], id="yaml-mapping-values"),
    pytest.param(
        """\
        workers: 1
        admin:
          address: 127.0.0.1:9128
         token: x
        """,
        None, id="yaml-bad-indent"),
]


@pytest.mark.parametrize(("text", "expected"), ERRORS)
def test_error_lines(text: str, expected: list[str] | None) -> None:
    errors = errors_of(text)
    if expected is None:  # only the shape is fixed: a YAML error on line 4
        assert len(errors) == 1
        assert errors[0].startswith(f"{FILE}:4: (yaml): ")
    else:
        assert errors == expected


def test_all_errors_of_one_pass_are_collected() -> None:
    errors = errors_of("""\
        workers: 0
        log:
          format: xml
        security:
          connect_ports: [443, 70000]
    """)
    assert sorted(errors) == sorted([
        f"{FILE}:1: workers: workers is a number from 1 to 64, or 'auto' (one per CPU)",
        f"{FILE}:3: log.format: write 'json' or 'squid', not text 'xml'",
        f"{FILE}:5: security.connect_ports[1]: must be less than 65536, got 70000",
    ])


def test_duplicate_keys_and_schema_errors_reported_together() -> None:
    errors = errors_of("""\
        workers: 2
        workers: 0
    """)
    assert len(errors) == 2
    assert errors[0] == f"{FILE}:2: workers: duplicate key"
    assert errors[1].endswith(": workers: workers is a number from 1 to 64, or 'auto' (one per CPU)")


def test_schema_error_on_duplicated_key_points_at_the_value_used() -> None:
    errors = errors_of("""\
        workers: 2
        workers: 0
    """)
    assert f"{FILE}:2: workers: workers is a number from 1 to 64, or 'auto' (one per CPU)" in errors


def test_every_error_has_the_file_line_key_shape() -> None:
    errors = errors_of("""\
        listen:
          - address: 127.0.0.1:3128
            egress: ghost
        clients:
          - name: a
            from: [10.0.0.0/8]
            egress: [nope]
            deny: ['*:99999']
    """)
    assert len(errors) == 3
    shape = re.compile(r"^gw\.yaml:[1-9][0-9]*: [A-Za-z_][\w.\[\]-]*: \S.*$")
    for line in errors:
        assert shape.match(line), line


def test_bad_bind_entry_points_at_the_item() -> None:
    errors = errors_of("""\
        egress:
          x:
            bind:
              - 10.0.0.1
              - nope
    """)
    assert errors == [f"{FILE}:5: egress.x.bind[1]: not an IP address: 'nope'"]


def test_password_env_must_be_set(monkeypatch: pytest.MonkeyPatch) -> None:
    text = """\
        clients:
          - name: a
            username: u
            password_env: EGRESSGATE_TEST_SECRET_XYZ
    """
    monkeypatch.delenv("EGRESSGATE_TEST_SECRET_XYZ", raising=False)
    assert errors_of(text) == [
        f"{FILE}:4: clients[0].password_env: environment variable EGRESSGATE_TEST_SECRET_XYZ is not set"]
    monkeypatch.setenv("EGRESSGATE_TEST_SECRET_XYZ", "s3cret")
    assert load(text).clients[0].password_env == "EGRESSGATE_TEST_SECRET_XYZ"


def test_password_file_must_exist(tmp_path) -> None:
    missing = tmp_path / "nope.txt"
    text = f"""\
        clients:
          - name: a
            username: u
            password_file: {missing}
    """
    assert errors_of(text) == [f"{FILE}:4: clients[0].password_file: file not found: {missing}"]
    missing.write_text("pw\n")
    assert load(text).clients[0].password_file == str(missing)


def test_load_config_names_the_path(tmp_path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text("workers: 2\nbogus: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.errors == [f"{path}:2: bogus: unknown key"]


def test_load_config_unreadable_file(tmp_path) -> None:
    path = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert len(info.value.errors) == 1
    assert info.value.errors[0].startswith(f"{path}:0: (file): cannot read")


def test_load_config_empty_file_is_default(tmp_path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path) == Config()


def test_listener_protocol() -> None:
    assert load("").listen[0].protocol == "http"
    cfg = load("""\
        listen:
          - address: 127.0.0.1:3128
          - address: 127.0.0.1:1080
            protocol: socks5
        """)
    assert [x.protocol for x in cfg.listen] == ["http", "socks5"]
    errors = errors_of("""\
        listen:
          - address: 127.0.0.1:1080
            protocol: socks4
        """)
    assert len(errors) == 1 and errors[0].startswith(f"{FILE}:3: listen[0].protocol: ")


def test_socks5_listener_takes_no_tls() -> None:
    errors = errors_of("""\
        listen:
          - address: 127.0.0.1:1080
            protocol: socks5
            tls: {cert: /nonexistent.crt, key: /nonexistent.key}
        """)
    assert f"{FILE}:4: listen[0].tls: a socks5 listener takes no tls" in errors[0]
