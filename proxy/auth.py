"""Bearer-key authentication: the admin key and optional per-client keys.

Rules (see docs/serving.md):
- The admin API always needs ``DPICL_ADMIN_KEY``; without one configured it answers 401 (it holds
  budgets and uploads private data, so there is no unauthenticated admin mode). A client key on an
  admin route gets 403.
- ``/v1`` is *open* (no key needed) when no admin key and no client keys are configured, or when
  the config says ``server.open: true``. Otherwise it needs a client key or the admin key.
- A client key may use the tasks it lists (``"*"`` = all) and, unless ``passthrough: false``,
  the pass-through models. Clients never see budgets or datasets.
- Client keys come from the config file (read-only) or from the admin API (``/admin/keys``), which
  stores only their SHA-256. Each replica keeps the stored keys in memory and re-reads them every
  ``server.cache_recheck_seconds`` (and at once after a change it made itself), so an unknown key
  never costs a store read and a key deleted on another replica stops working within that time.
- ``GET /metrics`` needs the admin key or the scrape token (``server.metrics_token_env``): its
  per-dataset budgets and per-route latencies (a warm-up's duration depends on private data) are
  admin-only figures, so the scrape token is as confidential as the admin key's read access.
- The admin key is read from ``Authorization: Bearer <key>`` only (the scheme name is
  case-insensitive, RFC 7235). ``/v1`` also accepts ``x-api-key`` / ``api-key`` headers, which some
  OpenAI-compatible clients send; the admin API does not (one documented form for the most
  powerful key).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from typing import Any, Mapping

from starlette.requests import Request

from proxy.config import ClientKey, Config, sha256_hex
from proxy.errors import APIError


@dataclass(frozen=True)
class Principal:
    """Who is calling: ``kind`` is "admin", "client" or "anonymous" (open mode)."""

    kind: str
    name: str
    tasks: frozenset[str] = field(default_factory=frozenset)
    passthrough: bool = True

    @property
    def actor(self) -> str:
        """How the ledger records this caller."""
        return self.kind if self.kind != "client" else f"client:{self.name}"

    def may_use_task(self, task: str) -> bool:
        return self.kind in ("admin", "anonymous") or "*" in self.tasks or task in self.tasks


ADMIN = Principal("admin", "admin")
ANONYMOUS = Principal("anonymous", "anonymous")


class Authenticator:
    """Resolves the bearer key of a request to a :class:`Principal`."""

    def __init__(self, config: Config):
        self._admin_key = config.admin_key
        self._metrics_token = config.metrics_token
        self._clients: dict[str, ClientKey] = dict(config.client_key_hashes)
        self._stored: dict[str, ClientKey] = {}  # SHA-256 -> key created through the admin API
        self.open = bool(config.server.open or (config.admin_key is None and not self._clients))

    def config_keys(self) -> list[ClientKey]:
        """The client keys of the config file (read-only through the API)."""
        return sorted(self._clients.values(), key=lambda k: k.name)

    def load_stored(self, records: Mapping[str, Mapping[str, Any]]) -> None:
        """Replace the in-memory copy of the admin-created keys (``Store.list_client_keys()``)."""
        stored: dict[str, ClientKey] = {}
        for name, rec in records.items():
            digest = rec.get("key_hash")
            if isinstance(digest, str) and digest not in self._clients:  # a config key always wins
                stored[digest] = ClientKey(name=name, key_hash=digest, tasks=list(rec.get("tasks") or []),
                                           passthrough=bool(rec.get("passthrough", True)))
        self._stored = stored

    @staticmethod
    def _bearer(request: Request, alternatives: bool = True) -> str | None:
        """The key of a request: None when absent, "" when the header is malformed.

        ``alternatives``: also read ``x-api-key`` / ``api-key`` (the /v1 routes only).
        """
        header = request.headers.get("authorization")
        if header:
            scheme, _, value = header.partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                return value.strip()
            return ""  # present but malformed
        if not alternatives:
            return None
        key = request.headers.get("x-api-key") or request.headers.get("api-key")
        return key.strip() if key else None

    def _lookup(self, key: str) -> Principal | None:
        if self._admin_key is not None and hmac.compare_digest(key.encode(), self._admin_key.encode()):
            return ADMIN
        digest = sha256_hex(key)
        client = self._clients.get(digest) or self._stored.get(digest)
        if client is not None:
            return Principal("client", client.name, frozenset(client.tasks), client.passthrough)
        return None

    def client(self, request: Request) -> Principal:
        """Principal for a /v1 request (raises 401 when a key is needed and missing or wrong)."""
        key = self._bearer(request)
        if not key:
            if self.open:
                return ANONYMOUS
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", "missing_api_key")
        principal = self._lookup(key)
        if principal is None:
            if self.open:  # open mode ignores keys it does not know (e.g. the openai client's dummy key)
                return ANONYMOUS
            raise APIError(401, "invalid API key", "invalid_api_key")
        return principal

    def admin(self, request: Request) -> Principal:
        """Principal for an admin request: 401 without a valid key, 403 with a client key."""
        if self._admin_key is None:
            raise APIError(401, "the admin API is disabled: start the server with DPICL_ADMIN_KEY set",
                           "admin_disabled")
        key = self._bearer(request, alternatives=False)
        if not key:
            raise APIError(401, "missing admin key: send 'Authorization: Bearer <admin key>'", "missing_api_key")
        principal = self._lookup(key)
        if principal is None:
            raise APIError(401, "invalid API key", "invalid_api_key")
        if principal.kind != "admin":
            raise APIError(403, "this key is not allowed to use the admin API", "permission_denied")
        return principal

    def metrics(self, request: Request) -> None:
        """Allow ``GET /metrics`` for the admin key or the scrape token (401 otherwise, 403 for a client key)."""
        if self._admin_key is None and self._metrics_token is None:
            raise APIError(401, "/metrics is disabled: set DPICL_ADMIN_KEY or server.metrics_token_env",
                           "metrics_disabled")
        key = self._bearer(request, alternatives=False)
        if not key:
            raise APIError(401, "missing key: send 'Authorization: Bearer <scrape token or admin key>'",
                           "missing_api_key")
        if self._metrics_token is not None and hmac.compare_digest(key.encode(), self._metrics_token.encode()):
            return
        principal = self._lookup(key)
        if principal is None:
            raise APIError(401, "invalid API key", "invalid_api_key")
        if principal.kind != "admin":
            raise APIError(403, "this key is not allowed to read /metrics", "permission_denied")
