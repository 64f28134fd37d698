"""The phase a new connection starts in, by its listener's ``protocol`` (``listen[].protocol``).

Each is a class satisfying ``serve.Phase`` (made as ``Phase(conn, now)``), serving its requests
through ``serve.serve``. A new listener protocol is one module with its phase, one entry here,
and its name in ``config.schema.ListenConfig.protocol``.
"""

from __future__ import annotations

from .pipeline import RequestPipeline
from .serve import Phase
from .socks import SocksHandshake

PHASES: dict[str, type[Phase]] = {
    "http": RequestPipeline,  # HTTP/1.1 proxy requests: CONNECT and absolute-URI forwarding
    "socks5": SocksHandshake,  # SOCKS5 CONNECT (RFC 1928, RFC 1929 credentials)
}
