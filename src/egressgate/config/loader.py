"""Load YAML into a ``Config``; every error names ``FILE:LINE: key: what``.

Three passes, all errors collected before raising one ``ConfigError``:
1. YAML syntax and duplicate keys (PyYAML accepts duplicates silently; we do not);
2. the pydantic schema (types, unknown keys with the nearest known key suggested, per-model
   rules); a refused value is taken out and the rest checked again (``repair``), so one run
   reports every error;
3. cross-references (profiles named by listeners and clients exist, client names unique,
   secrets referenced by file or environment variable are present).
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml
from pydantic import ValidationError

from ..errors import ConfigError
from ..model import DestPattern, UpstreamProxy
from .repair import Loc, Pruner, did_you_mean, related
from .schema import Config

# Values copied from an example and never replaced: refused wherever a credential goes.
PLACEHOLDER = re.compile(r"replace|change-?me|example|placeholder", re.IGNORECASE)


def load_config(path: str | os.PathLike[str]) -> Config:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}:0: (file): cannot read: {exc}"]) from None
    return load_config_text(text, str(path))


def load_config_text(text: str, filename: str = "<config>", *, offline: bool = False,
                     echo_url: str | None = None) -> Config:
    checked = check_config_text(text, filename, offline=offline, echo_url=echo_url)
    if checked.errors or checked.config is None:
        raise ConfigError(checked.errors)
    return checked.config


@dataclass(frozen=True)
class Checked:
    """Every error in a config text, and the config as far as it could be read (None when the
    YAML itself is broken). ``where(loc, what)`` renders ``FILE:LINE: key: what`` for a
    location in ``config`` (list indices as in the file, even where broken items were dropped);
    ``raw`` is the document as written and ``where_raw`` does the same for locations in it."""

    config: Config | None
    errors: list[str]
    where: Callable[[Loc, str], str]
    raw: dict = field(default_factory=dict)
    where_raw: Callable[[Loc, str], str] | None = None


def check_config_text(text: str, filename: str = "<config>", *, offline: bool = False,
                      echo_url: str | None = None) -> Checked:
    """All errors at once: YAML, schema (continuing past each refused value, see ``repair``) and
    cross-references. ``offline``: secrets and TLS files must be named, not present here (CI).
    ``echo_url``: ``probe.echo_url`` where the file names none (``egressgate probe --echo-url``)."""
    def nowhere(loc: Loc, what: str) -> str:
        return f"{filename}:0: {_dotted(loc) or '(top level)'}: {what}"

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 0
        problem = getattr(exc, "problem", None) or str(exc)
        return Checked(None, [f"{filename}:{line}: (yaml): {_yaml_hint(problem)}"], nowhere)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        return Checked(None, [f"{filename}:1: (top level): expected a mapping of keys, got {type(data).__name__}"],
                       nowhere)

    errors = [f"{filename}:{line}: {_dotted(loc)}: duplicate key" for loc, line in _duplicates(root, ())]
    if echo_url and isinstance(data.get("probe", {}), dict) and not (data.get("probe") or {}).get("echo_url"):
        data["probe"] = {**(data.get("probe") or {}), "echo_url": echo_url}
    pruner = Pruner(data)
    reported: list[Loc] = []

    def where_raw(loc: Loc, what: str) -> str:
        return f"{filename}:{_line(root, loc)}: {_dotted(loc) or '(top level)'}: {what}"

    def where(loc: Loc, what: str) -> str:
        return where_raw(pruner.original(loc), what)

    config: Config | None = None
    for _ in range(16):  # each pass takes out at least one value; nesting is shallow
        try:
            config = Config.model_validate(pruner.data)
            break
        except ValidationError as exc:
            earlier, found = list(reported), []
            for err in exc.errors():
                loc = tuple(p for p in err["loc"] if isinstance(p, int) or not _internal(p))
                found.append(loc)
                original = pruner.original(loc)
                if any(related(original, r) for r in earlier):
                    if err["type"] == "missing":  # the mapping holding it is reset: its other keys go too
                        reported.append(original[:-1])
                    continue  # a consequence of taking out a value already reported
                reported.append(original)
                errors.append(where(loc, _message(err, original)))
            if not pruner.prune(found):
                break
    if config is not None:
        for loc, msg in _cross_checks(config, offline):
            if not any(related(pruner.original(loc), r) for r in reported):
                errors.append(where(loc, msg))
    return Checked(config, _in_source_order(errors, filename), where, data, where_raw)


def _in_source_order(errors: list[str], filename: str) -> list[str]:
    """``FILE:LINE: ...`` lines by LINE (stable: one line's errors keep their order)."""
    def line(text: str) -> int:
        number = text[len(filename) + 1:].split(":", 1)[0]
        return int(number) if number.isdigit() else 0
    return sorted(errors, key=line)


def _cross_checks(config: Config, offline: bool = False) -> list[tuple[Loc, str]]:
    problems: list[tuple[Loc, str]] = []
    profiles = set(config.egress)
    for i, listener in enumerate(config.listen):
        if listener.egress not in profiles:
            problems.append((("listen", i, "egress"), f"unknown egress profile {listener.egress!r}"))
        if listener.proxy_protocol and not listener.trusted_proxies:
            problems.append((("listen", i, "trusted_proxies"),
                             "proxy_protocol needs trusted_proxies (the load balancer's CIDRs)"))
        if listener.protocol == "socks5" and listener.tls:
            problems.append((("listen", i, "tls"), "a socks5 listener takes no tls: SOCKS5 clients connect in "
                             "plain TCP (put it on a private address, or behind the load balancer)"))
        if listener.tls:
            for key in ("cert", "key", "client_ca"):
                path = getattr(listener.tls, key)
                if path and not offline and not os.path.isfile(path):
                    problems.append((("listen", i, "tls", key), f"file not found: {path}"))
    if config.workers > 1:
        for i, listener in enumerate(config.listen):
            if listener.address.endswith(":0"):
                problems.append((("listen", i, "address"), "workers > 1 share listeners: give a fixed port"))
    addresses = [listener.address for listener in config.listen]
    for i, address in enumerate(addresses):
        if addresses.index(address) != i:
            problems.append((("listen", i, "address"), f"listed twice: {address}"))
    seen: dict[str, int] = {}
    users: dict[str, int] = {}
    for i, client in enumerate(config.clients):
        if client.name in seen:
            problems.append((("clients", i, "name"), f"duplicate client name (first at clients[{seen[client.name]}])"))
        seen.setdefault(client.name, i)
        if client.username:
            if client.username in users:
                problems.append((("clients", i, "username"), "duplicate username"))
            users.setdefault(client.username, i)
        for j, name in enumerate(client.egress):
            if name not in profiles:
                problems.append((("clients", i, "egress", j), f"unknown egress profile {name!r}"))
        k8s = client.kubernetes
        if k8s is not None:
            clash = next((j for j, c in enumerate(config.clients) if c.username == k8s.username), None)
            if clash is not None:
                problems.append((("clients", i, "kubernetes", "username"),
                                 f"also the username of clients[{clash}], a password client"))
            for key in ("jwks_file", "ca_file"):
                path = getattr(k8s, key)
                if path and not offline and not os.path.isfile(path):
                    problems.append((("clients", i, "kubernetes", key), f"file not found: {path}"))
        if not offline:
            problems += _secret_problems(("clients", i), "password_file", client.password_file,
                                         "password_env", client.password_env)
        for key in ("username", "password_hash"):
            if PLACEHOLDER.search(getattr(client, key) or ""):
                problems.append((("clients", i, key), "a placeholder from an example, not a real value"))
        for key in ("allow", "deny"):
            for j, pattern in enumerate(getattr(client, key) or []):
                msg = _pattern_problem(pattern)
                if msg:
                    problems.append((("clients", i, key, j), msg))
    problems += _unreachable_clients(config.clients)
    for name, profile in config.egress.items():
        if profile.expect_ip and not config.probe.echo_urls:
            problems.append((("egress", name, "expect_ip"),
                             "needs probe.echo_url: without an IP-echo service nothing can check it, and "
                             "the profile would refuse all its traffic"))
        for j, url in enumerate(profile.upstream or []):
            msg = _upstream_problem(url)
            if msg:
                problems.append((("egress", name, "upstream", j), msg))
            elif PLACEHOLDER.search(unquote(urlsplit(url).password or "")):
                problems.append((("egress", name, "upstream", j), "the password is a placeholder from an example"))
            elif (profile.upstream_password_file or profile.upstream_password_env) and not urlsplit(url).username:
                problems.append((("egress", name, "upstream", j),
                                 "name the user in the URL (http://USER@host:port); the password comes from "
                                 "upstream_password_file / upstream_password_env"))
        problems += _protect_problems(name, profile)
        problems += _standby_problems(name, profile)
        for j, provider in enumerate(profile.providers):
            if not offline:
                problems += _secret_problems(("egress", name, "providers", j), "headers_file", provider.headers_file,
                                             "headers_env", provider.headers_env)
        if not offline:
            problems += _secret_problems(("egress", name), "upstream_password_file",
                                         profile.upstream_password_file, "upstream_password_env",
                                         profile.upstream_password_env)
    redis = config.fleet.redis
    if redis is not None and not offline:
        problems += _secret_problems(("fleet", "redis"), "password_file", redis.password_file,
                                     "password_env", redis.password_env)
        for key in ("ca", "cert", "key"):
            path = getattr(redis.tls, key) if redis.tls is not None else None
            if path and not os.path.isfile(path):
                problems.append((("fleet", "redis", "tls", key), f"file not found: {path}"))
    if config.admin.token_env and not offline and config.admin.token_env not in os.environ:
        problems.append((("admin", "token_env"), f"environment variable {config.admin.token_env} is not set"))
    if config.admin.token_file and not offline:
        problems += _secret_problems(("admin",), "token_file", config.admin.token_file, "token_env", None)
    if config.receipts.key_file and not offline and not os.path.isfile(config.receipts.key_file):
        problems.append((("receipts", "key_file"), f"file not found: {config.receipts.key_file}"))
    return problems


def _protect_problems(name: str, profile) -> list[tuple[Loc, str]]:
    """A profile's ``protect`` rules: valid destination patterns, one name per rule."""
    problems: list[tuple[Loc, str]] = []
    names: dict[str, int] = {}
    for i, rule in enumerate(profile.protect):
        for j, pattern in enumerate(rule.destinations):
            msg = _pattern_problem(pattern)
            if msg:
                problems.append((("egress", name, "protect", i, "destinations", j), msg))
        label = rule.label
        if label in names:
            problems.append((("egress", name, "protect", i, "name" if rule.name else "destinations"),
                             f"two protect rules named {label!r} (first at protect[{names[label]}]): give each "
                             "a distinct name"))
        names.setdefault(label, i)
    return problems


def _standby_problems(name: str, profile) -> list[tuple[Loc, str]]:
    """``standby`` members of the profile's kind, none also active, none twice; ``switch: auto``
    with something to fail over on (a required provider, or expect_ip) and to (standby);
    ``failover_after`` only with ``switch: auto``."""
    problems: list[tuple[Loc, str]] = []
    kind = profile.kind
    if profile.standby and kind == "direct":
        problems.append((("egress", name, "standby"), "a direct profile has no members to stand by for: standby "
                         "is for bind (addresses) and upstream (proxy URLs) profiles"))
    elif kind == "bind":
        active = [ipaddress.ip_network(e) for e in profile.bind]
        seen: list[tuple[int, object]] = []
        for j, entry in enumerate(profile.standby):
            if "://" in entry:
                problems.append((("egress", name, "standby", j), "a bind profile's standby members are source "
                                 "addresses or CIDRs, like its bind entries, not proxy URLs"))
                continue
            net = ipaddress.ip_network(entry)
            clash = next((k for k, a in enumerate(active) if a.version == net.version and a.overlaps(net)), None)
            twice = next((k for k, n in seen if n.version == net.version and n.overlaps(net)), None)
            if clash is not None:
                problems.append((("egress", name, "standby", j), f"{entry} is also an active member (bind[{clash}]: "
                                 f"{profile.bind[clash]}): a member is active or standby, not both"))
            elif twice is not None:
                problems.append((("egress", name, "standby", j), f"{entry} overlaps standby[{twice}]"))
            seen.append((j, net))
    elif kind == "upstream":
        active = {_proxy_key(u): k for k, u in enumerate(profile.upstream)}
        seen_urls: dict[object, int] = {}
        for j, url in enumerate(profile.standby):
            msg = _upstream_problem(url) if "://" in url else ("an upstream profile's standby members are proxy "
                                                               "URLs (http://host:port), like its upstream entries")
            if msg is None and PLACEHOLDER.search(unquote(urlsplit(url).password or "")):
                msg = "the password is a placeholder from an example"
            if msg is None and (profile.upstream_password_file or profile.upstream_password_env) \
                    and not urlsplit(url).username:
                msg = "name the user in the URL (http://USER@host:port); the password comes from " \
                      "upstream_password_file / upstream_password_env"
            key = _proxy_key(url) if msg is None else None
            if msg is None and key in active:
                msg = f"also an active member (upstream[{active[key]}]): a member is active or standby, not both"
            if msg is None and key in seen_urls:
                msg = f"listed twice (standby[{seen_urls[key]}])"
            if msg is not None:
                problems.append((("egress", name, "standby", j), msg))
            elif key is not None:
                seen_urls[key] = j
    if profile.switch == "auto":
        if kind == "direct":
            problems.append((("egress", name, "switch"), "switch: auto needs a bind or upstream profile with "
                             "standby members to fail over to"))
        elif not any(p.required for p in profile.providers) and not profile.expect_ip:
            problems.append((("egress", name, "switch"), "switch: auto fails over when a required provider refuses "
                             "every active member, or their egress-IP check fails: mark a provider required: true, "
                             "or give expect_ip"))
        elif not profile.standby:
            problems.append((("egress", name, "switch"), "switch: auto fails over to a standby member: name "
                             "standby members (checked like the active ones, carrying no traffic until then)"))
    elif profile.failover_after is not None:
        problems.append((("egress", name, "failover_after"), "only used with switch: auto"))
    return problems


def _proxy_key(url: str) -> object:
    """What makes two proxy URLs the same member: scheme, host and port."""
    try:
        proxy = UpstreamProxy.parse(url)
    except ValueError:
        return url
    return (urlsplit(url).scheme, str(proxy.address))


def _unreachable_clients(clients: list) -> list[tuple[Loc, str]]:
    """Client entries that can never match: an earlier entry without credentials admits every
    source they do and so takes each request that carries none (requests with credentials
    match only entries with credentials, so entries with a username are never shadowed). An
    entry that demands credentials (a username, or a ``kubernetes`` token) shadows nothing: a
    request without them passes it by."""
    problems: list[tuple[Loc, str]] = []
    nets = [None if c.from_ is None else [ipaddress.ip_network(n) for n in c.from_] for c in clients]
    for i, client in enumerate(clients):
        if client.username or client.kubernetes or nets[i] is None:
            continue
        for j in range(i):
            earlier = clients[j]
            if earlier.username or earlier.kubernetes or nets[j] is None:
                continue
            if earlier.cert_subject is not None and earlier.cert_subject != client.cert_subject:
                continue
            if all(any(n.version == m.version and n.subnet_of(m) for m in nets[j]) for n in nets[i]):
                problems.append(((("clients", i, "from")),
                                 f"can never match: clients[{j}] ({earlier.name}) admits these sources first "
                                 "and asks for no credentials"))
                break
    return problems


def _secret_problems(loc: Loc, file_key: str, path: str | None, env_key: str,
                     env: str | None) -> list[tuple[Loc, str]]:
    """A secret named by file or environment variable must exist and not be an example's placeholder."""
    if path:
        try:
            value = Path(path).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return [((*loc, file_key), f"file not found: {path}")]
        except (OSError, UnicodeDecodeError) as exc:
            return [((*loc, file_key), f"cannot read {path}: {exc}")]
        if not value or PLACEHOLDER.search(value):
            return [((*loc, file_key), f"{path} holds a placeholder or nothing, not a secret")]
    if env:
        if env not in os.environ:
            return [((*loc, env_key), f"environment variable {env} is not set")]
        value = os.environ[env].strip()
        if not value or PLACEHOLDER.search(value):
            return [((*loc, env_key), f"environment variable {env} holds a placeholder or nothing, not a secret")]
    return []


def _pattern_problem(pattern: str) -> str | None:
    try:
        DestPattern.parse(pattern)
    except ValueError as exc:
        return str(exc)
    return None


def _upstream_problem(url: str) -> str | None:
    try:
        UpstreamProxy.parse(url)
    except ValueError as exc:
        return str(exc)
    return None


# A YAML parser's complaint -> what usually causes it, said as what to do.
_YAML_HINTS = (
    ("found character '\\t'", "indent with spaces: YAML does not allow tabs"),
    ("expected <block end>", "this line's indentation does not fit the lines above: keys of one mapping "
     "start in the same column, and so do the '- ' items of one list"),
    ("mapping values are not allowed", "a value holding ': ' must be quoted (\"a: b\"), or a key is "
     "indented under a value"),
    ("could not find expected ':'", "a key needs ':' after it (key: value)"),
    ("found unexpected end of stream", "a quote or bracket is not closed"),
    ("found '<stream end>'", "the file ends inside a value: a [list], {mapping} or quote is not closed"),
    ("found unexpected ':'", "a value holding ':' must be quoted"),
    ("expected ',' or ']'", "a [list] is not closed, or an item holding ',' or ':' needs quotes"),
    ("expected ',' or '}'", "a {mapping} is not closed, or a value holding ',' or ':' needs quotes"),
    ("found undefined alias", "'*' starts a YAML alias: quote a value that starts with '*' (\"*.example.com\")"),
    ("expected alphabetic or numeric character", "'*' or '&' starts a YAML alias or anchor: quote the value "
     "(\"*.example.com\")"),
    ("found character '@'", "'@' and '`' cannot start a value: quote it"),
    ("found character '`'", "'@' and '`' cannot start a value: quote it"),
)


def _yaml_hint(problem: str) -> str:
    """``problem`` (PyYAML's words) with what to do about it."""
    for needle, hint in _YAML_HINTS:
        if needle in problem:
            return f"not valid YAML ({problem}): {hint}"
    return f"not valid YAML: {problem}"


def _internal(part: Any) -> bool:
    # pydantic inserts validator names such as 'function-after[...]' into locations
    return isinstance(part, str) and ("[" in part or part.startswith("function-"))


def _message(err: dict[str, Any], loc: Loc) -> str:
    if err["type"] == "extra_forbidden":
        near = did_you_mean(Config, loc)
        return f"unknown key; did you mean `{near}`?" if near else "unknown key"
    if err["type"] == "missing":
        return "required key is missing"
    plain = _plain(err)
    if plain is not None:
        return plain
    msg = str(err["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    return msg


# What a pattern in the schema admits, said as what to write (never the regular expression).
_PATTERNS = {
    r"^[A-Za-z0-9_.-]+$": "use only letters, digits, '_', '.' and '-'",
    r"^[A-Za-z0-9_.*:-]+$": "use only letters, digits, '_', '.', '*', ':' and '-'",
    r"^[^:+]+$": "no ':' or '+' (they separate the user name from the profile and the password)",
}
_KIND = {"list": "a list", "dict": "a mapping", "str": "text", "int": "a whole number", "float": "a number",
         "bool": "true or false", "NoneType": "nothing (an empty value)"}


def _got(value: Any) -> str:
    kind = _KIND.get(type(value).__name__, type(value).__name__)
    if isinstance(value, (dict, list)) or value is None:
        return kind
    text = repr(value)
    return f"{kind} {text if len(text) <= 60 else text[:57] + '...'}"


def _plain(err: dict[str, Any]) -> str | None:
    """A validation error in this project's words: what is wrong and what to write instead
    (None: the schema's own message, already ours, is used)."""
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    if kind == "list_type":
        return f"expected a list: [a, b] or one '- item' per line (got {_got(value)})"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"expected a mapping of keys ('key: value' lines, indented under this key), got {_got(value)}"
    if kind == "string_type":
        return f"expected text, got {_got(value)}" + (" (quote it)" if isinstance(value, (int, float, bool)) else "")
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"expected a whole number, got {_got(value)}"
    if kind in ("float_type", "float_parsing"):
        return f"expected a number, got {_got(value)}"
    if kind in ("bool_type", "bool_parsing"):
        return f"expected true or false, got {_got(value)}"
    if kind == "string_pattern_mismatch":
        return f"{value!r}: " + _PATTERNS.get(str(ctx.get("pattern")), "contains a character not allowed here")
    if kind == "string_too_short":
        return "must not be empty" if ctx.get("min_length") == 1 else f"at least {ctx.get('min_length')} characters"
    if kind == "string_too_long":
        return f"at most {ctx.get('max_length')} characters, got {len(value) if isinstance(value, str) else '?'}"
    if kind == "too_short":
        n = ctx.get("min_length")
        return f"give at least {n} item{'s' if n != 1 else ''}" + (" (the list is empty)" if not value else "")
    if kind == "too_long":
        return f"give at most {ctx.get('max_length')} items"
    if kind == "literal_error":
        return f"write {ctx.get('expected')}, not {_got(value)}"
    for bound, words in (("greater_than_equal", "at least"), ("greater_than", "greater than"),
                         ("less_than_equal", "at most"), ("less_than", "less than")):
        if kind == bound:
            key = {"greater_than_equal": "ge", "greater_than": "gt", "less_than_equal": "le", "less_than": "lt"}[bound]
            return f"must be {words} {ctx.get(key)}, got {value}"
    return None


def _dotted(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _line(root: yaml.Node | None, loc: Loc) -> int:
    node = root
    line = node.start_mark.line + 1 if node is not None else 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            matches = [(k, v) for k, v in node.value if k.value == str(part)]
            if not matches:
                return line
            key, node = matches[-1]  # PyYAML keeps the last of duplicated keys
            line = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _duplicates(node: yaml.Node | None, loc: Loc) -> list[tuple[Loc, int]]:
    found: list[tuple[Loc, int]] = []
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            if key.value in seen:
                found.append(((*loc, key.value), key.start_mark.line + 1))
            seen.add(key.value)
            found += _duplicates(value, (*loc, key.value))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            found += _duplicates(item, (*loc, i))
    return found
