"""Client keys created through the admin API, for both backends (mixins of the two stores).

A record is ``{"key_hash": sha256 hex, "tasks", "passthrough", "created_at", "key_prefix"}``:
never the key itself. Adding never overwrites an existing name.
"""

from __future__ import annotations

import json
from typing import Any

#: The SQLite table (part of the SQLite store's schema).
SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS client_keys (
    name TEXT PRIMARY KEY,
    record TEXT NOT NULL
);
"""


class SqliteClientKeys:
    """``add/list/delete_client_key`` on the SQLite store's connection and transactions."""

    def add_client_key(self, name: str, record: dict[str, Any]) -> bool:
        with self._tx() as c:  # type: ignore[attr-defined]
            cur = c.execute("INSERT OR IGNORE INTO client_keys (name, record) VALUES (?, ?)", (name, json.dumps(record)))
            return cur.rowcount > 0

    def list_client_keys(self) -> dict[str, dict[str, Any]]:
        cur = self._conn().execute("SELECT name, record FROM client_keys ORDER BY name")  # type: ignore[attr-defined]
        return {name: json.loads(record) for name, record in cur.fetchall()}

    def delete_client_key(self, name: str) -> bool:
        with self._tx() as c:  # type: ignore[attr-defined]
            return c.execute("DELETE FROM client_keys WHERE name = ?", (name,)).rowcount > 0


class RedisClientKeys:
    """The same on Redis: one hash ``{prefix}client_keys`` of name -> record JSON."""

    def add_client_key(self, name: str, record: dict[str, Any]) -> bool:
        return bool(self.r.hsetnx(self._k("client_keys"), name, json.dumps(record)))  # type: ignore[attr-defined]

    def list_client_keys(self) -> dict[str, dict[str, Any]]:
        raw = self.r.hgetall(self._k("client_keys"))  # type: ignore[attr-defined]
        return {k.decode(): json.loads(v) for k, v in sorted(raw.items())}

    def delete_client_key(self, name: str) -> bool:
        return bool(self.r.hdel(self._k("client_keys"), name))  # type: ignore[attr-defined]
