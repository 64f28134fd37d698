"""egressgate: an egress gateway for data-collection jobs.

A forward proxy (HTTP CONNECT tunnels and absolute-URI forwarding) that gives every job a
fixed, allowlist-able egress IP through a named *egress profile*, and lets nothing else in
or out.

Layers, bottom to top (lower layers never import higher ones, and no modules import each
other in a circle, ``TYPE_CHECKING`` imports included; see tests/unit/test_layers.py):

- ``errors``, ``model``: error types that carry their HTTP status, frozen value types.
- ``config``: YAML -> validated, frozen ``Config`` (errors name file, line and key).
- ``policy``: pure decisions (who is this client, may it go there, is this address safe).
- ``http1``: sans-IO HTTP/1.1 (llhttp via httptools), header rewriting, error responses.
- ``egress.plan`` (pure), ``egress.resolver`` and ``egress.dialer`` (the only outbound I/O).
- ``observe``: access log, metrics, and how each request's outcome is accounted for.
- ``proxy``: the asyncio driver (its package docstring follows one connection through it,
  file by file: accept -> gate -> parse -> identify -> route -> dial -> relay -> record).
- ``admin``: health, readiness, metrics, status and reload over HTTP.
- ``build`` (config -> runtime), ``probe`` (egress-IP checks), ``explain``; ``app``: the
  composition root; ``cli``: the command line.
"""

import os as _os
from importlib.machinery import EXTENSION_SUFFIXES as _EXT

__version__ = "0.1.0"


def build_kind() -> str:
    """Which build this install runs: ``"compiled"`` when its hot core is Cython-compiled
    extension modules (``EGRESSGATE_COMPILE=1``, see setup.py; an extension module beside a
    ``.py`` wins on import), else ``"pure"``. Shown by ``--version``, ``/status`` and the
    ``started`` log event."""
    for _, _, files in _os.walk(_os.path.dirname(_os.path.abspath(__file__))):
        if any(f.endswith(s) for f in files for s in _EXT):
            return "compiled"
    return "pure"
