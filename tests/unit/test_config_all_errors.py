"""config/loader.py + config/repair.py: one run reports every error (schema errors do not hide
the cross-checks, a refused list item does not shift the indices of later errors), unknown keys
get the nearest known key, and ``offline`` needs secrets named, not present."""

from __future__ import annotations

import textwrap

import pytest

from egressgate.config.loader import check_config_text
from egressgate.config.repair import Pruner, did_you_mean, known_keys
from egressgate.config.schema import Config

FILE = "gw.yaml"


def errors_of(text: str, offline: bool = False) -> list[str]:
    return check_config_text(textwrap.dedent(text), FILE, offline=offline).errors


def test_schema_and_cross_check_errors_in_one_run() -> None:
    assert errors_of("""\
        listen:
          - address: 0.0.0.0:99999
        egress:
          x:
            direct: {}
            expected_ip: [203.0.113.10]
        clients:
          - name: a
            from: [10.0.0.0/8, not-a-cidr]
            egress: [nowhere]
          - name: b
            from: [10.1.0.0/16]
            username: b
            password_file: /nonexistent/egressgate-secret
        """) == [
        f"{FILE}:2: listen[0].address: expected HOST:PORT or [IPv6]:PORT, got '0.0.0.0:99999'",
        f"{FILE}:6: egress.x.expected_ip: unknown key; did you mean `expect_ip`?",
        f"{FILE}:9: clients[0].from[1]: not an IP address or CIDR: 'not-a-cidr'",
        f"{FILE}:10: clients[0].egress[0]: unknown egress profile 'nowhere'",
        f"{FILE}:14: clients[1].password_file: file not found: /nonexistent/egressgate-secret",
    ]


def test_a_dropped_item_keeps_later_items_named_as_written() -> None:
    # clients[0] is refused whole (a model rule); clients[1]'s error still says clients[1], line 6
    assert errors_of("""\
        clients:
          - name: a
            from: [10.0.0.0/8]
            username: a
          - name: b
            egress: [ghost]
            from: [10.1.0.0/16]
        """) == [
        f"{FILE}:2: clients[0]: username needs password_hash, password_file or password_env",
        f"{FILE}:6: clients[1].egress[0]: unknown egress profile 'ghost'",
    ]


def test_no_error_that_only_follows_from_taking_a_value_out() -> None:
    # the bad hash is taken out; "username needs password_hash" would be a consequence, not a mistake
    errors = errors_of("""\
        clients:
          - name: a
            from: [10.0.0.0/8]
            username: a
            password_hash: not-a-hash
        """)
    assert len(errors) == 1 and errors[0].startswith(f"{FILE}:5: clients[0].password_hash: "), errors


def test_a_refused_profile_still_exists_for_its_clients() -> None:
    errors = errors_of("""\
        egress:
          x: {direct: {}, bind: [10.0.0.1]}
        clients:
          - {name: a, from: [10.0.0.0/8], egress: [x]}
        """)
    assert errors == [f"{FILE}:2: egress.x: a profile is one of direct, bind or upstream, not direct and bind"]


def test_an_error_under_a_shadow_check_is_not_doubled() -> None:
    # from[1] is refused; the shadowing check on the rest of clients[1].from is not reported on top
    errors = errors_of("""\
        clients:
          - {name: a, from: [10.0.0.0/8]}
          - {name: b, from: [10.1.0.0/16, bad]}
        """)
    assert errors == [f"{FILE}:3: clients[1].from[1]: not an IP address or CIDR: 'bad'"]


SECRETS = """\
    listen:
      - address: 127.0.0.1:3128
        tls: {cert: /nonexistent/tls.crt, key: /nonexistent/tls.key}
    admin: {address: 127.0.0.1:9128, token_env: EGRESSGATE_TEST_UNSET_TOKEN}
    egress:
      up:
        upstream: [http://chain@proxy.internal:3128]
        upstream_password_env: EGRESSGATE_TEST_UNSET_UPSTREAM
    clients:
      - {name: a, from: [10.0.0.0/8], username: a, password_file: /nonexistent/a}
      - {name: b, from: [10.0.0.0/8], username: b, password_env: EGRESSGATE_TEST_UNSET_B}
    """


def test_offline_needs_secrets_named_not_present() -> None:
    assert errors_of(SECRETS, offline=True) == []
    online = errors_of(SECRETS)
    assert [e.split(": ")[1] for e in online] == [  # in source order (issue 29 item 9)
        "listen[0].tls.cert", "listen[0].tls.key", "admin.token_env", "egress.up.upstream_password_env",
        "clients[0].password_file", "clients[1].password_env"]


def test_offline_still_refuses_a_username_without_a_secret() -> None:
    errors = errors_of("clients: [{name: a, from: [10.0.0.0/8], username: a}]\n", offline=True)
    assert errors == [f"{FILE}:1: clients[0]: username needs password_hash, password_file or password_env"]


SUGGESTIONS = [
    (("egress", "x", "expected_ip"), "expect_ip"),
    (("clints",), "clients"),
    (("clients", 3, "frm"), "from"),
    (("listen", 0, "tls", "client-ca"), "client_ca"),
    (("timeouts", "cleint_idle"), "client_idle"),
    (("security", "zzz"), None),
    (("egress", "x", "direct", "anything"), None),  # direct: {} is a free mapping
]


@pytest.mark.parametrize(("loc", "expected"), SUGGESTIONS, ids=[".".join(map(str, s[0])) for s in SUGGESTIONS])
def test_did_you_mean(loc: tuple, expected: str | None) -> None:
    assert did_you_mean(Config, loc) == expected


def test_known_keys_use_the_yaml_names() -> None:
    assert "from" in known_keys(Config, ("clients", 0))
    assert known_keys(Config, ("nope",)) == []


def test_pruner_maps_indices_back_through_several_passes() -> None:
    p = Pruner({"a": [0, 1, 2, 3, 4]})
    assert p.prune([("a", 1)])
    assert p.prune([("a", 0), ("a", 2)])  # items 0 and 3 as written
    assert p.data == {"a": [2, 4]}
    assert p.original(("a", 0)) == ("a", 2) and p.original(("a", 1)) == ("a", 4)
    assert not p.prune([()])  # the top level cannot be taken out
