"""Reload without a signal (``reload.watch``), the way a Kubernetes ConfigMap update arrives:
the gateway serves a config file that is a symlink through ``..data``; the kubelet writes a
new timestamped directory and swaps ``..data`` atomically. The gateway notices, reloads all
or nothing as on SIGHUP (every worker), keeps open tunnels flowing, keeps the old config on a
broken file and reports it, and takes the fixed file once it lands."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import urllib.request
from pathlib import Path

import yaml

from .conftest import curl
from .peers import ReservedPort, base_config, open_tunnel, pattern_bytes, pattern_sha256, wait_for

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ConfigMapVolume:
    """A directory laid out as the kubelet lays out a ConfigMap volume."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir()
        self.generation = 0
        self.path = root / "config.yaml"  # what --config names, as in deploy/kubernetes

    def publish(self, config: dict | str) -> str:
        """Write a new generation and swap ``..data`` to it in one rename; its config hash."""
        text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
        self.generation += 1
        stamp = self.root / f"..2025_06_01_12_00_{self.generation:02d}.{os.getpid()}"
        stamp.mkdir()
        (stamp / "config.yaml").write_text(text)
        (self.root / "..data_tmp").symlink_to(stamp.name)
        os.replace(self.root / "..data_tmp", self.root / "..data")
        if not self.path.is_symlink():
            self.path.symlink_to("..data/config.yaml")
        return hashlib.sha256(text.encode()).hexdigest()


def _config(echo_port: int, source: str, **overrides) -> dict:
    return base_config(
        egress={"moving": {"bind": [source]}},
        clients=[{"name": "job", "from": ["127.0.0.0/8"], "egress": ["moving"]}],
        security={"connect_ports": [443, echo_port]},
        reload={"interval": "200ms"},
        **overrides,
    )


def _pinned(cfg: dict, gw) -> dict:
    """``cfg`` with the addresses the running gateway bound (a reload keeps them)."""
    cfg["listen"] = [{"address": gw.address}]
    cfg["admin"] = {"address": gw.admin.removeprefix("http://")}
    return cfg


def _get(gw, path: str) -> str:
    with _DIRECT.open(gw.admin + path, timeout=10) as r:
        return r.read().decode()


def _metric(gw, name: str) -> float:
    line = next(ln for ln in _get(gw, "/metrics").splitlines() if ln.startswith(name + " "))
    return float(line.rsplit(" ", 1)[1])


def _source(gw, origin) -> bytes:
    return curl("-x", gw.url, origin.url("/ip")).stdout


class Tunnel:
    def __init__(self, gw, port: int) -> None:
        self.s = open_tunnel(gw, f"127.0.0.1:{port}", timeout=30)

    def roundtrip(self, n: int) -> None:
        """n bytes up through the tunnel and back from the echo server, byte-exact."""
        got = bytearray()

        def reader():
            while len(got) < n and (chunk := self.s.recv(1 << 20)):
                got.extend(chunk)

        t = threading.Thread(target=reader)
        t.start()
        for block in pattern_bytes(n):
            self.s.sendall(block)
        t.join(30)
        assert len(got) == n and hashlib.sha256(got).hexdigest() == pattern_sha256(n)

    def close(self) -> None:
        self.s.shutdown(socket.SHUT_WR)
        assert self.s.recv(100) == b""
        self.s.close()


def test_configmap_update_reloads_and_keeps_tunnels(start_gateway, tmp_path, echo, origin):
    volume = ConfigMapVolume(tmp_path / "config")
    volume.publish(_config(echo.port, "127.0.0.2"))
    gw = start_gateway({}, config_path=volume.path)
    assert _source(gw, origin) == b"127.0.0.2"
    tunnel = Tunnel(gw, echo.port)
    tunnel.roundtrip(1 << 20)  # flowing, from the old address

    # The ConfigMap moves the profile: the gateway reloads by itself.
    n = len(gw.events)
    moved = volume.publish(_pinned(_config(echo.port, "127.0.0.3"), gw))
    event = gw.wait_event("reloaded", after=n, timeout=20)
    assert event["hash"] == moved[:12] and event["config"] == str(volume.path)
    assert _source(gw, origin) == b"127.0.0.3"  # new requests leave from the new address
    tunnel.roundtrip(1 << 20)  # the open tunnel still carries bytes both ways
    assert json.loads(_get(gw, "/status"))["config"]["hash"] == moved
    assert f'egressgate_config_info{{hash="{moved}"}} 1.0' in _get(gw, "/metrics")

    # A broken update is refused whole and reported; the old config stays in force.
    n = len(gw.events)
    volume.publish("clients:\n  - name: x\n    frm: [10.0.0.0/8]\n")
    failed = gw.wait_event("reload_failed", after=n, timeout=20)
    assert any("clients[0].frm: unknown key" in e and ":3:" in e for e in failed["errors"]), failed
    assert _metric(gw, "egressgate_config_last_reload_successful") == 0.0
    assert _metric(gw, 'egressgate_config_reloads_total{result="failure"}') == 1.0
    assert _source(gw, origin) == b"127.0.0.3"
    assert json.loads(_get(gw, "/status"))["config"]["hash"] == moved
    tunnel.roundtrip(1 << 16)

    # The fixed file lands: reloaded.
    n = len(gw.events)
    fixed = volume.publish(_pinned(_config(echo.port, "127.0.0.4"), gw))
    assert gw.wait_event("reloaded", after=n, timeout=20)["hash"] == fixed[:12]
    assert _source(gw, origin) == b"127.0.0.4"
    assert _metric(gw, "egressgate_config_last_reload_successful") == 1.0
    assert _metric(gw, 'egressgate_config_reloads_total{result="success"}') == 2.0
    assert _metric(gw, 'egressgate_config_reloads_total{result="failure"}') == 1.0  # reported once
    tunnel.roundtrip(1 << 16)
    tunnel.close()
    assert echo.peers[-1] == "127.0.0.2"  # the tunnel left from the address in force when it opened


