"""The fleet store's wire side: Redis (redis-py asyncio), every operation one Lua script or
one command, each bounded by ``timeout`` (``StoreError`` otherwise). Nothing here decides
what to do when Redis fails: ``fleet.source`` does.

Keys, under one hash tag (``{PREFIX}``, so a Redis Cluster keeps them in one slot):

- ``{P}:instances``: sorted set, instance id -> when its heartbeat lapses (server time, ms);
- ``{P}:slots:PROFILE|MEMBER|RULE``: hash, instance id -> concurrency slots it holds. An
  ``acquire`` first forgets the slots of instances whose heartbeat lapsed, so a dead
  instance's slots come back within ``lease_ttl``;
- ``{P}:rate:PROFILE|MEMBER|RULE``: hash {tokens, at}: the fleet's token bucket per key;
- ``{P}:hold:PROFILE|MEMBER|RULE|HOST``: a hold (JSON), expiring with it, for instances that
  start later; ``{P}:events``: pub/sub channel of holds learned and slots wanted;
- ``{P}:check:NAME``: the last result of a provider check (JSON), and ``{P}:checking:NAME`` the
  claim of the process checking it this interval (``fleet.checks``).

Time is Redis's (``TIME``), never an instance's clock.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Awaitable
from pathlib import Path

from .ledger import Key

_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local held = redis.call('HGETALL', KEYS[1])
local total = 0
for i = 1, #held, 2 do
  if redis.call('ZSCORE', KEYS[2], held[i]) then
    total = total + tonumber(held[i + 1])
  else
    redis.call('HDEL', KEYS[1], held[i])
  end
end
if not redis.call('ZSCORE', KEYS[2], ARGV[1]) then
  return -1
end
local n = tonumber(ARGV[2])
local free = tonumber(ARGV[3]) - total
if free < n then n = free end
if n <= 0 then return 0 end
redis.call('HINCRBY', KEYS[1], ARGV[1], n)
return n
"""

_HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl * 10)
for i = 2, #KEYS do
  local n = tonumber(ARGV[i + 1])
  if n > 0 then
    redis.call('HSET', KEYS[i], ARGV[1], n)
    redis.call('PEXPIRE', KEYS[i], ttl * 10)
  else
    redis.call('HDEL', KEYS[i], ARGV[1])
  end
end
return redis.call('ZCARD', KEYS[1])
"""

_TOKENS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate = tonumber(ARGV[1])
local want = tonumber(ARGV[2])
local burst = rate
if burst < 1 then burst = 1 end
local b = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = burst
if b[1] then
  tokens = tonumber(b[1]) + (now - tonumber(b[2])) * rate
  if tokens > burst then tokens = burst end
end
local n = math.floor(tokens)
if n > want then n = want end
if n < 0 then n = 0 end
tokens = tokens - n
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], 3600000)
local wait = 0
if n == 0 then wait = (1 - tokens) / rate end
return {n, tostring(wait)}
"""

MAX_CONNECTIONS = 8  # to the store, per instance (only worker 0 talks to it)
HOLDS_LOADED = 10000  # holds read at start (the rest are learned as they are published)


class StoreError(Exception):
    """The store did not answer in time, or refused (connection, AUTH, TLS, script)."""


