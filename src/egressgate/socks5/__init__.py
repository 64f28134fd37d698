"""SOCKS5 (RFC 1928) with username/password authentication (RFC 1929), sans-IO.

``ServerNegotiation`` takes the client's bytes and yields events (``MethodsOffered``,
``Credentials``, ``ConnectRequest``); the driver answers each with the bytes the machine
makes (``choose_method``, ``auth_result``, ``reply``). Nothing here touches a socket or
decides policy: who may use which method and where a CONNECT may go is the caller's.

A message that is not acceptable raises ``SocksProtocolError`` (a ``ClientProtocolError``)
carrying the reply to send when the protocol allows one (``reply_bytes``), and a reason
for the access record. ``reply_code`` maps the gateway's typed refusals onto SOCKS reply
codes; the record keeps the precise reason.
"""

from .machine import (
    ADDRESS_TYPE_NOT_SUPPORTED,
    COMMAND_NOT_SUPPORTED,
    CONNECTION_NOT_ALLOWED,
    CONNECTION_REFUSED,
    GENERAL_FAILURE,
    HOST_UNREACHABLE,
    METHOD_NO_AUTH,
    METHOD_NONE_ACCEPTABLE,
    METHOD_USERPASS,
    REPLY_NAMES,
    SUCCEEDED,
    TTL_EXPIRED,
    ConnectRequest,
    Credentials,
    MethodsOffered,
    ServerNegotiation,
    SocksProtocolError,
    State,
    basic_authorization,
    reply_code,
)

__all__ = [
    "ADDRESS_TYPE_NOT_SUPPORTED", "COMMAND_NOT_SUPPORTED", "CONNECTION_NOT_ALLOWED", "CONNECTION_REFUSED",
    "GENERAL_FAILURE", "HOST_UNREACHABLE", "METHOD_NO_AUTH", "METHOD_NONE_ACCEPTABLE", "METHOD_USERPASS",
    "REPLY_NAMES", "SUCCEEDED", "TTL_EXPIRED", "ConnectRequest", "Credentials", "MethodsOffered",
    "ServerNegotiation", "SocksProtocolError", "State", "basic_authorization", "reply_code",
]
