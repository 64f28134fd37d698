"""Every argument and nested block deploy/terraform/gcp gives a google resource or data source exists
in the google provider's schema at BOTH ends of the module's version constraint, and every literal
given to an enum argument (directly, or through a variable whose validation lists its values) is one
the provider accepts. The schema extracts live in tests/deploy/google_schema/<version>.json; their
docstring-documented generator is tests/deploy/google_schema/extract.py (npm @cdktf/provider-google
bindings, generated from the provider's schema). The terraform binary cannot check this offline:
tf_standin.py replaces the provider, so this test is the provider half of `terraform validate`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import TF
from tf_standin import _items

SCHEMAS = Path(__file__).parent / "google_schema"
# The module's constraint -> the provider versions at its two ends (6.50.0 is the last 6.x release;
# the npm bindings stop there, so a 7.x end needs `terraform providers schema -json` output).
CONSTRAINT_ENDS = {">= 6.1, < 7.0": ("6.1.0", "6.50.0")}
META = {"count", "for_each", "depends_on", "provider", "lifecycle"}


def _constraint() -> str:
    m = re.search(r'google\s*=\s*\{[^}]*version\s*=\s*"([^"]+)"', (TF / "versions.tf").read_text(), re.S)
    assert m, "versions.tf: no google provider version constraint"
    return m.group(1)


def _module_blocks():
    for tf in sorted(TF.glob("*.tf")):
        for kind, name, labels, body in _items(tf.read_text()):
            if kind == "block" and name in ("resource", "data") and labels[0].startswith("google_"):
                yield tf.name, ("resources" if name == "resource" else "data-sources"), labels[0], body


def _variable_enums() -> dict[str, list[str]]:
    """var name -> values its validation allows, for `contains([...], var.NAME)` validations."""
    text = (TF / "variables.tf").read_text()
    return {
        m.group(2): json.loads("[" + m.group(1) + "]")
        for m in re.finditer(r"contains\(\[([^\]]*)\],\s*var\.([a-z_]+)\)", text)
    }


def _literals(expr: str) -> list[str]:
    """Plain string literals of an expression (no interpolation)."""
    return [s for s in re.findall(r'"((?:[^"\\$]|\\.)*)"', expr)]


def problems_in(body: str, schema: dict, path: str, var_enums: dict[str, list[str]]) -> list[str]:
    out = []
    for kind, name, labels, text in _items(body):
        if path.count(".") == 1 and name in META:
            continue
        if kind == "block" and name == "dynamic":
            content = next(t for k, n, _, t in _items(text) if k == "block" and n == "content")
            kind, name, text = "block", labels[0], content
        where = f"{path}.{name}"
        if kind == "block":
            if name not in schema["blocks"]:
                out.append(f"{where}: no such block")
            else:
                out += problems_in(text, schema["blocks"][name], where, var_enums)
        elif name not in schema["attributes"]:
            out.append(f"{where}: no such argument")
        elif "enum" in schema["attributes"][name]:
            allowed = set(schema["attributes"][name]["enum"])
            values = _literals(text)
            for v in re.findall(r"\bvar\.([a-z_]+)\b", text):
                values += var_enums.get(v, [])
            out += [f"{where} = {v!r}: not one of {sorted(allowed)}" for v in values if v not in allowed]
    return out


def test_the_constraint_has_a_schema_extract_at_each_end():
    constraint = _constraint()
    assert constraint in CONSTRAINT_ENDS, f"versions.tf constraint {constraint!r}: add extracts for its ends (extract.py)"
    for version in CONSTRAINT_ENDS[constraint]:
        assert (SCHEMAS / f"{version}.json").exists(), version


@pytest.mark.parametrize("version", sorted({v for ends in CONSTRAINT_ENDS.values() for v in ends}))
def test_every_argument_block_and_enum_exists_in_the_provider_schema(version):
    schema = json.loads((SCHEMAS / f"{version}.json").read_text())
    assert schema["provider_version"] == version and not schema["missing_types"]
    var_enums = _variable_enums()
    problems, seen = [], 0
    for fname, kind, rtype, body in _module_blocks():
        seen += 1
        if rtype not in schema[kind]:
            problems.append(f"{fname}: {rtype}: not a {kind[:-1]} of google {version}")
            continue
        problems += [f"{fname}: {p}" for p in problems_in(body, schema[kind][rtype], f"{rtype}.x", var_enums)]
    assert seen >= 15
    assert not problems, f"google provider {version}:\n" + "\n".join(problems)


def test_the_check_finds_a_wrong_argument_and_a_wrong_enum():
    schema = json.loads((SCHEMAS / "6.50.0.json").read_text())["resources"]["google_compute_router_nat"]
    body = 'nat_ip_allocate_option = "MANUAL"\nsubnetwork {\n  nmae = "x"\n}\nlog_config {\n  enable = true\n}\n'
    found = problems_in(body, schema, "google_compute_router_nat.x", {})
    assert any("nat_ip_allocate_option = 'MANUAL'" in p for p in found)
    assert any("subnetwork.nmae: no such argument" in p for p in found)
    assert len(found) == 2
