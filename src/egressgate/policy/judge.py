"""``judge``: which of a destination's resolved addresses may this client be connected to?

Pure, like ``decide``, and its second half: ``decide`` looks at what the client asked for,
``judge`` at the addresses the name resolved to (or the IP literal). Two checks, each with
its own reason:

- the address guard (private, loopback, link-local, metadata, ... and this gateway's own
  listeners): a safety check, ``destination_ip_prohibited``, never relaxed by report mode;
- the client's own IP deny rules: policy, ``destination_denied``; in report mode the
  request goes on and the judgement says what would have been denied.

The proxy dials exactly ``Judgement.usable``; ``egressgate explain`` prints ``verdicts``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import AddressProhibited, GatewayError, PolicyDenied
from ..model import HostPort
from .clients import ClientPolicy
from .guard import AddressGuard, OwnListeners

OWN_LISTENER = "this gateway's own listener"


@dataclass(frozen=True, slots=True)
class Verdict:
    """One resolved address: refused by the guard (``refused``, the address class), denied by
    one of the client's rules (``denied_by``), or usable (both None)."""

    address: str
    refused: str | None = None
    denied_by: str | None = None

    @property
    def label(self) -> str:
        if self.refused:
            return f"refused: {self.refused.replace('_', ' ')}"
        return f"denied by rule {self.denied_by}" if self.denied_by else "allowed"


@dataclass(frozen=True, slots=True)
class Judgement:
    verdicts: tuple[Verdict, ...]
    usable: tuple[str, ...]  # the addresses to dial, in resolver order (empty when refused)
    refusal: GatewayError | None = None  # the typed refusal when no address may be used
    would_deny: str | None = None  # report mode: the reason a rule would have refused it


def judge(dest: HostPort, addresses: list[str] | tuple[str, ...], client: ClientPolicy, guard: AddressGuard,
          own: OwnListeners) -> Judgement:
    verdicts = []
    safe = []
    for a in addresses:
        why = guard.check(a) or (OWN_LISTENER if own.contains(a, dest.port) else None)
        if why is None:
            safe.append(a)
        verdicts.append(Verdict(a, why))
    if not safe:
        first = next((v for v in verdicts if v.refused), None)
        what = first.refused.replace("_", " ") if first else "no"
        where = dest.host if dest.is_ip or first is None else f"{dest.host} resolves to {first.address}"
        return Judgement(tuple(verdicts), (), AddressProhibited(f"{where}: {what} address"))
    deny = client.deny
    if deny is None or deny.empty:
        return Judgement(tuple(verdicts), tuple(safe))
    rules = {a: deny.match_ip(a, dest.port) for a in safe}
    verdicts = [Verdict(v.address, v.refused, rules.get(v.address)) for v in verdicts]
    kept = tuple(a for a in safe if rules[a] is None)
    if kept:
        return Judgement(tuple(verdicts), kept)
    if client.report_only:  # every safe address is denied by a rule: logged, let through
        return Judgement(tuple(verdicts), tuple(safe), would_deny="destination_denied")
    detail = f"destination_denied: {dest.host} resolves to {safe[0]} ({rules[safe[0]]})"
    return Judgement(tuple(verdicts), (), PolicyDenied(detail, reason="destination_denied"))
