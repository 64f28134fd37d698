"""The admin listener: health, readiness, metrics, status and reload over HTTP."""
