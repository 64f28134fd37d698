"""The admin status page (GET /) rendered by a real headless Chromium, after its script fetched
/status: profiles with expected and observed egress IP and a red/green mark, the READY / NOT READY
banner, the live tunnel count, and recent denials. Also a screenshot, checked to be a real PNG
that shows the red and green marks.

Everything is on loopback: the gateway, an IP-echo origin for the egress probe, an echo server
for the tunnel, and Chromium with every background-networking feature off.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pytest

from .. import required
from .peers import EchoServer, GatewayProcess, Origin, base_config

CHROMIUM = "/usr/bin/chromium"
WINDOW = (1200, 900)
RED, GREEN = (0xCC, 0x33, 0x33), (0x22, 0xAA, 0x77)  # .bad and .ok backgrounds in status.html


# ------------------------------------------------------------------------------------ the DOM


@dataclass
class Cell:
    text: str
    cls: str


@dataclass
class Dom:
    by_id: dict[str, Cell] = field(default_factory=dict)  # text and class of elements with an id
    tables: dict[str, list[list[Cell]]] = field(default_factory=dict)  # tbody rows by table id
    body_attrs: dict[str, str] = field(default_factory=dict)


class _DomParser(HTMLParser):
    """Just enough of the dumped DOM: elements with ids, and the rows of each table's tbody."""

    VOID = {"meta", "link", "br", "img", "input", "hr"}

    def __init__(self) -> None:
        super().__init__()
        self.dom = Dom()
        self.stack: list[tuple[str, dict[str, str], list[str]]] = []  # tag, attrs, text parts
        self.table: str | None = None
        self.in_tbody = False
        self.row: list[Cell] | None = None

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        if tag == "body":
            self.dom.body_attrs = a
        if tag == "table":
            self.table = a.get("id")
            self.dom.tables.setdefault(self.table, [])
        elif tag == "tbody":
            self.in_tbody = True
        elif tag == "tr" and self.in_tbody:
            self.row = []
        if tag not in self.VOID:
            self.stack.append((tag, a, []))

    def handle_data(self, data):
        for _, _, parts in self.stack:
            parts.append(data)

    def handle_endtag(self, tag):
        if tag in self.VOID or not self.stack:
            return
        while self.stack:
            t, a, parts = self.stack.pop()
            text = " ".join("".join(parts).split())
            if a.get("id"):
                self.dom.by_id[a["id"]] = Cell(text, a.get("class", ""))
            if t == "td" and self.row is not None:
                self.row.append(Cell(text, a.get("class", "")))
            if t == "tr" and self.row is not None:
                self.dom.tables[self.table].append(self.row)
                self.row = None
            if t == "tbody":
                self.in_tbody = False
            if t == tag:
                break


def parse_dom(html: str) -> Dom:
    p = _DomParser()
    p.feed(html)
    p.close()
    return p.dom


# -------------------------------------------------------------------------------------- PNG


def read_png(data: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB(A) bytes) of an 8-bit, non-interlaced RGB or RGBA PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        assert zlib.crc32(kind + chunk) == struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0], \
            f"bad CRC in {kind!r}"
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
        if kind == b"IEND":
            break
    assert header is not None, "no IHDR"
    width, height, depth, color, _, _, interlace = header
    assert depth == 8 and color in (2, 6) and interlace == 0, f"unsupported PNG layout {header}"
    bpp = 3 if color == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            left = line[i - bpp] if i >= bpp else 0
            up = prev[i]
            ul = prev[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                p = left + up - ul
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - ul)
                line[i] = (line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else ul)) & 0xFF
        rows.append(bytes(line))
        prev = line
    return width, height, [bytes(r[i] for i in range(len(r)) if i % bpp < 3) for r in rows]


def count_colour(rows: list[bytes], rgb: tuple[int, int, int], tolerance: int = 6) -> int:
    n = 0
    for row in rows:
        for i in range(0, len(row), 3):
            if all(abs(row[i + k] - rgb[k]) <= tolerance for k in range(3)):
                n += 1
    return n


# ------------------------------------------------------------------------------- the browser