class RedisStore:
    def __init__(self, cfg, instance: str) -> None:
        import redis.asyncio as aioredis  # (only a gateway with a fleet store imports redis)

        self.cfg = cfg
        self.instance = instance
        self.timeout = cfg.timeout
        p = "{" + cfg.prefix + "}"
        self._instances = f"{p}:instances"
        self._slots = f"{p}:slots:"
        self._rate = f"{p}:rate:"
        self._hold = f"{p}:hold:"
        self._check = f"{p}:check:"
        self._checking = f"{p}:checking:"
        self.channel = f"{p}:events"
        password = None
        if cfg.password_file:
            password = Path(cfg.password_file).read_text(encoding="utf-8").strip()
        elif cfg.password_env:
            import os

            password = os.environ.get(cfg.password_env, "").strip() or None
        kwargs: dict = {"username": cfg.username, "password": password, "socket_timeout": max(cfg.timeout, 1.0),
                        "socket_connect_timeout": max(cfg.timeout, 1.0), "max_connections": MAX_CONNECTIONS,
                        "retry": None, "health_check_interval": 0}
        if cfg.url.startswith("rediss://"):
            tls = cfg.tls
            kwargs.update(ssl_cert_reqs=ssl.CERT_REQUIRED, ssl_ca_certs=tls.ca if tls else None,
                          ssl_certfile=tls.cert if tls else None, ssl_keyfile=tls.key if tls else None,
                          ssl_check_hostname=tls.check_hostname if tls else True)
        self.client = aioredis.Redis.from_url(cfg.url, **kwargs)
        self._acquire = self.client.register_script(_ACQUIRE)
        self._heartbeat = self.client.register_script(_HEARTBEAT)
        self._tokens = self.client.register_script(_TOKENS)

    async def _bounded(self, what: Awaitable, timeout: float | None = None):
        try:
            async with asyncio.timeout(timeout or self.timeout):
                return await what
        except TimeoutError:
            raise StoreError("timed out") from None
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # redis.exceptions.*, OSError, ssl.SSLError: all mean "not now"
            raise StoreError(f"{type(exc).__name__}: {exc}") from None

    @staticmethod
    def _name(key: Key) -> str:
        return "|".join(key)

    async def acquire(self, key: Key, limit: int, want: int) -> int:
        """Slots of ``key`` granted to this instance (-1: its heartbeat lapsed; beat first)."""
        n = await self._bounded(self._acquire(keys=[self._slots + self._name(key), self._instances],
                                              args=[self.instance, want, limit]))
        return int(n)

    async def heartbeat(self, held: dict[Key, int], ttl: float, timeout: float | None = None) -> int:
        """Renew this instance's lease and set the slots it holds; the live instances."""
        keys = list(held)
        n = await self._bounded(self._heartbeat(
            keys=[self._instances, *(self._slots + self._name(k) for k in keys)],
            args=[self.instance, int(ttl * 1000), *(held[k] for k in keys)]), timeout)
        return int(n)

    async def tokens(self, key: Key, rate: float, want: int) -> tuple[int, float]:
        n, wait = await self._bounded(self._tokens(keys=[self._rate + self._name(key)], args=[repr(rate), want]))
        return int(n), float(wait)

    async def publish(self, msg: dict) -> None:
        await self._bounded(self.client.publish(self.channel, json.dumps({**msg, "from": self.instance})))

    async def save_hold(self, doc: dict) -> None:
        name = self._hold + "|".join((doc["profile"], doc["member"], doc["rule"], doc["host"]))
        await self._bounded(self.client.set(name, json.dumps(doc), px=max(1, int(float(doc["seconds"]) * 1000))))

    async def load_holds(self, timeout: float) -> list[dict]:
        """Holds saved by any instance and still running (seconds: what is left of each)."""
        async def scan() -> list[dict]:
            out: list[dict] = []
            names = []
            async for name in self.client.scan_iter(match=self._hold + "*", count=500):
                names.append(name)
                if len(names) >= HOLDS_LOADED:
                    break
            for i in range(0, len(names), 500):
                pipe = self.client.pipeline(transaction=False)
                for name in names[i:i + 500]:
                    pipe.get(name)
                    pipe.pttl(name)
                values = await pipe.execute()
                for text, left in zip(values[::2], values[1::2], strict=True):
                    try:
                        doc = json.loads(text) if text else None
                    except ValueError:
                        doc = None
                    if isinstance(doc, dict) and isinstance(left, int) and left > 0:
                        out.append({**doc, "seconds": left / 1000})
            return out

        return await self._bounded(scan(), timeout)

    async def claim_check(self, name: str, ms: int) -> bool:
        """True: this process checks ``name`` now (nobody claimed it within the last ``ms``)."""
        return bool(await self._bounded(self.client.set(self._checking + name, self.instance, nx=True, px=max(1, ms))))

    async def check_result(self, name: str) -> dict | None:
        text = await self._bounded(self.client.get(self._check + name))
        try:
            doc = json.loads(text) if text else None
        except ValueError:
            return None
        return doc if isinstance(doc, dict) else None

    async def save_check(self, name: str, doc: dict, ms: int) -> None:
        await self._bounded(self.client.set(self._check + name, json.dumps({**doc, "by": self.instance}),
                                            px=max(1, ms)))

    def pubsub(self):
        return self.client.pubsub(ignore_subscribe_messages=True)

    async def close(self) -> None:
        try:
            await self.client.aclose()
        except Exception:  # (closing a broken connection: nothing left to do)
            pass
