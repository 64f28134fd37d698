"""Config -> ``Runtime``: the compile step, shared by the server, ``check-config``, ``probe``
and ``explain`` (``check_file`` adds the warnings of ``config.lint``). The config file is read once (its hash names the version in force), secrets
named by file or environment variable are read, and everything a request needs is compiled:
client matchers, the address guard, egress pools, listener settings.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import time
from pathlib import Path

from .config import Config, load_config_text
from .config.lint import host_bits, lint
from .config.loader import check_config_text
from .egress.localaddr import addresses_in, local_addresses
from .egress.plan import build_pool
from .egress.providers import compile_board
from .egress.resolver import Resolver
from .errors import ConfigError
from .http1.rewrite import Forwarding
from .model import parse_socket_address
from .policy.clients import compile_clients
from .policy.guard import AddressGuard
from .policy.protect import compile_protect
from .policy.tokens import parse_jwks
from .proxy.runtime import Runtime

EMBEDDED = "(embedded default)"


def read_config_file(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError([f"{path}:0: (file): cannot read: {exc}"]) from None


def read_config(path: str | None, text: bytes | None = None, *,
                echo_url: str | None = None) -> tuple[Config, str, bytes]:
    """(config, hash of its text, the text): the file at ``path`` read once (or ``text``, the
    copy a worker process is handed), the embedded default when both are None. ``echo_url``
    stands in for a missing ``probe.echo_url`` (``egressgate probe --echo-url``)."""
    if text is None:
        text = b"" if path is None else read_config_file(path)
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path or EMBEDDED}:0: (file): cannot read: {exc}"]) from None
    return load_config_text(decoded, path or EMBEDDED, echo_url=echo_url), hashlib.sha256(text).hexdigest(), text


def _read_secret(path: str | None, env: str | None, key: str = "password_file") -> str | None:
    if path:
        try:
            return Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError([f"{path}:0: {key}: {exc}"]) from None
    if env:
        return os.environ.get(env, "")
    return None


def _offline_secret(path: str | None, env: str | None, key: str = "password_file") -> str | None:
    """``check-config --offline``: a named secret stands for itself, nothing is read."""
    return "(offline)" if path or env else None


def _read_jwks(path: str) -> object:
    """A kubernetes ``jwks_file``: its signing keys (``policy.tokens.parse_jwks``)."""
    try:
        return parse_jwks(json.loads(Path(path).read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError([f"{path}:0: kubernetes.jwks_file: {exc}"]) from None


def build_runtime(config: Config, config_hash: str, source: str, clock=time.monotonic,
                  read_secret=_read_secret) -> Runtime:
    def secret(spec) -> str | None:  # a client's password_file / password_env
        return read_secret(spec.password_file, spec.password_env)

    def upstream_secret(spec) -> str | None:  # a profile's upstream_password_file / _env
        return read_secret(spec.upstream_password_file, spec.upstream_password_env, "upstream_password_file")

    jwks = (lambda path: {}) if read_secret is _offline_secret else _read_jwks  # a kubernetes jwks_file
    attest = config.probe.echo_url is not None
    profiles = {
        name: build_pool(name, spec, addresses_in, config.timeouts.upstream_connect, clock,
                         upstream_password=upstream_secret(spec), attest=attest)
        for name, spec in config.egress.items()
    }
    return Runtime(
        config=config, config_hash=config_hash, loaded_at=time.time(), source=source,
        clients=compile_clients(config.clients, secret, jwks), guard=AddressGuard(config.security.allow_private),
        profiles=profiles, connect_ports=frozenset(config.security.connect_ports), timeouts=config.timeouts,
        limits=config.limits, listeners={listener.address: listener for listener in config.listen},
        proxy_protocol={listener.address: tuple(ipaddress.ip_network(n) for n in listener.trusted_proxies)
                        for listener in config.listen if listener.proxy_protocol},
        forwarding=Forwarding.compile(config.forwarding.via, config.forwarding.x_forwarded_for),
        protect={name: compile_protect(spec.protect) for name, spec in config.egress.items() if spec.protect},
        providers=compile_board(config.egress, config.timeouts.upstream_connect, config.probe.interval),
    )


def load_runtime(path: str | None, *, echo_url: str | None = None) -> Runtime:
    return load_runtime_text(path, echo_url=echo_url)[0]


def load_runtime_text(path: str | None, text: bytes | None = None, *,
                      echo_url: str | None = None) -> tuple[Runtime, bytes]:
    """The runtime and the exact config text it was built from (handed to new workers)."""
    config, digest, text = read_config(path, text, echo_url=echo_url)
    return build_runtime(config, digest, path or EMBEDDED), text


def check_file(path: str, offline: bool = False) -> tuple[list[str], list[str]]:
    """``check-config``: (every error, every warning), each ``FILE:LINE: key: what``. The config
    is compiled as the server would (with ``offline``: without reading secrets or TLS files)."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return [f"{path}:0: (file): cannot read: {exc}"], []
    checked = check_config_text(text, path, offline=offline)
    if checked.config is None:
        return checked.errors, []
    errors = list(checked.errors)
    if not errors:
        try:
            build_runtime(checked.config, "", path, read_secret=_offline_secret if offline else _read_secret)
        except ConfigError as err:
            errors += err.errors
    findings = lint(checked.config, None, None if offline else local_addresses())
    warnings = [checked.where(f.loc, f"warning: {f.message}") for f in findings]
    warnings += [checked.where_raw(f.loc, f"warning: {f.message}") for f in host_bits(checked.raw)]
    return errors, warnings


def make_resolver(cfg: Config) -> Resolver:
    return Resolver(cfg.dns.cache_ttl, cfg.dns.negative_ttl, cfg.timeouts.dns,
                    servers=[parse_socket_address(a) for a in cfg.dns.servers])
