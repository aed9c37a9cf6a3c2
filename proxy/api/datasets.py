"""Admin API: datasets (upload, list, show, delete). See docs/admin-api.md.

No endpoint returns private rows: uploads answer with id, row and unit counts and the declared
label domain; listings show metadata. An upload of a non-public dataset must declare its label
domain (``labels``): the domain is public configuration, so every released structure keyed by
labels (noisy counts, ledger partitions, demonstrations, cache keys) is the same for neighbouring
datasets. Rows with a label outside the domain are refused, naming row numbers only.
"""

from __future__ import annotations

import contextlib
import json
import re
import logging
from typing import Any, AsyncIterator

import anyio
from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from aggregation.datasets import DataError, deduplicate, parse_rows
from aggregation.prompts import Example
from proxy.api.common import audit, json_response, require_admin
from proxy.api.schemas import check_budget
from proxy.errors import APIError
from proxy.logs import log_event
from proxy.store.base import DatasetMeta, NotFound, StagedUpload
from proxy.store.uploads import pause_after, row_chunks

_DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
#: Row numbers named in a refusal (the first few; the count is given too).
_SHOW_ROWS = 5
MAX_LABELS = 1000

log = logging.getLogger("dpicl.datasets")

router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])


def dataset_view(meta: DatasetMeta) -> dict[str, Any]:
    """The admin view of a dataset version (docs/admin-api.md)."""
    return {
        "id": meta.id, "name": meta.name, "version": meta.version, "rows": meta.rows,
        "units": meta.units if meta.units is not None else meta.rows, "labels": meta.labels,
        "budget_epsilon": meta.budget_epsilon, "budget_delta": meta.budget_delta, "public": meta.public,
        "created_at": meta.created_at, "noisy_counts_released": meta.noisy_counts is not None,
    }


def _float_field(form: Any, name: str, default: float | None) -> float | None:
    raw = form.get(name)
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return default
    if not isinstance(raw, str):
        raise APIError(400, f"'{name}' must be a form field, not a file", "invalid_budget", param=name)
    try:
        return float(raw)
    except ValueError:
        raise APIError(400, f"'{name}' must be a number", "invalid_budget", param=name) from None


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _bool_field(form: Any, name: str, default: bool) -> bool:
    # A typo must not silently pick a side: 'deduplicate=fasle' is refused, not read as true.
    raw = form.get(name)
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return default
    value = raw.strip().lower() if isinstance(raw, str) else None
    if value not in _TRUE + _FALSE:
        raise APIError(400, f"'{name}' must be true or false", "invalid_request", param=name)
    return value in _TRUE


def _labels_field(form: Any) -> list[str] | None:
    """The declared label domain: a JSON list (``labels=["A","B"]``), comma-separated, or the
    ``labels`` field repeated. None when not given."""
    raw = [v for v in form.getlist("labels") if not (isinstance(v, str) and not v.strip())]
    if not raw:
        return None
    if any(not isinstance(v, str) for v in raw):
        raise APIError(400, "'labels' must be a form field, not a file", "invalid_labels", param="labels")
    if len(raw) == 1 and raw[0].lstrip().startswith("["):
        try:
            parsed = json.loads(raw[0])
        except (json.JSONDecodeError, RecursionError):  # RecursionError: nested thousands of levels deep
            raise APIError(400, "'labels' is not a valid JSON list", "invalid_labels", param="labels") from None
        if not isinstance(parsed, list) or not all(isinstance(x, (str, int)) and not isinstance(x, bool)
                                                   for x in parsed):
            raise APIError(400, "'labels' must be a list of strings", "invalid_labels", param="labels")
        labels = [str(x).strip() for x in parsed]
    elif len(raw) == 1:
        labels = [x.strip() for x in raw[0].split(",")]
    else:
        labels = [x.strip() for x in raw]
    if not labels or any(not x for x in labels) or len(set(labels)) != len(labels) or len(labels) > MAX_LABELS:
        raise APIError(400, f"'labels' must be 1-{MAX_LABELS} distinct non-empty labels", "invalid_labels",
                       param="labels")
    return labels


def _outside(rows: list[Example], domain: list[str]) -> list[int]:
    allowed = set(domain)
    return [i for i, r in enumerate(rows, start=1) if r.label not in allowed]


async def _dataset_or_404(request: Request, ref: str) -> DatasetMeta:
    """A dataset version by id, else the newest version of the name ``ref`` (as tasks and jobs take it)."""
    try:
        return await anyio.to_thread.run_sync(request.app.state.store.resolve_dataset, ref)
    except NotFound:
        raise APIError(404, f"no dataset with the id or name {ref!r} (see dpicl datasets list)",
                       "dataset_not_found") from None


