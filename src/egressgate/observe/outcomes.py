"""``Outcomes``: how every request and tunnel ends up accounted for, in one place.

A finished request or tunnel is one access-log record and its metrics (``finished``); a
refusal or failure is also counted by reason (a denial also per configured client), and a
denial remembered among the recent ones the admin status shows (``refused``); a report-mode
denial let through is counted per client (``would_deny``). The access log is swapped on reload (``access_log``).
Each finished record is also counted for its client's job receipt (``tallies``, when receipts are on),
and one to a provider's watched destination tells its watch how it ended (``AccessRecord.watch``).
"""

from __future__ import annotations

import time
from collections import deque

from ..errors import AuthRequired, GatewayError
from ..model import AccessRecord, shown_target
from .accesslog import AccessLog
from .metrics import Metrics
from .tally import Tallies

RECENT_DENIALS = 50
DENIAL_STATUSES = (403, 407, 429)


class Outcomes:
    def __init__(self, metrics: Metrics, access_log: AccessLog) -> None:
        self.metrics = metrics
        self.access_log = access_log
        self.recent_denials: deque[dict] = deque(maxlen=RECENT_DENIALS)
        self.tallies: Tallies | None = None  # job receipts (observe.tally), when receipts are on

    def finished(self, rec: AccessRecord, status: int) -> None:
        rec.status = status
        if rec.watch is not None:  # a provider's destination: its signal, before the record is written
            rec.watch.finished(rec, status)
        if rec.protect is not None:  # (a shared-IP admission: released once, here, however it ended)
            rec.protect.release()
        m = self.metrics
        m.count_request(rec.client, rec.profile, rec.method, status)
        m.count_bytes(rec.profile, rec.bytes_up, rec.bytes_down)
        if self.tallies is not None:
            self.tallies.note(rec)
        self.access_log.write(rec)

    def refused(self, rec: AccessRecord, err: GatewayError) -> None:
        """Count a refusal or failure by its reason (its record follows via ``finished``)."""
        rec.reason = err.reason
        if err.status in DENIAL_STATUSES:
            if isinstance(err, AuthRequired) and err.user is not None:
                rec.user = err.user  # who a 407 was for (the answer itself does not say why)
            if isinstance(err, AuthRequired) and err.claimed:  # a refused token's job, as it claims
                rec.extra = {**(rec.extra or {}), "client_claimed": err.claimed, "claims_verified": False}
            self.metrics.denied.labels(err.reason).inc()
            self.metrics.denied_by_client.labels(rec.client, err.reason).inc()
            self.recent_denials.append({"ts": time.strftime("%H:%M:%S"), "client": rec.client,
                                        "target": shown_target(rec.target)[:200], "reason": err.reason})
        elif err.status >= 500:
            self.metrics.upstream_errors.labels(err.reason).inc()

    def would_deny(self, rec: AccessRecord, client: str, reason: str) -> None:
        rec.extra = {**(rec.extra or {}), "would_deny": reason}
        self.metrics.would_deny.labels(client, reason).inc()