def test_every_worker_takes_the_update(start_gateway, tmp_path, echo, origin):
    """Worker 0 watches and reloads as on SIGHUP, which it passes on: every worker reloads."""
    volume = ConfigMapVolume(tmp_path / "config")
    with ReservedPort() as port:
        volume.publish(_config(echo.port, "127.0.0.2", listen=[{"address": port.address}], workers=2))
        gw = start_gateway({}, config_path=volume.path)
        wait_for(lambda: len([e for e in gw.events if e.get("event") == "started"]) >= 2, "both workers")
    n = len(gw.events)
    moved = volume.publish(_pinned(_config(echo.port, "127.0.0.3", workers=2), gw))
    wait_for(lambda: {e["worker"] for e in gw.events[n:] if e.get("event") == "reloaded"} == {0, 1},
             "a reloaded event from each worker", timeout=20)
    assert {e["hash"] for e in gw.events[n:] if e.get("event") == "reloaded"} == {moved[:12]}
    for _ in range(12):  # new connections land on either worker: all leave from the new address
        assert _source(gw, origin) == b"127.0.0.3"


def _proxy_answers(gw) -> bool:
    """The proxy port still accepts and answers a request (a whoami through the proxy)."""
    host, port = gw.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"GET http://egressgate.whoami/ HTTP/1.1\r\nHost: egressgate.whoami\r\nConnection: close\r\n\r\n")
        return s.recv(12).startswith(b"HTTP/1.1 200")


def test_an_empty_file_is_refused_by_a_reload_and_by_the_watcher(start_gateway, tmp_path, echo):
    """Defect (issue 25 item 2): an empty (truncated) file is valid YAML, so a reload (SIGHUP or
    the watcher) replaced every listener, profile and client with the built-in defaults and the
    proxy port refused connections. Now it is refused, the running config stays in force."""
    import signal

    cfg = _config(echo.port, "127.0.0.2")
    gw = start_gateway(cfg)
    n = len(gw.events)
    cfg = _pinned(cfg, gw)
    gw.write_config(cfg)
    gw.wait_event("reloaded", after=n)
    for text in ("", "# nothing but a comment\n"):
        n = len(gw.events)
        gw.write_config(text)  # left empty: the watcher sees it settle
        failed = gw.wait_event("reload_failed", after=n)
        assert "empty" in failed["errors"][0], failed
        assert _proxy_answers(gw)
        n = len(gw.events)
        gw.signal(signal.SIGHUP)
        failed = gw.wait_event("reload_failed", after=n)
        assert "empty" in failed["errors"][0], failed
        assert _proxy_answers(gw)
        assert not any(e.get("event") == "reloaded" for e in gw.events[n:])
        gw.write_config(cfg)
        gw.wait_event("reloaded", after=n)


def test_a_reload_that_drops_every_listener_is_refused(start_gateway, echo):
    """Defect (issue 25 item 2): a config keeping none of the listeners in force (a truncated file
    that lost its ``listen``, another host's file) moved the proxy port away; now refused."""
    import signal

    cfg = _config(echo.port, "127.0.0.2")
    cfg["reload"] = {"watch": False}
    gw = start_gateway(cfg)
    n = len(gw.events)
    gw.write_config({k: v for k, v in cfg.items() if k != "listen"})  # the default listener instead
    gw.signal(signal.SIGHUP)
    failed = gw.wait_event("reload_failed", after=n)
    assert "listen" in failed["errors"][0] and "keeps none" in failed["errors"][0], failed
    assert _proxy_answers(gw)
    n = len(gw.events)
    gw.write_config(cfg)
    gw.signal(signal.SIGHUP)
    gw.wait_event("reloaded", after=n)
    assert _proxy_answers(gw)
