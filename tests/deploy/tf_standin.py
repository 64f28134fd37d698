"""Run the REAL terraform binary's language-level checks (init, validate, plan) on
deploy/terraform/gcp without the google provider, which cannot be downloaded here.

Contract: `standin_module(src, dst)` copies the module to `dst` and rewrites every
`resource "google_T" "N"` / `data "google_T" "N"` into `resource "terraform_data" "[data__]google_T__N"`
whose `input` object holds every argument of the original, with every nested block turned into a
list of objects (a `dynamic` block into the equivalent `for` expression) and every attribute the
module reads from the resource (`.id`, `.self_link`, `.address`, ...) added as a placeholder.
Meta-arguments (count, for_each, depends_on, lifecycle pre/postconditions, create_before_destroy)
are kept as they are; references `google_T.N[...].attr` become
`terraform_data.google_T__N[...].output.attr`. Variables, locals, outputs, templatefile() calls and
validations are untouched, so Terraform itself evaluates them: sensitive for_each, sensitive outputs,
invalid escapes, failing validations and preconditions are reported as with the real provider.
(terraform_data's output is unknown at plan for a new resource, as a real provider's computed
attributes are.) The google provider is dropped from required_providers; `terraform init` then needs
no network (terraform_data is built in).

What it cannot check — the google provider's argument names and enum values — is what
tests/deploy/test_deploy_google_schema.py checks against the provider's schema extract.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

TERRAFORM = shutil.which("terraform") or "/usr/local/bin/terraform"

_BLOCK_HEAD = re.compile(r'^\s*(resource|data)\s+"(google_[a-z0-9_]+)"\s+"([A-Za-z0-9_-]+)"\s*\{\s*$')
_REF = re.compile(r"(?<![\w.\"])(data\.)?(google_[a-z0-9_]+)\.([A-Za-z_][A-Za-z0-9_-]*)")
META = {"count", "for_each", "depends_on", "provider", "lifecycle"}


def tf_env(tmp: Path) -> dict[str, str]:
    """Environment for the terraform binary: no user config, no plugin cache, no network need."""
    rc = tmp / "terraformrc"
    rc.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_")}
    env.update(TF_CLI_CONFIG_FILE=str(rc), TF_IN_AUTOMATION="1", CHECKPOINT_DISABLE="1")
    return env


def terraform(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 120):
    return subprocess.run(
        [TERRAFORM, *args, "-no-color"], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


# ---------------------------------------------------------------------------------------- scanning


def _scan_to_close(text: str, i: int, close: str) -> int:
    """Index just past the bracket that closes at `close`, starting inside it at i. Strings,
    interpolations, heredocs and comments are skipped."""
    stack = [close]
    n = len(text)
    while i < n:
        c = text[i]
        if c == '"':
            i = _skip_string(text, i + 1)
            continue
        if c == "#" or text.startswith("//", i):
            while i < n and text[i] != "\n":
                i += 1
            continue
        if text.startswith("/*", i):
            i = text.index("*/", i) + 2
            continue
        if text.startswith("<<", i):
            m = re.compile(r"<<-?([A-Za-z_]+)\n").match(text, i)
            if m:
                end = re.compile(r"^\s*" + m.group(1) + r"\s*$", re.M).search(text, m.end())
                i = end.end()
                continue
        if c in "([{":
            stack.append({"(": ")", "[": "]", "{": "}"}[c])
        elif c in ")]}":
            if c != stack[-1]:
                raise ValueError(f"unbalanced {c!r} at {i}")
            stack.pop()
            if not stack:
                return i + 1
        i += 1
    raise ValueError("unterminated block")


def _skip_string(text: str, i: int) -> int:
    while True:
        c = text[i]
        if c == "\\":
            i += 2
        elif c == '"':
            return i + 1
        elif text.startswith("${", i) or text.startswith("%{", i):
            i = _scan_to_close(text, i + 2, "}")
        else:
            i += 1


def _items(body: str) -> list[tuple[str, str, list[str], str]]:
    """Split a block body into (kind, name, labels, text): kind 'attr' (text = expression) or
    'block' (text = the inner body)."""
    out = []
    i, n = 0, len(body)
    head = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_-]*)((?:\s+"[^"]*")*)\s*(=|\{)')
    while i < n:
        if body[i].isspace():
            i += 1
            continue
        if body[i] == "#" or body.startswith("//", i):
            i = body.find("\n", i)
            i = n if i < 0 else i
            continue
        m = head.match(body, i)
        if not m:
            raise ValueError(f"cannot parse near: {body[i:i + 60]!r}")
        name, labels = m.group(1), re.findall(r'"([^"]*)"', m.group(2))
        if m.group(3) == "{":
            end = _scan_to_close(body, m.end(), "}")
            out.append(("block", name, labels, body[m.end() : end - 1]))
            i = end
        else:
            j = m.end()
            # An expression ends at a newline outside any bracket/string.
            k = j
            while k < n and body[k] != "\n":
                c = body[k]
                if c == '"':
                    k = _skip_string(body, k + 1)
                elif c in "([{":
                    k = _scan_to_close(body, k + 1, {"(": ")", "[": "]", "{": "}"}[c])
                elif body.startswith("<<", k) and re.match(r"<<-?[A-Za-z_]+\n", body[k:]):
                    mm = re.match(r"<<-?([A-Za-z_]+)\n", body[k:])
                    end = re.compile(r"^\s*" + mm.group(1) + r"\s*$", re.M).search(body, k + mm.end())
                    k = end.end()
                elif c == "#" or body.startswith("//", k):
                    break
                else:
                    k += 1
            expr = body[j:k].strip()
            expr = re.sub(r"\s+(#|//).*$", "", expr) if "\n" not in expr else expr
            out.append(("attr", name, labels, expr))
            i = k
    return out


# ------------------------------------------------------------------------------------- rewriting


def _rewrite_refs(expr: str) -> str:
    out, pos = [], 0
    for m in _REF.finditer(expr):
        if _inside_plain_string(expr, m.start()):
            continue
        out.append(expr[pos : m.start()])
        prefix = "data__" if m.group(1) else ""
        out.append(f"terraform_data.{prefix}{m.group(2)}__{m.group(3)}")
        k = m.end()
        if k < len(expr) and expr[k] == "[":
            end = _scan_to_close(expr, k + 1, "]")
            out.append(_rewrite_refs(expr[k:end]))
            k = end
        if k < len(expr) and expr[k] == ".":
            out.append(".output")
        pos = k
    out.append(expr[pos:])
    return "".join(out)


def _inside_plain_string(expr: str, at: int) -> bool:
    """True when `at` is inside a string's literal part (not inside an interpolation)."""
    i, depth_stack = 0, []  # stack of 'str' / 'interp'
    while i < at:
        c = expr[i]
        top = depth_stack[-1] if depth_stack else None
        if top == "str":
            if c == "\\":
                i += 2
                continue
            if c == '"':
                depth_stack.pop()
            elif expr.startswith("${", i) or expr.startswith("%{", i):
                depth_stack.append("interp")
                i += 2
                continue
        else:
            if c == "#" or expr.startswith("//", i):
                nl = expr.find("\n", i)
                if nl < 0 or nl >= at:
                    return True  # in a comment: leave it alone
                i = nl
                continue
            if c == '"':
                depth_stack.append("str")
            elif c == "{":
                depth_stack.append("brace")
            elif c == "}" and depth_stack:
                depth_stack.pop()
        i += 1
    return bool(depth_stack) and depth_stack[-1] == "str"


