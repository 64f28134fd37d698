"""A tiny authoritative DNS server on loopback for tests (dnspython for the wire format):
names map to lists of addresses; anything else is NXDOMAIN."""

from __future__ import annotations

import ipaddress
import socket
import threading

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset


class DnsServer:
    def __init__(self, records: dict[str, list[str]], host: str = "127.0.0.1", ttl: int = 60) -> None:
        self.records = {k.rstrip(".").lower(): v for k, v in records.items()}
        self.ttl = ttl
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(0.2)
        self.address = f"{host}:{self.sock.getsockname()[1]}"
        self.queries: list[str] = []
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                data, peer = self.sock.recvfrom(4096)
            except (TimeoutError, OSError):
                continue
            try:
                query = dns.message.from_wire(data)
            except Exception:
                continue
            reply = dns.message.make_response(query)
            reply.flags |= dns.flags.AA
            question = query.question[0]
            name = question.name.to_text().rstrip(".").lower()
            self.queries.append(name)
            addrs = self.records.get(name)
            if addrs is None:
                reply.set_rcode(dns.rcode.NXDOMAIN)
            else:
                want = 4 if question.rdtype == dns.rdatatype.A else 6 if question.rdtype == dns.rdatatype.AAAA else 0
                matching = [a for a in addrs if ipaddress.ip_address(a).version == want]
                if matching:
                    rtype = "A" if want == 4 else "AAAA"
                    reply.answer.append(dns.rrset.from_text(question.name, self.ttl, "IN", rtype, *matching))
            self.sock.sendto(reply.to_wire(), peer)

    def close(self) -> None:
        self._stop = True
        self.sock.close()
