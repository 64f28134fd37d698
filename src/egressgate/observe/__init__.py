"""Observability: the access log (one record per request or tunnel) and metrics."""