def render(url: str, tmp: Path, screenshot: Path | None = None) -> str:
    """The DOM of ``url`` after its scripts ran (and optionally a screenshot), in headless Chromium."""
    if not os.path.exists(CHROMIUM):
        required.missing(CHROMIUM, "Debian package chromium; `make test` installs it")
    profile = tmp / f"chromium-{time.monotonic_ns()}"
    profile.mkdir()
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--no-proxy-server",  # the admin page is on loopback: ignore proxy variables and settings
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"--window-size={WINDOW[0]},{WINDOW[1]}",
            "--hide-scrollbars", "--virtual-time-budget=3000"]
    if screenshot is not None:
        args.append(f"--screenshot={screenshot}")
    proc = subprocess.run([*args, "--dump-dom", url], capture_output=True, timeout=60,
                          env={**os.environ, "HOME": str(profile)})
    html = proc.stdout.decode("utf-8", "replace")
    assert proc.returncode == 0 and "<html" in html, \
        f"chromium exited {proc.returncode}:\n{proc.stderr.decode(errors='replace')[-3000:]}"
    return html


# -------------------------------------------------------------------------------- the scene


# the admin listener is on loopback: never through a proxy named in the environment
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _status(gw: GatewayProcess) -> dict:
    with _DIRECT.open(gw.admin + "/status", timeout=10) as resp:
        return json.load(resp)


