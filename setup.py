"""Build hook: the pure-Python package by default; with ``EGRESSGATE_COMPILE=1`` the hot core
(the modules in ``COMPILED``) is also compiled by Cython 3 in pure-Python mode, unchanged
(issue 27). Everything else is in pyproject.toml.

    pip install -e .                                       # pure (the dev venv)
    pip install cython setuptools wheel
    EGRESSGATE_COMPILE=1 pip install --no-build-isolation .   # compiled (never in-place into src/:
                                                           # a .so beside a .py shadows it)

A compiled module ships beside its ``.py`` (which stays the source of tracebacks and docs); the
``.so`` wins on import. ``egressgate --version`` says which build runs. Never compiled: config/
(pydantic reads runtime annotations), the commands, admin, fleet and the cold paths. ``make
compiled`` builds .venv-compiled (clearing build/ first: setuptools would otherwise ship a stale
extension of a module since dropped from ``COMPILED``).
"""

from __future__ import annotations

import os

from setuptools import setup

# Compiled: the modules where compiling measured a win (`bench/instructions.py`, callgrind, per
# operation; paths relative to src/): logic over local values -- header rewriting, the SOCKS5
# machine, policy matching, routing, the access record. Left pure, because compiled they measured
# MORE instructions on CPython 3.11 (issue 27): the classes driven per event (proxy/*, http1/parse,
# egress/dialer and resolver, observe/metrics and outcomes). Compiled code reads and writes
# attributes of Python objects through the generic getattr/setattr (a type lookup each time) where
# 3.11's specialising interpreter uses inline caches: compiling all of proxy/ cost +13 % per tunnel.
COMPILED = [
    "egressgate/model.py",
    "egressgate/http1/rewrite.py",
    "egressgate/http1/responses.py",
    "egressgate/socks5/machine.py",
    "egressgate/policy/*.py",
    "egressgate/egress/plan.py",
    "egressgate/observe/accesslog.py",
    "egressgate/proxy/route.py",
]
# Modules Cython compiles but that then behave differently: left pure.
EXCLUDED = [
    "egressgate/*/__init__.py",  # package docstrings and re-exports: nothing hot
]


def _ext_modules():
    if os.environ.get("EGRESSGATE_COMPILE", "") not in ("1", "true", "yes"):
        return []
    from Cython.Build import cythonize  # build requirement of the compiled variant only

    here = os.path.dirname(os.path.abspath(__file__))
    os.chdir(os.path.join(here, "src"))  # module names from paths relative to src/
    try:
        exts = cythonize(
            COMPILED,
            exclude=EXCLUDED,
            compiler_directives={"language_level": 3, "binding": True},
            nthreads=os.cpu_count() or 1,
            quiet=True,
            build_dir=os.path.join(here, "build", "cython"),  # the generated C: not into src/
        )
    finally:
        os.chdir(here)
    for e in exts:
        e.sources = [s if os.path.isabs(s) else os.path.join("src", s) for s in e.sources]
        e.extra_compile_args = ["-O2", "-g0"]
    return exts


setup(
    ext_modules=_ext_modules(),
    options={"build_ext": {"parallel": os.cpu_count() or 1}},
)
