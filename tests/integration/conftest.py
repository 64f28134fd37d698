from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest
import trustme

from .. import required
from .faulty import Blackhole, FaultyOrigin, FaultyServer, echo_behaviour
from .peers import EchoServer, GatewayProcess, Origin


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture(scope="session")
def origin() -> Iterator[Origin]:
    o = Origin()
    yield o
    o.close()


@pytest.fixture(scope="session")
def tls_origin(ca: trustme.CA) -> Iterator[Origin]:
    cert = ca.issue_cert("localhost", "127.0.0.1")
    import ssl

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    o = Origin(tls=ctx)
    yield o
    o.close()


@pytest.fixture(scope="session")
def echo() -> Iterator[EchoServer]:
    e = EchoServer()
    yield e
    e.close()


@pytest.fixture(scope="module")
def faulty():
    """An origin that misbehaves as its request path says (see faulty.ROUTES)."""
    o = FaultyOrigin()
    yield o
    o.close()


@pytest.fixture(scope="module")
def echo_peer():
    e = FaultyServer(echo_behaviour)
    yield e
    e.close()


@pytest.fixture(scope="module")
def blackhole():
    """A listener whose accept queue is full: connects to it hang."""
    b = Blackhole()
    yield b
    b.close()


@pytest.fixture
def start_gateway(tmp_path):
    started: list[GatewayProcess] = []

    def start(config: dict, **kwargs) -> GatewayProcess:
        gw = GatewayProcess(config, tmp_path, **kwargs)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.kill()


def need(program: str) -> str:
    """The path of a program the test needs (under CI a missing one fails the test)."""
    return required.tool(program)


def curl(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([need("curl"), "-sS", "--noproxy", "", *args], capture_output=True, timeout=timeout)
