"""``egressgate verify``: the member x provider matrix of a config, checked from this host
exactly as the gateway would (``checks.check_pools``), printed as a table (or JSON lines).
With ``--since CURRENT.yaml`` only the members a reload from CURRENT to this config would add
(active or standby) are checked: run it on a candidate config before anyone reloads. Standby
members are checked like active ones and marked ``(standby)`` (JSON: ``role``). Exit 0 when every check
passed, 1 on any failure, 2 for an unknown profile or provider name."""

from __future__ import annotations

import asyncio
import json
import sys

from ..egress.dialer import Dialer
from ..egress.providers import added_anywhere, format_matrix
from ..egress.reach import Reach
from ..model import with_iso
from ..proxy.build import load_runtime, make_resolver
from ..services.checks import check_pools


def main(config: str | None, profiles: list[str] | None, providers: list[str] | None, since: str | None,
         as_json: bool) -> int:
    rt = load_runtime(config)
    board = rt.providers
    pools = rt.profiles
    unknown = [p for p in profiles or () if p not in pools]
    known_providers = {s.name for specs in board.specs.values() for s in specs}
    unknown += [f"provider {p}" for p in providers or () if p not in known_providers]
    if unknown:
        print(f"egressgate: unknown: {', '.join(unknown)}", file=sys.stderr)
        return 2
    current = load_runtime(since).profiles if since else None
    pairs = []
    for name, pool in pools.items():
        if profiles and name not in profiles:
            continue
        members = added_anywhere(current.get(name), pool) if current is not None else pool.everyone
        pairs += [(m, s) for m in members for s in board.specs.get(name, ()) if not providers or s.name in providers]
    if not pairs:
        print("egressgate: nothing to verify (no profile names providers" +
              (", or no member is new since " + since if since else "") + ")", file=sys.stderr)
        return 0

    async def run():
        loop = asyncio.get_running_loop()
        return await check_pools(pools, board, Reach(Dialer(loop), make_resolver(rt.config).resolve), rt.guard,
                                 only=pairs)

    results = asyncio.run(run())
    roles = {(name, m.label): pool.role(m) for name, pool in pools.items() for m in pool.everyone}
    if as_json:
        for r in results:
            print(json.dumps(with_iso({"profile": r.profile, **r.view(), "role": roles[(r.profile, r.member)]})))
    else:
        print(format_matrix(results, roles))
    # 1: a provider refuses a member; 3: none refuses, but one throttled the check (no verdict: retry later)
    return 0 if all(r.ok for r in results) else 1 if any(r.refused for r in results) else 3
