"""Provider checks compiled for use, and what they found. No I/O (``egressgate.services.checks`` does it).

A profile may name providers that must accept its egress (``providers:``). Each (member x
provider) pair is checked through that member exactly as a job's request leaves; the result,
with its evidence (status line, TLS error, reset, timeout, the egress address used, when), is a
``ProviderResult``. A ``ProviderBoard`` holds one runtime's specs and latest results, and the
verified cutovers waiting for their new members to pass (``PendingSwitch``).

Outcomes (``ProviderResult.outcome``), each a distinct failure an operator acts on differently:

- ``accepted``: the handshake (``accept: tls``) or the HTTP status was acceptable;
- ``http_status``: the provider answered, with a status outside ``accept`` (say 403: blocked);
- ``body_refused``: an acceptable status whose body matches ``refuse_body`` (or not
  ``expect_body``): a block page or CAPTCHA served as ``200`` (``BodyRules``);
- ``throttled``: the provider rate-limits the check (``429``, or ``503`` with ``Retry-After``):
  no verdict on the member either way, so not a refusal (``ProviderResult.refused`` is False,
  ``retry_after`` carries the provider's wait). ``judge_answer`` decides it, for every caller
  that judges a provider's answer (checks here, block detection from live traffic);
- ``tls_error``: the TLS handshake failed (an alert, or the certificate did not verify);
- ``reset``: the connection was reset (at connect, in the handshake or before the answer);
- ``closed``: the provider closed the connection before answering;
- ``connect_refused`` / ``connect_timeout`` / ``connect_failed``: no TCP connection;
- ``no_response``: connected, but no response head within the timeout;
- ``egress_ip_mismatch`` / ``egress_ip_unverified``: not a provider's answer but the member's
  egress-IP attestation (pseudo-provider ``egress-ip``), which a verified switch needs too;
- ``dns_error``, ``address_prohibited`` (the address guard), ``source_unavailable`` (the
  member's bind address is not on this host), ``upstream_refused`` (the chained proxy
  refused the CONNECT), ``bad_response``, ``error``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from ..model import HostPort
from ..policy.protect import retry_after_seconds
from .plan import EgressPlan, ProfilePool

MAX_BODY = 64 * 1024  # the part of a provider's body the body rules read


def parse_headers(text: str) -> tuple[tuple[str, str], ...]:
    """"Name: value" lines (blank lines and ``#`` comments skipped); raises ValueError naming
    the line number of one that is not a header (never its value: it may be a key)."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition(":")
        name = name.strip()
        if not sep or not name or not all(c.isalnum() or c in "-_" for c in name) or "\r" in value or "\n" in value:
            raise ValueError(f"line {n}: expected 'Name: value'")
        if name.lower() in ("host", "connection", "content-length", "transfer-encoding"):
            raise ValueError(f"line {n}: {name} is set by the check itself")
        out.append((name, value.strip()))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class BodyRules:
    """What a provider's body must not (``refuse``) or must (``expect``) contain, as regexes over
    its first ``MAX_BODY`` bytes: a ``200`` block page or CAPTCHA is a refusal. ``judge`` is
    shared by every judge of a provider's answer."""

    refuse: tuple[re.Pattern, ...]
    expect: re.Pattern | None

    @classmethod
    def compile(cls, refuse, expect: str | None) -> BodyRules | None:
        if not refuse and not expect:
            return None
        return cls(tuple(re.compile(p) for p in refuse or ()), re.compile(expect) if expect else None)

    def judge(self, body: bytes) -> str | None:
        """None: the body is fine; else why it is a refusal (outcome ``body_refused``)."""
        text = body[:MAX_BODY].decode("utf-8", "replace")
        for pattern in self.refuse:
            m = pattern.search(text)
            if m:
                return f"the body matches refuse_body {pattern.pattern!r} ({m.group(0)[:80]!r})"
        if self.expect is not None and not self.expect.search(text):
            return f"the body does not match expect_body {self.expect.pattern!r}"
        return None


@dataclass(frozen=True, slots=True)
class ProviderSpec:
    """One provider of one profile, compiled from ``ProviderConfig``."""

    name: str
    url: str
    dest: HostPort
    tls: bool
    path: str
    method: str
    accept: tuple[tuple[int, int], ...] | None  # None: a verified TLS handshake is enough
    timeout: float
    interval: float
    required: bool
    headers: tuple[tuple[str, str], ...] = ()  # extra request headers (headers_file / headers_env)
    body: BodyRules | None = None  # refuse_body / expect_body

    @classmethod
    def compile(cls, spec: object, default_timeout: float, default_interval: float,
                headers: str | None = None) -> ProviderSpec:
        """``headers``: the text of ``headers_file`` / ``headers_env`` ("Name: value" lines)."""
        parts = urlsplit(spec.url)
        tls = parts.scheme == "https"
        dest = HostPort(parts.hostname, parts.port or (443 if tls else 80))
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        accept = None if spec.accept == "tls" else tuple((lo, hi) for lo, hi in spec.accept)
        body = BodyRules.compile(getattr(spec, "refuse_body", ()), getattr(spec, "expect_body", None))
        return cls(spec.name, spec.url, dest, tls, path, spec.method, accept, spec.timeout or default_timeout,
                   spec.interval or default_interval, spec.required, parse_headers(headers or ""), body)

    @property
    def host_header(self) -> str:
        """``Host`` as a client would send it: the port only when it is not the scheme's default."""
        if self.dest.port != (443 if self.tls else 80):
            return str(self.dest)
        return f"[{self.dest.host}]" if ":" in self.dest.host else self.dest.host

    def accepts(self, status: int) -> bool:
        return self.accept is not None and any(lo <= status <= hi for lo, hi in self.accept)

    @property
    def expects(self) -> str:
        if self.accept is None:
            return "TLS handshake"
        return ", ".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in self.accept)


