"""``fleet`` (issue 28): the fleet store's configuration is checked at load, each mistake
named by its line and key, and secrets never taken from the URL."""

from __future__ import annotations

import pytest

from .test_config import FILE, errors_of, load


def test_defaults_no_store() -> None:
    cfg = load("")
    assert cfg.fleet.redis is None and cfg.fleet.fallback == "share" and cfg.fleet.fallback_instances is None


def test_a_full_store(tmp_path) -> None:
    pw, ca = tmp_path / "pw", tmp_path / "ca.pem"
    pw.write_text("x\n")
    ca.write_text("-")
    cfg = load(f"""\
        fleet:
          redis: {{url: "rediss://10.0.0.3:6378/0", password_file: {pw}, tls: {{ca: {ca}, check_hostname: false}},
                   timeout: 100ms, lease_ttl: 5s, prefix: gw-a}}
          fallback: refuse
          fallback_instances: 4
        """)
    r = cfg.fleet.redis
    assert (r.timeout, r.lease_ttl, r.prefix, r.tls.check_hostname) == (0.1, 5.0, "gw-a", False)
    assert (cfg.fleet.fallback, cfg.fleet.fallback_instances) == ("refuse", 4)


@pytest.mark.parametrize(("text", "error"), [
    ('fleet: {redis: {url: "http://10.0.0.3:6379"}}', "expected redis://HOST:PORT or rediss://HOST:PORT"),
    ('fleet: {redis: {url: "redis://:hunter2@10.0.0.3:6379"}}', "put the password in password_file"),
    ('fleet: {redis: {url: "redis://10.0.0.3:99999"}}', "not a URL"),
    ('fleet: {redis: {url: "redis://10.0.0.3:6379/x"}}', "names a database number"),
    ('fleet: {redis: {url: "redis://10.0.0.3:6379", tls: {}}}', "tls needs a rediss:// URL"),
    ('fleet: {redis: {url: "redis://h:1", password_file: /a, password_env: B}}', "not both"),
    ('fleet: {redis: {url: "rediss://h:1", tls: {cert: /a}}}', "give both cert and key"),
    ('fleet: {redis: {url: "redis://h:1", lease_ttl: 500ms}}', "lease_ttl"),
    ('fleet: {redis: {url: "redis://h:1", prefix: "a b"}}', "prefix"),
    ('fleet: {fallback: maybe}', "fallback"),
    ('fleet: {redis: {url: "redis://h:1", pasword_file: /a}}', "pasword_file"),
])
def test_mistakes_are_named(text: str, error: str) -> None:
    errors = errors_of(text + "\n")
    assert len(errors) == 1 and errors[0].startswith(f"{FILE}:1: fleet") and error in errors[0], errors


def test_secret_and_tls_files_must_exist(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("EGRESSGATE_TEST_REDIS_PW", raising=False)
    errors = errors_of(f"""\
        fleet:
          redis:
            url: rediss://h:1
            password_env: EGRESSGATE_TEST_REDIS_PW
            tls: {{ca: {tmp_path / "ca.pem"}}}
        """)
    assert errors == [
        f"{FILE}:4: fleet.redis.password_env: environment variable EGRESSGATE_TEST_REDIS_PW is not set",
        f"{FILE}:5: fleet.redis.tls.ca: file not found: {tmp_path / 'ca.pem'}"], errors