def _object(body: str, iterators: dict[str, str] | None = None) -> str:
    """A block body as an HCL object expression (nested blocks -> lists of objects)."""
    attrs: dict[str, str] = {}
    lists: dict[str, list[str]] = {}
    for kind, name, labels, text in _items(body):
        if kind == "attr":
            attrs[name] = _rewrite_refs(text)
        elif name == "dynamic":
            (bname,) = labels
            inner = {n: t for k, n, _, t in _items(text) if k == "attr"}
            content = next(t for k, n, _, t in _items(text) if k == "block" and n == "content")
            it = inner.get("iterator", bname).strip()
            src = _rewrite_refs(inner["for_each"])
            lists.setdefault(bname, []).append(
                f"[for {it} in [for k, v in {src} : {{ key = k, value = v }}] : {_object(content)}]"
            )
        else:
            lists.setdefault(name, []).append(f"[{_object(text)}]")
    parts = [f"{k} = {v}" for k, v in attrs.items()]
    for k, chunks in lists.items():
        parts.append(f"{k} = " + (chunks[0] if len(chunks) == 1 else f"concat({', '.join(chunks)})"))
    return "{\n" + "\n".join(parts) + "\n}"


def _lifecycle(body: str) -> str:
    keep = []
    for kind, name, _labels, text in _items(body):
        if kind == "attr" and name == "create_before_destroy":
            keep.append(f"create_before_destroy = {text}")
        elif kind == "block" and name in ("precondition", "postcondition"):
            inner = _rewrite_refs(text).replace("self.", "self.output.")
            keep.append(f"{name} {{\n{inner}\n}}")
        # ignore_changes / replace_triggered_by name provider attributes: not meaningful here.
    return "lifecycle {\n" + "\n".join(keep) + "\n}"


def _standin(kind: str, rtype: str, name: str, body: str, used_attrs: set[str]) -> str:
    meta, args = [], []
    for k, n, _labels, text in _items(body):
        if n in META:
            if k == "block":
                meta.append(_lifecycle(text))
            elif n != "provider":
                meta.append(f"{n} = {_rewrite_refs(text)}")
    for k, n, labels, text in _items(body):
        if n not in META:
            args.append((k, n, labels, text))
    # Rebuild the argument body without meta-arguments, then add placeholders for what is read.
    arg_body = "\n".join(
        f"{n} = {t}" if k == "attr" else (f'{n} {" ".join(chr(34) + x + chr(34) for x in labels)} {{\n{t}\n}}')
        for k, n, labels, t in args
    )
    obj = _object(arg_body)
    present = {n for k, n, _, _ in args}
    has = {n for k, n, _, _ in _items(body)}
    extra = [f"{a} = {_placeholder(rtype, a, has)}" for a in sorted(used_attrs - present)]
    if extra:
        obj = obj[:-1] + "\n".join(extra) + "\n}"
    prefix = "data__" if kind == "data" else ""
    return (
        f'resource "terraform_data" "{prefix}{rtype}__{name}" {{\n'
        + "\n".join(meta)
        + f"\ninput = {obj}\n}}\n"
    )