@dataclass(frozen=True, slots=True)
class ProviderResult:
    """One check of one member against one provider, with its evidence."""

    profile: str
    member: str
    provider: str
    outcome: str  # see the module docstring
    detail: str  # the evidence in words: the status line, the TLS error, ...
    at: float  # wall-clock time of the check
    status: int | None = None  # the HTTP status, when the provider answered
    egress_addr: str | None = None  # the local address the check left from (bind / direct)
    remote_addr: str | None = None  # the provider address connected to (or the chained proxy)
    duration_ms: float = 0.0
    retry_after: float | None = None  # throttled: the seconds the provider asked to wait (Retry-After)

    @property
    def ok(self) -> bool:
        return self.outcome == "accepted"

    @property
    def refused(self) -> bool:
        """Failed, and not merely throttled (a rate limit says nothing about the member)."""
        return not self.ok and self.outcome != "throttled"

    def view(self) -> dict:
        return {"member": self.member, "provider": self.provider, "ok": self.ok, "outcome": self.outcome,
                "detail": self.detail, "status": self.status, "egress_addr": self.egress_addr,
                "remote_addr": self.remote_addr, "at": self.at, "duration_ms": self.duration_ms,
                **({"retry_after": self.retry_after} if self.retry_after is not None else {})}


MAX_RETRY_AFTER = 86400.0  # a Retry-After beyond a day is read as a day


def header(head: bytes, name: bytes) -> str | None:
    """The first value of header ``name`` (lower case) in a response ``head``, stripped."""
    for line in head.split(b"\r\n")[1:]:
        key, sep, value = line.partition(b":")
        if sep and key.strip().lower() == name:
            return value.strip().decode("latin-1")
    return None


def parse_retry_after(value: str | None, now: float) -> float | None:
    """``Retry-After`` as seconds from ``now`` (``policy.protect.retry_after_seconds``: delta-seconds
    or an HTTP-date; None if absent, unreadable or past), at most ``MAX_RETRY_AFTER``."""
    seconds = retry_after_seconds(value.encode("latin-1"), now) if value is not None else None
    return min(seconds, MAX_RETRY_AFTER) if seconds is not None else None


def judge_answer(status: int, head: bytes, accepts, expects: str, now: float) -> tuple[str, str, float | None]:
    """(outcome, detail, retry_after) of a provider's answer ``head`` with ``status``:
    ``accepted`` when ``accepts(status)``; ``throttled`` for 429, or 503 with a Retry-After;
    else ``http_status``. Pure, shared by every judge of a provider's answer."""
    line = head.split(b"\r\n", 1)[0][:200].decode("latin-1")
    if accepts(status):
        return "accepted", line, None
    raw = header(head, b"retry-after")
    wait = parse_retry_after(raw, now)
    if status == 429 or (status == 503 and raw is not None):
        return "throttled", line + (f" (retry after {wait:g}s)" if wait is not None else ""), wait
    return "http_status", f"{line} (accepted: {expects})", None


ATTESTATION = "egress-ip"  # the pseudo-provider a verified switch's attestation failures are reported as