@router.post("/datasets")
async def upload_dataset(request: Request) -> Response:
    """Multipart upload: ``file`` (JSONL or CSV with text, label and optional privacy_unit),
    ``name``, ``labels`` (the label domain; required unless ``public``), optional ``epsilon`` and
    ``delta`` (the name's budget, set by its first upload), ``public`` and ``deduplicate``."""
    ctype = (request.headers.get("content-type") or "").split(";", 1)[0].strip().lower()
    if ctype != "multipart/form-data":
        raise APIError(415, "upload datasets as multipart/form-data with fields 'file', 'name' and 'labels'",
                       "unsupported_media_type")
    server = request.app.state.config.server
    try:
        form = await request.form(max_files=1, max_fields=16, max_part_size=server.max_body_bytes)
    except APIError:
        raise
    except Exception:
        # Multipart parser errors may quote the part they choked on: answer without details.
        raise APIError(400, "malformed multipart body", "invalid_multipart") from None
    try:
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise APIError(400, "missing 'file' (a JSONL or CSV file with 'text' and 'label')", "missing_file",
                           param="file")
        name = form.get("name")
        if not isinstance(name, str) or not _DATASET_NAME.match(name):
            raise APIError(400, "'name' is required: 1-128 letters, digits and ._-", "invalid_name", param="name")
        epsilon = _float_field(form, "epsilon", None)
        delta = _float_field(form, "delta", None)
        try:  # the same bounds as PUT /admin/budget/{name} (MIN_BUDGET_EPSILON..MAX_BUDGET_EPSILON)
            check_budget(epsilon if epsilon is not None else server.default_budget_epsilon, delta)
        except ValueError as exc:
            raise APIError(400, str(exc), "invalid_budget", param="delta" if "delta" in str(exc) else "epsilon") from None
        public = _bool_field(form, "public", False)
        dedup = _bool_field(form, "deduplicate", True)
        labels = _labels_field(form)
        if labels is None and not public:
            raise APIError(400, "'labels' is required for a non-public dataset: declare the label domain, e.g. "
                                "labels=[\"billing\",\"outage\"] (it is public configuration; reading it from the "
                                "rows would release it without noise)", "missing_labels", param="labels")
        filename = upload.filename or "data.jsonl"
        if not filename.lower().endswith((".jsonl", ".json", ".ndjson", ".csv")):
            raise APIError(415, "the file must be .jsonl or .csv", "unsupported_file_type", param="file")
        data = await upload.read()
    finally:
        await form.close()

    def parse() -> tuple[list[tuple[str, str, str | None]], int, list[int]]:
        examples = parse_rows(data, filename)
        outside = _outside(examples, labels) if labels is not None else []
        if outside:
            return [], 0, outside
        dropped = 0
        if dedup:
            examples, dropped = deduplicate(examples)
        return [(e.text, e.label, e.unit) for e in examples], dropped, []

    try:
        rows, dropped, outside = await anyio.to_thread.run_sync(parse)
    except DataError as exc:  # names the row number, never its content
        raise APIError(400, f"invalid dataset file: {exc}", "invalid_dataset", param="file") from None
    except UnicodeDecodeError:
        raise APIError(400, "invalid dataset file: it is not UTF-8 text", "invalid_dataset", param="file") from None
    if outside:
        shown = ", ".join(str(i) for i in outside[:_SHOW_ROWS])
        more = f" and {len(outside) - _SHOW_ROWS} more" if len(outside) > _SHOW_ROWS else ""
        raise APIError(400, f"{len(outside)} rows have a label outside the declared 'labels' (rows {shown}{more}, "
                            f"counting data rows from 1); nothing was stored", "label_outside_domain", param="labels")
    store = request.app.state.store
    eps = epsilon if epsilon is not None else server.default_budget_epsilon
    dlt = delta if delta is not None else server.default_budget_delta

    def begin() -> tuple[StagedUpload, bool]:
        try:
            pop = store.get_population(name)
        except NotFound:
            pop = None
        if pop is not None and ((epsilon is not None and epsilon != pop.budget_epsilon)
                                or (delta is not None and delta != pop.budget_delta)):
            raise APIError(409, f"dataset name {name!r} already has a budget (epsilon {pop.budget_epsilon:g}, delta "
                                f"{pop.budget_delta:g}) shared by its versions; change it with dpicl budget set "
                                f"{name} (PUT /admin/budget/{name})",
                           "budget_exists", param="epsilon")
        return store.begin_upload(name, eps, dlt, public, labels), pop is None

    upload, new_name = await anyio.to_thread.run_sync(begin)
    async with request.app.state.uploads.track():
        meta = await _stage_and_publish(request, upload, rows, new_name)
    request.app.state.metrics.record_spend(meta.id, 0.0, meta.budget_epsilon)
    log_event("dataset.uploaded", dataset_id=meta.id, rows=meta.rows, labels=len(meta.labels))
    # Told to the uploader only (who holds the file); not logged and not part of stored metadata.
    return json_response({**dataset_view(meta), "duplicates_removed": dropped}, 201)


