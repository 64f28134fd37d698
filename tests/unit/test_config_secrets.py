"""Credentials in the config: example placeholders are refused (FILE:LINE: key: what), and an
upstream proxy's password can come from a file or the environment, like clients' passwords."""

from __future__ import annotations

import base64
import textwrap

import pytest

from egressgate.config import load_config_text
from egressgate.egress.plan import build_pool, upstream_with_password
from egressgate.errors import ConfigError

FILE = "gw.yaml"


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config_text(textwrap.dedent(text), FILE)
    return info.value.errors


def client(extra: str) -> str:
    return "clients:\n  - name: job\n    from: [10.0.0.0/8]\n" + textwrap.indent(textwrap.dedent(extra), "    ")


@pytest.mark.parametrize("content", ["REPLACE-WITH-openssl-rand-hex-24", "changeme", "CHANGE-ME", "example-password",
                                     "", "  \n"])
def test_password_file_with_a_placeholder_is_refused(tmp_path, content):
    secret = tmp_path / "job"
    secret.write_text(content)
    errs = errors_of(client(f"username: job\npassword_file: {secret}\n"))
    assert errs == [f"{FILE}:5: clients[0].password_file: {secret} holds a placeholder or nothing, not a secret"]


def test_password_file_with_a_real_secret_is_accepted(tmp_path):
    secret = tmp_path / "job"
    secret.write_text("4f1e0a9c2b7d51e3\n")
    load_config_text(client(f"username: job\npassword_file: {secret}\n"), FILE)


def test_password_env_with_a_placeholder_is_refused(monkeypatch):
    monkeypatch.setenv("JOB_PW", "REPLACE-WITH-THE-GATEWAY-PASSWORD")
    errs = errors_of(client("username: job\npassword_env: JOB_PW\n"))
    assert errs == [f"{FILE}:5: clients[0].password_env: environment variable JOB_PW holds a placeholder or nothing, "
                    "not a secret"]


@pytest.mark.parametrize("username", ["REPLACE-ME", "changeme", "example"])
def test_placeholder_username_is_refused(tmp_path, username):
    secret = tmp_path / "pw"
    secret.write_text("4f1e0a9c2b7d51e3")
    errs = errors_of(client(f"username: {username}\npassword_file: {secret}\n"))
    assert errs == [f"{FILE}:4: clients[0].username: a placeholder from an example, not a real value"]


def test_placeholder_password_in_an_upstream_url_is_refused():
    errs = errors_of("""
        egress:
          chain:
            upstream: ["http://user:REPLACE-ME@proxy.internal:3128"]
        """)
    assert errs == [f"{FILE}:4: egress.chain.upstream[0]: the password is a placeholder from an example"]


UPSTREAM = """
    egress:
      chain:
        upstream: ["http://chain-user@proxy-a.internal:3128", "http://chain-user@proxy-b.internal:3128"]
        {key}: {value}
    """


def test_upstream_password_from_a_file(tmp_path):
    secret = tmp_path / "upstream"
    secret.write_text("s3cr3t-9f8e\n")
    cfg = load_config_text(textwrap.dedent(UPSTREAM.format(key="upstream_password_file", value=secret)), FILE)
    profile = cfg.egress["chain"]
    assert profile.upstream_password_file == str(secret)
    pool = build_pool("chain", profile, lambda cidr: [], 5.0, lambda: 0.0, upstream_password="s3cr3t-9f8e")
    want = "Basic " + base64.b64encode(b"chain-user:s3cr3t-9f8e").decode()
    assert [m.upstream.authorization for m in pool.members] == [want, want]
    assert "s3cr3t" not in str(pool.members[0].upstream)  # never in labels, metrics or logs


def test_upstream_password_from_the_environment_through_the_runtime(monkeypatch):
    from egressgate.proxy.build import build_runtime

    monkeypatch.setenv("CHAIN_PW", "env-s3cret")
    cfg = load_config_text(textwrap.dedent(UPSTREAM.format(key="upstream_password_env", value="CHAIN_PW")), FILE)
    rt = build_runtime(cfg, "0" * 64, FILE)
    want = "Basic " + base64.b64encode(b"chain-user:env-s3cret").decode()
    assert [m.upstream.authorization for m in rt.profiles["chain"].members] == [want, want]


def test_upstream_password_file_missing_or_placeholder(tmp_path, monkeypatch):
    errs = errors_of(UPSTREAM.format(key="upstream_password_file", value=tmp_path / "nope"))
    assert errs == [f"{FILE}:5: egress.chain.upstream_password_file: file not found: {tmp_path / 'nope'}"]
    monkeypatch.delenv("CHAIN_PW", raising=False)
    errs = errors_of(UPSTREAM.format(key="upstream_password_env", value="CHAIN_PW"))
    assert errs == [f"{FILE}:5: egress.chain.upstream_password_env: environment variable CHAIN_PW is not set"]


def test_upstream_password_needs_a_user_and_an_upstream(tmp_path):
    secret = tmp_path / "pw"
    secret.write_text("s3cr3t-9f8e")
    errs = errors_of(f"""
        egress:
          chain:
            upstream: ["http://proxy.internal:3128"]
            upstream_password_file: {secret}
        """)
    assert errs == [f"{FILE}:4: egress.chain.upstream[0]: name the user in the URL (http://USER@host:port); the "
                    "password comes from upstream_password_file / upstream_password_env"]
    errs = errors_of(f"""
        egress:
          direct-one:
            direct: {{}}
            upstream_password_file: {secret}
        """)
    assert errs == [f"{FILE}:3: egress.direct-one: upstream_password_file is for upstream profiles"]


def test_url_credentials_still_work_without_a_secret():
    proxy = upstream_with_password("http://u:p@proxy.internal:3128", None)
    assert proxy.authorization == "Basic " + base64.b64encode(b"u:p").decode()
    assert upstream_with_password("http://proxy.internal:3128", "x").authorization is None
