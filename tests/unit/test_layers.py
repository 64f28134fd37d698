"""Two import rules for src/egressgate, checked from the source alone (DESIGN.md, "Dependency direction").

Every module under src/egressgate is parsed with ``ast``; every import of an egressgate module
counts, wherever it sits: top level, inside functions, inside ``if TYPE_CHECKING:``.

1. No upward imports: each module is mapped to its layer, and an import of a higher layer fails
   the test with file and line.
2. No import cycles: no two or more modules may import each other, directly or round a circle.
   An import of a package is an edge to the package's ``__init__``; the parent packages that
   Python runs on the way are not edges, so ``config/__init__.py`` importing ``.schema`` is
   fine as long as ``schema`` does not import ``config`` back. ``from . import x`` inside a
   package is an edge to ``x`` when ``x`` is a submodule and to the package's ``__init__``
   otherwise, so a submodule that takes a name from its own ``__init__`` while the ``__init__``
   imports it is a cycle. Each circle is reported as ``a -> b -> a`` with the file:line of
   every step.

Layers, bottom to top:
  errors, model -> config -> policy, http1, socks5, egress.plan, observe
  (fleet.ledger, fleet.wire) -> egress.resolver, egress.dialer, egress.upstream, egress.chain, egress.reach,
  egress.fetch (egress.localaddr: the egress I/O, the one way out) -> proxy (proxy.build),
  admin, fleet -> services -> app -> commands, cli
"""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = "egressgate"
ROOT = SRC / PACKAGE

# Longest dotted prefix wins. The package root and the bare ``egress`` package (a docstring
# only) sit at the bottom of what they contain.
LAYER_OF: dict[str, int] = {
    "egressgate": 0,
    "egressgate.errors": 0,
    "egressgate.model": 0,
    "egressgate.config": 1,
    "egressgate.config.lint": 1,  # pure: check-config warnings
    "egressgate.config.repair": 1,
    "egressgate.policy": 2,
    "egressgate.http1": 2,
    "egressgate.socks5": 2,
    "egressgate.egress": 2,
    "egressgate.egress.plan": 2,
    "egressgate.observe": 2,
    "egressgate.egress.resolver": 3,
    "egressgate.egress.dialer": 3,
    "egressgate.egress.localaddr": 3,
    "egressgate.egress.upstream": 3,  # the protocol of one outbound connection (and idle ones kept)
    "egressgate.egress.chain": 3,  # the chained-proxy client (CONNECT through an upstream proxy)
    "egressgate.egress.reach": 3,  # the one way out: member x destination x guard -> a connection
    "egressgate.egress.fetch": 3,  # one HTTP(S) request through a member, over reach
    "egressgate.fleet.ledger": 2,  # pure: the owner's accounts of shared budgets
    "egressgate.fleet.wire": 2,  # pure: the messages between workers and their owner
    "egressgate.proxy": 4,
    "egressgate.proxy.build": 4,  # Config -> Runtime, beside the Runtime it builds
    "egressgate.fleet": 4,  # I/O: a worker's link to its owner, the owner's server, the fleet store
    "egressgate.admin": 4,
    "egressgate.services": 5,  # the background: attestation, provider checks, keys, watch, workers, receipts
    "egressgate.app": 6,
    "egressgate.commands": 7,  # the CLI verbs: verify, explain, demo, replay, receipt
    "egressgate.cli": 7,
    "egressgate.__main__": 7,
}
LAYER_NAMES = ["errors/model", "config", "policy/http1/egress.plan/observe", "egress I/O (dialer, reach, fetch)",
               "proxy/admin/fleet", "services", "app", "commands/cli"]


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        layer = LAYER_OF.get(".".join(parts[:end]))
        if layer is not None and (end > 1 or module == PACKAGE):
            return layer
    return None


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(name: str, root: Path) -> bool:
    rel = Path(*name.split(".")[1:]) if "." in name else Path()
    base = root / rel
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imported_modules(tree: ast.AST, module: str, is_package: bool, root: Path) -> list[tuple[str, int]]:
    """(absolute module name, line) for every egressgate import in ``tree``."""
    found: list[tuple[str, int]] = []
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                if node.level - 1 > 0:
                    base_parts = base_parts[: -(node.level - 1)]
                base = ".".join(base_parts)
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub if is_module(sub, root) else target, node.lineno))
    return [(name, line) for name, line in found if name == PACKAGE or name.startswith(PACKAGE + ".")]