class UploadsInFlight:
    """Uploads still writing or discarding rows. Shutdown waits for them (bounded) before it
    closes the store: a connection must not be closed under a thread that is using it."""

    def __init__(self) -> None:
        self.count = 0

    @contextlib.asynccontextmanager
    async def track(self) -> AsyncIterator[None]:
        """Count one upload for as long as the block runs (its discard included)."""
        self.count += 1
        try:
            yield
        finally:
            self.count -= 1

    async def drain(self, timeout: float) -> bool:
        """Wait until no upload is in flight, at most ``timeout`` seconds; whether none is left."""
        with anyio.move_on_after(timeout):
            while self.count:
                await anyio.sleep(0.02)
        return self.count == 0


async def _discard(upload: StagedUpload) -> None:
    """Abort a staged upload; a failure here (the store is failing already) must not hide the
    original error: the staged rows stay invisible and are swept later (docs/stores.md)."""
    try:
        await anyio.to_thread.run_sync(upload.abort)
    except Exception as exc:  # noqa: BLE001
        log.warning("could not discard a staged upload now (%s); it will be swept", type(exc).__name__)


async def _stage_and_publish(request: Request, upload: StagedUpload, rows: list[tuple[str, str, str | None]],
                             new_name: bool) -> DatasetMeta:
    """Write the rows chunk by chunk (each a short store write, then a pause that leaves the lock
    to waiting ledger and budget writes), then publish the version and its audit record together.

    A cancellation (client gone, server shutting down) or an error before the publish discards the
    staged rows: no version and no audit record appear. The publish and the audit record are
    shielded from cancellation, and a failed audit write removes the just-published version.
    """
    try:
        for chunk in row_chunks(rows):
            await anyio.sleep(pause_after(await anyio.to_thread.run_sync(upload.add, chunk)))
    except BaseException:
        with anyio.CancelScope(shield=True):
            await _discard(upload)
        raise
    with anyio.CancelScope(shield=True):
        try:
            meta = await anyio.to_thread.run_sync(upload.commit)
        except BaseException:
            await _discard(upload)
            raise
        try:
            await audit(request, "dataset.upload", meta.name, dataset_id=meta.id, version=meta.version,
                        rows=meta.rows, units=meta.units, labels=len(meta.labels), public=meta.public,
                        new_name=new_name, budget_epsilon=meta.budget_epsilon,
                        budget_delta=meta.budget_delta)  # the budget's history starts here
        except BaseException:
            with contextlib.suppress(Exception):  # best effort: the store is failing already
                await anyio.to_thread.run_sync(request.app.state.store.delete_dataset, meta.id)
            raise
    return meta


@router.get("/datasets")
async def list_datasets(request: Request) -> Response:
    metas = await anyio.to_thread.run_sync(request.app.state.store.list_datasets)
    return json_response({"object": "list", "data": [dataset_view(m) for m in metas]})


@router.get("/datasets/{dataset_id}")
async def get_dataset(request: Request, dataset_id: str) -> Response:
    """One version's metadata; ``dataset_id`` may be a name (its newest version)."""
    return json_response(dataset_view(await _dataset_or_404(request, dataset_id)))


@router.delete("/datasets/{dataset_id}")
async def delete_dataset(request: Request, dataset_id: str) -> Response:
    """Delete one version's rows; ``dataset_id`` may be a name (its newest version)."""
    meta = await _dataset_or_404(request, dataset_id)
    dataset_id = meta.id
    state = request.app.state
    try:
        await anyio.to_thread.run_sync(state.store.delete_dataset, dataset_id)
    except NotFound:
        raise APIError(404, f"dataset {dataset_id!r} not found", "dataset_not_found") from None
    state.demos.forget(dataset_id=dataset_id)
    state.metrics.forget_dataset(dataset_id)
    log_event("dataset.deleted", dataset_id=dataset_id)
    await audit(request, "dataset.delete", meta.name, dataset_id=dataset_id, version=meta.version)
    # The name's budget and ledger stay (docs/admin-api.md): a re-upload continues them.
    return json_response({"id": dataset_id, "deleted": True, "name": meta.name, "ledger_kept": True})
