"""``http://egressgate.whoami/``: a job's pre-flight. The gateway answers it itself with what it
knows about the asking client: its name and address, the profile it would leave through and
that profile's egress (members, expected and observed IP, whether it serves traffic), and the
client's destination rules, and (``egress_blocks``) the members a watched provider does not treat
as healthy (block-aware egress). Nothing is sent anywhere.

``http://egressgate.whoami/receipt[?since=T]``: the job's receipt -- what this very client (its
pod, for a token client) did through the gateway, signed (``observe.receipt``). The answering
worker gathers every worker's tallies (``Receipts``, provided by the app), so it awaits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import parse_qs

from ..egress.plan import ProfilePool
from ..egress.providers import profile_view
from ..http1.responses import simple_response
from ..model import parse_moment, with_iso
from ..policy.clients import Identity
from ..policy.decide import choose_profile, decide
from .blocks import BlockDesk
from .protect import SharedIpGuard
from .runtime import Runtime


def document(identity: Identity, peer: str, rt: Runtime, listener_default: str,
             protect: SharedIpGuard | None = None, requested: str | None = None,
             blocks: BlockDesk | None = None) -> dict:
    """``requested``: the profile the request asked for (``user+profile`` or the
    ``X-Egressgate-Profile`` header), as the job's own requests would."""
    client = identity.client
    name = choose_profile(client, requested, listener_default)
    pool = rt.profiles.get(name) if name else None
    subject = identity.subject
    return {
        "client": identity.name, "client_addr": peer, "profile": name,
        "pod": subject.pod if subject else None,  # as the access log's ``pod``
        **({"kubernetes": {"entry": client.name, "namespace": subject.namespace,
                           "service_account": subject.service_account, "pod": subject.pod,
                           "issuer": subject.issuer, "expires": int(subject.expires)}} if subject else {}),
        "profiles": list(client.profiles or (listener_default,)),
        "egress": describe(pool) if pool else None,
        "expect_ip": list(pool.expect_ip) if pool else [],
        "observed_ip": pool.observed_ip if pool else None,
        "ip_matches": pool.ip_matches if pool else None,
        "serving": pool.healthy if pool else None,
        "refusal": (pool.refusal() or (None, None))[1] if pool else None,
        "providers": _providers(identity, rt, name, listener_default, pool) if pool else None,
        "allow": list(client.allow_patterns) if client.allow_patterns is not None else None,
        "deny": list(client.deny_patterns),
        # shared-IP protection of the profile: its rules, what is in flight per member, the holds
        "protect": protect.view(rt.protect.get(name), name, [m.label for m in pool.everyone])
        if protect is not None and pool is not None else None,
        # block-aware egress: the profile's (member x provider) pairs that are not healthy, with
        # their evidence (empty: none; None: no provider of the profile names match)
        "egress_blocks": blocks.not_healthy(name, [m.label for m in pool.members])
        if blocks is not None and pool is not None and blocks.watched(name) else None,
    }


def _providers(identity: Identity, rt: Runtime, profile: str, listener_default: str, pool: ProfilePool) -> dict | None:
    """The profile's provider checks, each provider with whether this client's destination
    rules let it reach the provider's host at all (``allowed``, and the reason if not)."""
    view = profile_view(rt.providers, pool)
    if view is None:
        return None
    specs = {s.name: s for s in rt.providers.specs.get(pool.name, ())}
    for entry in view["providers"]:
        spec = specs[entry["name"]]
        d = decide(identity.client, spec.dest, spec.tls, profile, listener_default, rt.connect_ports)
        entry["allowed"] = d.allow
        entry["denied_because"] = None if d.allow else f"{d.reason} ({d.rule})"
    return view


def response(doc: dict, keep_alive: bool) -> bytes:
    return simple_response(200, json.dumps(with_iso(doc), indent=1).encode() + b"\n", keep_alive=keep_alive)


def describe(pool: ProfilePool) -> dict:
    if pool.kind == "bind":
        return {"kind": "bind", "sources": [m.source for m in pool.members],
                "standby": [m.source for m in pool.standby], "carrying": [m.label for m in pool.carrying()]}
    if pool.kind == "upstream":
        return {"kind": "upstream", "proxies": [str(m.upstream) for m in pool.members],
                "standby": [str(m.upstream) for m in pool.standby], "carrying": [m.label for m in pool.carrying()]}
    return {"kind": "direct"}


RECEIPT_PATH = b"/receipt"


@dataclass(frozen=True, slots=True)
class ReceiptQuery:
    """Whose receipt: ``client`` (None: any), ``pod`` (None: any; "" only records without one),
    from ``since`` (Unix seconds, None: since the identity was first seen)."""

    client: str | None
    pod: str | None
    since: float | None = None
    asked_by: str = "job"  # "job" (egressgate.whoami/receipt) or "admin"


class Receipts(Protocol):
    """What the gateway answers receipts with (``receiptdesk.ReceiptDesk``)."""

    async def issue(self, query: ReceiptQuery) -> dict: ...


def receipt_query(identity: Identity, origin_form: bytes) -> ReceiptQuery | None:
    """The job's own receipt query for ``/receipt[?since=T][&pods=all]``, None for any other
    path; raises ValueError for a bad ``since``. A token client's receipt is its own pod's;
    ``pods=all``: every pod of its service account (an exit handler runs in a pod of its own)."""
    path, _, query = origin_form.partition(b"?")
    if path.rstrip(b"/") != RECEIPT_PATH:
        return None
    q = parse_qs(query.decode("latin-1"))
    since = q.get("since", [None])[0]
    pod = identity.subject.pod if identity.subject is not None and identity.subject.pod else ""
    if q.get("pods", [""])[0] == "all":
        pod = None
    return ReceiptQuery(identity.name, pod, parse_moment(since) if since is not None else None)


def receipt_response(doc: dict, keep_alive: bool, status: int = 200) -> bytes:
    """A signed receipt as it was signed (no fields added: ``with_iso`` would break the signature)."""
    return simple_response(status, json.dumps(doc, indent=1, ensure_ascii=False).encode() + b"\n",
                           keep_alive=keep_alive)