# Computed attributes that are not strings, by (resource type, attribute): their stand-in values.
TYPED = {
    ("google_redis_instance", "host"): '"10.200.0.3"',
    ("google_redis_instance", "port"): "6378",
    ("google_redis_instance", "server_ca_certs"):
        '[{ cert = "-----BEGIN CERTIFICATE-----\\nstandin\\n-----END CERTIFICATE-----\\n" }]',
}


def _placeholder(rtype: str, attr: str, meta: set[str]) -> str:
    """A computed attribute's stand-in value. IP addresses are documentation addresses
    (203.0.113.0/24), distinct per instance, so configs rendered from them stay valid."""
    if (rtype, attr) in TYPED:
        return TYPED[(rtype, attr)]
    if attr != "address":
        return f'"standin-{rtype}-{attr}"'
    if "for_each" in meta:
        return 'cidrhost("203.0.113.0/24", parseint(substr(sha1(tostring(each.key)), 0, 4), 16) % 250 + 2)'
    if "count" in meta:
        return 'cidrhost("198.51.100.0/24", count.index + 2)'
    return '"192.0.2.10"'


def apply_and_show(mod: Path, env: dict[str, str], plan: str) -> dict[str, dict]:
    """Apply a saved plan of the stand-in module; {google address: its arguments as applied}, e.g.
    {"google_compute_router_nat.profile[\"vendor-x\"]": {...}} (data sources as "data.google_...")."""
    import json

    r = terraform(["apply", "-input=false", "-lock=false", "-auto-approve", plan], mod, env)
    if r.returncode != 0:
        raise AssertionError(r.stdout + r.stderr)
    r = terraform(["show", "-json"], mod, env)
    state = json.loads(r.stdout)
    out: dict[str, dict] = {}

    def walk(module: dict) -> None:
        for res in module.get("resources", []):
            name = res["name"]
            if res["type"] != "terraform_data" or "__" not in name:
                continue
            kind = "data." if name.startswith("data__") else ""
            rtype, rname = name.removeprefix("data__").split("__", 1)
            idx = res.get("index")
            key = "" if idx is None else (f'["{idx}"]' if isinstance(idx, str) else f"[{idx}]")
            out[f"{kind}{rtype}.{rname}{key}"] = res["values"]["input"]
        for child in module.get("child_modules", []):
            walk(child)

    walk(state["values"]["root_module"])
    return out


def _used_attrs(texts: list[str]) -> dict[tuple[str, str, str], set[str]]:
    used: dict[tuple[str, str, str], set[str]] = {}
    pat = re.compile(r"(?<![\w.])(data\.)?(google_[a-z0-9_]+)\.([A-Za-z_][A-Za-z0-9_-]*)(\[[^\]]*\])?\.([a-z_][a-z0-9_]*)")
    for t in texts:
        for m in pat.finditer(t):
            used.setdefault(("data" if m.group(1) else "resource", m.group(2), m.group(3)), set()).add(m.group(5))
    return used


def rewrite_file(text: str, used: dict[tuple[str, str, str], set[str]]) -> str:
    out, pos = [], 0
    head = re.compile(r'^(resource|data)\s+"(google_[a-z0-9_]+)"\s+"([A-Za-z0-9_-]+)"\s*\{', re.M)
    while True:
        m = head.search(text, pos)
        if not m:
            break
        out.append(_rewrite_outside_google(text[pos : m.start()]))
        end = _scan_to_close(text, m.end(), "}")
        kind, rtype, name = m.groups()
        out.append(_standin(kind, rtype, name, text[m.end() : end - 1], used.get((kind, rtype, name), set())))
        pos = end
    out.append(_rewrite_outside_google(text[pos:]))
    return "".join(out)


def _rewrite_outside_google(text: str) -> str:
    text = re.sub(r"(?ms)^(\s*)google\s*=\s*\{[^}]*\}\s*\n", "", text)  # required_providers entry
    return _rewrite_refs(text)


def standin_module(src: Path, dst: Path) -> Path:
    """Copy module `src` to `dst` with every google resource/data source replaced (see module doc)."""
    shutil.copytree(src, dst)
    tf_files = sorted(dst.glob("*.tf"))
    texts = [p.read_text() for p in tf_files]
    used = _used_attrs(texts)
    for p, t in zip(tf_files, texts, strict=True):
        p.write_text(rewrite_file(t, used))
    return dst
