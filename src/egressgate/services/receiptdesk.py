"""Job receipts for a running gateway: the signing key, this worker's tallies, and a receipt made
from every worker's.

The key: ``receipts.key_file`` (an Ed25519 private key in PEM; read at start and again at each
reload, so a new key takes effect with a reload), else one generated at start. With several
workers, worker 0 generates it before it starts the others and leaves it (mode 0600) in the
workers' private socket directory (itself mode 0700, removed when the gateway stops), where
every worker -- a restarted one too -- reads it: one key per running gateway. /status shows its
public key; a generated key lasts as long as the gateway runs, so keep the public key from
/status with the receipts it signed, or configure ``key_file``.

Several workers: each keeps its own tallies (``observe.tally``: O(1) per finished record on the
path every record already takes, nothing shared, nothing sent between processes while traffic
flows). The worker that answers a receipt -- the one the job's ``egressgate.whoami/receipt``
request reached, or worker 0 for the admin ``/receipt`` -- asks every other worker for its
tallies of that identity over their private admin sockets (the Unix sockets /metrics merging
uses; worker 0 has one too when there are several workers), adds them up and signs. A receipt
costs one local round trip per worker, only when one is asked for; a worker that does not answer
within ``WORKER_TIMEOUT`` is named in ``covers.workers_unanswered``.

Several instances: there is no fleet store for tallies, so a receipt covers this instance only
and says so (``covers.scope``: ``instance``).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections.abc import Callable
from urllib.parse import urlencode

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .. import __version__
from ..admin.server import TALLIES_PATH, worker_get
from ..config.schema import ReceiptsConfig
from ..errors import ConfigError, GatewayError
from ..model import HostPort
from ..observe import receipt as signing
from ..observe.tally import Tallies, merge
from ..proxy.runtime import Runtime
from ..proxy.whoami import ReceiptQuery

KEY_NAME = "receipt-key.pem"  # the generated key, in the workers' private socket directory
WORKER_TIMEOUT = 2.0


def shared_key_path(sockdir: str) -> str:
    return os.path.join(sockdir, KEY_NAME)


def write_shared_key(sockdir: str) -> None:
    """Worker 0, before it starts the other workers: a fresh key they all read (mode 0600)."""
    pem = signing.private_to_pem(Ed25519PrivateKey.generate())
    fd = os.open(shared_key_path(sockdir), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, pem)
    finally:
        os.close(fd)


class ReceiptDesk:
    """``peers()``: (index, private socket path) of every other worker of this gateway;
    ``runtime()``: the runtime in force (provider names, config hash)."""

    def __init__(self, cfg: ReceiptsConfig, source: str, worker: int, sockdir: str | None,
                 peers: Callable[[], list[tuple[int, str]]], runtime: Callable[[], Runtime],
                 clock: Callable[[], float] = time.time) -> None:
        self.worker = worker
        self.sockdir = sockdir
        self.peers = peers
        self.runtime = runtime
        self.clock = clock
        self.tallies = Tallies(cfg.max_identities, cfg.max_hosts, cfg.idle_expiry, cfg.resolution, clock)
        self._generated: Ed25519PrivateKey | None = None
        self.key, self.key_source = self.prepare(cfg, source)

    # --- the key (start and reload) ---------------------------------------------------------
    def prepare(self, cfg: ReceiptsConfig, source: str) -> tuple[Ed25519PrivateKey, str]:
        """The key ``cfg`` names (or the generated one) and where it comes from; ConfigError
        when ``key_file`` cannot be used. Changes nothing (a reload commits it with ``commit``)."""
        if cfg.key_file:
            try:
                with open(cfg.key_file, "rb") as f:
                    return signing.private_from_pem(f.read()), f"key_file {cfg.key_file}"
            except OSError as exc:
                raise ConfigError([f"{source}:0: receipts.key_file: cannot read {cfg.key_file}: "
                                   f"{exc.strerror or exc}"]) from None
            except ValueError as exc:
                raise ConfigError([f"{source}:0: receipts.key_file: {cfg.key_file}: {exc}"]) from None
        return self._generated_key(source), "generated at start (lasts while this gateway runs)"

    def _generated_key(self, source: str) -> Ed25519PrivateKey:
        if self._generated is None:
            if self.sockdir is not None:  # several workers: the one worker 0 left for all of them
                try:
                    with open(shared_key_path(self.sockdir), "rb") as f:
                        self._generated = signing.private_from_pem(f.read())
                except (OSError, ValueError) as exc:
                    raise ConfigError([f"{source}:0: receipts: the gateway's generated receipt key is "
                                       f"unreadable: {exc}"]) from None
            else:
                self._generated = Ed25519PrivateKey.generate()
        return self._generated

    def commit(self, cfg: ReceiptsConfig, prepared: tuple[Ed25519PrivateKey, str]) -> None:
        self.key, self.key_source = prepared
        self.tallies.configure(cfg.max_identities, cfg.max_hosts, cfg.idle_expiry, cfg.resolution)

    def describe(self) -> dict:
        public = self.key.public_key()
        return {"enabled": True, "public_key": signing.public_text(public), "key_id": signing.key_id(public),
                "key_source": self.key_source, "algorithm": signing.ALGORITHM,
                "identities": len(self.tallies.ids), "expired": self.tallies.expired,
                "evicted": self.tallies.evicted}

    # --- receipts -----------------------------------------------------------------------------
    def local(self, query: ReceiptQuery) -> dict:
        """This worker's tallies for ``query``."""
        return self.tallies.export(query.client, query.pod, query.since)

    async def issue(self, query: ReceiptQuery) -> dict:
        """The signed receipt: this worker's tallies and every other worker's, added up."""
        exports = [self.local(query)]
        answered, unanswered = [self.worker], []
        peers = self.peers()
        if peers:
            params = {k: v for k, v in (("client", query.client), ("pod", query.pod),
                                         ("since", query.since)) if v is not None}
            target = f"{TALLIES_PATH}?{urlencode(params)}"
            for index, _, body in await asyncio.gather(*(worker_get(i, path, target, WORKER_TIMEOUT)
                                                         for i, path in peers)):
                doc = _parse(body)
                if doc is None:
                    unanswered.append(index)
                else:
                    answered.append(index)
                    exports.append(doc)
        rt = self.runtime()
        subject = {"client": query.client, "pod": query.pod or None, "asked_by": query.asked_by}
        covers = {"scope": "instance", "instance": socket.gethostname(), "note": signing.SCOPE_INSTANCE,
                  "workers": sorted(answered), "workers_unanswered": sorted(unanswered)}
        gateway = {"version": __version__, "config_hash": rt.config_hash[:12]}
        doc = signing.build(merge(exports), subject, self.clock(), query.since, covers, gateway,
                            lambda profile, dest: provider_of(rt, profile, dest))
        return signing.sign(doc, self.key)


def provider_of(rt: Runtime, profile: str, destination: str) -> str | None:
    """The provider of ``profile`` whose URL names ``destination`` (``host:port``, or a host
    alone for port 80), if any."""
    specs = rt.providers.specs.get(profile, ())
    if not specs:
        return None
    try:
        dest = HostPort.parse_authority(destination, 80)
    except GatewayError:
        return None
    return next((s.name for s in specs if s.dest == dest), None)


def _parse(body: str | None) -> dict | None:
    if body is None:
        return None
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) and "destinations" in doc else None
