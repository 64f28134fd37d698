"""``SocksHandshake``: the SOCKS5 phase of a connection on a ``protocol: socks5`` listener.

It takes the place the ``RequestPipeline`` has on an HTTP listener (the connection calls the
same methods: ``received``, ``tick``, ``lost``, ``teardown`` ...) and drives the sans-IO
negotiation (``egressgate.socks5``):

1. methods: user/password (RFC 1929) when a client rule for this source address has
   credentials and the client offers it; "no authentication" when a rule admits the source
   address alone; otherwise "no acceptable methods" and a close.
2. credentials: mapped onto the client registry exactly as a ``Proxy-Authorization: Basic``
   header (``user+profile`` included); a new password is checked off the loop, throttled
   (``limits.AuthThrottle``).
3. request: a ``SocksRequest`` (a CONNECT as the dispatcher sees it) goes through the same
   ``dispatch.Dispatcher`` as an HTTP CONNECT -- identify (limits), route (destination rules,
   CONNECT ports, profile, address guard after the gateway's own resolution, report mode),
   connect (direct, bind, chained proxy) -- and on success the connection opens the same
   ``Tunnel`` with the SOCKS success reply in place of ``200 Connection established``.

Refusals answer with the SOCKS reply code (``socks5.reply_code``) and the access record keeps
the precise reason (``method: "SOCKS5"``). Timeouts: the negotiation up to the request must
finish within ``timeouts.client_head``; the dial has the profile's connect timeout.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from ..errors import AuthRequired, ClientTimeout, GatewayError, Unavailable
from ..http1.parse import RequestHead
from ..model import AccessRecord
from ..policy.clients import Identity, rejected
from ..socks5 import (
    METHOD_NO_AUTH,
    METHOD_NONE_ACCEPTABLE,
    METHOD_USERPASS,
    REPLY_NAMES,
    SUCCEEDED,
    ConnectRequest,
    Credentials,
    MethodsOffered,
    ServerNegotiation,
    SocksProtocolError,
    basic_authorization,
    reply_code,
)
from .connector import Link
from .limits import PendingAuth
from .serve import ClientSide, serve

if TYPE_CHECKING:
    from .route import Route
    from .runtime import Runtime

METHOD = "SOCKS5"  # the access record's method (and the requests metric's label)
_NO_ANSWER = b""


class SocksRequest:
    """A SOCKS CONNECT as the dispatcher and the tunnel see a request: a CONNECT head (its
    ``Proxy-Authorization`` made from the RFC 1929 credentials), its record, the bytes the
    client sent after the request (``body``) and, once routed, its route."""

    __slots__ = ("head", "record", "connect", "socks", "route", "target", "body", "ended", "runtime", "waiting",
                 "task")

    def __init__(self, head: RequestHead, record: AccessRecord) -> None:
        self.head = head
        self.record = record
        self.connect = True
        self.socks = True  # (the port rule is security.socks_ports)
        self.route: Route | None = None
        self.target = None
        self.body: list[bytes] = []
        self.ended = False
        self.runtime: Runtime | None = None
        self.waiting = False  # in a protect rule's hold queue
        self.task: asyncio.Task | None = None  # serving it, while it must wait (``serve``)

    def hand_over(self) -> list[bytes]:
        """The tunnel takes over: the bytes the client sent after its request (returned)."""
        body, self.body = self.body, []
        self.ended = True
        return body


class SocksHandshake:
    """The phase of a connection on a ``protocol: socks5`` listener (``serve.Phase``)."""

    AT_LIMIT = None  # (no SOCKS answer exists before the methods: the connection is reset)
    __slots__ = ("conn", "gw", "transport", "flow", "machine", "since", "auth", "req", "task", "started",
                 "finished")

    def __init__(self, conn: ClientSide, now: float) -> None:
        self.conn = conn
        self.gw = conn.gw
        self.transport = conn.transport
        self.flow = conn.flow
        self.machine = ServerNegotiation()
        self.since = now  # connected (the negotiation's deadline counts from here)
        self.auth: bytes | None = None  # the credentials as a Basic value, once accepted
        self.req: SocksRequest | None = None
        self.task: asyncio.Task | None = None
        self.started = False  # a byte arrived
        self.finished = False  # answered and recorded (or handed to a tunnel)

    # --- reading --------------------------------------------------------------------------
    def received(self, data: bytes) -> None:
        if self.finished:
            return
        self.started = True
        req = self.req
        if req is not None:  # dialing: early tunnel data, held (bounded by flow control)
            req.body.append(data)
            self.flow.buffered(len(data))
            return
        try:
            self.machine.receive(data)
            if self.task is None:  # (a password check in flight: the request waits in the machine)
                self._advance()
        except SocksProtocolError as err:
            self._refuse(err, err.reply_bytes)

    def _advance(self) -> None:
        while not self.finished and self.task is None and self.req is None:
            event = self.machine.next_event()
            if event is None:
                return
            if isinstance(event, MethodsOffered):
                self._choose(event.methods)
            elif isinstance(event, Credentials):
                self._credentials(event)
            elif isinstance(event, ConnectRequest):
                self._request(event)

    # --- 1. methods -----------------------------------------------------------------------
    def _choose(self, offered: frozenset[int]) -> None:
        candidates = self.gw.runtime.clients.candidates(self.conn.who.peer)
        # (a Kubernetes token entry needs credentials too: user "k8s" or its username, the token
        # as the password, if it fits RFC 1929's 255 bytes)
        if METHOD_USERPASS in offered and any(c.username is not None or c.token is not None for c in candidates):
            self.transport.write(self.machine.choose_method(METHOD_USERPASS))
        elif METHOD_NO_AUTH in offered and any(c.username is None and c.cert_subject is None and c.token is None
                                               for c in candidates):
            self.transport.write(self.machine.choose_method(METHOD_NO_AUTH))
        else:
            answer = self.machine.choose_method(METHOD_NONE_ACCEPTABLE)
            self._refuse(AuthRequired("no acceptable SOCKS5 authentication method (this client needs "
                                      "username/password)", reason="socks_no_acceptable_method"), answer)

    # --- 2. credentials ---------------------------------------------------------------------
    def _credentials(self, creds: Credentials) -> None:
        auth = basic_authorization(creds)
        user = creds.user.decode("utf-8", "replace")
        try:
            if auth is None:
                raise rejected(user, "bad_credentials")
            result = self.gw.runtime.clients.identify(self.conn.who.peer, auth, None)
        except GatewayError as err:
            self._auth_failed(err)
            return
        if not isinstance(result, Identity):  # a password or token check, or a token's issuer keys
            self.task = self.gw.loop.create_task(self._check(result, auth))
            return
        self._authenticated(auth)

    async def _check(self, pending: PendingAuth, auth: bytes) -> None:
        """Success is answered only once the credentials are verified (a token whose issuer
        keys must be fetched first is not yet)."""
        try:
            peer = self.conn.who.peer
            await self.gw.auth.settle(lambda: self.gw.runtime.clients.identify(peer, auth, None), peer, pending)
            self.task = None
            if self.finished:
                return
            self._authenticated(auth)
            self._advance()  # a request sent along with the credentials
        except SocksProtocolError as err:  # (the request sent along with the credentials)
            self.task = None
            self._refuse(err, err.reply_bytes)
        except GatewayError as err:
            self.task = None
            self._auth_failed(err)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.conn.crashed("serve", exc)

    def _authenticated(self, auth: bytes) -> None:
        self.auth = auth
        self.transport.write(self.machine.auth_result(True))

    def _auth_failed(self, err: GatewayError) -> None:
        self._refuse(err, self.machine.auth_result(False))

    # --- 3. the request ----------------------------------------------------------------------
    def _request(self, event: ConnectRequest) -> None:
        target = str(event.dest)
        head = RequestHead("CONNECT", target, "HTTP/1.1", [], False, None, False, 0, frozenset(),
                           self.auth, b"")
        rec = AccessRecord(self.conn.who.peer, self.conn.listener.name, time.time(), method=METHOD, target=target)
        req = self.req = SocksRequest(head, rec)
        early = self.machine.rest()
        if early:
            req.body.append(early)
            self.flow.buffered(len(early))
        if self.gw.draining:
            self.failed(req, Unavailable("the gateway is shutting down"))
            return
        serve(self, req)

    def ready(self, req: SocksRequest, link: Link) -> None:
        """``serve``'s answer: the connection for the tunnel."""
        if not isinstance(link, Link):  # (a Whoami: never for a CONNECT, which route refuses)
            self.failed(req, GatewayError("the gateway answers egressgate.whoami over HTTP only"))
            return
        up = link.upstream
        if self.conn.closed or self.finished:
            up.transport.close()
            return
        try:
            req.record.egress_ip = req.route.pool.attested_ip(link.plan)
            sockname = up.transport.get_extra_info("sockname") or ("0.0.0.0", 0)
            reply = self.machine.reply(SUCCEEDED, (sockname[0], sockname[1]))
            self.finished = True
            self.gw.metrics.socks_replies.labels(REPLY_NAMES[SUCCEEDED]).inc()
            self.conn.open_tunnel(req, link, reply)
        except BaseException:
            if up.owner is None:  # a bug before the hand-over: the connection is nobody's, close it
                up.transport.abort()
            raise

    def failed(self, req: SocksRequest, err: GatewayError) -> None:  # noqa: ARG002 (serve.Serving; it is self.req)
        """The request refused or its dial failed: the SOCKS reply, the record, a close."""
        code = reply_code(err)
        self._refuse(err, self.machine.reply(code), REPLY_NAMES[code])

    # --- ending ---------------------------------------------------------------------------------
    def _refuse(self, err: GatewayError, answer: bytes, reply: str | None = None) -> None:
        if self.finished:
            return
        self.finished = True
        rec = self.req.record if self.req is not None else self._record()
        if reply is None:
            reply = _reply_name(err)
        self.gw.metrics.socks_replies.labels(reply).inc()
        rec.extra = {**(rec.extra or {}), "socks_reply": reply}
        if rec.client == "-" and self.conn.who.counted:
            rec.client = self.conn.who.counted
        self.gw.outcomes.refused(rec, err)
        self.gw.outcomes.finished(rec, err.status)
        if self.req is not None:
            self.req.ended = True  # (its record is written here)
        if self.conn.closed:
            return
        if answer:
            self.transport.write(answer)
        if self.transport.can_write_eof() and not self.transport.is_closing():
            self.conn.linger()  # the answer is not lost to a reset while the client still sends
        else:
            self.conn.close()

    def _record(self) -> AccessRecord:
        return AccessRecord(self.conn.who.peer, self.conn.listener.name, time.time(), method=METHOD)

    def lost(self, reason: str) -> None:
        """The client went away before its tunnel was up: the dial (or check) is cancelled and
        a negotiation that had begun gets its 499 record."""
        self._end_unfinished(reason, 499)

    def teardown(self, reason: str, abort: bool) -> None:  # noqa: ARG002 (the connection closes the transport)
        self._end_unfinished(reason, 503)

    def _end_unfinished(self, reason: str, status: int) -> None:
        self._cancel()
        if self.finished or not self.started:
            self.finished = True
            return
        self.finished = True
        rec = self.req.record if self.req is not None else self._record()
        rec.reason = reason
        self.gw.outcomes.finished(rec, status)

    def _cancel(self) -> None:
        for task in (self.task, self.req.task if self.req is not None else None):
            if task is not None and not task.done():
                task.cancel()
        self.task = None

    def close_queue(self) -> None:
        self._cancel()

    def request_complete(self) -> bool:
        """A half-close before the tunnel is up ends the negotiation (as for CONNECT)."""
        return False

    # --- back-pressure, timeouts, status ------------------------------------------------------------
    def pause_writing(self) -> None:
        self.flow.write_paused = True

    def resume_writing(self) -> None:
        self.flow.write_paused = False

    def tick(self, now: float, rt: Runtime) -> None:
        if self.finished or self.req is not None or self.task is not None:
            return  # (a dial has the profile's connect timeout; a password check is bounded)
        if self.gw.draining and not self.started:
            self.finished = True
            self.conn.close()
        elif now - self.since > rt.timeouts.client_head:
            self._refuse(ClientTimeout(f"the SOCKS5 negotiation was not complete within "
                                       f"{rt.timeouts.client_head:g}s", reason="client_timeout"), _NO_ANSWER)

    def current(self) -> AccessRecord | None:
        return self.req.record if self.req is not None else None


def _reply_name(err: GatewayError) -> str:
    """The socks_replies label of a refusal before the request (a fixed set)."""
    if err.reason == "socks_no_acceptable_method":
        return "no_acceptable_method"
    if isinstance(err, AuthRequired) or err.status == 403:
        return "auth_failed"
    if err.status == 408:
        return "timeout"
    return "protocol_error"
