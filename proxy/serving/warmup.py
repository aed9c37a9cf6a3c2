"""Warm-up: the charged generation of a task's demonstration set, in the privacy order.

Privacy order of a warm-up (:meth:`Warmup.generate`), all before any private row is read:
1. resolve the dataset (metadata only) and fix the DP pool-size estimates (charged once, by
   :meth:`proxy.budget.BudgetService.noisy_counts`);
2. plan the demonstrations from public quantities (:func:`aggregation.fewshot.plan_demonstrations`);
3. reserve the plan's charges in the ledger (atomic; refused with 402 when over budget).
Only then are the rows loaded and the demonstrations generated with CSPRNG noise (``Noise(None)``).
:meth:`Warmup.price` answers a dry run with the same plan and charges nothing.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import dp_accounting as dpa

from aggregation.accounting import WHOLE_DATASET
from aggregation.embeddings import CachedEmbedder, Embedder
from aggregation.evaluation.clustered import public_centroid_texts
from aggregation.fewshot import COUNT_SIGMA, Plan, generate_demonstration, plan_demonstrations
from aggregation.mechanisms import Noise
from aggregation.prompts import Example
from aggregation.quantile import WidthRelease, width_event
from aggregation.sources.timing import TimedSource
from aggregation.units import unit_pools
from proxy.budget import BudgetService
from proxy.task_config import TaskConfig
from proxy.errors import APIError
from proxy.logs import log_event
from proxy.metrics import Metrics
from proxy.serving import clusters as cl
from proxy.serving.calibrations import StoreCalibrationCache
from proxy.serving.generators import Generators
from proxy.serving.tasks import generation_config, task_prompt
from proxy.serving.widths import Width, counter, fixed_width, from_release, is_auto
from proxy.store.base import BudgetExceeded, DatasetMeta, NotFound, Store
from proxy.upstreams.base import UpstreamError

#: Cached payload format version (bump when the payload layout changes).
PAYLOAD_VERSION = 1

#: ``progress(tokens_done, tokens_total)``; called from the generating thread.
Progress = Callable[[int, int], None]
#: ``reserved(epsilon_cost)``: the cost (count release included) is in the ledger; no row read yet.
Reserved = Callable[[float], None]
#: ``should_stop()``: asked before the reservation and before every token (cancel, lost owner).
ShouldStop = Callable[[], bool]


class Stopped(Exception):
    """The generation was asked to stop; ``charged`` says whether its cost was already reserved."""

    def __init__(self, charged: bool, tokens_done: int = 0):
        super().__init__("stopped")
        self.charged = charged
        self.tokens_done = tokens_done


@dataclass
class Prepared:
    """A task resolved against its dataset: the dataset's metadata, the labels and the cache key."""

    meta: DatasetMeta
    labels: list[str]
    key: str


