"""egressgate: an egress gateway for data-collection jobs.

A forward proxy (HTTP CONNECT tunnels and absolute-URI forwarding) that gives every job a
fixed, allowlist-able egress IP through a named *egress profile*, and lets nothing else in
or out.

Layers, bottom to top (lower layers never import higher ones; see tests/unit/test_layers.py):

- ``errors``, ``model``: error types that carry their HTTP status, frozen value types.
- ``config``: YAML -> validated, frozen ``Config`` (errors name file, line and key).
- ``policy``: pure decisions (who is this client, may it go there, is this address safe).
- ``http1``: sans-IO HTTP/1.1 (llhttp via httptools), header rewriting, error responses.
- ``egress.plan`` (pure), ``egress.resolver`` and ``egress.dialer`` (the only outbound I/O).
- ``observe``: access log and metrics.
- ``proxy``: the asyncio driver: one protocol object per client connection, tunnels and
  forwarded exchanges, listeners, reload and drain.
- ``admin``: health, readiness, metrics, status and reload over HTTP.
- ``app``: the composition root; ``cli``: the command line.
"""

__version__ = "0.1.0"
