"""BudgetService: accounting over the ledger, refusals, dry runs, budgets, pool sizes, and
cross-process atomicity against a shared SQLite file and a shared Redis."""

from __future__ import annotations

import json
import math
import multiprocessing as mp

import dp_accounting as dpa
import pytest

from aggregation.accounting import epsilon_of
from proxy import budget as budget_mod
from proxy.budget import BudgetService, Reservation
from proxy.store import BudgetExceeded, NotFound, open_store

DELTA = 1e-5
ROWS = [(f"secret question number {i}", lab) for i, lab in enumerate(["loc", "hum", "num"] * 40)]


def g(sigma: float) -> dpa.GaussianDpEvent:
    return dpa.GaussianDpEvent(sigma)


@pytest.fixture
def svc(store):
    return BudgetService(store)


def test_spent_is_parallel_composition(store, svc):
    m = store.create_dataset("d", ROWS, 50.0, DELTA)
    assert svc.spent(m.id) == 0.0
    svc.reserve(m.id, [("loc", g(3.0)), ("hum", g(2.0))], "admin", "t1")
    svc.reserve(m.id, [("loc", g(4.0)), ("*", g(6.0))], "admin", "t2")
    svc.reserve(m.id, [("num", g(1.5))], "admin", "t3")
    per_label = {
        "loc": epsilon_of([g(3.0), g(4.0), g(6.0)], DELTA),
        "hum": epsilon_of([g(2.0), g(6.0)], DELTA),
        "num": epsilon_of([g(6.0), g(1.5)], DELTA),  # whole-dataset events reach later labels too
    }
    assert svc.spent(m.id) == pytest.approx(max(per_label.values()), rel=1e-9)
    # Parallel, not sequential: far below the epsilon of composing everything together.
    assert svc.spent(m.id) < epsilon_of([g(3.0), g(4.0), g(6.0), g(2.0), g(1.5)], DELTA) - 0.1
    st = svc.status(m.id)
    for label, eps in per_label.items():
        assert st["per_partition"][label] == pytest.approx(eps, rel=1e-9)
    # A fresh service (another replica) computes the same from the store alone.
    assert BudgetService(store).spent(m.id) == pytest.approx(svc.spent(m.id), rel=1e-12)


def test_reserve_result_and_ledger_entries(store, svc):
    m = store.create_dataset("d", ROWS, 5.0, DELTA)
    r = svc.reserve(m.id, [("loc", g(2.0))], "admin:key1", "task trec")
    assert isinstance(r, Reservation) and not r.dry_run and r.fits and r.seqs == [1]
    assert r.spent_before == 0.0 and r.epsilon == pytest.approx(epsilon_of([g(2.0)], DELTA), rel=1e-9)
    assert r.remaining == pytest.approx(5.0 - r.spent_after)
    st = svc.status(m.id)
    assert st["budget_epsilon"] == 5.0 and st["budget_delta"] == DELTA
    assert st["spent_epsilon"] == pytest.approx(r.spent_after)
    assert st["remaining_epsilon"] == pytest.approx(5.0 - r.spent_after)
    (entry,) = st["entries"]
    assert entry["event"] == {"type": "GaussianDpEvent", "noise_multiplier": 2.0}
    assert (entry["partition"], entry["actor"], entry["reason"], entry["seq"]) == ("loc", "admin:key1", "task trec", 1)
    assert entry["epsilon_after"] == pytest.approx(r.spent_after) and entry["created_at"] > 0
    text = json.dumps(st) + json.dumps(svc.status_all()) + json.dumps(r.to_dict())
    assert "secret" not in text  # no private row text anywhere
    assert "entries" not in svc.status_all()[0]


def test_refusal_leaves_ledger_unchanged(store, svc):
    m = store.create_dataset("d", ROWS, 2.0, DELTA)
    svc.reserve(m.id, [("*", g(3.0))], "a", "first")
    spent = svc.spent(m.id)
    before = store.ledger(m.name)
    with pytest.raises(BudgetExceeded) as err:
        svc.reserve(m.id, [("loc", g(2.0)), ("hum", g(5.0))], "a", "too much")
    msg = str(err.value)
    assert f"only {2.0 - spent:.2f} of 2.00 remains on dataset {m.id}" in msg
    needed = epsilon_of([g(3.0), g(2.0)], DELTA) - spent
    assert f"needs epsilon {needed:.2f}" in msg
    assert err.value.remaining == pytest.approx(2.0 - spent)
    assert store.ledger(m.name) == before
    assert svc.spent(m.id) == spent


