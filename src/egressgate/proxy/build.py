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
from collections.abc import Mapping
from pathlib import Path

from ..config import Config
from ..config.lint import host_bits, lint
from ..config.loader import check_config_text
from ..egress.blockwatch import compile_rules
from ..egress.localaddr import addresses_in, local_addresses
from ..egress.plan import build_pool
from ..egress.providers import compile_board, parse_headers
from ..egress.resolver import Resolver
from ..errors import ConfigError
from ..http1.rewrite import Forwarding
from ..model import parse_socket_address
from ..observe.accesslog import log_event
from ..policy.clients import compile_clients
from ..policy.guard import AddressGuard, NameGuard
from ..policy.protect import compile_protect
from ..policy.tokens import parse_jwks
from .runtime import Runtime

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
    checked = check_config_text(decoded, path or EMBEDDED, echo_url=echo_url)
    errors = checked.errors or (_jwks_problems(checked) if checked.config is not None else [])
    if errors or checked.config is None:
        raise ConfigError(errors)
    return checked.config, hashlib.sha256(text).hexdigest(), text


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


def _parse_jwks_file(path: str) -> dict:
    return parse_jwks(json.loads(Path(path).read_text(encoding="utf-8")))


def _read_jwks(path: str, min_refresh: float = 10.0) -> Mapping[str, object]:
    """A kubernetes ``jwks_file``: its signing keys (``policy.tokens.parse_jwks``), re-read
    when a token names a key it lacks (``JwksFile``)."""
    try:
        return JwksFile(path, _parse_jwks_file(path), min_refresh)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError([f"{path}:0: kubernetes.jwks_file: {exc}"]) from None


def _jwks_problems(checked) -> list[str]:
    """Each kubernetes ``jwks_file`` that cannot be read or holds no usable key, reported at the
    config's line of its ``jwks_file`` key (not at the JWKS file's)."""
    problems = []
    for i, client in enumerate(checked.config.clients):
        path = client.kubernetes.jwks_file if client.kubernetes is not None else None
        if not path:
            continue
        try:
            _parse_jwks_file(path)
        except OSError as exc:
            problems.append(checked.where(("clients", i, "kubernetes", "jwks_file"),
                                          f"cannot read {path}: {exc.strerror or exc}"))
        except UnicodeDecodeError:
            problems.append(checked.where(("clients", i, "kubernetes", "jwks_file"), f"{path} is not UTF-8 text"))
        except ValueError as exc:
            what = "is not JSON" if isinstance(exc, json.JSONDecodeError) else str(exc)
            problems.append(checked.where(("clients", i, "kubernetes", "jwks_file"),
                                          f"{path}: {what} (expected the issuer's JWKS document, e.g. from "
                                          "`kubectl get --raw /openid/v1/jwks`)"))
    return problems


class JwksFile(Mapping):
    """The keys of a local ``jwks_file``. A key id it lacks (a cluster rotated its signing key
    and the file was replaced) makes it look at the file again -- at most once per
    ``min_refresh`` seconds -- and re-read it if it changed (size or modification time); a file
    that cannot be read or parsed then keeps the keys it had (and says so on stderr)."""

    def __init__(self, path: str, keys: dict, min_refresh: float, clock=time.monotonic) -> None:
        self.path, self._keys, self.min_refresh, self._clock = path, keys, min_refresh, clock
        self._stamp = self._stat()
        self._looked = clock()

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def __getitem__(self, kid: str) -> object:
        key = self._keys.get(kid)
        if key is None and self._clock() - self._looked >= self.min_refresh:
            self._looked = self._clock()
            stamp = self._stat()
            if stamp is not None and stamp != self._stamp:
                try:
                    self._keys = _parse_jwks_file(self.path)
                    self._stamp = stamp
                    log_event("jwks_file_reread", path=self.path, keys=len(self._keys))
                except (OSError, UnicodeDecodeError, ValueError) as exc:
                    log_event("jwks_file_unreadable", path=self.path, error=str(exc)[:200])
                key = self._keys.get(kid)
        if key is None:
            raise KeyError(kid)
        return key

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def build_runtime(config: Config, config_hash: str, source: str, clock=time.monotonic,
                  read_secret=_read_secret) -> Runtime:
    def secret(spec) -> str | None:  # a client's password_file / password_env
        return read_secret(spec.password_file, spec.password_env)

    def upstream_secret(spec) -> str | None:  # a profile's upstream_password_file / _env
        return read_secret(spec.upstream_password_file, spec.upstream_password_env, "upstream_password_file")

    def headers(provider) -> str | None:  # a provider's headers_file / headers_env
        text = read_secret(provider.headers_file, provider.headers_env, "headers_file")
        if text is None or text == "(offline)":
            return None
        try:
            parse_headers(text)
        except ValueError as exc:
            raise ConfigError([f"{provider.headers_file or provider.headers_env}:0: headers: {exc}"]) from None
        return text

    jwks = (lambda path, min_refresh: {}) if read_secret is _offline_secret else _read_jwks  # a kubernetes jwks_file
    attest = bool(config.probe.echo_urls)
    profiles = {
        name: build_pool(name, spec, addresses_in, config.timeouts.upstream_connect, clock,
                         upstream_password=upstream_secret(spec), attest=attest, grace=config.probe.grace)
        for name, spec in config.egress.items()
    }
    return Runtime(
        config=config, config_hash=config_hash, loaded_at=time.time(), source=source,
        clients=compile_clients(config.clients, secret, jwks), guard=AddressGuard(config.security.allow_private),
        profiles=profiles, connect_ports=frozenset(config.security.connect_ports),
        socks_ports=config.security.socks_port_set, timeouts=config.timeouts,
        limits=config.limits, listeners={listener.address: listener for listener in config.listen},
        proxy_protocol={listener.address: tuple(ipaddress.ip_network(n) for n in listener.trusted_proxies)
                        for listener in config.listen if listener.proxy_protocol},
        forwarding=Forwarding.compile(config.forwarding.via, config.forwarding.x_forwarded_for),
        protect={name: compile_protect(spec.protect) for name, spec in config.egress.items() if spec.protect},
        providers=compile_board(config.egress, config.timeouts.upstream_connect, config.probe.interval, headers),
        blocks=compile_rules(config.egress),
        names=NameGuard(config.security.deny_suffixes, config.security.allow_suffixes, config.security.internal_names),
    )


def load_runtime(path: str | None, *, echo_url: str | None = None) -> Runtime:
    return load_runtime_text(path, echo_url=echo_url)[0]


def load_runtime_text(path: str | None, text: bytes | None = None, *,
                      echo_url: str | None = None) -> tuple[Runtime, bytes]:
    """The runtime and the exact config text it was built from (handed to new workers)."""
    config, digest, text = read_config(path, text, echo_url=echo_url)
    return build_runtime(config, digest, path or EMBEDDED), text


def load_candidate(path: str) -> Runtime:
    """A config compiled for deciding, not serving (``egressgate replay``): checked as
    ``check-config --offline`` does (secrets and TLS files need only be named), and with no egress
    attestation (every member may carry traffic: what its decisions are, not whether its IPs
    are verified now). Raises ``ConfigError``."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}:0: (file): cannot read: {exc}"]) from None
    checked = check_config_text(text, path, offline=True)
    if checked.errors or checked.config is None:
        raise ConfigError(checked.errors)
    config = checked.config.model_copy(update={"probe": checked.config.probe.model_copy(update={"echo_url": None})})
    return build_runtime(config, hashlib.sha256(text.encode()).hexdigest(), path, read_secret=_offline_secret)


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
    if not errors and not offline:
        errors += _jwks_problems(checked)
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