def violations(root: Path) -> tuple[list[str], list[str]]:
    """(upward imports, modules with no layer), each as human-readable lines."""
    upward: list[str] = []
    unmapped: list[str] = []
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        own = layer_of(module)
        where = path.relative_to(root.parent)
        if own is None:
            unmapped.append(f"{where}: module {module} has no layer in test_layers.LAYER_OF")
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for target, line in imported_modules(tree, module, path.name == "__init__.py", root):
            theirs = layer_of(target)
            if theirs is None:
                unmapped.append(f"{where}:{line}: imports {target}, which has no layer")
            elif theirs > own:
                upward.append(f"{where}:{line}: {module} ({LAYER_NAMES[own]}) imports {target} "
                              f"({LAYER_NAMES[theirs]})")
    return upward, unmapped


def import_graph(root: Path) -> dict[str, dict[str, str]]:
    """module -> {imported egressgate module: "file:line[,line...]" of the import(s)}.

    Only modules that exist under ``root`` are nodes; a package is its ``__init__`` module's
    name; a module importing itself is left out.
    """
    files = {module_name(path, root): path for path in sorted(root.rglob("*.py"))}
    graph: dict[str, dict[str, str]] = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        lines: dict[str, set[int]] = {}
        for target, line in imported_modules(tree, module, path.name == "__init__.py", root):
            if target in files and target != module:
                lines.setdefault(target, set()).add(line)
        where = path.relative_to(root.parent)
        graph[module] = {target: f"{where}:{','.join(map(str, sorted(found)))}"
                         for target, found in sorted(lines.items())}
    return graph


def shortest_path(graph: dict[str, dict[str, str]], start: str, goal: str) -> list[str] | None:
    """Fewest-imports path ``start`` ... ``goal`` (breadth first, neighbours in name order), or None."""
    previous: dict[str, str | None] = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        if node == goal:
            path: list[str] = []
            step: str | None = node
            while step is not None:
                path.append(step)
                step = previous[step]
            return path[::-1]
        for following in sorted(graph.get(node, {})):
            if following not in previous:
                previous[following] = node
                queue.append(following)
    return None


def describe_cycle(graph: dict[str, dict[str, str]], circle: list[str]) -> str:
    """``a -> b -> a  [a's file:line, b's file:line]``: the circle, then where each step imports."""
    steps = zip(circle, circle[1:], strict=False)
    return " -> ".join(circle) + "  [" + ", ".join(graph[a][b] for a, b in steps) + "]"


def import_cycles(root: Path) -> list[str]:
    """Every import cycle among the modules under ``root``, one readable line per circle.

    Each import that lies on some circle is named by at least one line: imports are taken in
    name order, and for one not yet named the shortest way back from its target closes the
    circle. A strongly connected tangle therefore shows up as a few short circles that together
    cover every import in it, rather than as one line per possible circle.
    """
    graph = import_graph(root)
    covered: set[tuple[str, str]] = set()
    cycles: list[str] = []
    for source in sorted(graph):
        for target in sorted(graph[source]):
            if (source, target) in covered:
                continue
            back = shortest_path(graph, target, source)
            if back is None:
                continue
            circle = [source, *back]
            covered.update(zip(circle, circle[1:], strict=False))
            cycles.append(describe_cycle(graph, circle))
    return cycles


def test_no_upward_imports() -> None:
    upward, _ = violations(ROOT)
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_every_module_has_a_layer() -> None:
    _, unmapped = violations(ROOT)
    assert not unmapped, "\n".join(unmapped)


def test_no_import_cycles() -> None:
    cycles = import_cycles(ROOT)
    assert not cycles, "import cycles (each line a circle, then the import making each step):\n" + "\n".join(cycles)


def test_the_source_tree_is_found() -> None:
    modules = {module_name(p, ROOT) for p in ROOT.rglob("*.py")}
    assert {"egressgate.model", "egressgate.policy.decide", "egressgate.proxy.session", "egressgate.cli"} <= modules


# ------------------------------------------------------------------------------ the checker itself

def write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