def attestation_failures(pool: ProfilePool, members: list[EgressPlan], now: float) -> list[ProviderResult]:
    """``members`` of ``pool`` that its egress-IP attestation does not (yet) let carry traffic,
    as results of the pseudo-provider ``egress-ip``: ``egress_ip_mismatch`` (the echo service saw
    another IP) or ``egress_ip_unverified`` (no answer, or not checked). Empty without ``attest``."""
    if not pool.attest:
        return []
    out = []
    expected = ", ".join(pool.expect_ip)
    for m in members:
        if pool.verified(m):
            continue
        check = pool.checks.get(m)
        if check is not None and check.error is None:
            out.append(ProviderResult(pool.name, m.label, ATTESTATION, "egress_ip_mismatch",
                                      f"egress IP {check.observed} is not one of [{expected}]", check.at))
        else:
            why = check.error if check is not None else "not checked yet"
            out.append(ProviderResult(pool.name, m.label, ATTESTATION, "egress_ip_unverified",
                                      f"egress IP not verified against [{expected}]: {why}",
                                      check.at if check is not None else now))
    return out


@dataclass(slots=True)
class PendingSwitch:
    """A ``switch: verified`` reload whose new members did not (yet) pass every provider (and,
    with ``expect_ip``, the egress-IP attestation): the
    profile keeps ``old`` members; ``candidate`` takes over once all its checks pass."""

    profile: str
    candidate: ProfilePool
    failures: list[ProviderResult]
    since: float

    def view(self) -> dict:
        return {"new_members": [m.label for m in self.candidate.members],
                "since": self.since, "refused_by": [f.view() for f in self.failures]}

    def describe(self) -> str:
        return "; ".join(f"provider {f.provider} refused {f.member}: {f.outcome}: {f.detail}" for f in self.failures)


@dataclass(slots=True)
class ProviderBoard:
    """One runtime's provider specs (by profile) and the latest result of each check."""

    specs: dict[str, tuple[ProviderSpec, ...]] = field(default_factory=dict)
    switch: dict[str, str] = field(default_factory=dict)  # profile -> "immediate" | "verified" | "auto"
    results: dict[tuple[str, str, str], ProviderResult] = field(default_factory=dict)
    pending: dict[str, PendingSwitch] = field(default_factory=dict)
    # consecutive refusals per (profile, member, provider): 0 after an accept, unchanged when throttled
    streaks: dict[tuple[str, str, str], int] = field(default_factory=dict)
    failover_after: dict[str, int] = field(default_factory=dict)  # switch: auto profile -> rounds

    @property
    def configured(self) -> bool:
        return any(self.specs.values())

    def record(self, result: ProviderResult) -> None:
        key = (result.profile, result.member, result.provider)
        self.results[key] = result
        if result.ok:
            self.streaks[key] = 0
        elif result.refused:
            self.streaks[key] = self.streaks.get(key, 0) + 1

    def adopt(self, previous: ProviderBoard, pools: dict[str, ProfilePool]) -> None:
        """After a reload: keep results of checks that did not change (same member, still in
        ``pools``, same spec). Results of members gone are dropped: the table stays bounded."""
        members = {(name, m.label) for name, pool in pools.items() for m in pool.everyone}
        for (profile, member, provider), result in previous.results.items():
            if (profile, member) not in members:
                continue
            old = {s.name: s for s in previous.specs.get(profile, ())}.get(provider)
            new = {s.name: s for s in self.specs.get(profile, ())}.get(provider)
            if old is not None and old == new:
                self.results[(profile, member, provider)] = result
                self.streaks[(profile, member, provider)] = previous.streaks.get((profile, member, provider), 0)

    def result(self, profile: str, member: str, provider: str) -> ProviderResult | None:
        return self.results.get((profile, member, provider))

    def matrix(self, pool: ProfilePool) -> list[dict]:
        """One row per (member x provider) of ``pool`` as it serves now, standby members after
        the active ones (``role``); unchecked ones say so."""
        rows = []
        for plan in pool.everyone:
            role = pool.role(plan)
            for spec in self.specs.get(pool.name, ()):
                r = self.result(pool.name, plan.label, spec.name)
                row = r.view() if r is not None else {"member": plan.label, "provider": spec.name,
                                                      "ok": None, "outcome": "unchecked", "detail": ""}
                rows.append({**row, "role": role})
        return rows

    def due(self, pool: ProfilePool, now: float) -> list[tuple[EgressPlan, ProviderSpec]]:
        """The checks of ``pool`` (active and standby members) never made, or older than their
        provider's interval."""
        out = []
        for plan in pool.everyone:
            for spec in self.specs.get(pool.name, ()):
                r = self.result(pool.name, plan.label, spec.name)
                if r is None or now - r.at >= spec.interval:
                    out.append((plan, spec))
        return out

    def failing_required(self, pool: ProfilePool) -> list[ProviderResult]:
        """The last checks that failed, of providers marked ``required``, through members in use."""
        out = []
        for spec in self.specs.get(pool.name, ()):
            if not spec.required:
                continue
            for plan in pool.members:
                r = self.result(pool.name, plan.label, spec.name)
                if r is not None and not r.ok:
                    out.append(r)
        return out

    def next_due(self, profiles: dict[str, ProfilePool], now: float) -> float | None:
        """Seconds until the next check falls due (None: no provider configured)."""
        waits = []
        for pool in profiles.values():
            for plan in pool.everyone:
                for spec in self.specs.get(pool.name, ()):
                    r = self.result(pool.name, plan.label, spec.name)
                    waits.append(0.0 if r is None else max(0.0, r.at + spec.interval - now))
        for pending in self.pending.values():
            waits += [s.interval for s in self.specs.get(pending.profile, ())]
        return min(waits) if waits else None


