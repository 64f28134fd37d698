"""Shared-IP budgets and holds shared beyond one process.

One instance (``workers: N``): worker 0 owns the instance's budgets (``ledger.Ledger``) and
serves them to the other workers over a Unix socket (``owner.Owner``; a worker's end is
``member.Member``). A worker's ``proxy.protect.SharedIpGuard`` admits from slices it leased
-- concurrency slots it keeps until the owner reclaims them, rate tokens it spends within
``ledger.TOKEN_TTL`` -- so a protected request pays a round trip to the owner only when its
worker's slice is used up. Concurrency is exact across the workers (the slots leased never
sum past ``max_concurrent``); rates stay within the bound stated in ``ledger``. A hold one
worker learns is sent to the owner, which applies it and passes it to every other worker.

A worker that dies gives its slots back with its connection. A gateway with one worker, or
without ``protect`` rules, uses none of this.
"""
