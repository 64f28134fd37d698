"""deploy/Dockerfile and .dockerignore, checked without a Docker engine.

Structure is linted from the parsed instructions; the HEALTHCHECK command is executed against a
loopback server; and the image's install steps (build the wheel from exactly the files the
.dockerignore lets through, install it into a fresh venv from local wheels only) run in a scratch
directory.
"""

from __future__ import annotations

import fnmatch
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import DEPLOY, REPO

from tests import required

DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # comment inside a continuation
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        instr, _, args = buf.partition(" ")
        out.append((instr.upper(), args.strip()))
        buf = ""
    assert not buf, "dangling line continuation"
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for instr, args in instructions():
        if instr == "FROM":
            result.append([])
        if result:
            result[-1].append((instr, args))
    return result


def final_stage() -> list[tuple[str, str]]:
    return stages()[-1]


def get(stage, name):
    return [args for instr, args in stage if instr == name]


def base_image() -> str:
    """The value of the global ARG PYTHON_IMAGE (before the first FROM)."""
    (arg,) = [line.split("=", 1)[1] for line in DOCKERFILE.read_text().splitlines()
              if line.startswith("ARG PYTHON_IMAGE=")]
    return arg.strip()


def test_multi_stage_on_python_311_slim():
    froms = [args for instr, args in instructions() if instr == "FROM"]
    assert len(froms) >= 2, "expected a build stage and a runtime stage"
    for f in froms:
        assert f.split()[0] == "${PYTHON_IMAGE}", f"unexpected base image {f}"
    assert froms[0].split()[-1] == "build"


def test_base_image_pinned_by_digest():
    """Defect: `python:3.11-slim` floated; two builds of one commit could differ."""
    import re

    assert re.fullmatch(r"python:3\.11-slim@sha256:[0-9a-f]{64}", base_image()), base_image()


