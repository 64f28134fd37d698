"""The keys that sign Kubernetes service-account tokens, fetched from their issuer: a
``policy.tokens.KeyProvider`` for the running gateway (``ClientRegistry.keys``).

For each issuer (or configured ``jwks_url``) one ``_Keys`` entry: the OIDC discovery document
(``ISSUER/.well-known/openid-configuration``, whose ``issuer`` must be the configured one)
names the JWKS URL; the JWKS is fetched and parsed (``policy.tokens.parse_jwks``).

- Nothing blocks the loop and no thread is used: the fetch is a task on the loop, over
  ``egress.fetch`` (direct, from the host's address: ``MEMBER``; the address guard does not
  apply, the issuer is operator-configured like the probe's echo URL: ``GUARD``), under
  ``timeouts.upstream_connect`` for the whole exchange.
- Cached: the keys are kept and re-fetched in the background once older than ``refresh``.
- A token naming an unknown ``kid`` (a rotated key) asks for a fetch (``refresh``); fetches
  start at most once per ``min_refresh`` per issuer, and concurrent askers share one.
- An issuer outage keeps the last keys: a failed fetch is logged (``jwks_fetch_failed``) and
  counted (``egressgate_jwks_fetches_total{result="error"}``), never clears them.
- Reloads keep the entries (keyed by source and CA file), so a reload costs no fetch.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from ..egress.fetch import fetch, get
from ..egress.plan import EgressPlan
from ..egress.reach import Reach, Unguarded
from ..errors import GatewayError
from ..observe.accesslog import log_event
from ..observe.metrics import Metrics
from ..policy.tokens import TokenPolicy, parse_jwks

MAX_DOCUMENT = 1 << 20  # bytes of a discovery or JWKS document
MEMBER = EgressPlan("(issuer keys)", "direct")
GUARD = Unguarded("the token issuer is operator-configured (clients[].token)")
ACCEPT = (("Accept", "application/json"), ("User-Agent", "egressgate"))
DISCOVERY = "/.well-known/openid-configuration"


class _Keys:
    __slots__ = ("keys", "fetched", "attempted", "task")

    def __init__(self) -> None:
        self.keys: Mapping[str, Any] | None = None
        self.fetched = 0.0  # when the keys in hand were fetched
        self.attempted: float | None = None  # when the last fetch started
        self.task: asyncio.Task | None = None


class KeySources:
    def __init__(self, reach: Callable[[], Reach], metrics: Metrics, timeout: Callable[[], float] = lambda: 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._reach = reach
        self._metrics = metrics
        self._timeout = timeout
        self._clock = clock
        self._by_source: dict[tuple[str, str | None], _Keys] = {}

    # --- KeyProvider --------------------------------------------------------------------------
    def keys(self, policy: TokenPolicy) -> Mapping[str, Any] | None:
        entry = self._by_source.get((policy.source, policy.ca_file))
        if entry is None:
            return None
        if entry.keys is not None and self._clock() - entry.fetched >= policy.refresh:
            self._start(policy, entry)  # in the background: the keys in hand serve meanwhile
        return entry.keys

    def refresh(self, policy: TokenPolicy) -> Callable[[], Awaitable[None]] | None:
        entry = self._by_source.setdefault((policy.source, policy.ca_file), _Keys())
        task = entry.task or self._start(policy, entry)
        if task is None:
            return None

        async def wait() -> None:
            await asyncio.shield(task)  # (the fetch never raises; a cancelled waiter leaves it running)

        return wait

    # --- fetching -----------------------------------------------------------------------------
    def prefetch(self, policies: list[TokenPolicy]) -> None:
        """Start fetching the keys of issuers not seen yet (at start and after a reload)."""
        for policy in policies:
            if policy.static_keys is None and (policy.source, policy.ca_file) not in self._by_source:
                self.refresh(policy)

    def close(self) -> None:
        for entry in self._by_source.values():
            if entry.task is not None:
                entry.task.cancel()

    def _start(self, policy: TokenPolicy, entry: _Keys) -> asyncio.Task | None:
        now = self._clock()
        if entry.task is not None:
            return entry.task
        if entry.attempted is not None and now - entry.attempted < policy.min_refresh:
            return None
        entry.attempted = now
        entry.task = asyncio.get_running_loop().create_task(self._fetch(policy, entry))
        return entry.task

    async def _fetch(self, policy: TokenPolicy, entry: _Keys) -> None:
        try:
            url = policy.source
            if url == policy.issuer:  # OIDC discovery names the JWKS
                doc = await self._get_json(policy.issuer.rstrip("/") + DISCOVERY, policy.ca_file)
                if not isinstance(doc, dict) or doc.get("issuer") != policy.issuer:
                    raise ValueError("the discovery document names another issuer")
                url = doc.get("jwks_uri")
                if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https"):
                    raise ValueError("the discovery document has no http(s) jwks_uri")
                if urlsplit(policy.issuer).scheme == "https" and urlsplit(url).scheme != "https":
                    # (keys in clear text could be swapped on the way: forged tokens would pass)
                    raise ValueError("the discovery document of an https issuer names a plain-http jwks_uri")
            keys = parse_jwks(await self._get_json(url, policy.ca_file))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # (an issuer's answer must never take a waiting request down with it)
            self._metrics.jwks_fetches.labels("error").inc()
            detail = exc.detail if isinstance(exc, GatewayError) else str(exc) or type(exc).__name__
            log_event("jwks_fetch_failed", issuer=policy.issuer, error=detail[:300],
                      keeping=len(entry.keys or ()))
        else:
            entry.keys, entry.fetched = keys, self._clock()
            self._metrics.jwks_fetches.labels("ok").inc()
            log_event("jwks_fetched", issuer=policy.issuer, keys=sorted(keys)[:16])
        finally:
            entry.task = None

    async def _get_json(self, url: str, ca_file: str | None) -> object:
        answer = await fetch(self._reach(), MEMBER, get(url, ACCEPT, ca_file), GUARD, self._timeout(),
                             max_body=MAX_DOCUMENT, what="issuer")
        if answer.status != 200:
            raise ValueError(f"{url[:200]} answered {answer.status}")
        try:
            return json.loads(answer.body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{url[:200]} did not answer JSON") from None