class Warmup:
    """Prices and generates demonstration sets (one generation at a time per process)."""

    def __init__(self, store: Store, budget: BudgetService, metrics: Metrics, generators: Generators,
                 embedder: Embedder):
        self.store = store
        self.budget = budget
        self.metrics = metrics
        self.generators = generators
        #: Calibrations shared through the store: a repeated plan (dry run, 202, start) answers at once.
        self.calibrations = StoreCalibrationCache(store)
        #: Per-label cluster releases of clustered tasks (charged once, shared by every task).
        self.clusters = cl.ClusterReleases(store, budget)
        #: The sentence embedder of clustered tasks, held by the process's lifespan objects like the
        #: generators (a MiniLMEmbedder loads its model on first use; tests may replace it).
        self.embedder = embedder
        #: Generation is CPU-heavy: one at a time per process.
        self._gen_lock = threading.Lock()

    def _plan(self, task: TaskConfig, meta: DatasetMeta, labels: list[str],
              pool_sizes: dict[str, float], releases: dict[str, cl.LabelClusters] | None = None,
              ) -> tuple[Plan, dict[str, cl.Part]]:
        """The set's plan from public inputs (keyed by label, or by ``label#j`` inside clusters)."""
        config = generation_config(task)
        if not config.private and not config.public_only and not meta.public:
            raise APIError(400, f"task {task.name!r} has infinite epsilon (no noise), which is only allowed on "
                                f"datasets marked public", "not_private")
        try:
            if releases is not None:
                return cl.plan_clusters(config, releases, labels, task.shots, meta.budget_delta, self.calibrations)
            return plan_demonstrations(config, {lab: task.shots for lab in labels}, pool_sizes,
                                       meta.budget_delta, cache=self.calibrations), {}
        except ValueError as exc:
            # Messages name labels and DP-estimated sizes only (admin-facing).
            raise APIError(400, f"task {task.name!r}: {exc}", "invalid_generation") from None

    def _estimated_pools(self, meta: DatasetMeta, labels: list[str]) -> dict[str, float]:
        """Pool sizes for pricing before the DP counts exist: units spread evenly over the
        declared labels (admin-only: exact sizes never reach a client, see :meth:`generate`)."""
        units = meta.units if meta.units is not None else meta.rows
        share = units / max(1, len(meta.labels))
        return {lab: share for lab in labels}

    def _stored_release(self, task: TaskConfig, meta: DatasetMeta) -> WidthRelease | None:
        stored = self.store.get_width_release(meta.id, self.generators.generator_id(task))
        return WidthRelease.from_dict(stored) if stored is not None else None

    def width(self, task: TaskConfig, prep: Prepared) -> Width:
        """The task's prompt width now, charging nothing: hand-set, derived from the stored DP
        row-length release, or (``auto`` before the release) ``width=None``."""
        if not is_auto(task):
            return fixed_width(task)
        release = self._stored_release(task, prep.meta)
        if release is None:
            return Width(None, auto=True)
        # Token counting only: a view or dry run does not load the generator's weights for this.
        return from_release(task, self.generators.token_counter(task), task_prompt(task), prep.labels, release)

    def _release_keys(self, task: TaskConfig, labels: list[str], width: int | None) -> dict[str, str]:
        return cl.release_keys(task, labels, task_prompt(task, labels), generation_config(task, width),
                               self.generators.generator_id(task))

    def _price_clusters(self, task: TaskConfig, prep: Prepared, width: Width
                        ) -> tuple[Plan, list[tuple[str, dpa.DpEvent]], dict[str, cl.Part]]:
        """Plan and pending release charges of a clustered task (estimated sizes where no release
        exists yet: admin-only, like :meth:`_estimated_pools`)."""
        have = self.clusters.stored(prep.meta, self._release_keys(task, prep.labels, width.width))
        guess = cl.estimated(task, prep.meta, prep.labels)
        sizes = {lab: r if r is not None else guess[lab] for lab, r in have.items()}
        plan, parts = self._plan(task, prep.meta, prep.labels, {}, sizes)
        return plan, self.clusters.pending(task, have), parts

    def price(self, task: TaskConfig, prep: Prepared, actor: str) -> dict[str, Any]:
        """Dry run: what generating the set would cost now (nothing is charged or read)."""
        meta, labels = prep.meta, prep.labels
        cached = self.store.get_demos(prep.key) is not None
        width = self.width(task, prep)
        clusters_pending = counts_pending = False
        parts: dict[str, cl.Part] = {}
        if cl.clustered(task):  # the clusters' DP sizes replace the label histogram
            plan, pending, parts = self._price_clusters(task, prep, width)
            clusters_pending = bool(pending)
            charges = pending + plan.charges()
            # Only released DP sizes are shown: a label still to be clustered was planned on an estimate.
            unreleased = {lab for lab, _ in pending}
            parts = {k: p for k, p in parts.items() if p.label not in unreleased}
        else:
            counts_pending = meta.noisy_counts is None and not task.generation.public_only
            pools = dict(meta.noisy_counts or {}) if not counts_pending else self._estimated_pools(meta, labels)
            plan, _ = self._plan(task, meta, labels, pools)
            charges = list(plan.charges())
            if counts_pending:
                charges.insert(0, (WHOLE_DATASET, dpa.GaussianDpEvent(COUNT_SIGMA)))
        if width.auto and width.width is None:
            charges.insert(0, (WHOLE_DATASET, width_event()))  # the row-length release, charged once
        res = self.budget.reserve(meta.id, charges, actor, f"dry run: task {task.name}", dry_run=True)
        return {
            "key": prep.key, "dry_run": True, "cached": cached, "dataset_id": meta.id,
            # A set already cached under the current key is served as it is: warming costs nothing.
            "epsilon_cost": 0.0 if cached else _num(res.epsilon), "set_epsilon": _num(plan.epsilon()),
            "spent_epsilon": _num(res.spent_before), "remaining_epsilon": _num(max(0.0, res.budget_epsilon - res.spent_before)),
            "remaining_after": _num(res.remaining), "budget_epsilon": res.budget_epsilon,
            "budget_delta": res.budget_delta, "fits": res.fits,
            # Before the first real warm-up the per-label pool sizes are estimated (the DP counts,
            # charged once, are released then), so the cost is approximate.
            "estimate": (clusters_pending or counts_pending or width.width is None) and not cached,
            "decisions": _decisions(plan),
            **({"clusters": cl.shown(parts, plan)} if parts else {}),
            # The prompt width (DP-derived for ``auto``; null until the row-length release exists).
            "prompt_width": width.to_dict(),
        }

    def _load_source(self, task: TaskConfig) -> None:
        """Load the generator (cached per process) so that an install without the model's extra is
        refused with nothing charged (501 naming the extra and the module; a module name is no data)."""
        try:
            self.generators.source(task)
        except ImportError as exc:
            module = exc.name if isinstance(exc.name, str) and exc.name.isidentifier() else "unknown"
            raise APIError(501, f"demonstration generation needs module {module}, which this server lacks (the "
                                "local model needs the 'local' extra: pip install 'dpicl[local]'); nothing was "
                                "charged", "missing_extra") from None

    def _refuse(self, exc: BudgetExceeded) -> APIError:
        return APIError(402, f"privacy budget exceeded: {exc}", "budget_exceeded")

    def generate(self, task: TaskConfig, prep: Prepared, actor: str, admin: bool = True,
                 progress: Progress | None = None, reserved: Reserved | None = None,
                 should_stop: ShouldStop | None = None) -> dict[str, Any]:
        """Reserve the set's cost, then read the rows, generate the set and store it (blocking).

        ``reserved`` is told the cost once it is in the ledger; ``progress`` after every token.
        Progress counts the charged maximum ``T`` per demonstration (a demonstration that stops
        early jumps to its full ``T``), so ``tokens_total`` is public; how fast it moves is not
        (stopping depends on the data), which is why warm-up views are admin-only.
        A demonstration that came out empty is not stored; its label is listed in
        ``empty_labels`` (the choice is post-processing of DP output).
        ``should_stop`` is asked before the reservation (a stop there raises :class:`Stopped` with
        nothing charged) and before every token (then the charge stays: rows may have been read);
        a stopped generation stores nothing.
        """
        meta, labels = prep.meta, prep.labels
        reason = f"task {task.name} demos {prep.key[:12]}"
        config = generation_config(task)
        embed = CachedEmbedder(self.embedder)  # this warm-up's only: rows stay here
        entered = time.perf_counter()
        load_s = 0.0  # loading the generator model (the first warm-up of a process)
        # epsilon_cost is the increase of the name's spent epsilon, the one-time count release
        # included (a charge by another process at the same moment is counted too: over-reports).
        if should_stop is not None and should_stop():
            raise Stopped(charged=False)  # cancelled before anything was charged
        spent_before = self.budget.spent(meta.id)
        try:
            width = fixed_width(task)
            auto = is_auto(task)
            if auto:
                # A generator that cannot count tokens cannot derive a width: refused (400) before
                # anything is charged; loading it first also keeps a missing model uncharged.
                count = counter(task, self.generators.source(task))
            pools: dict[str, float] = {}
            releases: dict[str, cl.LabelClusters] | None = None
            clustered = cl.clustered(task)
            problem = self.embedder.unavailable() if clustered else None
            if problem:  # the install lost its embedder after the task was accepted
                raise APIError(501, f"generation.clusters needs the offline sentence embedder: {problem}; "
                                    "nothing was charged", "missing_extra")
            if not config.public_only:
                pending: list[tuple[str, dpa.DpEvent]] = []
                if clustered:  # the clusters' DP sizes replace the label histogram
                    pending += self._price_clusters(task, prep, width)[1]
                elif meta.noisy_counts is None:
                    pending.append((WHOLE_DATASET, dpa.GaussianDpEvent(COUNT_SIGMA)))
                if auto and self._stored_release(task, meta) is None:
                    pending.append((WHOLE_DATASET, width_event()))
                if pending:
                    # Refuse hopeless requests before a one-time release is charged. The
                    # estimate uses the exact row count, which the admin already knows (upload
                    # answer) but a client must not learn from a refusal: for clients only the
                    # releases themselves, data-independent costs, are checked first.
                    trial = list(pending)
                    if admin and clustered:
                        trial += self._price_clusters(task, prep, width)[0].charges()
                    elif admin:
                        known = meta.noisy_counts
                        estimate, _ = self._plan(task, meta, labels, dict(known) if known is not None
                                                 else self._estimated_pools(meta, labels))
                        trial += list(estimate.charges())
                    res = self.budget.reserve(meta.id, trial, actor, reason, dry_run=True, kind="warmup")
                    if not res.fits:
                        raise BudgetExceeded(
                            f"this request needs about epsilon {_fmt(res.epsilon)} but only "
                            f"{_fmt(max(0.0, res.budget_epsilon - res.spent_before))} of "
                            f"{_fmt(res.budget_epsilon)} remains on dataset {meta.id}",
                            remaining=max(0.0, res.budget_epsilon - res.spent_before))
                loading = time.perf_counter()
                self._load_source(task)  # before the first charge: a model that cannot load costs nothing
                load_s = time.perf_counter() - loading
                if not clustered:
                    pools = self.budget.noisy_counts(meta.id, actor, f"noisy pool sizes for task {task.name}")
                if auto:
                    release = self.budget.width_release(meta.id, self.generators.generator_id(task), count, actor,
                                                        f"row lengths for task {task.name}")
                    width = from_release(task, self.generators.source(task), task_prompt(task), labels, release)
                    config = generation_config(task, width.width)
                if clustered:
                    releases = self._release_clusters(task, prep, config, width, embed, actor)
            plan, parts = self._plan(task, meta, labels, pools, releases)
            # The spend is recorded BEFORE any private row is read.
            res = self.budget.reserve(meta.id, plan.charges(), actor, reason, kind="warmup", ref=task.name)
        except BudgetExceeded as exc:
            raise self._refuse(exc) from None
        except NotFound:
            raise APIError(409, f"dataset {task.dataset!r} was deleted", "dataset_missing") from None
        self.metrics.record_spend(meta.id, res.spent_after, res.budget_epsilon)
        log_event("demos.reserved", task=task.name, dataset_id=meta.id, epsilon=_num(res.epsilon),
                  spent=_num(res.spent_after), actor=actor)
        if reserved is not None:
            reserved(max(res.epsilon, res.spent_after - spent_before))
        # Where the time went (admin-only: how long generation takes depends on the data).
        accounting_s = time.perf_counter() - entered - load_s
        store_s = 0.0
        generating_s = 0.0
        source = TimedSource(self.generators.source(task))
        prompt = task_prompt(task, labels)  # aliases, if any, over the declared label domain
        noise = Noise(None)  # CSPRNG: the noise must not be reproducible from the seed
        started = time.perf_counter()
        with self._gen_lock:
            if config.public_only:
                pools_rows: dict[str, list[Example]] = {}
            else:
                try:
                    loading = time.perf_counter()
                    rows = self.store.load_rows(meta.id, units=True)
                    store_s += time.perf_counter() - loading
                except NotFound:
                    raise APIError(409, f"dataset {meta.id} was deleted during the warm-up (its charge "
                                        f"stays in the ledger)", "dataset_missing") from None
                # Pools over privacy units over the declared domain (aggregation.units): a unit sits
                # in one label's pool, and sampling draws units, then one row of each.
                pools_rows = unit_pools([Example(t, lab, unit=u) for t, lab, u in rows], meta.labels)
                del rows
            if releases is not None:  # after the charge: each unit's cluster, from its own rows
                pools_rows = cl.member_pools(pools_rows, releases, parts, embed, cl.cluster_config(task))
            jobs = [(key, p.label) for key, p in parts.items()] if parts else [(lab, lab) for lab in labels]
            demos: list[dict[str, Any]] = []
            empty: list[str] = []
            tokens = 0
            total = len(labels) * task.shots * config.max_tokens
            done = 0

            def on_token(step: int) -> None:
                if progress is not None:
                    progress(done + step + 1, total)

            for key, label in jobs:
                lp = plan.labels[key]
                if lp.decision == "skip":
                    done += lp.shots * config.max_tokens
                    continue  # decided from the noisy count and public settings (see "decisions")
                for _ in range(lp.shots):
                    one = time.perf_counter()
                    d = generate_demonstration(source, prompt, pools_rows.get(key, []), label, config,
                                               lp, noise, on_token=on_token, should_stop=should_stop)
                    generating_s += time.perf_counter() - one
                    if d.stopped:
                        del pools_rows
                        raise Stopped(charged=True, tokens_done=done + d.tokens)
                    done += config.max_tokens
                    if progress is not None:
                        progress(done, total)
                    tokens += d.tokens
                    if not d.text.strip():
                        # An empty demonstration teaches nothing and would inject a bare header.
                        if label not in empty:
                            empty.append(label)
                        continue
                    demos.append({"text": d.text, "label": label, **cl.demo_fields(parts.get(key))})
            del pools_rows
        payload = {
            "version": PAYLOAD_VERSION,
            "task": task.name,
            "dataset_id": meta.id,
            "dataset_version": meta.version,
            "labels": labels,
            "demos": demos,
            "empty_labels": empty,
            # Which rule applied to each label: from the DP count and public settings only.
            "decisions": _decisions(plan),
            # Clustered sets: the clusters used, with their DP sizes (ids and DP counts only).
            **({"clustering": {"clusters": task.generation.clusters, "method": task.generation.clustering},
                "clusters": cl.shown(parts, plan)} if releases is not None else {}),
            "epsilon": _num(plan.epsilon()),
            "delta": meta.budget_delta,
            "generator": self.generators.generator_id(task),
            # The prompt width used (public, or derived from the DP row-length release).
            "prompt_width": width.to_dict(),
            "created_at": time.time(),
            "tokens": tokens,
            "seconds": round(time.perf_counter() - started, 3),
        }
        storing = time.perf_counter()
        self.store.put_demos(prep.key, meta.id, task.name, payload)
        store_s += time.perf_counter() - storing
        timings = _timings(time.perf_counter() - entered, source.seconds, generating_s - source.seconds,
                           accounting_s, store_s, load_s)
        log_event("demos.generated", task=task.name, dataset_id=meta.id, demos=len(demos), tokens=tokens,
                  seconds=payload["seconds"])
        return {"key": prep.key, "cached": False, "charged": True, "payload": payload, "timings": timings,
                "epsilon_cost": _num(max(res.epsilon, res.spent_after - spent_before)),
                "spent_epsilon": _num(res.spent_after),
                "remaining_epsilon": _num(max(0.0, res.remaining))}

    def _release_clusters(self, task: TaskConfig, prep: Prepared, config: Any, width: Width, embed: cl.Embed,
                          actor: str) -> dict[str, cl.LabelClusters]:
        """The labels' cluster releases (charged once per dataset version and settings)."""
        source, prompt = self.generators.source(task), task_prompt(task, prep.labels)

        def public_texts(missing: Any) -> dict[str, list[str]]:  # epsilon 0: the public prompt alone
            return public_centroid_texts(source, prompt, missing, config, task.generation.clusters, 0)

        return self.clusters.release(task, prep.meta, self._release_keys(task, prep.labels, width.width), embed,
                                     public_texts, actor, f"clusters for task {task.name}")


