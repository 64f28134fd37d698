"""``http://egressgate.whoami/``: a job's pre-flight. The gateway answers it itself with what it
knows about the asking client: its name and address, the profile it would leave through and
that profile's egress (members, expected and observed IP, whether it serves traffic), and the
client's destination rules. Nothing is sent anywhere.
"""

from __future__ import annotations

import json

from ..egress.plan import ProfilePool
from ..http1.responses import simple_response
from ..policy.clients import Identity
from ..policy.decide import choose_profile
from .runtime import Runtime


def document(identity: Identity, peer: str, rt: Runtime, listener_default: str) -> dict:
    client = identity.client
    name = choose_profile(client, identity.requested_profile, listener_default)
    pool = rt.profiles.get(name) if name else None
    subject = identity.subject
    return {
        "client": identity.name, "client_addr": peer, "profile": name,
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
        "allow": list(client.allow_patterns) if client.allow_patterns is not None else None,
        "deny": list(client.deny_patterns),
    }


def response(doc: dict, keep_alive: bool) -> bytes:
    return simple_response(200, json.dumps(doc, indent=1).encode() + b"\n", keep_alive=keep_alive)


def describe(pool: ProfilePool) -> dict:
    if pool.kind == "bind":
        return {"kind": "bind", "sources": [m.source for m in pool.members]}
    if pool.kind == "upstream":
        return {"kind": "upstream", "proxies": [str(m.upstream) for m in pool.members]}
    return {"kind": "direct"}
