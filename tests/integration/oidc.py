"""A Kubernetes service-account issuer on loopback: OIDC discovery and JWKS over HTTPS (a
certificate from the test's CA), signing keys made in the test, and tokens minted as the
kube-apiserver mints projected ones (``iss``, ``aud``, ``exp``/``nbf``/``iat``, ``sub`` and
the ``kubernetes.io`` claims). ``publish`` chooses which keys the JWKS shows (rotation);
``close`` takes the issuer away (an outage); ``requests`` counts what was fetched."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

DISCOVERY = "/.well-known/openid-configuration"
JWKS = "/openid/v1/jwks"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def new_key(kind: str = "RSA"):
    return rsa.generate_private_key(public_exponent=65537, key_size=2048) if kind == "RSA" \
        else ec.generate_private_key(ec.SECP256R1())


def public_jwk(kid: str, key) -> dict:
    if isinstance(key, rsa.RSAPrivateKey):
        doc = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
        doc["alg"] = "RS256"
    else:
        doc = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
        doc["alg"] = "ES256"
    return {**doc, "kid": kid, "use": "sig"}


def public_pem(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


class Signer:
    """Signing keys and tokens, no server (unit tests): ``url`` is the issuer named."""

    def __init__(self, url: str = "https://issuer.test") -> None:
        self.url = url
        self.keys: dict[str, object] = {"k1": new_key("RSA"), "e1": new_key("EC")}
        self.published: list[str] = ["k1", "e1"]

    def publish(self, *kids: str) -> None:
        for kid in kids:
            self.keys.setdefault(kid, new_key("EC" if kid.startswith("e") else "RSA"))
        self.published = list(kids)

    def jwks(self, *kids: str) -> dict:
        return {"keys": [public_jwk(kid, self.keys[kid]) for kid in kids or self.published]}

    def claims(self, ns: str = "data-jobs", sa: str = "vendor-x-collector", pod: str | None = "collector-7d9f",
               aud: list[str] | None = None, iss: str | None = None, lifetime: float = 600,
               issued: float = 0.0, **extra) -> dict:
        now = int(time.time() + issued)
        doc = {"aud": aud or ["egressgate"], "iss": iss or self.url, "iat": now, "nbf": now,
               "exp": int(now + lifetime), "sub": f"system:serviceaccount:{ns}:{sa}",
               "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": sa, "uid": "3f1c"}}}
        if pod:
            doc["kubernetes.io"]["pod"] = {"name": pod, "uid": "9a2e"}
        doc.update(extra)
        return doc

    def mint(self, kid: str = "k1", **claims) -> str:
        key = self.keys[kid]
        alg = "RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256"
        return jwt.encode(self.claims(**claims), key, algorithm=alg, headers={"kid": kid})

    def forged(self, alg: str, kid: str = "k1", **claims) -> str:
        """A token PyJWT would refuse to make: ``none`` (no signature), or ``HS256`` whose HMAC
        key is the issuer's public key (the classic key-confusion attack)."""
        header = b64(json.dumps({"alg": alg, "kid": kid, "typ": "JWT"}).encode())
        payload = b64(json.dumps(self.claims(**claims)).encode())
        signing_input = f"{header}.{payload}".encode()
        if alg == "none":
            return f"{header}.{payload}."
        mac = hmac.new(public_pem(self.keys[kid]), signing_input, hashlib.sha256).digest()
        return f"{header}.{payload}.{b64(mac)}"


class Issuer(Signer):
    def __init__(self, ca: trustme.CA, host: str = "127.0.0.2") -> None:
        super().__init__()
        self.requests: list[str] = []
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                issuer.requests.append(self.path)
                if self.path == DISCOVERY:
                    body = {"issuer": issuer.url, "jwks_uri": issuer.url + JWKS,
                            "id_token_signing_alg_values_supported": ["RS256", "ES256"]}
                elif self.path == JWKS:
                    body = {"keys": [public_jwk(kid, issuer.keys[kid]) for kid in issuer.published]}
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(host).configure_cert(ctx)
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://{host}:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()
        self._closed = False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.server.shutdown()
            self.server.server_close()
