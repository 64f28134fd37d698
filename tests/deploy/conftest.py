"""Shared helpers for the offline deployment-asset tests (tests/deploy).

Nothing here touches the network: YAML and HCL are parsed locally, scripts run against loopback
fakes, and tools that are not installed make their test skip with the reason.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import required

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "kubernetes"
ARGO = DEPLOY / "argo"
TF = DEPLOY / "terraform" / "gcp"


# ---------------------------------------------------------------------------------------------- YAML


def load_docs(path: Path) -> list[dict[str, Any]]:
    """All non-empty documents of a (multi-document) YAML file."""
    with path.open() as fh:
        return [d for d in yaml.safe_load_all(fh) if d is not None]


def k8s_objects() -> dict[tuple[str, str], dict[str, Any]]:
    """Every object under deploy/kubernetes (kustomization.yaml excluded), keyed by (kind, name)."""
    objs: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in load_docs(path):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in objs, f"duplicate {key} in {path}"
            objs[key] = doc
    return objs


# ------------------------------------------------------------------------------------------------ HCL

_META_KEYS = {"__is_block__", "__comments__", "__inline_comments__", "__start_line__", "__end_line__"}


def unquote(value: Any) -> Any:
    """Normalise python-hcl2 8.x output: drop quotes around strings and labels, drop metadata keys."""
    if isinstance(value, str):
        if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
            return value[1:-1]
        return value
    if isinstance(value, list):
        return [unquote(v) for v in value]
    if isinstance(value, dict):
        return {unquote(k): unquote(v) for k, v in value.items() if k not in _META_KEYS}
    return value


def load_tf_module(directory: Path = TF) -> dict[str, Any]:
    """Parse every *.tf file of a module into {'resource': {type: {name: body}}, 'variable': {...},
    'output': {...}, 'locals': {...}, 'terraform': [...]} (bodies normalised by unquote)."""
    hcl2 = required.module("hcl2")
    module: dict[str, Any] = {
        "resource": {},
        "data": {},
        "variable": {},
        "output": {},
        "locals": {},
        "terraform": [],
    }
    for path in sorted(directory.glob("*.tf")):
        with path.open() as fh:
            raw = unquote(hcl2.load(fh))
        for block in raw.get("resource", []):
            for rtype, by_name in block.items():
                for name, body in by_name.items():
                    assert name not in module["resource"].setdefault(rtype, {}), f"duplicate {rtype}.{name}"
                    module["resource"][rtype][name] = body
        for block in raw.get("data", []):
            for dtype, by_name in block.items():
                module["data"].setdefault(dtype, {}).update(by_name)
        for kind in ("variable", "output"):
            for block in raw.get(kind, []):
                module[kind].update(block)
        for block in raw.get("locals", []):
            module["locals"].update(block)
        module["terraform"].extend(raw.get("terraform", []))
    return module


def first_block(body: dict[str, Any], name: str) -> dict[str, Any]:
    """A nested block (python-hcl2 returns blocks as lists of dicts)."""
    value = body.get(name)
    assert value, f"block {name!r} missing"
    return value[0] if isinstance(value, list) else value


def walk_keys(node: Any):
    """Yield every mapping key anywhere in a parsed tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield k
            yield from walk_keys(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk_keys(v)


# ---------------------------------------------------------------------- Terraform templatefile subset

_INTERP = re.compile(r"\$\{([^}]*)\}")


def render_tftpl(text: str, variables: dict[str, Any]) -> str:
    """Render the small subset of Terraform's template language the module's templates use:
    ${name}, ${jsonencode(name)}, ${yamlencode(name)}, ${indent(N, name)} and the escape $${ (a literal ${). Anything
    else (directives, other functions) raises, so a template that grows beyond what this test can
    check fails loudly."""
    if "%{" in text.replace("%%{", ""):
        raise ValueError("template directives are not supported by the test renderer")

    def tf_json(value: Any) -> str:
        return json.dumps(value, sort_keys=True, separators=(",", ":"))

    def tf_str(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (dict, list)):
            raise ValueError("cannot interpolate a collection without jsonencode()")
        return str(value)

    def sub(match: re.Match[str]) -> str:
        expr = match.group(1).strip()
        if re.fullmatch(r"[a-z_][a-z0-9_]*", expr):
            return tf_str(variables[expr])
        m = re.fullmatch(r"jsonencode\(([a-z_][a-z0-9_]*)\)", expr)
        if m:
            return tf_json(variables[m.group(1)])
        m = re.fullmatch(r"yamlencode\(([a-z_][a-z0-9_]*)\)", expr)
        if m:
            return yaml.safe_dump(variables[m.group(1)], sort_keys=True, default_flow_style=False)
        m = re.fullmatch(r"indent\((\d+),\s*([a-z_][a-z0-9_]*)\)", expr)
        if m:
            pad = " " * int(m.group(1))
            lines = tf_str(variables[m.group(2)]).split("\n")
            return "\n".join([lines[0]] + [pad + line if line else line for line in lines[1:]])
        raise ValueError(f"unsupported template expression: ${{{expr}}}")

    pieces = text.split("$${")
    return "${".join(_INTERP.sub(sub, piece).replace("%%{", "%{") for piece in pieces)


def template_variables(text: str) -> set[str]:
    """Names a template reads."""
    names = set()
    for expr in _INTERP.findall(text.replace("$${", "")):
        names.update(n for n in re.findall(r"[a-z_][a-z0-9_]*", expr) if n not in {"jsonencode", "yamlencode", "indent"})
    return names


# ------------------------------------------------------------------------------- egressgate binary

EGRESSGATE = REPO / ".venv" / "bin" / "egressgate"


@pytest.fixture
def check_config(tmp_path):
    """Run `egressgate check-config` on a config text; skip when the CLI is not installed yet."""
    exe = os.environ.get("EGRESSGATE_BIN") or (
        str(EGRESSGATE) if EGRESSGATE.exists() else shutil.which("egressgate")
    )
    if not exe:
        required.missing(f"the egressgate CLI ({EGRESSGATE})", "`pip install -e .`")
    assert os.environ.get("EGRESSGATE_BIN") or (REPO / "src" / "egressgate" / "cli.py").exists(), \
        "src/egressgate/cli.py does not exist, so `egressgate check-config` cannot run"

    def run(text: str, name: str = "config.yaml") -> subprocess.CompletedProcess[str]:
        path = tmp_path / name
        path.write_text(text)
        return subprocess.run([exe, "check-config", str(path)], capture_output=True, text=True, timeout=60)

    return run
