"""``egressgate replay --config CANDIDATE.yaml [--log FILE ...] [--since T] [--json]``: what a
candidate config would change for the traffic in the access logs (``egressgate.commands.replay_core``).

Exit 0 when no traffic allowed today would be refused (newly denied or newly limited by
``protect``), 1 when some would, 2 for a usage or config error -- so it can gate a config pull
request in CI next to ``check-config``. With no ``--log``, the candidate's own ``log.access`` file
and its rotated siblings (``FILE.1``, ``FILE.2.gz``, ``FILE-20261201.gz`` ...) are read. A progress
line is drawn on standard error when it is a terminal.
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys
import time
from typing import TextIO

from ..model import iso8601, parse_moment
from ..observe.logread import STDIN, Line, merged
from . import candidate_or_say_why
from .replay_core import (
    DEFAULT_WINDOW,
    KINDS,
    MOVED_MEMBER,
    MOVED_PROFILE,
    NEWLY_ALLOWED,
    NEWLY_DENIED,
    NEWLY_LIMITED,
    REASON_CHANGED,
    Replayer,
    Report,
    replay,
)

TITLES = {
    NEWLY_DENIED: "newly denied",
    NEWLY_LIMITED: "newly limited by protect",
    NEWLY_ALLOWED: "newly allowed",
    MOVED_PROFILE: "moved to another profile",
    MOVED_MEMBER: "moved to another member",
    REASON_CHANGED: "refused for another reason",
}
GROUPS_SHOWN = 20  # per kind in the text report (--json has them all)
PROGRESS_EVERY = 0.25  # seconds between progress lines
_AGO = re.compile(r"^(\d+(?:\.\d+)?)(s|m|h|d)$")


class UsageError(Exception):
    """A bad argument: exit 2."""


def main(config: str, logs: list[str] | None, since: str | None, as_json: bool, window: float = DEFAULT_WINDOW,
         out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    rt = candidate_or_say_why(config, err)
    if rt is None:
        return 2
    try:
        paths = log_paths(logs, rt.config.log.access)
        since_t = parse_since(since, time.time()) if since else None
    except UsageError as exc:
        print(f"egressgate replay: {exc}", file=err)
        return 2
    rep = Replayer(rt, since_t, window)
    progress = Progress(err) if err.isatty() else None
    report = replay(rep, merged(paths, rep.malformed), progress)
    if progress is not None:
        progress.done(report)
    if as_json:
        print(json.dumps(document(report, config, paths, since_t), indent=1), file=out)
    else:
        print(text(report, config, paths), file=out)
    return report.exit_code()


def log_paths(logs: list[str] | None, access: str) -> list[str]:
    if logs:
        missing = [p for p in logs if p != STDIN and not os.path.isfile(p)]
        if missing:
            raise UsageError(f"no such log file: {', '.join(missing)}")
        return logs
    if access in ("stdout", "none"):
        raise UsageError(f"no --log given, and the candidate's log.access is {access!r}, not a file: "
                         "name the access log files with --log FILE ...")
    found = [access] if os.path.isfile(access) else []
    found += sorted(p for p in glob.glob(glob.escape(access) + ".*") + glob.glob(glob.escape(access) + "-*")
                    if os.path.isfile(p))
    if not found:
        raise UsageError(f"no --log given, and the candidate's log.access {access} does not exist here")
    return found


def parse_since(text: str, now: float) -> float:
    """ISO 8601 UTC (``2026-12-01T09:00:00Z``, ``2026-12-01``), Unix seconds, or a time ago (``2h``)."""
    text = text.strip()
    m = _AGO.match(text)
    if m:
        return now - float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    try:
        return parse_moment(text if "T" in text or "-" not in text else text + "T00:00:00Z")
    except ValueError:
        raise UsageError(f"--since {text!r}: expected ISO 8601 UTC (2026-12-01T09:00:00Z), Unix seconds, "
                         "or a time ago (30m, 2h, 7d)") from None


class Progress:
    """``replay: 1,200,000 records, access.log.2.gz:81234`` redrawn in place on a terminal."""

    def __init__(self, err: TextIO) -> None:
        self.err = err
        self.started = time.monotonic()
        self.shown = 0.0

    def __call__(self, n: int, line: Line) -> None:
        now = time.monotonic()
        if now - self.shown >= PROGRESS_EVERY:
            self.shown = now
            rate = n / max(now - self.started, 1e-6)
            self.err.write(f"\rreplay: {n:,} records ({rate:,.0f}/s), at {line.where}\x1b[K")
            self.err.flush()

    def done(self, report: Report) -> None:
        self.err.write(f"\rreplay: {report.records:,} records in {time.monotonic() - self.started:.1f}s\x1b[K\n")
        self.err.flush()


def text(report: Report, config: str, paths: list[str]) -> str:
    span = (f" from {iso8601(report.first)} to {iso8601(report.last)}" if report.first is not None else "")
    lines = [f"replay of {config} against {report.records:,} records in {len(paths)} file(s){span}",
             f"  decided again: {report.replayed:,}; not decided again: {sum(report.skipped.values()):,}"
             + (f"; malformed lines: {report.malformed:,}" if report.malformed else "")]
    for why, n in sorted(report.skipped.items(), key=lambda kv: -kv[1]):
        lines.append(f"    {n:,}: {why}")
    if report.late:
        lines.append(f"  protect: {report.late:,} records longer than the reorder window were admitted late")
    for kind in KINDS:
        count = report.counts[kind]
        if not count:
            continue
        groups = report.groups_of(kind)
        lines.append("")
        lines.append(f"{TITLES[kind].upper()}: {count:,} record{'s' if count != 1 else ''}")
        for g in groups[:GROUPS_SHOWN]:
            lines.append(f"  {g.client} -> {g.destination}: {g.records:,} x  {g.before}  =>  {g.after}")
            for ex in g.examples:
                lines.append(f"      e.g. {ex['where']} {ex['ts']} {ex['method']} {ex['target']} -> {ex['status']}"
                             + (f" {ex['reason']}" if ex["reason"] else ""))
        if len(groups) > GROUPS_SHOWN:
            lines.append(f"  ... and {len(groups) - GROUPS_SHOWN:,} more groups (--json lists them all)")
    if report.malformed:
        lines.append("")
        lines.append(f"MALFORMED LINES: {report.malformed:,} (skipped; the rest was replayed)")
        lines += [f"  {m}" for m in report.malformed_lines]
        if report.malformed > len(report.malformed_lines):
            lines.append(f"  ... and {report.malformed - len(report.malformed_lines):,} more")
    lines.append("")
    if report.refusing:
        lines.append(f"result: {report.refusing:,} records allowed today would be refused (exit 1)")
    elif report.changed:
        lines.append(f"result: {report.changed:,} records would change; none allowed today would be refused (exit 0)")
    else:
        lines.append("result: no change (exit 0)")
    return "\n".join(lines)


def document(report: Report, config: str, paths: list[str], since: float | None) -> dict:
    return {
        "candidate": config, "logs": paths, "since": since, "since_iso": iso8601(since) if since is not None else None,
        "records": report.records, "replayed": report.replayed, "not_replayed": report.skipped,
        "first": report.first, "last": report.last,
        "malformed": {"count": report.malformed, "lines": report.malformed_lines},
        "protect_late": report.late,
        "changes": {kind: {"records": report.counts[kind], "groups": [g.view() for g in report.groups_of(kind)]}
                    for kind in KINDS},
        "would_refuse_allowed": report.refusing,
        "exit": report.exit_code(),
    }