def test_dry_run_writes_nothing(store, svc):
    m = store.create_dataset("d", ROWS, 3.0, DELTA)
    svc.reserve(m.id, [("hum", g(2.0))], "a", "r")
    before = store.ledger(m.name)
    dry = svc.reserve(m.id, [("hum", g(2.5)), ("loc", g(3.0))], "a", "r", dry_run=True)
    assert dry.dry_run and dry.fits and dry.seqs == []
    assert store.ledger(m.name) == before
    real = svc.reserve(m.id, [("hum", g(2.5)), ("loc", g(3.0))], "a", "r")
    assert dry.epsilon == pytest.approx(real.epsilon, rel=1e-12)
    assert dry.remaining == pytest.approx(real.remaining, rel=1e-12)
    # A dry run that would not fit reports it instead of raising, and still writes nothing.
    big = svc.reserve(m.id, [("hum", g(0.3))], "a", "r", dry_run=True)
    assert not big.fits and big.remaining < 0
    assert len(store.ledger(m.name)) == 3


def test_non_private_only_on_public_datasets(store, svc):
    private = store.create_dataset("p", ROWS, 100.0, DELTA)
    with pytest.raises(BudgetExceeded, match="not differentially private"):
        svc.reserve(private.id, [("loc", dpa.NonPrivateDpEvent())], "a", "r")
    assert store.ledger(private.name) == []
    public = store.create_dataset("pub", ROWS, 1.0, DELTA, public=True)
    r = svc.reserve(public.id, [("loc", dpa.NonPrivateDpEvent())], "a", "r")
    assert r.fits and math.isinf(r.spent_after)
    st = svc.status(public.id)
    assert st["spent_epsilon"] is None and st["remaining_epsilon"] is None
    assert st["entries"][0]["epsilon_after"] is None
    json.dumps(st, allow_nan=False)  # JSON-safe for the HTTP layer
    json.dumps(r.to_dict(), allow_nan=False)
    svc.set_budget(public.id, 0.5)  # public: spend is recorded, not limited


def test_set_budget(store, svc):
    m = store.create_dataset("d", ROWS, 4.0, DELTA)
    svc.reserve(m.id, [("*", g(2.0))], "a", "r")
    spent = svc.spent(m.id)
    with pytest.raises(ValueError, match="already spent"):
        svc.set_budget(m.id, spent * 0.9, DELTA)
    assert store.get_dataset(m.id).budget_epsilon == 4.0
    for eps, delta in ((0.0, DELTA), (-1.0, DELTA), (math.inf, DELTA), (math.nan, DELTA), (5.0, 0.0), (5.0, 1.0)):
        with pytest.raises(ValueError):
            svc.set_budget(m.id, eps, delta)
    st = svc.set_budget(m.id, spent * 1.1)
    assert st["budget_epsilon"] == pytest.approx(spent * 1.1) and st["budget_delta"] == DELTA
    # A smaller delta costs more epsilon for the same ledger; the check uses the new delta.
    tighter = epsilon_of([g(2.0)], 1e-9)
    assert tighter > spent * 1.1
    with pytest.raises(ValueError, match="already spent"):
        svc.set_budget(m.id, spent * 1.1, 1e-9)
    st = svc.set_budget(m.id, tighter + 1.0, 1e-9)
    assert svc.spent(m.id) == pytest.approx(tighter, rel=1e-9)  # cache rebuilt at the new delta
    assert st["spent_epsilon"] == pytest.approx(tighter, rel=1e-9)
    with pytest.raises(NotFound):
        svc.set_budget("ds_missing", 1.0)


def test_cache_advances_incrementally(store, svc, monkeypatch):
    m = store.create_dataset("d", ROWS, 100.0, DELTA)
    for i in range(6):
        svc.reserve(m.id, [("loc" if i % 2 else "hum", g(5.0))], "a", "r")
    decoded = []
    real = budget_mod.event_from_dict
    monkeypatch.setattr(budget_mod, "event_from_dict", lambda d: decoded.append(d) or real(d))
    spent = svc.spent(m.id)
    svc.status(m.id)
    assert decoded == []  # nothing recomposed for reads
    other = BudgetService(store)  # another replica appends two entries
    other.reserve(m.id, [("num", g(5.0)), ("*", g(9.0))], "b", "r")
    decoded.clear()
    assert svc.spent(m.id) > spent
    assert len(decoded) == 2  # only the new entries were composed
    decoded.clear()
    svc.reserve(m.id, [("loc", g(5.0))], "a", "r")
    assert decoded == []  # its own charge is not decoded again