def _wait(predicate, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@dataclass
class Scene:
    mismatch: Dom  # profile "moved" leaves from 127.0.0.3 but expects 127.0.0.9
    fixed: Dom  # after expect_ip was corrected and the config reloaded
    screenshot: Path
    denied_target: str


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Scene:
    tmp = tmp_path_factory.mktemp("status-page")
    origin, echo = Origin(), EchoServer()
    cfg = base_config(
        security={"connect_ports": [echo.port]},
        egress={"default": {"direct": {}},
                "pinned": {"bind": ["127.0.0.2"], "expect_ip": ["127.0.0.2"],
                           "protect": [{"name": "origin", "destinations": ["localhost"]}]},
                "moved": {"bind": ["127.0.0.3"], "expect_ip": ["127.0.0.9"]}},
        clients=[{"name": "crawler", "from": ["127.0.0.1/32"], "egress": ["pinned", "moved"],
                  "deny": ["blocked.example"]}],
        probe={"echo_url": origin.url("/ip"), "interval": "1h", "readiness": "all"},
    )
    gw = GatewayProcess(cfg, tmp)
    tunnel = None
    try:
        _wait(lambda: _status(gw)["profiles"]["moved"]["observed_ip"] is not None, "the egress probe")
        denied_target = "http://blocked.example/secret"
        with socket.create_connection((gw.host, gw.port), timeout=5) as s:
            s.sendall(f"GET {denied_target} HTTP/1.1\r\nHost: blocked.example\r\nConnection: close\r\n\r\n".encode())
            assert s.recv(4096).startswith(b"HTTP/1.1 403"), "the denial did not happen"
        with socket.create_connection((gw.host, gw.port), timeout=5) as s:  # a provider asks for a back-off
            s.sendall(f"GET http://localhost:{origin.port}/answer?code=503&retry_after=3600 HTTP/1.1\r\n"
                      "Host: localhost\r\nConnection: close\r\n\r\n".encode())
            assert s.recv(4096).startswith(b"HTTP/1.1 503"), "the provider's answer did not come through"
        tunnel = socket.create_connection((gw.host, gw.port), timeout=5)
        tunnel.sendall(f"CONNECT 127.0.0.1:{echo.port} HTTP/1.1\r\nHost: 127.0.0.1:{echo.port}\r\n\r\n".encode())
        assert tunnel.recv(4096).startswith(b"HTTP/1.1 200")
        tunnel.sendall(b"hello")
        assert tunnel.recv(4096) == b"hello"
        _wait(lambda: _status(gw)["connections"]["tunnels"] == 1, "the tunnel in /status")

        shot = tmp / "status.png"
        mismatch = parse_dom(render(gw.admin + "/", tmp, screenshot=shot))
        tunnel.close()
        tunnel = None
        _wait(lambda: _status(gw)["connections"]["tunnels"] == 0, "the tunnel to close")

        cfg["egress"]["moved"]["expect_ip"] = ["127.0.0.3"]
        gw.write_config(cfg)
        req = urllib.request.Request(gw.admin + "/-/reload", method="POST")
        with _DIRECT.open(req, timeout=10) as resp:
            assert resp.status == 200
        _wait(lambda: _status(gw)["ready"], "readiness after fixing expect_ip")
        fixed = parse_dom(render(gw.admin + "/", tmp))
        return Scene(mismatch, fixed, shot, denied_target)
    finally:
        if tunnel is not None:
            tunnel.close()
        gw.kill()
        origin.close()
        echo.close()


def _profiles(dom: Dom) -> dict[str, list[Cell]]:
    rows = dom.tables.get("profiles", [])
    return {row[0].text: row for row in rows}


# --------------------------------------------------------------------------------- the tests


def test_script_ran(scene):
    assert scene.mismatch.body_attrs.get("data-loaded") == "1", "the page's script did not finish a refresh"
    assert "status unavailable" not in scene.mismatch.by_id["meta"].text


def test_profiles_show_expected_and_observed_ip_with_a_mark(scene):
    rows = _profiles(scene.mismatch)
    assert {"default", "pinned", "moved"} <= set(rows), f"profile rows: {sorted(rows)}"
    header = ["profile", "kind", "members", "expected IP", "observed IP", "check", "requests", "bytes"]
    pinned = dict(zip(header, rows["pinned"], strict=True))
    moved = dict(zip(header, rows["moved"], strict=True))
    assert (pinned["expected IP"].text, pinned["observed IP"].text) == ("127.0.0.2", "127.0.0.2")
    assert (pinned["check"].text, pinned["check"].cls) == ("OK", "ok")
    assert (moved["expected IP"].text, moved["observed IP"].text) == ("127.0.0.9", "127.0.0.3")
    assert (moved["check"].text, moved["check"].cls) == ("MISMATCH", "bad")
    assert rows["default"][5].text == "unknown", "a profile with no expect_ip has no verdict"


def test_banner_says_not_ready_with_the_reason(scene):
    banner = scene.mismatch.by_id["ready"]
    assert banner.text.startswith("NOT READY") and banner.cls == "bad", banner
    assert "moved" in banner.text and "127.0.0.3" in banner.text, banner.text


def test_live_tunnel_count_and_connections(scene):
    meta = scene.mismatch.by_id["meta"].text
    assert "1 tunnels" in meta, meta
    conns = {row[0].text: row[1].text for row in scene.mismatch.tables["conns"]}
    assert conns.get("crawler") == "1", conns


def test_recent_denial_is_listed(scene):
    rows = scene.mismatch.tables["denials"]
    assert rows, "no denial rows"
    newest = [c.text for c in rows[0]]
    assert newest[1:] == ["crawler", scene.denied_target, "destination_denied"], newest
    assert len(newest[0]) == 8 and newest[0].count(":") == 2, f"time column {newest[0]!r}"


def test_page_follows_a_reload_that_fixes_the_profile(scene):
    banner = scene.fixed.by_id["ready"]
    assert (banner.text, banner.cls) == ("READY", "ok")
    moved = _profiles(scene.fixed)["moved"]
    assert (moved[3].text, moved[4].text, moved[5].text, moved[5].cls) == ("127.0.0.3", "127.0.0.3", "OK", "ok")
    assert "0 tunnels" in scene.fixed.by_id["meta"].text


def test_screenshot_is_a_real_png_showing_the_marks(scene):
    data = scene.screenshot.read_bytes()
    assert len(data) > 5000, f"screenshot only {len(data)} bytes"
    width, height, rows = read_png(data)
    assert (width, height) == WINDOW
    distinct = {row[i:i + 3] for row in rows[::10] for i in range(0, len(row), 30)}
    assert len(distinct) > 8, "the screenshot is (nearly) blank"
    assert count_colour(rows, RED) > 500, "no red MISMATCH mark / NOT READY banner in the screenshot"
    assert count_colour(rows, GREEN) > 200, "no green OK mark in the screenshot"


def test_open_connections_table_shows_the_tunnel(scene):
    rows = scene.mismatch.tables["open"]
    header = ["age", "client", "from", "state", "profile", "egress address", "egress IP", "target", "bytes"]
    tunnels = [dict(zip(header, (c.text for c in row), strict=True)) for row in rows]
    tunnels = [t for t in tunnels if t["state"] == "tunnel"]
    assert len(tunnels) == 1, rows
    t = tunnels[0]
    assert (t["client"], t["from"], t["profile"]) == ("crawler", "127.0.0.1", "pinned"), t
    assert (t["egress address"], t["egress IP"]) == ("127.0.0.2", "127.0.0.2"), t  # the attested member
    assert t["target"].startswith("127.0.0.1:") and t["bytes"] == "5 B / 5 B", t
    assert t["age"].endswith("s"), t


def test_shared_ip_holds_are_listed(scene):
    rows = scene.mismatch.tables.get("holds", [])
    assert [[c.text for c in row[:5]] for row in rows] == [["pinned", "127.0.0.2", "localhost", "origin", "503"]]
    assert rows[0][4].cls == "bad" and 0 < int(rows[0][5].text) <= 3600
