"""``egressgate receipt verify FILE [--public-key KEY]`` and ``egressgate receipt public-key``.

``verify`` checks a job receipt's Ed25519 signature (``observe.receipt.verify``): exit 0 when it
is valid, 1 when it is not (changed after signing, or signed by another key than the pinned
one), 2 when the file or the key cannot be read. ``KEY``: the gateway's public key as /status
shows it (base64), in PEM, or a file holding either.

``public-key`` prints the gateway's receipt public key (base64, one line): from the config's
``receipts.key_file`` when it names one, else asked of the running gateway (``GET /status`` at
``--admin URL``, or at the config's admin address), whose key was generated at start.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from typing import TextIO

from ..model import parse_socket_address
from ..observe.receipt import key_id, private_from_pem, public_from_text, public_text, verify
from . import candidate_or_say_why

TIMEOUT = 10.0


def verify_main(path: str, public_key: str | None, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    try:
        raw = sys.stdin.buffer.read() if path == "-" else open(path, "rb").read()  # noqa: SIM115
    except OSError as exc:
        print(f"egressgate receipt verify: cannot read {path}: {exc.strerror or exc}", file=err)
        return 2
    pinned = None
    if public_key is not None:
        try:
            text = public_key
            if os.path.isfile(public_key):
                with open(public_key, encoding="utf-8") as f:
                    text = f.read()
            pinned = public_from_text(text)
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            print(f"egressgate receipt verify: --public-key: {exc}", file=err)
            return 2
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        print(f"{path}: INVALID: not JSON ({exc})", file=out)
        return 1
    ok, why = verify(doc, pinned)
    print(f"{path}: {'OK' if ok else 'INVALID'}: {why}", file=out)
    if ok:
        r = doc["receipt"]
        subject = r.get("subject", {})
        who = subject.get("client") or "-"
        if subject.get("pod"):
            who += f" (pod {subject['pod']})"
        totals = r.get("totals", {})
        print(f"  {who}: {totals.get('requests', 0)} requests, {totals.get('tunnels', 0)} tunnels, "
              f"{totals.get('refusals', 0)} refusals, egress IPs {', '.join(r.get('egress_ips') or ['(none attested)'])}, "
              f"issued {r.get('issued_at_iso')}; covers {r.get('covers', {}).get('scope', '?')}", file=out)
    return 0 if ok else 1


def public_key_main(config: str | None, admin: str | None, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    url = admin
    if url is None:
        if config is None:
            print("egressgate receipt public-key: give --config FILE (its receipts.key_file, or its admin "
                  "address) or --admin URL", file=err)
            return 2
        rt = candidate_or_say_why(config, err)
        if rt is None:
            return 2
        key_file = rt.config.receipts.key_file
        if key_file:
            try:
                with open(key_file, "rb") as f:
                    public = private_from_pem(f.read()).public_key()
            except (OSError, ValueError) as exc:
                print(f"{config}:0: receipts.key_file: {key_file}: {exc}", file=err)
                return 2
            print(public_text(public), file=out)
            print(f"{key_id(public)} (from {key_file})", file=err)
            return 0
        if not rt.config.admin.address:
            print(f"egressgate receipt public-key: {config} names no receipts.key_file and no admin address: "
                  "the key is generated at start; give --admin URL", file=err)
            return 2
        host, port = parse_socket_address(rt.config.admin.address)
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(url.rstrip("/") + "/status", timeout=TIMEOUT) as resp:
            status = json.load(resp)
    except (OSError, ValueError) as exc:
        print(f"egressgate receipt public-key: cannot read {url}/status: {exc}", file=err)
        return 1
    receipts = status.get("receipts") or {}
    if not receipts.get("public_key"):
        print(f"egressgate receipt public-key: the gateway at {url} has receipts off", file=err)
        return 1
    print(receipts["public_key"], file=out)
    print(f"{receipts.get('key_id')} ({receipts.get('key_source')}, from {url}/status)", file=err)
    return 0
