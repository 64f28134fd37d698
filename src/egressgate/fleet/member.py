"""A worker's side (workers 1..N-1) of its instance's shared budgets: the ``Budget`` of its
guard, leased from worker 0 (``owner.Owner``) over the Unix socket.

The connection is made at start and again whenever it drops (every ``RETRY`` seconds). A
lease that cannot be asked (no connection) or is not answered within ``ASK_TIMEOUT`` counts
as nothing granted: the request is refused (429), never admitted past the limit. The owner's
``reclaim`` is answered at once with the idle slots; holds and block states (``block``: a
(member x provider) found ``blocked`` or ``reverified``, ``proxy.blocks``) come and go both ways. Token
slices past their TTL go back every ``TOKEN_TTL / 2``.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable

from . import wire
from .ledger import TOKEN_TTL, Key

ASK_TIMEOUT = 1.0  # seconds a lease waits for the owner (and for the connection to it)
RETRY = 0.05  # seconds between attempts to reach the owner


class Member:
    def __init__(self, path: str, worker: int, reclaim: Callable[[Key], int], apply_hold: Callable[[dict], bool],
                 stale_tokens: Callable[[], list], on_error: Callable[[str, BaseException], None]) -> None:
        self.path = path
        self.worker = worker
        self._reclaim = reclaim
        self._apply_hold = apply_hold
        self._stale_tokens = stale_tokens
        self._on_error = on_error
        self._writer: asyncio.StreamWriter | None = None
        self._connected = asyncio.Event()
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._tasks: list[asyncio.Task] = []
        self.on_block: Callable[[dict], None] | None = None  # a block state another worker found

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._run()), loop.create_task(self._sweep())]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._writer is not None:
            self._writer.close()

    # --- the Budget of this worker's guard --------------------------------------------------------
    def try_slots(self, key: Key, limit: int) -> int:
        return 0

    async def slots(self, key: Key, limit: int) -> int:
        answer = await self._ask({"op": "slots", "key": list(key), "limit": limit})
        return wire.count(answer.get("n")) or 0

    def try_tokens(self, key: Key, rate: float) -> int:
        return 0

    async def tokens(self, key: Key, rate: float) -> tuple[int, float]:
        answer = await self._ask({"op": "tokens", "key": list(key), "rate": rate})
        n = wire.count(answer.get("n")) or 0
        return n, wire.number(answer.get("wait")) or 1.0

    def give_back(self, key: Key, slots: int, tokens: int, rate: float | None) -> None:
        self._tell({"op": "back", "key": list(key), "slots": slots, "tokens": tokens, "rate": rate or 0})

    def hold_learned(self, doc: dict) -> None:
        self._tell({"op": "hold", "hold": doc})

    def block_learned(self, doc: dict) -> None:
        self._tell({"op": "block", "block": doc})

    # --- the connection ------------------------------------------------------------------------
    async def _ask(self, msg: dict) -> dict:
        """The owner's answer, or {} (nothing granted) when it cannot be had in time."""
        loop = asyncio.get_running_loop()
        ident = next(self._ids)
        fut = self._waiting[ident] = loop.create_future()
        try:
            async with asyncio.timeout(ASK_TIMEOUT):
                await self._connected.wait()
                self._writer.write(wire.encode({**msg, "id": ident}))
                return await fut
        except (TimeoutError, OSError, ConnectionError):
            return {}
        finally:
            self._waiting.pop(ident, None)

    def _tell(self, msg: dict) -> None:
        writer = self._writer
        if writer is not None and not writer.is_closing():
            writer.write(wire.encode(msg))

    async def _run(self) -> None:
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(self.path, limit=wire.MAX_LINE)
            except OSError:
                await asyncio.sleep(RETRY)
                continue
            try:
                writer.write(wire.encode({"op": "hello", "worker": self.worker}))
                self._writer = writer
                self._connected.set()
                while True:
                    line = await reader.readline()
                    if not line:
                        break
                    msg = wire.decode(line)
                    if msg is not None:
                        self._handle(msg)
            except (OSError, ValueError, asyncio.IncompleteReadError):
                pass
            except Exception as exc:
                self._on_error("fleet", exc)
            finally:
                self._connected.clear()
                self._writer = None
                writer.close()
                for fut in self._waiting.values():  # nothing will answer them now
                    if not fut.done():
                        fut.set_result({})
            await asyncio.sleep(RETRY)

    def _handle(self, msg: dict) -> None:
        if "id" in msg and "op" not in msg:
            fut = self._waiting.get(msg["id"]) if isinstance(msg["id"], int) else None
            if fut is not None and not fut.done():
                fut.set_result(msg)
            return
        op = msg.get("op")
        if op == "reclaim":
            key = wire.key(msg.get("key"))
            if key is not None:
                self._tell({"op": "returned", "key": list(key), "n": self._reclaim(key)})
        elif op == "hold" and isinstance(msg.get("hold"), dict):
            self._apply_hold(msg["hold"])
        elif op == "block" and isinstance(msg.get("block"), dict) and self.on_block is not None:
            self.on_block(msg["block"])

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(TOKEN_TTL / 2)
            try:
                for key, n, rate in self._stale_tokens():
                    self.give_back(key, 0, n, rate)
            except Exception as exc:
                self._on_error("fleet", exc)
