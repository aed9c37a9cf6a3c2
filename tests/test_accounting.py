"""Accounting against independent values and the properties the ledger relies on."""

import math

import dp_accounting as dpa
import pytest
from scipy.optimize import brentq
from scipy.stats import norm

from aggregation import accounting
from aggregation.bounded_range import SampledBoundedRangeDpEvent
from aggregation.mechanisms import demonstration_event


def analytic_gaussian_epsilon(sigma: float, delta: float) -> float:
    """Exact epsilon of one Gaussian mechanism (Balle and Wang 2018), solved independently."""

    def delta_of(eps: float) -> float:
        return norm.cdf(-eps * sigma + 1 / (2 * sigma)) - math.exp(eps) * norm.cdf(-eps * sigma - 1 / (2 * sigma))

    return brentq(lambda e: delta_of(e) - delta, 0.0, 100.0)


def test_reference_setting_is_about_3_8():
    # DESIGN.md: AGNews setting, resample mode, PLD/Poisson/add-remove -> 3.81; RDP is looser.
    n = 30000
    ev = demonstration_event("resample", 20 / n, 100, sigma=0.39)
    eps = accounting.epsilon_of([ev], 1 / n)
    assert 3.78 < eps < 3.85
    assert accounting.epsilon_of([ev], 1 / n, accountant="rdp") > eps + 1.0


@pytest.mark.parametrize("sigma,delta", [(1.0, 1e-5), (2.0, 1e-6), (0.8, 1e-3)])
def test_single_gaussian_matches_analytic_formula(sigma, delta):
    ours = accounting.epsilon_of([dpa.GaussianDpEvent(sigma)], delta)
    exact = analytic_gaussian_epsilon(sigma, delta)
    # Pessimistic PLD: never below the exact value, and close to it.
    assert exact - 1e-9 <= ours <= exact * 1.01 + 1e-3


def test_fixed_mode_is_one_gaussian_of_sigma_over_sqrt_t():
    # T Gaussians of multiplier s on the same sample = one Gaussian of s/sqrt(T) (q = 1 case).
    t, s, delta = 16, 8.0, 1e-5
    composed = accounting.epsilon_of([dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(s), t)], delta)
    exact = analytic_gaussian_epsilon(s / math.sqrt(t), delta)
    assert composed == pytest.approx(exact, rel=0.01)
    fixed = accounting.epsilon_of([demonstration_event("fixed", 1.0, t, sigma=s)], delta)
    assert fixed == pytest.approx(exact, rel=0.01)


def test_monotone_in_sigma_tokens_and_rate():
    base = dict(q=0.01, tokens=20, sigma=0.8)

    def eps(**kw):
        p = {**base, **kw}
        return accounting.epsilon_of([demonstration_event("resample", p["q"], p["tokens"], sigma=p["sigma"])], 1e-5)

    e0 = eps()
    assert eps(sigma=1.2) < e0 < eps(sigma=0.6)
    assert eps(tokens=10) < e0 < eps(tokens=40)
    assert eps(q=0.005) < e0 < eps(q=0.02)


def test_parallel_composition_takes_the_max():
    delta = 1e-5
    a = demonstration_event("resample", 0.01, 20, sigma=0.7)
    b = demonstration_event("resample", 0.01, 20, sigma=1.5)
    led = accounting.PartitionedLedger(delta)
    led.add("x", a)
    led.add("y", b)
    led.add("y", b)
    ex = accounting.epsilon_of([a], delta)
    ey = accounting.epsilon_of([b, b], delta)
    assert led.per_partition() == pytest.approx({"x": ex, "y": ey})
    assert led.spent() == pytest.approx(max(ex, ey))
    # Sequential composition on one partition costs more than either alone.
    assert ey > accounting.epsilon_of([b], delta)


def test_whole_dataset_events_compose_into_every_partition_even_later_ones():
    delta = 1e-5
    g = dpa.GaussianDpEvent(5.0)
    d = demonstration_event("resample", 0.01, 10, sigma=0.9)
    led = accounting.PartitionedLedger(delta)
    led.add(accounting.WHOLE_DATASET, g)
    assert led.spent() == pytest.approx(accounting.epsilon_of([g], delta))
    led.add("late", d)
    assert led.per_partition()["late"] == pytest.approx(accounting.epsilon_of([g, d], delta))


def test_epsilon_if_does_not_change_the_ledger():
    led = accounting.PartitionedLedger(1e-5)
    d = demonstration_event("resample", 0.01, 10, sigma=0.9)
    led.add("a", d)
    before = led.spent()
    after = led.epsilon_if("a", d)
    assert after > before
    assert led.spent() == before


