"""Egress: which source address or upstream proxy a connection leaves through (``plan``),
name resolution (``resolver``) and the one place outbound sockets are opened (``dialer``)."""