def test_dependencies_locked_and_used_by_the_build():
    """Defect: dependency versions were not locked. deploy/constraints.txt pins every runtime
    dependency (transitively) with ==, and the image build uses it."""
    from importlib.metadata import distribution

    from packaging.requirements import Requirement

    pins = {}
    for line in (DEPLOY / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{line}: pin with =="
            pins[name.lower().replace("_", "-")] = version
    needed, todo = set(), ["egressgate"]
    while todo:
        for text in distribution(todo.pop()).requires or []:
            req = Requirement(text)  # (pytest's own dependency: markers judged as pip judges them here)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue  # an extra, another platform, another Python (redis: async-timeout < 3.11.3)
            name = req.name.lower().replace("_", "-")
            if name not in needed:
                needed.add(name)
                todo.append(name)
    assert needed <= set(pins), f"not pinned: {needed - set(pins)}"
    runs = " ".join(get(stages()[0], "RUN"))
    assert "--constraint deploy/constraints.txt" in runs
    assert "deploy/constraints.txt" in context_files()
    # the runtime installs from the build stage's wheels, not from the network
    runs = " ".join(get(final_stage(), "RUN"))
    assert "from=build" in runs and "--no-index" in runs and "--find-links=/wheels" in runs


def test_image_ships_the_compiled_build():
    """Issue 27: the image's wheel is the Cython-compiled build (EGRESSGATE_COMPILE=1, setup.py in
    the context, Cython pinned); the compiler is in the build stage only."""
    runs = " ".join(get(stages()[0], "RUN"))
    assert "EGRESSGATE_COMPILE=1 python -m pip wheel --no-build-isolation" in runs
    assert re.search(r"\bcython==\d", runs) and re.search(r"\bsetuptools==\d", runs), runs
    assert "gcc" in runs
    assert "setup.py" in context_files()
    assert "gcc" not in " ".join(get(final_stage(), "RUN")), "the runtime stage must not install a compiler"


def test_exec_form_entrypoint_and_cmd():
    stage = final_stage()
    (entrypoint,) = get(stage, "ENTRYPOINT")
    ep = json.loads(entrypoint)  # exec form is a JSON array; shell form would not parse
    assert isinstance(ep, list) and ep[0].endswith("/egressgate"), ep
    (cmd,) = get(stage, "CMD")
    cmd = json.loads(cmd)
    assert cmd[:1] == ["serve"] and "--config" in cmd
    assert cmd[cmd.index("--config") + 1] == "/etc/egressgate/config.yaml"
    stop = get(stage, "STOPSIGNAL")
    assert stop in ([], ["SIGTERM"])


def test_runs_as_non_root_numeric_user():
    stage = final_stage()
    users = get(stage, "USER")
    assert users, "no USER in the runtime stage"
    user = users[-1].split(":")[0]
    assert user.isdigit() and int(user) >= 10000, f"USER should be a numeric non-root uid, got {users[-1]}"
    # nothing after USER switches back to root
    idx = max(i for i, (instr, _) in enumerate(stage) if instr == "USER")
    assert all(instr != "RUN" for instr, _ in stage[idx:]), "RUN after USER would run as the app user"


def test_read_only_root_friendly_env():
    env = " ".join(get(final_stage(), "ENV"))
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    assert "PYTHONUNBUFFERED=1" in env


def test_ports_and_no_remote_add():
    expose = " ".join(get(final_stage(), "EXPOSE")).split()
    assert {"3128", "9128"} <= set(expose)
    for instr, _args in instructions():
        assert instr != "ADD", "use COPY; ADD can fetch URLs and unpack archives"


def healthcheck_command() -> list[str]:
    (hc,) = get(final_stage(), "HEALTHCHECK")
    assert "CMD" in hc
    options, _, cmd = hc.partition("CMD")
    assert "--interval" in options and "--timeout" in options
    argv = json.loads(cmd.strip())  # exec form
    assert "curl" not in cmd and "wget" not in cmd, "the slim image has neither: use python stdlib"
    return argv


def test_healthcheck_probes_healthz_with_stdlib():
    argv = healthcheck_command()
    assert argv[0].endswith("python") and argv[1] == "-c"
    env = " ".join(get(final_stage(), "ENV"))
    assert "EGRESSGATE_HEALTH_URL=http://127.0.0.1:9128/healthz" in env


_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


def _run_healthcheck(status: int, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run the HEALTHCHECK's python code against a loopback server answering ``status``."""
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            seen.append(self.path)
            self.send_response(status)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        argv = healthcheck_command()
        full = {k: v for k, v in os.environ.items() if k not in _PROXY_VARS}
        full.update(env, EGRESSGATE_HEALTH_URL=f"http://127.0.0.1:{server.server_port}/healthz")
        proc = subprocess.run([sys.executable, *argv[1:]], env=full, capture_output=True, timeout=20)
    finally:
        server.shutdown()
    return proc, seen


@pytest.mark.parametrize("status,ok", [(200, True), (503, False)])
def test_healthcheck_command_really_checks_status(status, ok):
    proc, seen = _run_healthcheck(status)  # no proxy variables: see the next test
    assert seen == ["/healthz"]
    assert (proc.returncode == 0) is ok, proc.stderr


def test_healthcheck_ignores_proxy_variables():
    proc, seen = _run_healthcheck(200, http_proxy=os.environ.get("http_proxy", "http://127.0.0.1:9"))
    assert seen == ["/healthz"] and proc.returncode == 0, proc.stderr


# ------------------------------------------------------------------------------ .dockerignore + build


def dockerignore_rules() -> list[tuple[bool, str]]:
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        rules.append((negate, line.lstrip("!").strip("/")))
    return rules


def _matches(pattern: str, path: str) -> bool:
    # A pattern matches the path itself or any parent directory of it (Docker semantics).
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for cand in candidates:
        if fnmatch.fnmatchcase(cand, pattern):
            return True
        if pattern.startswith("**/") and any(
            fnmatch.fnmatchcase("/".join(cand.split("/")[j:]), pattern[3:])
            for j in range(len(cand.split("/")))
        ):
            return True
    return False


def context_files() -> list[str]:
    """Files of the repository that `docker build .` would send, per .dockerignore (last match wins)."""
    rules = dockerignore_rules()
    sent = []
    for path in sorted(REPO.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith(".git/") or rel.startswith(".venv/"):
            continue
        excluded = False
        for negate, pattern in rules:
            if _matches(pattern, rel):
                excluded = not negate
        if not excluded:
            sent.append(rel)
    return sent


def test_dockerignore_sends_only_what_the_build_needs():
    sent = context_files()
    assert "pyproject.toml" in sent and "README.md" in sent or not (REPO / "README.md").exists()
    assert "deploy/container-config.yaml" in sent
    for rel in sent:
        assert not rel.startswith(("tests/", ".venv/", "bench/", "docs/")), (
            f"{rel} would be in the build context"
        )
        assert "__pycache__" not in rel and not rel.endswith(".pyc")
        assert not rel.startswith("deploy/terraform/") and not rel.startswith("deploy/kubernetes/")


def test_every_copy_source_is_in_the_build_context():
    sent = set(context_files())
    for instr, args in instructions():
        if instr != "COPY" or "--from=" in args:
            continue
        parts = [p for p in args.split() if not p.startswith("--")]
        for src in parts[:-1]:
            src = src.rstrip("/")
            assert src in sent or any(s.startswith(src + "/") for s in sent) or not (REPO / src).exists(), (
                f"COPY {src} is excluded by .dockerignore"
            )
            if src != "README.md":  # README.md is written by the gateway engineer; may not exist yet
                assert (REPO / src).exists(), f"COPY source {src} does not exist"


def test_baked_in_config_is_valid(check_config):
    proc = check_config((DEPLOY / "container-config.yaml").read_text())
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_image_install_steps_in_scratch_venv(tmp_path):
    """The Dockerfile's two pip steps, offline: `pip wheel` of the context (no deps, no build
    isolation, since the dependencies' wheels would come from PyPI), then a fresh venv installing
    egressgate from that wheel dir with --no-index, as the runtime stage does."""
    assert list((REPO / "src" / "egressgate").rglob("*.py")), "src/egressgate has no Python files"
    assert (REPO / "README.md").exists(), "README.md (named by pyproject.toml readme=) does not exist"
    from importlib.metadata import version

    from packaging.version import Version

    if Version(version("setuptools")) < Version("68"):
        required.missing("setuptools>=68 in the test venv", "the offline build needs it; pip install -e '.[test]'")
    runs = " ".join(get(stages()[0], "RUN"))
    assert ("EGRESSGATE_COMPILE=1 python -m pip wheel --no-build-isolation --constraint deploy/constraints.txt "
            "--wheel-dir /wheels .") in runs
    final_runs = " ".join(get(final_stage(), "RUN"))
    assert "python -m venv /opt/egressgate" in final_runs
    assert "/opt/egressgate/bin/pip install --no-index --find-links=/wheels egressgate" in final_runs

    ctx = tmp_path / "ctx"
    for rel in context_files():
        (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, ctx / rel)
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(wheels),
            str(ctx),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert list(wheels.glob("egressgate-*.whl"))
    venv = tmp_path / "opt-egressgate"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "--quiet",
            "--no-index",
            "--no-deps",
            f"--find-links={wheels}",
            "egressgate",
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    exe = venv / "bin" / "egressgate"
    assert exe.exists(), "console script egressgate not installed"
    if (REPO / "src" / "egressgate" / "cli.py").exists():
        site = next(Path(sys.prefix).glob("lib/python3*/site-packages"))  # dependencies from the test venv
        proc = subprocess.run(
            [str(exe), "--help"],
            env=dict(os.environ, PYTHONPATH=str(site)),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        assert "serve" in proc.stdout