def test_noisy_counts_charged_before_reading(store, svc):
    m = store.create_dataset("d", ROWS, 10.0, DELTA)
    calls = []
    real_load, real_append = store.load_rows, store.append_ledger
    store.load_rows = lambda *a, **k: calls.append("load") or real_load(*a, **k)
    store.append_ledger = lambda *a, **k: calls.append("append") or real_append(*a, **k)
    counts = svc.noisy_counts(m.id, "admin")
    assert calls == ["append", "load"]
    assert set(counts) == {"loc", "hum", "num"}
    assert all(abs(v - 40) < 200 for v in counts.values())  # sigma 20: 10 sigma
    assert len({round(v, 9) for v in counts.values()}) == 3  # noise was added, not exact counts
    (entry,) = store.ledger(m.name)
    assert entry.partition == "*" and entry.event["type"] == "GaussianDpEvent"
    assert store.get_dataset(m.id).noisy_counts == counts
    calls.clear()
    assert svc.noisy_counts(m.id, "admin") == counts  # later calls are free
    assert calls == [] and len(store.ledger(m.name)) == 1


def test_noisy_counts_refused_reads_nothing(store, svc):
    m = store.create_dataset("d", ROWS, 0.01, DELTA)
    store.load_rows = lambda *a, **k: pytest.fail("rows read although the budget refused")
    with pytest.raises(BudgetExceeded):
        svc.noisy_counts(m.id, "admin")
    assert store.ledger(m.name) == [] and store.get_dataset(m.id).noisy_counts is None


def test_deleted_dataset(store, svc):
    m = store.create_dataset("d", ROWS, 10.0, DELTA)
    svc.reserve(m.id, [("*", g(3.0))], "a", "r")
    store.delete_dataset(m.id)
    svc.forget(m.id)
    with pytest.raises(NotFound):
        svc.reserve(m.id, [("*", g(3.0))], "a", "r")
    with pytest.raises(NotFound):
        svc.status(m.id)
    assert len(store.ledger(m.name)) == 1


# ---------------------------------------------------------------------------------------------
# Cross-process atomicity.

SIGMA = 8.0
ALLOWED = 5


def _reserver(url: str, dataset_id: str, attempts: int, barrier, results) -> None:
    """Child process: its own store connection and BudgetService, racing the others.

    Always reports ``(successes, refusals, error)`` so a crash fails the test at once."""
    ok = refused = 0
    try:
        store = open_store(url)
        svc = BudgetService(store)
        barrier.wait(timeout=60)
        for _ in range(attempts):
            try:
                svc.reserve(dataset_id, [("*", dpa.GaussianDpEvent(SIGMA))], f"pid{mp.current_process().pid}", "race")
                ok += 1
            except BudgetExceeded:
                refused += 1
        store.close()
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        results.put((ok, refused, repr(exc)))
        return
    results.put((ok, refused, None))


def test_threads_sharing_one_service(store, svc):
    """Threads of one process share the service (and its cache): still exactly what fits."""
    import threading

    fits, overshoot = (epsilon_of([g(SIGMA)] * k, DELTA) for k in (ALLOWED, ALLOWED + 1))
    m = store.create_dataset("threads", ROWS, (fits + overshoot) / 2, DELTA)
    wins, errors = [], []

    def worker():
        for _ in range(8):
            try:
                svc.reserve(m.id, [("*", g(SIGMA))], "t", "race")
                wins.append(1)
            except BudgetExceeded:
                pass
            except Exception as exc:  # noqa: BLE001 - surfaced below
                errors.append(repr(exc))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(wins) == ALLOWED
    assert svc.spent(m.id) == pytest.approx(fits, rel=1e-9)
    assert BudgetService(store).spent(m.id) == pytest.approx(svc.spent(m.id), rel=1e-12)


