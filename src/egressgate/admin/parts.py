"""``/status`` across worker processes (``workers: N``): each worker > 0 answers
``GET /status-part`` on its private admin socket with what only it knows -- its open
connections and its shared-IP counts -- and worker 0 folds those parts into its own
status document (``merge``). A worker that does not answer within ``PART_TIMEOUT`` is
listed as such (``workers.unanswered``), never waited for."""

from __future__ import annotations

import asyncio
import json
import os

PART_TIMEOUT = 2.0  # seconds worker 0 waits for another worker's part
PART_LIMIT = 1 << 22  # bytes of one part (a worker's 200 oldest connections fit many times)


def part(gw, open_limit: int) -> dict:
    """This worker's part (``gw``: its ``proxy.server.Gateway``)."""
    rt = gw.runtime
    views = gw.open_connections()
    return {
        "pid": os.getpid(),
        "connections": {"total": len(views), "open": views[:open_limit]},
        "protect": {name: gw.protect.view(rt.protect.get(name), name, [m.label for m in pool.everyone])
                    for name, pool in rt.profiles.items() if name in rt.protect},
        "holds": len(gw.protect.holds),
        "refused_sources": gw.gate.refused_source_count,
    }


async def fetch(index: int, path: str, timeout: float = PART_TIMEOUT) -> tuple[int, dict | None]:
    """(index, part) of another worker, from its private admin socket (None: no answer)."""
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(path)
            writer.write(b"GET /status-part HTTP/1.1\r\nHost: worker\r\n\r\n")
            data = await reader.read(PART_LIMIT)
    except (OSError, TimeoutError):
        return index, None
    finally:
        if writer is not None:
            writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        return index, None
    try:
        doc = json.loads(body)
    except ValueError:
        return index, None
    return index, doc if isinstance(doc, dict) else None


def merge(doc: dict, own_index: int, own_holds: int, parts: list[tuple[int, dict | None]], open_limit: int) -> dict:
    """Worker 0's status ``doc`` with every other worker's part folded in: connections (each
    tagged with its ``worker``, oldest first, counts over all), shared-IP counts per member
    summed, and per worker its open connections and holds (``workers.workers[i]``)."""
    conns = doc["connections"]
    for view in conns["open"]:
        view["worker"] = own_index
    per_worker = {own_index: {"connections": conns["total"], "holds": own_holds}}
    unanswered = []
    for index, p in parts:
        if p is None:
            unanswered.append(index)
            continue
        c = p.get("connections") or {}
        views = [v for v in c.get("open") or [] if isinstance(v, dict)]
        for view in views:
            view["worker"] = index
            conns["by_client"][view.get("client", "-")] = conns["by_client"].get(view.get("client", "-"), 0) + 1
            if view.get("state") == "tunnel":
                conns["tunnels"] += 1
            if view.get("state") not in ("idle", None):
                conns["by_profile"][view.get("profile", "-")] = conns["by_profile"].get(view.get("profile", "-"), 0) + 1
        conns["total"] += int(c.get("total") or 0)
        conns["open"] += views
        per_worker[index] = {"connections": int(c.get("total") or 0), "holds": p.get("holds")}
        for name, view in (p.get("protect") or {}).items():
            _add_protect(doc["profiles"].get(name, {}).get("protect"), view)
        doc["refused_sources"]["total"] += int(p.get("refused_sources") or 0)
    conns["open"].sort(key=lambda v: -float(v.get("age_seconds") or 0))
    del conns["open"][open_limit:]
    workers = doc.get("workers")
    if workers is not None:
        for w in workers.get("workers", []):
            w.update(per_worker.get(w["index"], {"connections": None, "holds": None}))
        workers["unanswered"] = unanswered
    return doc


def _add_protect(mine: dict | None, theirs: dict) -> None:
    """Sum another worker's per-member counts into worker 0's view of a profile's rules."""
    if not mine or not isinstance(theirs, dict):
        return
    by_name = {r.get("name"): r for r in theirs.get("rules") or [] if isinstance(r, dict)}
    for rule in mine["rules"]:
        other = by_name.get(rule["name"])
        if other is None:
            continue
        for member, counts in rule["members"].items():
            more = (other.get("members") or {}).get(member)
            if not isinstance(more, dict):
                continue
            counts["in_flight"] += int(more.get("in_flight") or 0)
            counts["admitted"] += int(more.get("admitted") or 0)
            for limit in counts["refused"]:
                counts["refused"][limit] += int((more.get("refused") or {}).get(limit) or 0)