def test_unsupported_events_fall_back_to_rdp():
    led = accounting.PartitionedLedger(1e-5)
    d = demonstration_event("resample", 0.01, 10, sigma=0.9)
    led.add("a", d)
    old = dpa.ZCDpEvent(0.05)  # what exponential/public-prior charges were before the PLD accounting
    assert not accounting.pld_supports(old)
    led.add("a", old)
    rdp = accounting.epsilon_of([d, old], 1e-5, accountant="rdp")
    assert led.per_partition()["a"] == pytest.approx(rdp)


def test_a_bounded_range_block_widens_a_pld_partition_to_best_of_pld_and_rdp():
    led = accounting.PartitionedLedger(1e-5)
    d = demonstration_event("resample", 0.01, 10, sigma=0.9)
    led.add("a", d)
    assert led.partition_accountants()["a"][0] == "pld"
    em = demonstration_event("resample", 0.01, 10, epsilon_per_token=0.5)
    assert accounting.kind_for(em) == "best"
    led.add("a", em)
    assert led.partition_accountants()["a"][0] == "best"
    pld = accounting.epsilon_of([d, em], 1e-5, accountant="pld")
    rdp = accounting.epsilon_of([d, em], 1e-5, accountant="rdp")
    assert led.per_partition()["a"] == pytest.approx(min(pld, rdp))
    led.add("a", dpa.ZCDpEvent(0.01))  # an old-ledger event: the partition falls back to RDP
    assert led.partition_accountants()["a"][0] == "rdp"
    assert led.per_partition()["a"] == pytest.approx(
        accounting.epsilon_of([d, em, dpa.ZCDpEvent(0.01)], 1e-5, accountant="rdp"))


@pytest.mark.parametrize("mode", ["resample", "fixed"])
@pytest.mark.parametrize("target", [1.0, 4.0])
def test_calibration_round_trip(mode, target):
    delta = 1e-5

    def make(s):
        return demonstration_event(mode, 0.004, 15, sigma=s)

    sigma = accounting.calibrate_sigma(make, target, delta)
    eps = accounting.epsilon_of([make(sigma)], delta)
    assert eps <= target
    assert eps > target * 0.98  # not wastefully noisy
    assert accounting.epsilon_of([make(sigma * 0.97)], delta) > target


def test_calibration_rejects_bad_targets():
    with pytest.raises(ValueError):
        accounting.calibrate_sigma(lambda s: dpa.GaussianDpEvent(s), 0.0, 1e-5)
    with pytest.raises(ValueError):
        accounting.calibrate_sigma(lambda s: dpa.GaussianDpEvent(s), 1.0, 1.5)


def test_event_serialisation_round_trip():
    ev = dpa.ComposedDpEvent([
        demonstration_event("resample", 0.01, 10, sigma=0.9),
        demonstration_event("fixed", 0.02, 5, sigma=2.0),
        dpa.ZCDpEvent(0.1),
        dpa.NonPrivateDpEvent(),
        demonstration_event("block", 0.02, 12, epsilon_per_token=0.3, block_tokens=5),
    ])
    assert accounting.event_from_dict(accounting.event_to_dict(ev)) == ev
    with pytest.raises(ValueError):
        accounting.event_from_dict({"type": "Nope"})


def test_exponential_event_is_one_sampled_bounded_range_block_per_token_in_resample_mode():
    e, q, t = 0.5, 0.01, 10
    ev = demonstration_event("resample", q, t, epsilon_per_token=e)
    assert ev == dpa.SelfComposedDpEvent(SampledBoundedRangeDpEvent(q, e, 1), t)
    # The RDP side still sees the old zCDP bound: min(L e^2/8, amplified^2/2) per block.
    amplified = math.log1p(q * math.expm1(e))
    zcdp = accounting.epsilon_of([dpa.ZCDpEvent(t * min(e * e / 8, amplified**2 / 2))], 1e-5, accountant="rdp")
    assert accounting.epsilon_of([ev], 1e-5, accountant="rdp") == pytest.approx(zcdp)


# ---------------------------------------------------------------------------------------------
# Block resampling: one Poisson sample per block of k tokens.