@pytest.fixture
def fake_tree(tmp_path: Path) -> Path:
    root = tmp_path / PACKAGE
    for rel in ("__init__.py", "errors.py", "model.py", "config/__init__.py", "config/schema.py",
                "policy/__init__.py", "policy/guard.py", "proxy/__init__.py", "proxy/server.py",
                "egress/__init__.py", "egress/plan.py", "egress/dialer.py", "app.py", "cli.py"):
        write(root, rel, "")
    return root


CHECKER_CASES = [
    # (file, source, expected violation prefix or None)
    ("policy/guard.py", "from ..model import HostPort\nfrom . import guard\n", None),
    ("policy/guard.py", "x = 1\nfrom ..proxy.server import Gateway\n",
     "egressgate/policy/guard.py:2: egressgate.policy.guard"),
    ("policy/guard.py",
     "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..proxy import server\n",
     "egressgate/policy/guard.py:3: egressgate.policy.guard"),
    ("model.py", "def f():\n    import egressgate.config.schema\n",
     "egressgate/model.py:2: egressgate.model"),
    ("egress/plan.py", "from .dialer import x\n", "egressgate/egress/plan.py:1: egressgate.egress.plan"),
    ("egress/dialer.py", "from .plan import EgressPlan\nfrom ..policy import guard\n", None),
    ("config/schema.py", "from .. import app\n", "egressgate/config/schema.py:1: egressgate.config.schema"),
    ("config/__init__.py", "from .schema import Config\n", None),
    ("app.py", "from .cli import main\n", "egressgate/app.py:1: egressgate.app"),
    ("cli.py", "from .app import run\nimport json\n", None),
]


@pytest.mark.parametrize(("rel", "source", "expected"), CHECKER_CASES, ids=[f"{c[0]}-{c[2] is None}" for c in CHECKER_CASES])
def test_checker_finds_upward_imports(fake_tree: Path, rel: str, source: str, expected: str | None) -> None:
    write(fake_tree, rel, source)
    upward, unmapped = violations(fake_tree)
    assert unmapped == []
    if expected is None:
        assert upward == []
    else:
        assert len(upward) == 1
        assert upward[0].startswith(expected), upward


def test_checker_reports_unmapped_modules(fake_tree: Path) -> None:
    write(fake_tree, "newthing.py", "")
    _, unmapped = violations(fake_tree)
    assert unmapped and "egressgate.newthing" in unmapped[0]


TC = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"

CYCLE_CASES = [
    # (id, {file: source}, expected cycle lines)
    ("two-modules",
     {"policy/guard.py": "from ..egress.plan import EgressPlan\n", "egress/plan.py": "from ..policy import guard\n"},
     ["egressgate.egress.plan -> egressgate.policy.guard -> egressgate.egress.plan"
      "  [egressgate/egress/plan.py:1, egressgate/policy/guard.py:1]"]),
    ("three-modules",
     {"errors.py": "from .model import HostPort\n", "model.py": "import egressgate.config.schema\n",
      "config/schema.py": "x = 1\nfrom ..errors import ConfigError\n"},
     ["egressgate.config.schema -> egressgate.errors -> egressgate.model -> egressgate.config.schema"
      "  [egressgate/config/schema.py:2, egressgate/errors.py:1, egressgate/model.py:1]"]),
    ("only-type-checking",
     {"app.py": "from .proxy.server import Gateway\n", "proxy/server.py": TC + "    from ..app import App\n"},
     ["egressgate.app -> egressgate.proxy.server -> egressgate.app"
      "  [egressgate/app.py:1, egressgate/proxy/server.py:3]"]),
    ("function-level",
     {"app.py": "from .cli import main\n\ndef f():\n    from .cli import main\n",
      "cli.py": "def main():\n    from .app import run\n"},
     ["egressgate.app -> egressgate.cli -> egressgate.app  [egressgate/app.py:1,4, egressgate/cli.py:2]"]),
    ("from-dot-import-init-name",
     {"policy/__init__.py": "from . import guard\nLIMIT = 3\n", "policy/guard.py": "from . import LIMIT\n"},
     ["egressgate.policy -> egressgate.policy.guard -> egressgate.policy"
      "  [egressgate/policy/__init__.py:1, egressgate/policy/guard.py:1]"]),
    ("submodule-imports-its-package",
     {"config/__init__.py": "from .schema import Config\n", "config/schema.py": "import egressgate.config\n"},
     ["egressgate.config -> egressgate.config.schema -> egressgate.config"
      "  [egressgate/config/__init__.py:1, egressgate/config/schema.py:1]"]),
    ("two-circles-through-one-module",
     {"proxy/server.py": "from ..egress import plan, dialer\n",
      "egress/plan.py": TC + "    from ..proxy.server import Gateway\n",
      "egress/dialer.py": "def f():\n    from ..proxy import server\n"},
     ["egressgate.egress.dialer -> egressgate.proxy.server -> egressgate.egress.dialer"
      "  [egressgate/egress/dialer.py:2, egressgate/proxy/server.py:1]",
      "egressgate.egress.plan -> egressgate.proxy.server -> egressgate.egress.plan"
      "  [egressgate/egress/plan.py:3, egressgate/proxy/server.py:1]"]),
    ("acyclic-diamond",
     {"cli.py": "from .app import run\nfrom .proxy.server import Gateway\n",
      "app.py": "from .model import HostPort\n", "proxy/server.py": "from ..model import HostPort\n",
      "model.py": "import json\n"},
     []),
    ("package-init-imports-submodule",
     {"config/__init__.py": "from .schema import Config\n", "config/schema.py": "from ..model import HostPort\n",
      "egress/__init__.py": "from . import plan\n", "egress/plan.py": "from .. import errors\n"},
     []),
    ("module-importing-itself",
     {"policy/guard.py": "from . import guard\nimport egressgate.policy.guard\n"},
     []),
]


