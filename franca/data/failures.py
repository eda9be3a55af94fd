"""Which fetch failures are transient (worth another try on a later run) and which are permanent: the fetcher
records them (``franca.data.download``), and the work units decide reruns and their success-rate floor from them
(``franca.data.units``) without importing the HTTP client."""

from __future__ import annotations

__all__ = ["RETRYABLE", "is_transient"]

RETRYABLE = frozenset({"timeout", "connection_error", "http_408", "http_429"})  # plus every http_5xx


def is_transient(reason: str | None) -> bool:
    """True for a failure worth another try later (timeout, connection error, HTTP 408, 429 and 5xx); every other
    reason (404 and the other 4xx, decode errors, too large, bad scheme, blocked address...) is permanent."""
    return isinstance(reason, str) and (reason in RETRYABLE or reason.startswith("http_5"))
