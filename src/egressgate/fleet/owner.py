"""Worker 0's side of one instance's shared budgets: the ``Ledger`` it owns, served to the
other workers over a Unix socket (``workers: N``), and the ``Budget`` of worker 0's own guard
(in process: no round trip). What the instance may lease out comes from its ``source``
(``source.Alone``: the configured figures; ``source.Fleet``: slots and tokens held in the
fleet store, holds shared with every instance).

Messages (``wire``; a worker first says ``{"op": "hello", "worker": i}``):

- ``slots`` / ``tokens`` (with an ``id``): lease a concurrency slot / a slice of rate tokens;
  answered ``{"id", "n"[, "wait"]}``. When no slot is free the owner first reclaims idle
  ones: it asks every other holder (``reclaim``; worker 0's guard directly) and waits up to
  ``RECLAIM_WAIT`` for their ``returned``; what comes back is granted.
- ``back``: slots and tokens a worker gives back (idle after a reclaim, tokens past their TTL).
- ``hold``: a hold a worker learned: applied to worker 0's guard and passed to every other
  worker; one worker 0 learned goes to all of them.
- ``block``: a (member x provider) a worker found ``blocked`` or ``reverified`` (block-aware
  egress, ``proxy.blocks``): passed on the same way (``on_block``), so every worker routes alike.

A worker's connection closing gives back every slot it held (``Ledger.drop``): a worker
that dies takes its connections, and their slots, with it. Requests are handled in tasks,
so a reclaim never waits behind the requests of the worker it asks.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable

from . import wire
from .ledger import TOKEN_TTL, Key, Ledger
from .source import Alone

RECLAIM_WAIT = 0.2  # seconds a lease waits for other workers to give back idle slots
HOLDS_KEPT = 10000  # holds in force the owner replays to a worker that connects (or reconnects) later
OWNER = 0  # worker 0's holder number


class Owner:
    """``path`` None: no other workers to serve (one worker, with a fleet store)."""

    def __init__(self, path: str | None, ledger: Ledger, reclaim: Callable[[Key], int],
                 apply_hold: Callable[[dict], bool], stale_tokens: Callable[[], list],
                 on_error: Callable[[str, BaseException], None]) -> None:
        self.path = path
        self.ledger = ledger
        self.source = Alone(ledger)  # (app.py puts a source.Fleet here when a store is configured)
        self._reclaim_own = reclaim  # worker 0's guard gives back its idle slots of a key
        self._apply_hold = apply_hold
        self._stale_tokens = stale_tokens
        self._on_error = on_error
        self.members: dict[int, asyncio.StreamWriter] = {}
        self._returned: dict[tuple[int, Key], asyncio.Future] = {}
        self._reclaiming: dict[Key, asyncio.Future] = {}
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        # holds in force, for a worker that says hello after they were learned: doc, when it ends
        self._holds: dict[tuple, tuple[dict, float]] = {}
        self.on_block: Callable[[dict], None] | None = None  # a block state another worker found

    async def start(self) -> None:
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self._server = await asyncio.start_unix_server(self._serve, self.path, limit=wire.MAX_LINE)
        await self.source.start()
        self._spawn(self._sweep())

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for writer in list(self.members.values()):
            writer.close()
        await self.source.close()

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _sweep(self) -> None:
        """Worker 0's own token slices past their TTL go back to the bucket."""
        while True:
            await asyncio.sleep(TOKEN_TTL / 2)
            try:
                for key, n, rate in self._stale_tokens():
                    self.source.return_tokens(key, rate, n)
            except Exception as exc:
                self._on_error("fleet", exc)

    # --- the Budget of worker 0's guard ---------------------------------------------------------
    def try_slots(self, key: Key, limit: int) -> int:
        return self.ledger.grant_slots(OWNER, key, self.source.cap(key, limit), 1)

    async def slots(self, key: Key, limit: int) -> int:
        return await self._grant_slots(OWNER, key, limit)

    def try_tokens(self, key: Key, rate: float) -> int:
        return self.source.try_tokens(key, rate)

    async def tokens(self, key: Key, rate: float) -> tuple[int, float]:
        return await self.source.tokens(key, rate)

    def give_back(self, key: Key, slots: int, tokens: int, rate: float | None) -> None:
        self.ledger.return_slots(OWNER, key, slots)
        if tokens and rate:
            self.source.return_tokens(key, rate, tokens)

    def hold_learned(self, doc: dict) -> None:
        self._keep_hold(doc)
        self._broadcast({"op": "hold", "hold": doc}, besides=OWNER)
        self.source.hold_learned(doc)

    def block_learned(self, doc: dict) -> None:
        """A block state worker 0 found: every other worker (and every other instance) takes it."""
        self._broadcast({"op": "block", "block": doc}, besides=OWNER)
        self.source.block_learned(doc)

    def fleet_block(self, doc: dict) -> None:
        """A block state another instance found: worker 0 and every worker take it."""
        if self.on_block is not None:
            self.on_block(doc)
        self._broadcast({"op": "block", "block": doc}, besides=OWNER)

    def fleet_hold(self, doc: dict) -> None:
        """A hold another instance learned: worker 0's guard and every worker hold it too."""
        if self._apply_hold(doc):
            self._keep_hold(doc)
            self._broadcast({"op": "hold", "hold": doc}, besides=OWNER)

    def _keep_hold(self, doc: dict) -> None:
        """Remember a (well-formed) hold until it ends, to replay it to workers that connect later."""
        now = asyncio.get_running_loop().time()
        key = tuple(str(doc.get(k)) for k in ("profile", "member", "rule", "client", "host", "address"))
        self._holds.pop(key, None)
        self._holds[key] = (doc, now + float(doc["seconds"]))
        if len(self._holds) > HOLDS_KEPT:
            for k in [k for k, (_, until) in self._holds.items() if until <= now] or [next(iter(self._holds))]:
                del self._holds[k]

    def _replay_holds(self, writer: asyncio.StreamWriter) -> None:
        now = asyncio.get_running_loop().time()
        for key, (doc, until) in list(self._holds.items()):
            if until <= now:
                del self._holds[key]
            else:
                self._send(writer, {"op": "hold", "hold": {**doc, "seconds": until - now}})

    async def give_back_idle(self, key: Key) -> None:
        """Every worker's idle slots of ``key`` come back (another instance is short)."""
        await self._reclaim(key, besides=-1)

    # --- leasing --------------------------------------------------------------------------------
    async def _grant_slots(self, holder: int, key: Key, limit: int) -> int:
        """A slot for ``holder``: free in the instance's share, else reclaimed from the other
        workers' idle ones, else one more for the instance from its source (the fleet)."""
        n = self.ledger.grant_slots(holder, key, self.source.cap(key, limit), 1)
        if n:
            return n
        await self._reclaim(key, holder)
        n = self.ledger.grant_slots(holder, key, self.source.cap(key, limit), 1)
        if n:
            return n
        await self.source.more_slots(key, limit)
        return self.ledger.grant_slots(holder, key, self.source.cap(key, limit), 1)

    async def _reclaim(self, key: Key, besides: int) -> None:
        """Ask every other holder of ``key`` for its idle slots (one reclaim per key at a time)."""
        running = self._reclaiming.get(key)
        if running is not None:
            await asyncio.shield(running)
            return
        done = self._reclaiming[key] = asyncio.get_running_loop().create_future()
        try:
            waits = []
            for holder in self.ledger.holders(key, besides):
                if holder == OWNER:
                    self.ledger.return_slots(OWNER, key, self._reclaim_own(key))
                    continue
                writer = self.members.get(holder)
                if writer is None:
                    continue
                fut = self._returned.get((holder, key))
                if fut is None:
                    fut = self._returned[(holder, key)] = asyncio.get_running_loop().create_future()
                    self._send(writer, {"op": "reclaim", "key": list(key)})
                waits.append(fut)
            if waits:
                await asyncio.wait(waits, timeout=RECLAIM_WAIT)
        finally:
            del self._reclaiming[key]
            done.set_result(None)

    # --- the workers' connections -----------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        holder = None
        try:
            hello = wire.decode(await reader.readline())
            holder = wire.count((hello or {}).get("worker"), 1 << 16)
            if not hello or hello.get("op") != "hello" or not holder:
                return
            old = self.members.pop(holder, None)
            if old is not None:  # a restarted worker in the same slot: the old one is gone
                self._forget(holder)
                old.close()
            self.members[holder] = writer
            self._replay_holds(writer)
            while True:
                line = await reader.readline()
                if not line:
                    return
                msg = wire.decode(line)
                if msg is not None:
                    self._handle(holder, writer, msg)
        except (OSError, ValueError, asyncio.IncompleteReadError):
            pass  # (a worker gone or misbehaving: its slots come back below)
        except Exception as exc:
            self._on_error("fleet", exc)
        finally:
            if holder and self.members.get(holder) is writer:
                del self.members[holder]
                self._forget(holder)
            writer.close()

    def _forget(self, holder: int) -> None:
        self.ledger.drop(holder)
        for (h, key), fut in list(self._returned.items()):
            if h == holder:
                del self._returned[(h, key)]
                if not fut.done():
                    fut.set_result(0)

    def _handle(self, holder: int, writer: asyncio.StreamWriter, msg: dict) -> None:
        op = msg.get("op")
        key = wire.key(msg.get("key"))
        if op == "slots" and key is not None:
            limit, ident = wire.count(msg.get("limit")), msg.get("id")
            if limit is not None:
                self._spawn(self._answer_slots(holder, writer, ident, key, limit))
        elif op == "tokens" and key is not None:
            rate = wire.number(msg.get("rate"))
            if rate:
                self._spawn(self._answer_tokens(writer, msg.get("id"), key, rate))
        elif op == "back" and key is not None:
            slots, tokens, rate = wire.count(msg.get("slots")), wire.count(msg.get("tokens")), wire.number(msg.get("rate"))
            if slots:
                self.ledger.return_slots(holder, key, slots)
            if tokens and rate:
                self.source.return_tokens(key, rate, tokens)
        elif op == "returned" and key is not None:
            n = wire.count(msg.get("n"))
            if n:
                self.ledger.return_slots(holder, key, n)
            fut = self._returned.pop((holder, key), None)
            if fut is not None and not fut.done():
                fut.set_result(n or 0)
        elif op == "block" and isinstance(msg.get("block"), dict):
            if self.on_block is not None:
                self.on_block(msg["block"])
            self._broadcast({"op": "block", "block": msg["block"]}, besides=holder)
            self.source.block_learned(msg["block"])
        elif op == "hold" and isinstance(msg.get("hold"), dict) and self._apply_hold(msg["hold"]):
            self._keep_hold(msg["hold"])
            self._broadcast({"op": "hold", "hold": msg["hold"]}, besides=holder)
            self.source.hold_learned(msg["hold"])

    async def _answer_slots(self, holder: int, writer: asyncio.StreamWriter, ident, key: Key, limit: int) -> None:
        try:
            n = await self._grant_slots(holder, key, limit)
        except Exception as exc:
            self._on_error("fleet", exc)
            n = 0
        if self.members.get(holder) is writer:
            self._send(writer, {"id": ident, "n": n})
        else:  # (the worker went away meanwhile: what it was granted comes back)
            self.ledger.return_slots(holder, key, n)

    async def _answer_tokens(self, writer: asyncio.StreamWriter, ident, key: Key, rate: float) -> None:
        try:
            n, wait = await self.source.tokens(key, rate)
        except Exception as exc:
            self._on_error("fleet", exc)
            n, wait = 0, 1.0
        self._send(writer, {"id": ident, "n": n, "wait": wait})

    def _broadcast(self, msg: dict, besides: int) -> None:
        for holder, writer in list(self.members.items()):
            if holder != besides:
                self._send(writer, msg)

    @staticmethod
    def _send(writer: asyncio.StreamWriter, msg: dict) -> None:
        if not writer.is_closing():
            if writer.transport.get_write_buffer_size() > wire.MAX_BUFFERED:  # a worker that stopped reading
                writer.close()
                return
            writer.write(wire.encode(msg))
