"""What the phases of every listener protocol share (HTTP's ``pipeline``, SOCKS5's ``socks``):

- ``Phase``: how a connection (``session.ClientConnection``) drives the phase its listener's
  protocol starts it in (``phases.PHASES``), until a tunnel takes over;
- ``ClientSide``: what a phase may use of its connection, and ``Services``: what it may use of
  the gateway (a narrow view: ``tests/unit/test_layers.py`` checks that a phase reaches for
  nothing else);
- ``serve(phase, req)``: the one serving path from a parsed request to its answer. Identify,
  route, admit and connect (``dispatch.Dispatcher.now``) as far as it goes without waiting; the
  first step that must wait hands the rest to a task (``req.task``: ``Dispatcher.rest``, or
  ``again`` for a retry on a fresh connection). The phase then gets ``ready(req, step)`` (a
  ``Link``; on HTTP also a ``Whoami``) or ``failed(req, err)``. A bug is counted and answered as
  an internal error through ``failed``; if even that fails, the connection is closed
  (``crashed``);

(What an upstream connection's owner -- an ``Exchange``, a ``Tunnel`` -- answers for it the same
way is ``flow.OwnsUpstream``.)
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from ..errors import GatewayError
from .dispatch import Pending, Who
from .flow import FlowControl
from .listeners import ListenerInfo

if TYPE_CHECKING:
    from ..model import AccessRecord
    from ..observe.metrics import Metrics
    from ..observe.outcomes import Outcomes
    from .connector import Connector, Link
    from .dispatch import Dispatcher
    from .limits import AuthChecks
    from .runtime import Runtime


class Services(Protocol):
    """What a phase, and ``serve``, may use of the gateway (``server.Gateway`` is one)."""

    runtime: Runtime  # the configuration in force (a reload replaces it: read it per request)
    draining: bool  # shutting down: no new requests
    loop: asyncio.AbstractEventLoop
    dispatcher: Dispatcher  # identify, route, admit, connect
    outcomes: Outcomes  # records and counts every ending
    metrics: Metrics
    auth: AuthChecks  # the bounded password and token checks (SOCKS5 credentials)
    connector: Connector  # (a forwarded request's kept-alive upstream goes back to its pool)

    def internal_error(self, where: str, exc: BaseException) -> None: ...  # a bug: counted, logged once


class ClientSide(Protocol):
    """What a phase needs of its connection."""

    gw: Services
    listener: ListenerInfo
    who: Who
    transport: asyncio.Transport
    flow: FlowControl
    closed: bool
    eof: bool

    def close(self) -> None: ...
    def linger(self) -> None: ...  # half-close after an error answer, discard what follows
    def crashed(self, where: str, exc: BaseException) -> None: ...
    def open_tunnel(self, req: Any, link: Link, reply: bytes = ...) -> None: ...


class Phase(Protocol):
    """A connection's phase before any tunnel: made as ``Phase(conn, now)`` once the peer is
    admitted; every method is called from the connection's callbacks (which catch what
    escapes). ``since``: when the connection was made or its last request answered (idle
    timeouts, the status page). ``AT_LIMIT``: what a connection turned away at the gateway's
    connection limit is told before it is closed (None: it is reset)."""

    AT_LIMIT: ClassVar[bytes | None]
    since: float

    def received(self, data: bytes) -> None: ...  # the client's bytes
    def request_complete(self) -> bool: ...  # the client half-closed: answer, then close?
    def pause_writing(self) -> None: ...  # the client does not read: stop reading upstreams
    def resume_writing(self) -> None: ...
    def tick(self, now: float, rt: Runtime) -> None: ...  # timeouts (the gateway's sweep)
    def lost(self, reason: str) -> None: ...  # the client went away (499 records)
    def teardown(self, reason: str, abort: bool) -> None: ...  # a bug or drain's deadline (503 records)
    def close_queue(self) -> None: ...  # the connection closes: drop what waits
    def current(self) -> AccessRecord | None: ...  # the record being served (status snapshot)


class Served(Protocol):
    """What ``serve`` needs of a request (an ``Exchange``, a ``SocksRequest``)."""

    runtime: Runtime | None
    task: asyncio.Task | None


class Serving(Protocol):
    """What ``serve`` needs of a phase: its connection, its gateway, and the two ways a
    request ends here."""

    conn: ClientSide
    gw: Services

    def ready(self, req: Any, step: Any) -> None: ...
    def failed(self, req: Any, err: GatewayError) -> None: ...


def serve(phase: Serving, req: Served) -> None:
    """Serve ``req`` as far as it goes without waiting; the rest runs in ``req.task``."""
    conn = phase.conn
    gw = phase.gw
    rt = req.runtime = gw.runtime
    try:
        profile = conn.listener.default_profile(rt)
        step = gw.dispatcher.now(conn.who, req, rt, profile)
        if not isinstance(step, Pending):
            phase.ready(req, step)
            return
    except GatewayError as err:
        phase.failed(req, err)
        return
    except Exception as exc:  # a bug: an internal error for this request, the others go on
        internal_failure(phase, req, "serve", exc)
        return
    req.task = gw.loop.create_task(_serve_rest(phase, req, step, profile))


def serve_again(phase: Serving, req: Served) -> None:
    """A reused upstream failed before answering: the same route, on a new connection, once."""
    req.task = phase.gw.loop.create_task(_serve_rest(phase, req, None, ""))


async def _serve_rest(phase: Serving, req: Served, pending: Pending | None, profile: str) -> None:
    try:
        d = phase.gw.dispatcher
        if pending is None:
            step = await d.again(req)
        else:
            step = await d.rest(phase.conn.who, req, req.runtime, profile, pending)
        req.task = None
        phase.ready(req, step)
    except GatewayError as err:
        req.task = None
        try:
            phase.failed(req, err)
        except Exception as exc:
            phase.conn.crashed("exchange_failed", exc)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # a bug: an internal error for this request, the others go on
        req.task = None
        internal_failure(phase, req, "serve", exc)


def internal_failure(phase: Serving, req: Served, where: str, exc: BaseException) -> None:
    """A bug while serving one request: count it and answer it as an internal error; if even
    that fails, the connection is closed (``crashed``)."""
    phase.gw.internal_error(where, exc)
    try:
        phase.failed(req, GatewayError(f"internal error: {type(exc).__name__}"))
    except Exception as again:
        phase.conn.crashed("exchange_failed", again)
