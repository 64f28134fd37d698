"""Command line: ``egressgate serve | check-config | hash-password | probe | verify | explain | replay |
evidence | receipt | demo``.

Library code raises; only ``main`` turns errors into messages and exit codes.
"""

from __future__ import annotations

import argparse
import getpass
import sys

from . import __version__, build_kind
from .errors import ConfigError

# A password a job presents on every request is a shared secret, not something a person types:
# anything shorter than this is refused unless --allow-short says it is deliberate.
MIN_PASSWORD_LENGTH = 12


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="egressgate", description="An egress gateway for data-collection jobs.")
    p.add_argument("--version", action="version", version=f"egressgate {__version__} ({build_kind()})")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the gateway (SIGHUP reloads, SIGTERM drains)")
    s.add_argument("--config", "-c", help="YAML config file (default: the embedded safe default)")
    # How worker 0 starts the other workers (``workers: N``); not for people.
    s.add_argument("--pidfile", metavar="PATH",
                   help="write the gateway's process id here (for kill -HUP / logrotate's kill -USR1: "
                        "pidof cannot find a console-script or container install); removed on exit")
    s.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    s.add_argument("--worker-dir", help=argparse.SUPPRESS)
    s.add_argument("--worker-parent", type=int, help=argparse.SUPPRESS)
    c = sub.add_parser("check-config", help="validate a config file: every error and warning as FILE:LINE: key: what")
    c.add_argument("file")
    c.add_argument("--offline", action="store_true",
                   help="for CI: secrets and TLS files need only be named, not present; bind addresses not checked")
    c.add_argument("--strict", action="store_true", help="warnings fail the check too (exit 1)")
    hp = sub.add_parser("hash-password", help="read a password on stdin, print a password_hash")
    hp.add_argument("--allow-short", action="store_true",
                    help=f"accept a password shorter than {MIN_PASSWORD_LENGTH} characters (tests, throw-away setups)")
    pr = sub.add_parser("probe", help="which IP each egress profile really exits from")
    pr.add_argument("--config", "-c")
    pr.add_argument("--profile", action="append", help="only this profile (repeatable)")
    pr.add_argument("--echo-url", help="an IP-echo URL (plain text or JSON with an 'ip' field)")
    pr.add_argument("--timeout", type=float, default=10.0)
    v = sub.add_parser("verify", help="does each provider accept each profile member? (exit 1 on any failure)")
    v.add_argument("--config", "-c", help="the config to check (a candidate: check it before anyone reloads)")
    v.add_argument("--profile", action="append", help="only this profile (repeatable)")
    v.add_argument("--provider", action="append", help="only this provider (repeatable)")
    v.add_argument("--since", metavar="CURRENT.yaml",
                   help="only the members that CURRENT.yaml's same profile does not have (what a reload would add)")
    v.add_argument("--json", action="store_true", help="one JSON object per check instead of the table")
    sub.add_parser("demo", help="a self-contained demonstration on loopback")
    ex = sub.add_parser("explain", help="the decision for a client and destination, without sending traffic")
    ex.add_argument("--config", "-c")
    ex.add_argument("--client", required=True, help="a client name from the config, or a namespace/serviceaccount")
    ex.add_argument("--from", dest="source", help="the client's source address, to check 'from'")
    ex.add_argument("--profile", help="the egress profile the client asks for (as USER+PROFILE would)")
    ex.add_argument("target", help="a URL (http:// forwards, https:// tunnels) or HOST:PORT (CONNECT)")
    rp = sub.add_parser("replay", help="what a candidate config would change for the recorded traffic "
                                       "(exit 1 if traffic allowed today would be refused)")
    rp.add_argument("--config", "-c", required=True, help="the candidate config")
    rp.add_argument("--log", action="append", metavar="FILE",
                    help="a JSON access log, plain or gzipped (repeatable: rotated files, several instances; "
                         "- for stdin); default: the candidate's log.access and its rotated files")
    rp.add_argument("--since", metavar="T", help="only records that started at or after T (ISO 8601 UTC, "
                                                 "Unix seconds, or a time ago: 30m, 2h, 7d)")
    rp.add_argument("--json", action="store_true", help="the report as one JSON document")
    rp.add_argument("--window", type=float, default=None, metavar="SECONDS",
                    help="protect: how far out of start order records may come (default 120)")
    ev = sub.add_parser("evidence", help="what a provider's support desk needs about a block of our egress IP: "
                                         "counts by signal, sample answers, TLS alerts, state changes, checks")
    ev.add_argument("--profile", required=True, help="the egress profile")
    ev.add_argument("--provider", required=True, help="the provider (a providers[] name with match)")
    ev.add_argument("--log", action="append", metavar="FILE",
                    help="a JSON access log, plain or gzipped (repeatable; - for stdin); default: --config's "
                         "log.access and its rotated files")
    ev.add_argument("--events", action="append", metavar="FILE",
                    help="the gateway's events (its stderr, JSON lines; repeatable): state changes and checks")
    ev.add_argument("--config", "-c", help="the gateway's config (for the default --log)")
    ev.add_argument("--since", metavar="T", help="only from T on (ISO 8601 UTC, Unix seconds, or 30m, 2h, 7d ago)")
    ev.add_argument("--json", action="store_true", help="one JSON document")
    rc = sub.add_parser("receipt", help="job receipts: check one's signature, print the gateway's public key")
    rsub = rc.add_subparsers(dest="receipt_command", required=True)
    rv = rsub.add_parser("verify", help="check a receipt's signature (exit 0 valid, 1 invalid)")
    rv.add_argument("file", help="the receipt (JSON, as /receipt answered it; - for stdin)")
    rv.add_argument("--public-key", metavar="KEY",
                    help="the gateway's public key (base64 as /status shows it, PEM, or a file holding either); "
                         "without it only the key inside the receipt is used")
    rk = rsub.add_parser("public-key", help="the gateway's receipt public key (base64)")
    rk.add_argument("--config", "-c", help="the gateway's config: its receipts.key_file, or its admin address")
    rk.add_argument("--admin", metavar="URL", help="ask the running gateway's admin endpoint (/status)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            from .app import run, run_worker

            if args.worker_index is not None:
                return run_worker(args.config, args.worker_index, args.worker_dir, args.worker_parent)
            return run(args.config, args.pidfile)
        if args.command == "check-config":
            return _check_config(args.file, args.offline, args.strict)
        if args.command == "hash-password":
            from .policy.passwords import hash_password

            if sys.stdin.isatty():
                password = getpass.getpass("password: ")
            else:
                password = sys.stdin.read().rstrip("\r\n")
            if not password:
                print("egressgate: empty password", file=sys.stderr)
                return 2
            if len(password) < MIN_PASSWORD_LENGTH and not args.allow_short:
                print(f"egressgate: password is {len(password)} characters; use at least {MIN_PASSWORD_LENGTH} "
                      "(e.g. `openssl rand -base64 18`), or pass --allow-short to accept it anyway",
                      file=sys.stderr)
                return 2
            print(hash_password(password))
            return 0
        if args.command == "probe":
            return _probe(args.config, args.profile, args.echo_url, args.timeout)
        if args.command == "verify":
            from .commands.verify import main as verify_main

            return verify_main(args.config, args.profile, args.provider, args.since, args.json)
        if args.command == "explain":
            return _explain(args.config, args.client, args.target, args.source, args.profile)
        if args.command == "replay":
            from .commands.replay import DEFAULT_WINDOW
            from .commands.replay import main as replay_main

            return replay_main(args.config, args.log, args.since, args.json,
                               args.window if args.window is not None else DEFAULT_WINDOW)
        if args.command == "evidence":
            from .commands.evidence import main as evidence_main

            return evidence_main(args.profile, args.provider, args.log, args.events, args.config, args.since,
                                 args.json)
        if args.command == "receipt":
            from .commands import receipt

            if args.receipt_command == "verify":
                return receipt.verify_main(args.file, args.public_key)
            return receipt.public_key_main(args.config, args.admin)
        if args.command == "demo":
            from .commands.demo import main as demo_main

            return demo_main()
    except ConfigError as err:
        for line in err.errors:
            print(line, file=sys.stderr)
        return 1
    except OSError as err:
        print(f"egressgate: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 2


def _probe(config_path: str | None, profiles: list[str] | None, echo_url: str | None, timeout: float) -> int:
    import asyncio

    from .egress.dialer import Dialer
    from .egress.reach import Reach
    from .proxy.build import load_runtime, make_resolver
    from .services.probe import format_table, probe_pools

    rt = load_runtime(config_path, echo_url=echo_url)  # --echo-url is what expect_ip needs
    url = echo_url or rt.config.probe.echo_urls
    if not url:
        raise ConfigError([f"{config_path or '(embedded default)'}:0: probe.echo_url: no IP-echo URL; "
                           "set probe.echo_url or pass --echo-url"])
    pools = rt.profiles
    if profiles:
        unknown = [p for p in profiles if p not in pools]
        if unknown:
            print(f"egressgate: unknown profile(s): {', '.join(unknown)}", file=sys.stderr)
            return 2
        pools = {name: pools[name] for name in profiles}
    resolver = make_resolver(rt.config)  # dns.servers, as the server resolves

    async def run() -> list:
        return await probe_pools(pools, url, timeout, Reach(Dialer(asyncio.get_running_loop()), resolver.resolve))

    observations = asyncio.run(run())
    print(format_table(observations))
    return 0 if all(o.ok for o in observations) else 1


def _check_config(path: str, offline: bool, strict: bool) -> int:
    from .proxy.build import check_file

    errors, warnings = check_file(path, offline)
    for line in errors + warnings:
        print(line, file=sys.stderr)
    if errors or (strict and warnings):
        return 1
    print(f"{path}: OK" + (f" ({len(warnings)} warning{'s' if len(warnings) > 1 else ''})" if warnings else ""))
    return 0


def _explain(config: str | None, client: str, target: str, source: str | None, profile: str | None) -> int:
    from .commands.explain import explain
    from .proxy.build import load_runtime, make_resolver

    rt = load_runtime(config)
    try:
        ok, lines = explain(rt, client, target, source, make_resolver(rt.config), profile)
    except ValueError as exc:
        print(f"egressgate: {exc}")
        return 2
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
