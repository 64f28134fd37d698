"""Error types, sorted by who is at fault, each carrying the response to answer with.

Library code raises these; one place (``http1.responses.error_response``) turns an error into
bytes on the wire, and only ``cli.main`` turns errors into exit codes.

``proxy_status`` is the RFC 9209 error type put in the ``Proxy-Status`` header.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base class: an error that ends a request with a response."""

    status: int = 500
    proxy_status: str = "proxy_internal_error"
    reason: str = "internal_error"  # short machine-readable reason (access log, metrics)
    profile: str | None = None  # the egress profile the request was decided under, if it got that far
    headers: tuple[tuple[str, str], ...] = ()  # extra response header fields (e.g. Retry-After)

    def __init__(self, detail: str, *, reason: str | None = None, status: int | None = None,
                 proxy_status: str | None = None, profile: str | None = None,
                 headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(detail)
        self.detail = detail
        if headers:
            self.headers = headers
        if profile is not None:
            self.profile = profile
        if reason is not None:
            self.reason = reason
        if status is not None:
            self.status = status
        if proxy_status is not None:
            self.proxy_status = proxy_status


# --- the client's fault -----------------------------------------------------------------

class ClientProtocolError(GatewayError):
    """The client sent something that is not acceptable HTTP/1.x for a proxy."""

    status = 400
    proxy_status = "http_request_error"
    reason = "bad_request"


class HeadTooLarge(ClientProtocolError):
    status = 431
    reason = "head_too_large"


class ClientTimeout(ClientProtocolError):
    status = 408
    reason = "client_timeout"


class AuthRequired(GatewayError):
    """``user``: the user name that was tried, if any (for the access record, never the answer).
    ``claimed``: what a refused service-account token says about its job (service account, pod),
    unverified (for the access record, never the answer; never the token itself)."""

    status = 407
    proxy_status = "http_request_denied"
    reason = "auth_required"
    user: str | None = None
    claimed: dict[str, str] | None = None

    def __init__(self, detail: str, *, user: str | None = None, **kwargs) -> None:
        super().__init__(detail, **kwargs)
        if user is not None:
            self.user = user


class PolicyDenied(GatewayError):
    status = 403
    proxy_status = "http_request_denied"
    reason = "denied"


class AddressProhibited(PolicyDenied):
    proxy_status = "destination_ip_prohibited"
    reason = "destination_ip_prohibited"


class NameProhibited(AddressProhibited):
    """A name that stands for an internal address (``policy.guard.NameGuard``)."""

    reason = "destination_name_prohibited"


class LimitReached(GatewayError):
    status = 429
    proxy_status = "connection_limit_reached"
    reason = "connection_limit_reached"


class Unavailable(GatewayError):
    """The gateway cannot take the request now (draining, overloaded)."""

    status = 503
    proxy_status = "proxy_internal_response"
    reason = "unavailable"


class EgressUnverified(Unavailable):
    """The profile's egress IP is not one its ``expect_ip`` promises, or could not be verified:
    the profile refuses its traffic until a check passes (fail closed)."""

    proxy_status = "destination_unavailable"
    reason = "egress_ip_unverified"


class EgressBlocked(Unavailable):
    """Every member of the profile is blocked by the provider the destination belongs to, and
    the provider says ``on_block: reroute``: nowhere to go (the detail names provider, member
    and evidence)."""

    proxy_status = "destination_unavailable"
    reason = "egress_blocked"


# --- the upstream's fault ---------------------------------------------------------------

class UpstreamError(GatewayError):
    status = 502
    proxy_status = "proxy_internal_error"
    reason = "upstream_error"


class DnsError(UpstreamError):
    proxy_status = "dns_error"
    reason = "dns_error"


class ConnectRefused(UpstreamError):
    proxy_status = "connection_refused"
    reason = "connection_refused"


class UpstreamProtocolError(UpstreamError):
    proxy_status = "http_protocol_error"
    reason = "upstream_protocol_error"


class UpstreamTimeout(UpstreamError):
    status = 504
    proxy_status = "connection_timeout"
    reason = "connect_timeout"


# --- the operator's fault ---------------------------------------------------------------

class ConfigError(Exception):
    """An invalid configuration. ``errors`` holds one ``FILE:LINE: key: what`` per problem."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors
