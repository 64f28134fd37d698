"""Job receipts on a real gateway with two worker processes: a job's forwarded requests, HTTP
CONNECT tunnels and SOCKS5 tunnels (real clients: requests, raw CONNECT, PySocks), spread over
both workers by the kernel, appear in its receipt -- asked by the job itself
(``http://egressgate.whoami/receipt``) and by an operator (admin ``GET /receipt``) -- with exact
counts, bytes and refusals; another job's traffic does not. The signature verifies with the
public key /status shows (``egressgate receipt verify``); a tampered receipt does not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import requests
import socks

from .peers import ReservedPort, base_config, basic_auth, request_tunnel, wait_for

SECRET = "receipt-secret-1234"
OTHER = "other-secret-5678"
TOKEN = "admin-token-for-receipts"
PAYLOAD = bytes(range(256)) * 8  # 2048 bytes each tunnel sends (and gets back)


def _admin(gw, path: str, token: str | None = TOKEN) -> tuple[int, dict]:
    req = urllib.request.Request(gw.admin + path, headers={"Authorization": f"Bearer {token}"} if token else {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        body = err.read()
        try:
            return err.code, json.loads(body)
        except ValueError:
            return err.code, {"text": body.decode(errors="replace")}


def _verify(path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "egressgate", "receipt", "verify", str(path), *args],
                          capture_output=True, text=True, timeout=60)


def _private(sock_path: str, query: str) -> dict:
    """A worker's own tallies, from its private admin socket (what the answering worker gathers)."""
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(sock_path)
        s.sendall(f"GET /-/tallies?{query} HTTP/1.1\r\nHost: w\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return json.loads(data.partition(b"\r\n\r\n")[2])


def _echo_through(sock, n: int = len(PAYLOAD)) -> None:
    sock.sendall(PAYLOAD[:n])
    got = b""
    while len(got) < n:
        chunk = sock.recv(65536)
        assert chunk, got
        got += chunk
    assert got == PAYLOAD[:n]


def _connect_tunnel(gw, user: str, password: str, target: str) -> bytes:
    s, head = request_tunnel(gw, target, headers={"Host": target, "Proxy-Authorization": basic_auth(user, password)})
    if head.startswith(b"HTTP/1.1 200"):
        _echo_through(s)
    s.close()
    return head.split(b"\r\n", 1)[0]


def test_a_jobs_receipt_across_two_workers(start_gateway, origin, echo, tmp_path):
    with ReservedPort() as http_port, ReservedPort() as socks_port:
        cfg = base_config(
            listen=[{"address": http_port.address}, {"address": socks_port.address, "protocol": "socks5"}],
            admin={"address": "127.0.0.1:0", "token": TOKEN}, workers=2,
            security={"allow_private": ["127.0.0.0/8"], "connect_ports": [443, echo.port]},
            clients=[{"name": "job-a", "from": ["127.0.0.1/32"], "username": "job-a", "password_env": "JOB_A"},
                     {"name": "job-b", "from": ["127.0.0.1/32"], "username": "job-b", "password_env": "JOB_B"}])
        gw = start_gateway(cfg, env={"JOB_A": SECRET, "JOB_B": OTHER})
        wait_for(lambda: sum(e.get("event") == "started" for e in gw.events) >= 2, "both workers' started events")
    socks_address = socks_port.address
    sock_w1 = next(e["admin_socket"] for e in gw.events if e.get("event") == "started" and e.get("worker") == 1)
    sock_w0 = os.path.join(os.path.dirname(sock_w1), "w0.sock")
    proxies = {"http": f"http://job-a:{SECRET}@{gw.address}"}

    def per_worker() -> list[int]:
        """job-a's records each worker has tallied (its own, not gathered)."""
        docs = [_private(p, "client=job-a") for p in (sock_w0, sock_w1)]
        return [sum(d["requests"] + d["tunnels"] + sum(d["refusals"].values()) for d in doc["destinations"])
                for doc in docs]

    sent = {"requests": 0, "http_tunnels": 0, "socks_tunnels": 0}
    # New connections are spread over the two workers by the kernel (SO_REUSEPORT): send rounds of
    # every kind until both workers have tallied some of job-a's traffic (bounded).
    for _ in range(20):
        for _i in range(4):
            with requests.Session() as s:
                r = s.get(origin.url(f"/r{sent['requests']}"), proxies=proxies, timeout=10)
            assert r.status_code == 200
            sent["requests"] += 1
        for _ in range(2):
            assert _connect_tunnel(gw, "job-a", SECRET, f"127.0.0.1:{echo.port}") == b"HTTP/1.1 200 Connection established"
            sent["http_tunnels"] += 1
        for _ in range(2):
            s = socks.socksocket()
            s.set_proxy(socks.SOCKS5, socks_address.rsplit(":", 1)[0], int(socks_address.rsplit(":", 1)[1]),
                        username="job-a", password=SECRET)
            s.settimeout(10)
            s.connect(("127.0.0.1", echo.port))
            _echo_through(s)
            s.close()
            sent["socks_tunnels"] += 1
        wait_for(lambda: sum(per_worker()) == sum(sent.values()), "every finished record tallied")
        if all(per_worker()):
            break
    assert all(per_worker()), per_worker()
    requests_sent, http_tunnels, socks_tunnels = sent["requests"], sent["http_tunnels"], sent["socks_tunnels"]
    # refusals: a CONNECT to a port that is not allowed (twice), and another job's traffic
    for _ in range(2):
        assert _connect_tunnel(gw, "job-a", SECRET, "127.0.0.1:22").startswith(b"HTTP/1.1 403")
    for _ in range(3):
        assert requests.get(origin.url("/b"), proxies={"http": f"http://job-b:{OTHER}@{gw.address}"},
                            timeout=10).status_code == 200
    n_records = requests_sent + http_tunnels + socks_tunnels + 2
    wait_for(lambda: sum(per_worker()) == n_records, "the refusals tallied")
    wait_for(lambda: sum(r.get("client") == "job-a" for r in gw.log) >= n_records, "job-a's access-log records")

    # the job asks for its own receipt, through the gateway
    r = requests.get("http://egressgate.whoami/receipt", proxies=proxies, timeout=10)
    assert r.status_code == 200, r.text
    signed = r.json()
    receipt = signed["receipt"]
    assert receipt["subject"] == {"client": "job-a", "pod": None, "asked_by": "job"}
    assert receipt["covers"]["workers"] == [0, 1] and receipt["covers"]["workers_unanswered"] == []
    assert receipt["covers"]["scope"] == "instance"
    by_dest = {d["destination"]: d for d in receipt["destinations"]}
    assert set(by_dest) == {f"127.0.0.1:{origin.port}", f"127.0.0.1:{echo.port}", "127.0.0.1:22"}, by_dest
    web, tunnels, refused = by_dest[f"127.0.0.1:{origin.port}"], by_dest[f"127.0.0.1:{echo.port}"], by_dest["127.0.0.1:22"]
    assert (web["requests"], web["tunnels"]) == (requests_sent, 0)
    assert (tunnels["requests"], tunnels["tunnels"]) == (0, http_tunnels + socks_tunnels)
    assert tunnels["bytes_up"] == tunnels["bytes_down"] == len(PAYLOAD) * (http_tunnels + socks_tunnels)
    assert refused["refusals"] == {"connect_port_not_allowed": 2} and refused["tunnels"] == 0
    # bytes each way as the access log has them (the log is the ground truth of the receipt)
    log_a = [rec for rec in gw.log if rec.get("client") == "job-a" and "egressgate.whoami" not in rec["target"]]
    assert len(log_a) == n_records
    assert web["bytes_down"] == sum(rec["bytes_down"] for rec in log_a if rec["method"] == "GET")
    assert receipt["totals"] == {"requests": requests_sent, "tunnels": http_tunnels + socks_tunnels,
                                 "bytes_up": sum(rec["bytes_up"] for rec in log_a),
                                 "bytes_down": sum(rec["bytes_down"] for rec in log_a), "refusals": 2, "holds_met": 0}
    assert receipt["egress"] == [{"profile": "default", "source": "127.0.0.1", "egress_ip": None,
                                  "records": requests_sent + http_tunnels + socks_tunnels}]

    # the operator asks for it too (bearer token), and gets the same counts
    status, _ = _admin(gw, "/receipt?client=job-a", token=None)
    assert status == 401
    status, by_admin = _admin(gw, "/receipt?client=job-a")
    assert status == 200 and by_admin["receipt"]["subject"]["asked_by"] == "admin"
    assert by_admin["receipt"]["totals"] == receipt["totals"]
    assert _admin(gw, "/receipt?client=nobody")[0] == 404
    _, other = _admin(gw, "/receipt?client=job-b")
    assert other["receipt"]["totals"]["requests"] == 3 and other["receipt"]["totals"]["tunnels"] == 0

    # the signature: verifies with the gateway's public key from /status; a tampered copy does not
    _, status_doc = _admin(gw, "/status")
    public_key = status_doc["receipts"]["public_key"]
    assert status_doc["receipts"]["key_id"] == signed["signature"]["key_id"]
    path = tmp_path / "receipt.json"
    path.write_text(r.text)
    ok = _verify(path, "--public-key", public_key)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "OK: valid, signed by " + signed["signature"]["key_id"] in ok.stdout
    tampered = json.loads(r.text)
    tampered["receipt"]["totals"]["requests"] -= 1
    bad = tmp_path / "tampered.json"
    bad.write_text(json.dumps(tampered))
    out = _verify(bad, "--public-key", public_key)
    assert out.returncode == 1 and "INVALID" in out.stdout, out.stdout
    out = _verify(bad)  # the key inside the receipt does not save it either
    assert out.returncode == 1
    resigned = dict(json.loads(r.text))
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from egressgate.observe.receipt import sign

    forged = sign({**resigned["receipt"], "totals": tampered["receipt"]["totals"]}, Ed25519PrivateKey.generate())
    fake = tmp_path / "forged.json"
    fake.write_text(json.dumps(forged))
    assert _verify(fake).returncode == 0  # intact, but by some key: only pinning the gateway's key tells
    out = _verify(fake, "--public-key", public_key)
    assert out.returncode == 1 and "signed by another key" in out.stdout, out.stdout
    pk = subprocess.run([sys.executable, "-m", "egressgate", "receipt", "public-key", "--admin", gw.admin],
                        capture_output=True, text=True, timeout=30)
    assert pk.returncode == 0 and pk.stdout.strip() == public_key, pk.stdout + pk.stderr


def _key(path) -> str:
    """A fresh Ed25519 key in PEM at ``path``; its public key (base64) returned."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from egressgate.observe.receipt import private_to_pem, public_text

    key = Ed25519PrivateKey.generate()
    path.write_bytes(private_to_pem(key))
    return public_text(key.public_key())


def test_the_key_file_is_used_checked_and_reloaded(start_gateway, origin, tmp_path):
    first, second = tmp_path / "first.pem", tmp_path / "second.pem"
    first_public, second_public = _key(first), _key(second)
    cfg = base_config(receipts={"key_file": str(first)})
    gw = start_gateway(cfg)
    assert _admin(gw, "/status", token=None)[1]["receipts"]["public_key"] == first_public
    pk = subprocess.run([sys.executable, "-m", "egressgate", "receipt", "public-key", "--config", str(gw.config_path)],
                        capture_output=True, text=True, timeout=30)
    assert pk.returncode == 0 and pk.stdout.strip() == first_public, pk.stderr
    proxies = {"http": f"http://{gw.address}"}
    assert requests.get(origin.url("/x"), proxies=proxies, timeout=10).status_code == 200
    r = requests.get("http://egressgate.whoami/receipt", proxies=proxies, timeout=10)
    saved = tmp_path / "r1.json"
    saved.write_text(r.text)
    assert r.json()["receipt"]["totals"]["requests"] == 1
    assert _verify(saved, "--public-key", str(first.with_suffix(".pub"))).returncode == 2  # (no such file: not a key)
    assert _verify(saved, "--public-key", first_public).returncode == 0
    # a reload with another key_file: new receipts are signed with it, the old one still verifies with the old key
    gw.write_config(base_config(receipts={"key_file": str(second)}, listen=[{"address": gw.address}],
                                admin={"address": gw.admin.removeprefix("http://")}))
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(urllib.request.Request(gw.admin + "/-/reload", method="POST"), timeout=20) as resp:
        assert json.loads(resp.read())["reloaded"] is True
    r2 = requests.get("http://egressgate.whoami/receipt", proxies=proxies, timeout=10)
    assert r2.json()["signature"]["public_key"] == second_public
    assert r2.json()["receipt"]["totals"]["requests"] == 1  # the tallies survive the reload
    assert _verify(saved, "--public-key", first_public).returncode == 0
    # a key file that is not an Ed25519 key: the reload is refused by name, the old key stays
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN PRIVATE KEY-----\nnonsense\n-----END PRIVATE KEY-----\n")
    gw.write_config(base_config(receipts={"key_file": str(bad)}, listen=[{"address": gw.address}],
                                admin={"address": gw.admin.removeprefix("http://")}))
    try:
        opener.open(urllib.request.Request(gw.admin + "/-/reload", method="POST"), timeout=20)
        raise AssertionError("the reload was not refused")
    except urllib.error.HTTPError as err:
        errors = json.loads(err.read())["errors"]
    assert errors and f"receipts.key_file: {bad}: not an unencrypted PEM private key" in errors[0], errors
    assert _admin(gw, "/status", token=None)[1]["receipts"]["public_key"] == second_public
    # check-config names a missing key file at its line
    missing = tmp_path / "missing.yaml"
    missing.write_text("receipts:\n  key_file: /nonexistent/key.pem\n")
    out = subprocess.run([sys.executable, "-m", "egressgate", "check-config", str(missing)], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 1 and f"{missing}:2: receipts.key_file: file not found: /nonexistent/key.pem" in out.stderr


def test_receipts_off(start_gateway, origin):
    gw = start_gateway(base_config(receipts={"enabled": False}))
    proxies = {"http": f"http://{gw.address}"}
    r = requests.get("http://egressgate.whoami/receipt", proxies=proxies, timeout=10)
    assert r.status_code == 404 and "receipts are off" in r.text
    assert requests.get("http://egressgate.whoami/", proxies=proxies, timeout=10).json()["client"] == "local"
    assert _admin(gw, "/receipt?client=local", token=None)[0] == 404
    assert _admin(gw, "/status", token=None)[1]["receipts"] == {"enabled": False}