def compile_board(egress: dict, default_timeout: float, default_interval: float,
                  headers=lambda provider: None) -> ProviderBoard:
    """``egress``: the config's profiles (name -> ``ProfileConfig``); ``headers(provider)``: the
    text of its ``headers_file`` / ``headers_env`` (read by the caller)."""
    return ProviderBoard(
        specs={name: tuple(ProviderSpec.compile(p, default_timeout, default_interval, headers(p))
                           for p in spec.providers)
               for name, spec in egress.items() if spec.providers},
        switch={name: spec.switch for name, spec in egress.items()},
        failover_after={name: spec.failover_rounds for name, spec in egress.items() if spec.switch == "auto"},
    )


def new_members(old: ProfilePool | None, new: ProfilePool) -> list[EgressPlan]:
    """The members of ``new`` that ``old`` did not have (all of them when there was no ``old``)."""
    if old is None:
        return list(new.members)
    return [m for m in new.members if m not in old.members]


def added_anywhere(old: ProfilePool | None, new: ProfilePool) -> list[EgressPlan]:
    """The members of ``new``, active or standby, that ``old`` had in neither role (``verify --since``)."""
    if old is None:
        return list(new.everyone)
    return [m for m in new.everyone if m not in old.everyone]


def format_matrix(results: list[ProviderResult], roles: dict[tuple[str, str], str] | None = None) -> str:
    """``egressgate verify``: one line per (profile, member, provider); a standby member (by
    ``roles``) is marked so."""
    rows = [("PROFILE", "MEMBER", "PROVIDER", "EGRESS", "RESULT")]
    for r in results:
        verdict = "OK" if r.ok else "FAIL"
        member = r.member + (" (standby)" if roles and roles.get((r.profile, r.member)) == "standby" else "")
        rows.append((r.profile, member, r.provider, r.egress_addr or "-", f"{verdict} {r.outcome}: {r.detail}"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=True)) + "  " + row[4]
                     for row in rows)


def refused_members(board: ProviderBoard, pool: ProfilePool) -> frozenset[EgressPlan]:
    """The members of ``pool`` whose last check of a ``required`` provider refused them
    (``throttled`` is no verdict): the profile steers new connections away from them."""
    required = [s.name for s in board.specs.get(pool.name, ()) if s.required]
    if not required:
        return frozenset()
    return frozenset(m for m in pool.members
                     if any((r := board.result(pool.name, m.label, name)) is not None and r.refused for name in required))


def not_ready(board: ProviderBoard, pool: ProfilePool) -> list[str]:
    """The profile's problems with ``required`` providers: a member in use whose last check of
    a required provider refused it, or that was not checked yet. Shown per profile in
    ``/readyz``; never the instance's readiness (every replica shares the egress IPs: a
    provider's block is shared, and evicting instances would only add an outage)."""
    problems = []
    for spec in board.specs.get(pool.name, ()):
        if not spec.required:
            continue
        for plan in pool.members:
            r = board.result(pool.name, plan.label, spec.name)
            if r is None:
                problems.append(f"profile {pool.name}: provider {spec.name} not checked yet through {plan.label}")
            elif r.refused:  # (throttled is no verdict: it never counts as a refusal)
                problems.append(f"profile {pool.name}: provider {spec.name} refuses {plan.label}: "
                                f"{r.outcome}: {r.detail}")
    return problems


def profile_view(board: ProviderBoard, pool: ProfilePool) -> dict | None:
    """What ``/status`` and ``whoami`` show of a profile's providers (None: it names none)."""
    specs = board.specs.get(pool.name, ())
    if not specs:
        return None
    pending = board.pending.get(pool.name)
    return {"switch": board.switch.get(pool.name, "immediate"),
            "providers": [{"name": s.name, "url": s.url, "accept": s.expects, "required": s.required,
                           "interval": s.interval} for s in specs],
            "checks": board.matrix(pool),
            "pending_switch": pending.view() if pending is not None else None}
