"""Name resolution with a small positive/negative cache and in-flight de-duplication.

By default the system resolver (``getaddrinfo`` in the loop's thread pool); with
``dns.servers`` configured, those name servers are asked directly (dnspython, A and AAAA in
parallel) and answers are cached no longer than their TTL. Answers are IP address strings,
in the resolver's order, de-duplicated.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable

from ..errors import DnsError, UpstreamTimeout


class Resolver:
    def __init__(self, cache_ttl: float = 30.0, negative_ttl: float = 5.0, timeout: float = 5.0,
                 clock: Callable[[], float] = time.monotonic, max_entries: int = 10000,
                 servers: list[tuple[str, int]] | None = None) -> None:
        self.servers = servers or []
        self._dns = None
        if self.servers:
            import dns.asyncresolver

            r = dns.asyncresolver.Resolver(configure=False)
            r.nameservers = [host for host, _ in self.servers]
            r.nameserver_ports = {host: port for host, port in self.servers}
            r.timeout = r.lifetime = timeout
            r.cache = None
            self._dns = r
        self.cache_ttl = cache_ttl
        self.negative_ttl = negative_ttl
        self.timeout = timeout
        self._clock = clock
        self._max = max_entries
        self._cache: dict[str, tuple[float, list[str] | Exception]] = {}
        self._inflight: dict[str, asyncio.Future[list[str]]] = {}

    def cached(self, host: str) -> list[str] | None:
        """A fresh positive answer from the cache, without awaiting (the hot path)."""
        hit = self._cache.get(host)
        if hit is not None and hit[0] > self._clock() and not isinstance(hit[1], Exception):
            return hit[1]
        return None

    async def resolve(self, host: str) -> list[str]:
        if host == "localhost" or host.endswith(".localhost"):
            return ["127.0.0.1", "::1"]  # RFC 6761: never asked of a name server
        hit = self._cache.get(host)
        if hit is not None and hit[0] > self._clock():
            if isinstance(hit[1], Exception):
                raise hit[1]
            return hit[1]
        pending = self._inflight.get(host)
        if pending is not None:
            return await asyncio.shield(pending)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[str]] = loop.create_future()
        self._inflight[host] = fut
        try:
            if self._dns is not None:
                addrs, ttl = await self._query(host)
            else:
                addrs, ttl = await self._lookup(loop, host), self.cache_ttl
        except (DnsError, UpstreamTimeout) as exc:
            self._store(host, exc, self.negative_ttl)
            fut.set_exception(exc)
            fut.exception()  # mark retrieved: waiters, if any, get it through shield
            raise
        else:
            self._store(host, addrs, min(ttl, self.cache_ttl))
            fut.set_result(addrs)
            return addrs
        finally:
            del self._inflight[host]

    async def _lookup(self, loop: asyncio.AbstractEventLoop, host: str) -> list[str]:
        try:
            async with asyncio.timeout(self.timeout):
                infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
        except TimeoutError:
            raise UpstreamTimeout(f"DNS lookup of {host} timed out", reason="dns_timeout",
                                  proxy_status="dns_timeout") from None
        except (socket.gaierror, UnicodeError, OSError) as exc:
            raise DnsError(f"cannot resolve {host}: {getattr(exc, 'strerror', None) or exc}") from None
        out: list[str] = []
        for family, _, _, _, sockaddr in infos:
            if family in (socket.AF_INET, socket.AF_INET6):
                addr = sockaddr[0].split("%")[0]
                if addr not in out:
                    out.append(addr)
        if not out:
            raise DnsError(f"{host} has no IPv4 or IPv6 address")
        return out

    async def _query(self, host: str) -> tuple[list[str], float]:
        import dns.exception
        import dns.resolver

        async def one(rdtype: str):
            try:
                return await self._dns.resolve(host, rdtype, search=False)
            except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
                return None

        try:
            answers = await asyncio.gather(one("A"), one("AAAA"))
        except dns.exception.Timeout:
            raise UpstreamTimeout(f"DNS lookup of {host} timed out", reason="dns_timeout",
                                  proxy_status="dns_timeout") from None
        except dns.exception.DNSException as exc:
            raise DnsError(f"cannot resolve {host}: {exc}") from None
        out: list[str] = []
        ttl = self.cache_ttl
        for answer in answers:
            if answer is None:
                continue
            ttl = min(ttl, answer.rrset.ttl)
            out += [r.address for r in answer if r.address not in out]
        if not out:
            raise DnsError(f"cannot resolve {host}: no such name or no address")
        return out, float(ttl)

    def _store(self, host: str, value: list[str] | Exception, ttl: float) -> None:
        if ttl <= 0:
            return
        if len(self._cache) >= self._max:
            self._cache.clear()
        self._cache[host] = (self._clock() + ttl, value)
