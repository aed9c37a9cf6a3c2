"""Staged dataset uploads: rows written in short chunks, published by one small step at the end.

Why (issue 20): an upload used to insert every row in one transaction, holding SQLite's database
write lock (the lock every ledger append and budget change needs) for as long as the insert took;
a 200,000-row upload stalled every budget write behind it. Now an upload is a
:class:`~proxy.store.base.StagedUpload`:

1. ``begin_upload``: a fresh dataset id is registered as *staging* (no metadata, so no reader, listing or
   charge can see it; ``load_rows`` finds no dataset);
2. ``add``: each chunk of at most :data:`CHUNK_ROWS` rows / :data:`CHUNK_BYTES` bytes is its own
   short transaction (SQLite) or pipeline (Redis); the driver pauses between chunks for about as
   long as the chunk took, so writers waiting for the lock in other threads or processes (whose
   busy handler polls) find it free;
3. ``commit``: one small transaction assigns the version, writes the metadata and drops the staging
   mark: the dataset appears whole or not at all;
4. ``abort`` (an error, a cancelled request, a shutdown) deletes the staged rows in chunks. A
   process killed mid-upload leaves a staging mark that the next upload (or the next SQLite open)
   sweeps away once its owner is gone or it has not been touched for :data:`STALE_SECONDS`.

Rows stay in the ledger's database (one file to back up, deletions stay one transaction); chunking
bounds how long the lock is held, which is what the ledger needs.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator, Sequence

from proxy.store.base import DatasetMeta, StagedUpload, normalise_rows

#: Most rows written per chunk (one short write transaction each).
CHUNK_ROWS = 1000
#: Most bytes of text per chunk; a single larger row is a chunk of its own.
CHUNK_BYTES = 1 << 20
#: Pause after a chunk, as a multiple of the time the chunk took (1.0: the lock is free at least
#: half of the time during an upload), capped at :data:`MAX_PAUSE` seconds.
PAUSE_RATIO = 1.0
MAX_PAUSE = 0.05
#: A staging mark untouched this long belongs to a dead upload and is swept.
STALE_SECONDS = 900.0

Row = tuple[str, str, "str | None"]


def row_chunks(rows: Sequence[Row], max_rows: int | None = None, max_bytes: int | None = None) -> Iterator[list[Row]]:
    """Normalised rows in chunks of at most ``max_rows`` rows and about ``max_bytes`` bytes
    (default :data:`CHUNK_ROWS` / :data:`CHUNK_BYTES`)."""
    max_rows = max_rows or CHUNK_ROWS
    max_bytes = max_bytes or CHUNK_BYTES
    chunk: list[Row] = []
    size = 0
    for row in rows:
        n = len(row[0]) + len(row[1]) + (len(row[2]) if row[2] is not None else 0)
        if chunk and (len(chunk) >= max_rows or size + n > max_bytes):
            yield chunk
            chunk, size = [], 0
        chunk.append(row)
        size += n
    if chunk:
        yield chunk


def pause_after(seconds: float) -> float:
    """How long to leave the lock free after a chunk that took ``seconds``."""
    return min(MAX_PAUSE, max(0.0, seconds) * PAUSE_RATIO)


def write_all(upload: StagedUpload, rows: Sequence[Sequence[Any]],
              sleep: Callable[[float], None] = time.sleep) -> DatasetMeta:
    """Stage ``rows`` chunk by chunk (pausing between chunks) and commit; abort on any error."""
    try:
        for chunk in row_chunks(normalise_rows(rows)):
            sleep(pause_after(upload.add(chunk)))
        return upload.commit()
    except BaseException:
        upload.abort()
        raise


class ChunkedCreate:
    """``create_dataset`` for a store with ``begin_upload``: a staged upload driven to the end."""

    def create_dataset(self, name: str, rows: Sequence[tuple[str, ...]], budget_epsilon: float,
                       budget_delta: float, public: bool = False,
                       labels: Sequence[str] | None = None) -> DatasetMeta:
        upload = self.begin_upload(name, budget_epsilon, budget_delta, public, labels)  # type: ignore[attr-defined]
        return write_all(upload, rows)
