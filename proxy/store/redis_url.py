"""Our ``prefix=`` parameter of Redis store URLs (not a redis-py option)."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = ["split_prefix"]


def split_prefix(url: str, default: str = "dpicl:") -> tuple[str, str]:
    """Remove a ``prefix=`` query parameter (ours, not redis-py's) from ``url``."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefix = default
    kept = []
    for k, v in query:
        if k == "prefix":
            prefix = v
        else:
            kept.append((k, v))
    return urlunsplit(parts._replace(query=urlencode(kept))), prefix
