"""``clients[].kubernetes``: every key validated, each error as ``FILE:LINE: key: what``."""

from __future__ import annotations

import textwrap

import pytest

from egressgate.config.lint import lint
from egressgate.config.loader import check_config_text

FILE = "gw.yaml"
ISSUER = "https://container.googleapis.com/v1/projects/p/locations/l/clusters/c"


def errors_of(client: str, offline: bool = True) -> list[str]:
    text = "clients:\n  - name: k\n    from: [10.0.0.0/8]\n" + textwrap.indent(textwrap.dedent(client), "    ")
    return check_config_text(text, FILE, offline=offline).errors


def test_a_valid_entry() -> None:
    checked = check_config_text(textwrap.dedent(f"""\
        clients:
          - name: k
            kubernetes:
              issuer: {ISSUER}
              service_accounts: [data-jobs/vendor-x-collector, "batch/*"]
        """), FILE)
    assert checked.errors == []
    k8s = checked.config.clients[0].kubernetes
    assert (k8s.audiences, k8s.username, k8s.leeway, k8s.min_refresh) == (["egressgate"], "k8s", 30.0, 10.0)
    assert lint(checked.config) == []  # no 'from': still not an open proxy (a token is required)


def test_a_token_entry_before_an_anonymous_one_shadows_nothing() -> None:
    """Defect (issue 29 item 7): a kubernetes entry before an anonymous entry with the same
    sources was reported as "can never match ... asks for no credentials" and the reload was
    refused, while at run time the token entry does demand credentials."""
    checked = check_config_text(textwrap.dedent(f"""\
        clients:
          - name: k
            from: [10.0.0.0/8]
            kubernetes:
              issuer: {ISSUER}
              service_accounts: [data-jobs/vendor-x-collector]
          - name: anonymous-batch
            from: [10.1.0.0/16]
        """), FILE, offline=True)
    assert checked.errors == []


CASES = {
    "service account not ns/name": (
        f"kubernetes: {{issuer: {ISSUER}, service_accounts: [vendor-x]}}\n",
        f"{FILE}:4: clients[0].kubernetes.service_accounts: expected 'namespace/serviceaccount' "
        "or 'namespace/*', got 'vendor-x'"),
    "no service accounts": (
        f"kubernetes: {{issuer: {ISSUER}, service_accounts: []}}\n",
        f"{FILE}:4: clients[0].kubernetes.service_accounts: give at least 1 item (the list is empty)"),
    "issuer not a URL": (
        "kubernetes: {issuer: my-cluster, service_accounts: [a/b]}\n",
        f"{FILE}:4: clients[0].kubernetes.issuer: expected an http:// or https:// URL without "
        "query or fragment, got 'my-cluster'"),
    "unknown key": (
        f"kubernetes: {{issuer: {ISSUER}, service_accounts: [a/b], audience: [x]}}\n",
        f"{FILE}:4: clients[0].kubernetes.audience: unknown key; did you mean `audiences`?"),
    "token and password": (
        f"username: u\npassword_env: P\nkubernetes: {{issuer: {ISSUER}, service_accounts: [a/b]}}\n",
        f"{FILE}:2: clients[0]: a kubernetes client is identified by its token: no username, "
        "password or cert_subject"),
    "jwks_file and jwks_url": (
        f"kubernetes: {{issuer: {ISSUER}, service_accounts: [a/b], jwks_file: /k.json, jwks_url: {ISSUER}/k}}\n",
        f"{FILE}:4: clients[0].kubernetes: give one of jwks_file, jwks_url"),
    "leeway too large": (
        f"kubernetes: {{issuer: {ISSUER}, service_accounts: [a/b], leeway: 1h}}\n",
        f"{FILE}:4: clients[0].kubernetes.leeway: must be at most 300, got 1h"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_refused(name: str) -> None:
    text, error = CASES[name]
    assert errors_of(text) == [error]


def test_files_must_exist_unless_offline() -> None:
    text = f"kubernetes: {{issuer: {ISSUER}, service_accounts: [a/b], jwks_file: /nonexistent/jwks.json}}\n"
    assert errors_of(text, offline=False) == [
        f"{FILE}:4: clients[0].kubernetes.jwks_file: file not found: /nonexistent/jwks.json"]
    assert errors_of(text, offline=True) == []


def test_token_user_name_is_not_a_password_user() -> None:
    text = textwrap.dedent(f"""\
        clients:
          - name: pw
            from: [10.0.0.0/8]
            username: k8s
            password_env: P
          - name: k
            kubernetes: {{issuer: {ISSUER}, service_accounts: [a/b]}}
        """)
    errors = check_config_text(text, FILE, offline=True).errors
    assert errors == [f"{FILE}:7: clients[1].kubernetes.username: also the username of clients[0], a password client"]


def test_lint_warns_of_keys_over_plain_http_and_no_rate_limit() -> None:
    checked = check_config_text(textwrap.dedent("""\
        clients:
          - name: k
            kubernetes:
              issuer: http://issuer.internal
              service_accounts: [a/b]
              min_refresh: 0
          - name: f
            kubernetes: {issuer: http://issuer.internal, service_accounts: [a/b], jwks_file: /k.json}
        """), FILE, offline=True)
    assert [(f.loc, f.message.split(":")[0]) for f in lint(checked.config)] == [
        (("clients", 0, "kubernetes", "issuer"), "the signing keys would be fetched over plain http"),
        (("clients", 0, "kubernetes", "min_refresh"), "below 1s"),
    ]


def test_check_file_reads_the_jwks_file(tmp_path) -> None:
    from egressgate.proxy.build import check_file

    jwks = tmp_path / "jwks.json"
    config = tmp_path / "gw.yaml"
    config.write_text(f"clients:\n  - name: k\n    kubernetes: {{issuer: {ISSUER}, service_accounts: [a/b], "
                      f"jwks_file: {jwks}}}\n")
    # (issue 29 item 9: reported at the config's line of the jwks_file key, not FILE:0 of the JWKS file)
    for content, what in (('{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}', "no usable RSA or EC signing key"),
                          ("not json", "is not JSON")):
        jwks.write_text(content)
        errors, _ = check_file(str(config))
        assert len(errors) == 1 and errors[0].startswith(f"{config}:3: clients[0].kubernetes.jwks_file: {jwks}: "), errors
        assert what in errors[0], errors
    assert check_file(str(config), offline=True) == ([], [])  # offline: named, not read