def test_processes_never_overshoot(store_url):
    store = open_store(store_url)
    # Budget halfway between the cost of ALLOWED and ALLOWED+1 charges: exactly ALLOWED fit.
    fits, overshoot = (epsilon_of([g(SIGMA)] * k, DELTA) for k in (ALLOWED, ALLOWED + 1))
    budget = (fits + overshoot) / 2
    m = store.create_dataset("race", ROWS, budget, DELTA)
    # fork: children start in milliseconds (spawn re-imports scipy/dp-accounting in each). Each
    # child opens its own store; the stores never reuse a connection across a fork.
    ctx = mp.get_context("fork")
    procs_n, attempts = 4, 15
    barrier, results = ctx.Barrier(procs_n), ctx.Queue()
    procs = [ctx.Process(target=_reserver, args=(store_url, m.id, attempts, barrier, results)) for _ in range(procs_n)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert [err for _, _, err in outcomes] == [None] * procs_n
    assert sum(ok for ok, _, _ in outcomes) == ALLOWED
    assert sum(ok + refused for ok, refused, _ in outcomes) == procs_n * attempts
    ledger = store.ledger(m.name)
    assert [e.seq for e in ledger] == list(range(1, ALLOWED + 1))
    assert max(e.epsilon_after for e in ledger) <= budget
    svc = BudgetService(store)
    assert svc.spent(m.id) == pytest.approx(fits, rel=1e-9) and svc.spent(m.id) <= budget
    store.close()


def test_admin_budget_change_survives_a_count_release_in_flight(store, svc, monkeypatch):
    """The review's reproduction: the admin lowers the budget while the one-time count release is
    between its charge and its write-back. The write-back only stores the counts; the budget stays."""
    m = store.create_dataset("race", ROWS, 4.0, DELTA, labels=["loc", "hum", "num"])
    real_load = store.load_rows

    def load_then_admin_acts(*a, **k):
        rows = real_load(*a, **k)
        svc.set_name_budget("race", 0.5)  # the admin, while the release reads the rows
        return rows

    monkeypatch.setattr(store, "load_rows", load_then_admin_acts)
    counts = svc.noisy_counts(m.id, "warm")
    assert set(counts) == {"loc", "hum", "num"}
    assert store.get_dataset(m.id).budget_epsilon == 0.5 and store.get_dataset(m.id).noisy_counts == counts
    with pytest.raises(BudgetExceeded):
        svc.reserve(m.id, [("loc", g(1.0))], "warm", "demos")


def test_versions_and_reuploads_share_the_spend(store, svc):
    v1 = store.create_dataset("pop", ROWS, 3.0, DELTA)
    svc.reserve(v1.id, [("loc", g(2.0))], "a", "r")
    one = svc.spent(v1.id)
    store.delete_dataset(v1.id)
    v2 = store.create_dataset("pop", ROWS, 99.0, DELTA)
    assert svc.spent(v2.id) == pytest.approx(one)
    svc.reserve(v2.id, [("hum", g(2.0))], "a", "r")
    # A unit labelled loc in v1 and hum in v2 saw both events.
    assert svc.spent(v2.id) == pytest.approx(epsilon_of([g(2.0), g(2.0)], DELTA), rel=1e-3)
    with pytest.raises(ValueError, match="reason"):
        svc.reset("pop", "admin", "  ")
    view = svc.reset("pop", "admin", "new consent period")
    assert view["epsilon_spent"] == 0 and svc.spent(v2.id) == 0


def test_racing_count_releases_are_both_charged_and_the_first_wins(store_url):
    """Two replicas release the label counts of one version at the same moment: both releases are
    charged (over-counting is safe), and the first stored release is the one everyone uses."""
    s1, s2 = open_store(store_url), open_store(store_url)
    try:
        m = s1.create_dataset("race2", ROWS, 10.0, DELTA, labels=["loc", "hum", "num"])
        svc1, svc2 = BudgetService(s1), BudgetService(s2)
        stale = s2.get_dataset(m.id)
        real_get = s2.get_dataset
        calls = [0]

        def stale_once(dataset_id):
            calls[0] += 1
            return stale if calls[0] == 1 else real_get(dataset_id)

        first = svc1.noisy_counts(m.id, "replica-1")
        s2.get_dataset = stale_once  # replica 2 read the metadata before replica 1 stored its counts
        second = svc2.noisy_counts(m.id, "replica-2")
        assert second == first and s1.get_dataset(m.id).noisy_counts == first
        kinds = [(e.kind, e.actor) for e in s1.ledger("race2")]
        assert kinds == [("histogram", "replica-1"), ("histogram", "replica-2")]
        assert svc1.spent(m.id) == pytest.approx(epsilon_of([g(20.0), g(20.0)], DELTA))
    finally:
        s1.close()
        s2.close()


def test_bounded_range_blocks_and_old_zcdp_entries_read_back_from_the_store(store, svc):
    """The ledger stores the new block event and still reads the zCDP events older ledgers hold."""
    from aggregation.bounded_range import SampledBoundedRangeDpEvent
    from aggregation.mechanisms import demonstration_event

    m = store.create_dataset("d", ROWS, 50.0, DELTA)
    new = demonstration_event("fixed", 0.02, 20, epsilon_per_token=0.2)
    assert new == SampledBoundedRangeDpEvent(0.02, 0.2, 20)
    old = dpa.ZCDpEvent(0.05)  # an exponential/public-prior charge written by the old accounting
    svc.reserve(m.id, [("loc", new)], "admin", "new accounting")
    svc.reserve(m.id, [("hum", old), ("hum", new)], "admin", "old ledger entry, then a new one")
    fresh = BudgetService(store)  # another replica: everything from the stored JSON
    per = fresh.status(m.id)["per_partition"]
    assert per["loc"] == pytest.approx(epsilon_of([new], DELTA), rel=1e-9)
    assert per["loc"] == pytest.approx(0.729, abs=1e-3)  # the PLD of the amplified pair, not 1.914
    assert per["hum"] == pytest.approx(epsilon_of([old, new], DELTA, accountant="rdp"), rel=1e-9)
    entries = fresh.status(m.id)["entries"]
    assert entries[0]["event"] == {"type": "SampledBoundedRangeDpEvent", "sampling_probability": 0.02,
                                   "epsilon_per_token": 0.2, "tokens": 20}
