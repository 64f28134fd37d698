"""A tiny authoritative DNS server on loopback for tests (dnspython for the wire format):
names map to lists of addresses; anything else is NXDOMAIN.

A name may instead map to ``Changing([...], [...], ...)``: answers that change between
lookups (the first answer for the first A query, the second for the second, ...; the last
one is repeated), served with TTL 0 so no cache keeps them -- DNS rebinding. ``silent=True``
makes a server that reads queries and never answers (DNS timeouts)."""

from __future__ import annotations

import ipaddress
import socket
import threading

import dns.flags
import dns.message
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset


class Changing:
    """Answers that change from one A lookup to the next (AAAA lookups follow the A count)."""

    def __init__(self, *answers: list[str]) -> None:
        assert answers
        self.answers = [list(a) for a in answers]
        self.lookups = 0  # A queries answered so far

    def next(self, rdtype: int) -> list[str]:
        index = min(self.lookups, len(self.answers) - 1)
        if rdtype == dns.rdatatype.A:
            self.lookups += 1
        else:
            index = min(max(self.lookups - 1, 0), len(self.answers) - 1)
        return self.answers[index]


class DnsServer:
    def __init__(self, records: dict[str, list[str] | Changing], host: str = "127.0.0.1", ttl: int = 60,
                 silent: bool = False) -> None:
        self.records = {k.rstrip(".").lower(): v for k, v in records.items()}
        self.ttl = ttl
        self.silent = silent
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(0.2)
        self.address = f"{host}:{self.sock.getsockname()[1]}"
        self.queries: list[str] = []
        self._lock = threading.Lock()
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
            question = query.question[0]
            name = question.name.to_text().rstrip(".").lower()
            self.queries.append(name)
            if self.silent:
                continue
            reply = dns.message.make_response(query)
            reply.flags |= dns.flags.AA
            with self._lock:
                entry = self.records.get(name)
                ttl = self.ttl
                if isinstance(entry, Changing):
                    entry, ttl = entry.next(question.rdtype), 0
            if entry is None:
                reply.set_rcode(dns.rcode.NXDOMAIN)
            else:
                want = 4 if question.rdtype == dns.rdatatype.A else 6 if question.rdtype == dns.rdatatype.AAAA else 0
                matching = [a for a in entry if ipaddress.ip_address(a).version == want]
                if matching:
                    rtype = "A" if want == 4 else "AAAA"
                    # one record per address, in the order given (a refused address first is
                    # what catches a gateway that dials every answer in turn)
                    rrset = dns.rrset.RRset(question.name, dns.rdataclass.IN, dns.rdatatype.from_text(rtype))
                    for a in matching:
                        rrset.add(dns.rdata.from_text("IN", rtype, a), ttl)
                    reply.answer.append(rrset)
            self.sock.sendto(reply.to_wire(want_shuffle=False), peer)

    def close(self) -> None:
        self._stop = True
        self.sock.close()

    def __enter__(self) -> DnsServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
