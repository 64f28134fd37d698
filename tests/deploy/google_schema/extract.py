#!/usr/bin/env python3
"""Regenerate the google provider schema extract that test_deploy_google_schema.py checks the GCP
module against: for every resource / data source type deploy/terraform/gcp uses, its settable
arguments, nested blocks (recursively) and the enum values the provider documents
("Possible values: [...]").

Source: the prebuilt CDKTF bindings of the provider on the npm registry (@cdktf/provider-google),
whose jsii manifest is generated from the provider's own schema. Each binding version names the
provider version it was generated from (package.json "cdktf.provider.version"):

    npm view @cdktf/provider-google@14.0.0 cdktf     # -> hashicorp/google 6.1.0
    npm view @cdktf/provider-google@16.12.1 cdktf    # -> hashicorp/google 6.50.0 (the last binding:
                                                     #    CDKTF is deprecated, no 7.x binding exists)
    cd /tmp && npm pack @cdktf/provider-google@14.0.0 && tar xzf cdktf-provider-google-14.0.0.tgz \\
        package/.jsii package/package.json
    python3 tests/deploy/google_schema/extract.py /tmp/package    # writes tests/deploy/google_schema/6.1.0.json

Run it for the binding of each end of the module's `required_providers` version constraint
(versions.tf). With network access and the provider installed, `terraform providers schema -json`
is the same data; this script reads the npm binding because that is what a registry client can fetch.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODULE = HERE.parents[2] / "deploy" / "terraform" / "gcp"
_LINK = re.compile(r"docs/(resources|data-sources)/([a-z0-9_]+)#([a-z0-9_]+)")
_ENUM = re.compile(r"Possible values: \[([^\]]*)\]")


def used_types(module: Path = MODULE) -> set[tuple[str, str]]:
    found = set()
    for tf in module.glob("*.tf"):
        for kind, rtype in re.findall(r'^(resource|data)\s+"(google_[a-z0-9_]+)"', tf.read_text(), re.M):
            found.add(("resources" if kind == "resource" else "data-sources", rtype.removeprefix("google_")))
    return found


def _struct_of(t: dict) -> str | None:
    """fqn of the struct a property's type is (or is a list/union of), else None."""
    if "fqn" in t:
        return t["fqn"] if not t["fqn"].startswith("cdktf.") else None
    if "collection" in t:
        return _struct_of(t["collection"]["elementtype"]) if t["collection"]["kind"] == "array" else None
    if "union" in t:
        for u in t["union"]["types"]:
            s = _struct_of(u)
            if s:
                return s
    return None


def _schema(types: dict, fqn: str, skip: frozenset[str]) -> dict:
    out: dict = {"attributes": {}, "blocks": {}}
    for p in types[fqn].get("properties", []):
        docs = p.get("docs", {})
        m = _LINK.search(json.dumps(docs))  # remarks, summary or (jsdoc oddity) a custom tag
        if not m or p["name"] in skip:
            continue
        name = m.group(3)
        struct = _struct_of(p["type"])
        if struct and types.get(struct, {}).get("kind") == "interface":
            out["blocks"][name] = _schema(types, struct, frozenset())
        else:
            attr: dict = {}
            e = _ENUM.search(docs.get("remarks", ""))
            if e:
                attr["enum"] = sorted(json.loads("[" + e.group(1) + "]"))
            out["attributes"][name] = attr
    return out


# TerraformMetaArguments of cdktf (count, for_each, provider, ...) are not provider schema.
_META = frozenset({"connection", "count", "dependsOn", "forEach", "lifecycle", "provider", "provisioners"})


def extract(package: Path, module: Path = MODULE) -> tuple[str, dict]:
    version = json.loads((package / "package.json").read_text())["cdktf"]["provider"]["version"]
    types = json.loads((package / ".jsii").read_text())["types"]
    wanted = used_types(module)
    result: dict = {"provider_version": version, "resources": {}, "data-sources": {}}
    for fqn, t in types.items():
        # The resource's own Config struct (not a nested block such as ...ConfidentialInstanceConfig).
        parts = fqn.split(".")
        if t.get("kind") != "interface" or len(parts) != 3 or parts[2] != parts[1][:1].upper() + parts[1][1:] + "Config":
            continue
        for p in t.get("properties", []):
            docs = p.get("docs", {})
            m = _LINK.search(json.dumps(docs))
            if m:
                break
        else:
            continue
        kind, name = m.group(1), m.group(2)
        if (kind, name) in wanted and f"google_{name}" not in result[kind]:
            result[kind][f"google_{name}"] = _schema(types, fqn, _META)
    missing = {f"{k}/google_{n}" for k, n in wanted} - {f"{k}/{n}" for k in ("resources", "data-sources") for n in result[k]}
    result["missing_types"] = sorted(missing)
    return version, result


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    version, result = extract(Path(argv[1]))
    out = HERE / f"{version}.json"
    out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"wrote {out} ({len(result['resources'])} resources, {len(result['data-sources'])} data sources)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
