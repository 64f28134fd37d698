"""The asyncio driver: the only layer that touches client and upstream sockets (with
``egress.dialer``). Everything it decides with is below it and pure: ``http1`` parses,
``policy`` decides and judges, ``egress.plan`` picks members, ``model`` holds the values.

How one connection flows, file by file
--------------------------------------
1. accept — ``listeners.py``: a listener (plain, TLS or mutual TLS) accepts and makes a
   ``session.ClientConnection``.
2. gate — ``gate.py``: source address allowed? PROXY header from a trusted load balancer?
   under the connection limit? A refused peer is closed before a byte is parsed.
3. parse — ``pipeline.py``: a ``RequestPipeline`` feeds the bytes to llhttp
   (``http1.parse``); each request head becomes an ``Exchange`` (``forward.py``) in a queue,
   served in arrival order; ``flow.py`` pauses reading (named ``Pause`` reasons) for
   back-pressure, buffered bodies, pipelining and fairness. On a ``protocol: socks5``
   listener a ``SocksHandshake`` (``socks.py``) takes the pipeline's place: the sans-IO
   negotiation (``egressgate.socks5``), RFC 1929 credentials as a Basic value, and a
   ``SocksRequest`` that steps 4-7 serve exactly as a CONNECT.
4. identify — ``dispatch.py``: the client from its source address, ``Proxy-Authorization``
   or TLS certificate (``policy.clients``), a new password checked off the loop and throttled
   (``limits.AuthThrottle``), a Kubernetes service-account token verified (``policy.tokens``)
   once its issuer's keys are in hand (``egressgate.services.keysource`` fetches them), the connection counted against the client's limits
   (``limits.ClientLimits``).
5. route — ``route.py``: decide (``policy.decide``: destination rules, CONNECT ports,
   profile) -> resolve (``egress.resolver``, cache first) -> judge (``policy.judge``: the
   address guard and IP deny rules on the resolved addresses) -> pick the egress members in
   order (``egress.plan``). A ``Route`` value, or a typed refusal. A profile with ``protect``
   rules then admits the route against its first member (``protect.py``: shared-IP limits
   and holds, 429 beyond), the admission riding on the request's access record.
6. dial — ``connector.py``: an idle pooled connection (forwarded requests) or a new one from
   the member's source address (``egress.dialer``), or through a chained proxy
   (``chain.py``, also used by ``probe``).
7. relay — CONNECT: ``tunnel.py`` (copy, then ``splice.py`` for bulk); absolute-URI:
   ``forward.py`` streams the rewritten request and the re-framed response over an
   ``upstream.Upstream``.
8. record — ``observe.outcomes``: one access record and its metrics per request or tunnel;
   finishing the record releases its shared-IP admission, whatever ended it.

Steps 4-6 run synchronously as long as nothing must be awaited (a known client, a cached
destination, an idle upstream): no task is made for a keep-alive request that needs none.
``server.py`` holds what connections share (the ``Gateway``: runtime, the pieces above, the
sweep that enforces timeouts, reload and drain); ``runtime.py`` is one compiled config.

No task lives for the life of a tunnel or a keep-alive connection: data moves in protocol
callbacks with pause/resume back-pressure. ``Exchange`` and ``Tunnel`` see their client side
through small ``typing.Protocol``s, never the connection class; the admin server reads
``Gateway.open_connections()``, a snapshot.
"""