def _timings(total: float, forward: float, sampling: float, accounting: float, store: float,
             load: float) -> dict[str, float]:
    """Seconds of a warm-up by part: model forward, sampling and noise (the generator's own work
    between forwards), planning with accounting and the ledger write, store reads and writes,
    loading the generator model, and the rest."""
    parts = {"forward": forward, "sampling": sampling, "accounting": accounting, "store": store, "load": load}
    parts["other"] = max(0.0, total - sum(parts.values()))
    parts["total"] = total
    return {k: round(v, 3) for k, v in parts.items()}


def _decisions(plan: Plan) -> dict[str, dict[str, str]]:
    """``{label: {"decision": private|public|skip, "rule": ...}}`` of a plan (public quantities)."""
    return {lab: {"decision": d, "rule": r} for lab, (d, r) in plan.decisions().items()}


def _num(x: float) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def generation_error(exc: Exception) -> APIError:
    """A clean error for a failed generation. Only messages written to be safe are passed on (the
    upstream / source errors and missing-model errors); anything else is named by type only, as
    its text could quote a prompt, and prompts hold private rows."""
    note = "any budget reserved for it stays spent"
    if isinstance(exc, UpstreamError):
        return APIError(502, f"the generator model failed: {exc.message}; {note}", "generator_error")
    if type(exc).__name__ == "SourceError":  # aggregation.sources.openai_compat: type + status only
        return APIError(502, f"the generator model failed: {exc}; {note}", "generator_error")
    if isinstance(exc, FileNotFoundError):
        return APIError(503, f"the generator model is not available: {exc}; {note}", "generator_unavailable")
    return APIError(500, f"demonstration generation failed ({type(exc).__name__}); {note}", "generation_failed")


def _fmt(x: float) -> str:
    return f"{x:.2f}" if math.isfinite(x) else "infinity"