@pytest.mark.parametrize("tokens", [1, 7, 12])
def test_block_mode_at_k_1_is_resample_and_at_k_t_is_fixed(tokens):
    q, sigma, delta = 0.01, 0.8, 1e-5
    written_resample = dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), tokens)
    written_fixed = dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma / math.sqrt(tokens)))
    k1 = demonstration_event("block", q, tokens, sigma=sigma, block_tokens=1)
    kt = demonstration_event("block", q, tokens, sigma=sigma, block_tokens=tokens)
    assert accounting.epsilon_of([k1], delta) == accounting.epsilon_of([written_resample], delta)
    assert accounting.epsilon_of([kt], delta) == accounting.epsilon_of([written_fixed], delta)
    assert kt == demonstration_event("fixed", q, tokens, sigma=sigma)
    assert demonstration_event("block", q, tokens, sigma=sigma, block_tokens=tokens + 5) == kt
    e = 0.3
    assert demonstration_event("block", q, tokens, epsilon_per_token=e, block_tokens=1) == \
        demonstration_event("resample", q, tokens, epsilon_per_token=e)
    assert demonstration_event("block", q, tokens, epsilon_per_token=e, block_tokens=tokens) == \
        demonstration_event("fixed", q, tokens, epsilon_per_token=e)


def test_block_event_composes_full_blocks_with_a_shorter_last_block():
    q, sigma, delta = 0.02, 1.1, 1e-5
    ev = demonstration_event("block", q, 10, sigma=sigma, block_tokens=4)  # blocks of 4, 4, 2
    assert accounting.pld_supports(ev)
    by_hand = [dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma / 2.0))] * 2 + \
        [dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma / math.sqrt(2)))]
    assert accounting.epsilon_of([ev], delta) == pytest.approx(accounting.epsilon_of(by_hand, delta), rel=1e-9)
    # Longer blocks share a sample across more tokens: less amplification, more epsilon.
    eps = [accounting.epsilon_of([demonstration_event("block", q, 16, sigma=sigma, block_tokens=k)], delta)
           for k in (1, 2, 4, 8, 16)]
    assert eps == sorted(eps) and eps[0] < eps[-1]
    # Exponential mechanism: two sampled blocks of 4 bounded-range tokens, then one of 2; on the
    # RDP side zCDP adds over blocks, each block the smaller of its two bounds.
    e = 0.4
    amp = lambda x: math.log1p(q * math.expm1(x))  # noqa: E731
    rho = lambda length: min(length * e * e / 8, amp(length * e) ** 2 / 2)  # noqa: E731
    em = demonstration_event("block", q, 10, epsilon_per_token=e, block_tokens=4)
    assert em == dpa.ComposedDpEvent([dpa.SelfComposedDpEvent(SampledBoundedRangeDpEvent(q, e, 4), 2),
                                      SampledBoundedRangeDpEvent(q, e, 2)])
    zcdp = accounting.epsilon_of([dpa.ZCDpEvent(2 * rho(4) + rho(2))], delta, accountant="rdp")
    assert accounting.epsilon_of([em], delta, accountant="rdp") == pytest.approx(zcdp)


def test_block_mode_needs_a_block_size():
    with pytest.raises(ValueError):
        demonstration_event("block", 0.01, 10, sigma=1.0)
    with pytest.raises(ValueError):
        demonstration_event("block", 0.01, 10, sigma=1.0, block_tokens=0)


def test_worked_example_numbers_match_the_code():
    # docs/privacy.md's worked example (issue 20, section 5): it quoted Gaussian numbers while the
    # default mechanism is public_prior. Both rows are recomputed here and must be the ones quoted.
    from pathlib import Path

    from aggregation.planning import GenerationConfig, plan_demonstrations

    doc = " ".join((Path(__file__).resolve().parents[1] / "docs" / "privacy.md").read_text().split())
    delta = 1e-5
    quoted = {}
    for mechanism in ("public_prior", "gaussian"):
        cfg = GenerationConfig(mode="resample", mechanism=mechanism, num_subsets=10, shots_per_subset=2,
                               max_tokens=20, epsilon=1.0)
        plan = plan_demonstrations(cfg, {"a": 1, "b": 1}, {"a": 900.0, "b": 900.0}, delta)
        a, b = plan.labels["a"].event, plan.labels["b"].event
        add_remove = accounting.epsilon_of([a, dpa.GaussianDpEvent(20.0)], delta)
        # Relabel = remove from partition a, add to b: both partitions, counts at sensitivity sqrt 2.
        relabel = accounting.epsilon_of([a, b, dpa.GaussianDpEvent(20.0 / math.sqrt(2))], delta)
        quoted[mechanism] = (f"{add_remove:.3f}", f"{relabel:.3f}", f"{2 * add_remove:.3f}")
    assert (f"label counts costs {quoted['public_prior'][0]} under add/remove and at most "
            f"{quoted['public_prior'][1]} for changing one unit's label") in doc
    assert f"against {quoted['public_prior'][2]} for plain group privacy of two" in doc
    g = quoted["gaussian"]
    assert f"With `mechanism: gaussian` the same setting gives {g[0]} and {g[1]} ({g[2]})" in doc