@pytest.mark.parametrize(("files", "expected"), [c[1:] for c in CYCLE_CASES], ids=[c[0] for c in CYCLE_CASES])
def test_checker_finds_import_cycles(fake_tree: Path, files: dict[str, str], expected: list[str]) -> None:
    for rel, source in files.items():
        write(fake_tree, rel, source)
    assert import_cycles(fake_tree) == expected


def test_the_package_root_holds_only_the_app_and_the_model() -> None:
    """Every other module has a wing (DESIGN.md, "Suggested layout"): background services in
    ``services/``, CLI verbs in ``commands/``, the Config -> Runtime step beside ``Runtime`` in
    ``proxy/``. A new root module is a design decision, made here on purpose."""
    root_modules = sorted(path.stem for path in ROOT.glob("*.py"))
    assert root_modules == ["__init__", "__main__", "app", "cli", "errors", "model"]


def _gateway_reaches(path: Path) -> dict[str, int]:
    """Every ``<x>.gw.<name>`` / ``gw.<name>`` attribute a module reads: name -> first line."""
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute):
            inner = node.value
            via_gw = (isinstance(inner, ast.Name) and inner.id == "gw") or (
                isinstance(inner, ast.Attribute) and inner.attr == "gw")
            if via_gw:
                found.setdefault(node.attr, node.lineno)
    return found


def _members(protocol: type) -> set[str]:
    names: set[str] = set()
    for klass in protocol.__mro__:
        if klass is object:
            continue
        names |= set(getattr(klass, "__annotations__", {})) | {n for n in vars(klass) if not n.startswith("_")}
    return names


@pytest.mark.parametrize(("module", "protocol"), [
    ("proxy/pipeline.py", "Services"), ("proxy/socks.py", "Services"), ("proxy/serve.py", "Services"),
    ("proxy/session.py", "ConnectionServices"), ("admin/server.py", "GatewayView"), ("admin/parts.py", "GatewayView"),
])
def test_a_phase_uses_only_the_narrow_services_it_declares(module: str, protocol: str) -> None:
    """Issue 32: the phases no longer use the ``Gateway`` as a service locator. A phase sees
    ``serve.Services`` (the connection ``session.ConnectionServices``, the admin endpoints
    ``admin.server.GatewayView``); reaching for anything
    else of the gateway fails here -- add it to the protocol, where it is visible, or pass it."""
    from egressgate.admin import server as admin
    from egressgate.proxy import serve, session

    home = {"Services": serve, "ConnectionServices": session, "GatewayView": admin}[protocol]
    allowed = _members(getattr(home, protocol))
    reaches = _gateway_reaches(SRC / "egressgate" / module)
    assert reaches, f"{module}: no gateway reach found (the check would prove nothing)"
    outside = {name: line for name, line in reaches.items() if name not in allowed}
    assert not outside, f"{module} reaches the gateway outside {protocol}: " + ", ".join(
        f"gw.{n} (line {line})" for n, line in sorted(outside.items()))
