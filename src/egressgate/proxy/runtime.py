"""``Runtime``: one configuration compiled for use. Built by ``app``; swapped whole on reload.
A request takes the runtime in force when it starts and keeps it to the end, so a reload
never changes a request or tunnel already under way."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config.schema import Config, LimitsConfig, ListenConfig, TimeoutsConfig
from ..egress.blockwatch import BlockRules
from ..egress.plan import ProfilePool
from ..egress.providers import ProviderBoard
from ..http1.rewrite import Forwarding
from ..policy.clients import ClientRegistry
from ..policy.guard import AddressGuard, NameGuard
from ..policy.protect import ProfileProtect


@dataclass(frozen=True, slots=True, eq=False)
class Runtime:
    config: Config
    config_hash: str
    loaded_at: float
    source: str  # file path, or "(embedded default)"
    clients: ClientRegistry
    guard: AddressGuard
    profiles: dict[str, ProfilePool]
    connect_ports: frozenset[int]  # HTTP CONNECT (security.connect_ports)
    timeouts: TimeoutsConfig
    limits: LimitsConfig
    listeners: dict[str, ListenConfig]
    proxy_protocol: dict[str, tuple]  # listener name -> trusted load-balancer networks, if PROXY is on
    forwarding: Forwarding  # Via and client-address fields of forwarded requests
    # profile -> its shared-IP protection rules; only profiles that have some (policy.protect)
    protect: dict[str, ProfileProtect] = field(default_factory=dict)
    providers: ProviderBoard = field(default_factory=ProviderBoard)  # provider checks and their results
    socks_ports: frozenset[int] = frozenset({80, 443, 8080})  # SOCKS5 CONNECT (security.socks_ports)
    names: NameGuard = field(default_factory=NameGuard)  # internal names, refused before they leave
    blocks: BlockRules | None = None  # providers' destinations watched for blocks (None: none has match)
