"""Accounting of a Poisson-sampled block of bounded-range tokens (exponential and public-prior).

One token of the exponential or public-prior mechanism is ``eta``-bounded-range, hence ``eta``-DP
(for the public prior ``eta = 4C/(M tau)``). A block of ``L`` tokens generated from one Poisson
sample of rate ``q`` is :class:`SampledBoundedRangeDpEvent`. dp-accounting has no pure-DP event
that its PLD accountant subsamples, so this module adds the event and teaches the accountants:

* PLD (:class:`PldAccountant`): the ``L`` tokens on one sample are ``L*eta``-DP, and every
  ``eps``-DP mechanism is dominated by randomized response ``A = [e^eps, 1]/(1+e^eps)`` against
  ``B = [1, e^eps]/(1+e^eps)`` (Kairouz, Oh and Viswanath 2015). Poisson sampling of a mechanism
  dominated by ``(A, B)`` is dominated by ``(qA + (1-q)B, B)`` for removing a record and by
  ``(B, qA + (1-q)B)`` for adding one (Zhu, Dong and Wang 2022, Theorem 11; the pair dp-accounting
  itself uses for the subsampled Gaussian). The block's PLD is built from these two-point pairs,
  both directions, with pessimistic (upwards) rounding of the losses, and composed exactly.
* RDP (:class:`RdpAccountant`): the block as zCDP, the smaller of the bounded-range bound
  ``L eta^2/8`` (Cesar and Rogers 2021; ignores sampling) and ``eps'^2/2`` for the amplified pure
  epsilon ``eps' = log(1 + q(e^{L eta} - 1))`` (Bun and Steinke 2016).
* :class:`BestOfAccountant` composes both and reports the smaller epsilon. Both are upper bounds on
  the same composed mechanism, so their minimum is one too. The PLD route wins by far at small
  ``q`` (fixed mode, eta 0.2, T 20, q 0.02: 0.729 against 1.914); the zCDP route wins when ``q``
  is near 1 and a block is long (it uses bounded range, which the randomized-response pair does not).
"""

from __future__ import annotations

import math
from typing import Optional

import attr
import dp_accounting as dpa
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from dp_accounting.rdp import rdp_privacy_accountant

_ADD_OR_REMOVE = dpa.NeighboringRelation.ADD_OR_REMOVE_ONE


@attr.s(frozen=True, slots=True, auto_attribs=True)
class SampledBoundedRangeDpEvent(dpa.DpEvent):
    """``tokens`` adaptive ``epsilon_per_token``-bounded-range steps on one Poisson sample of rate
    ``sampling_probability`` (add/remove-one neighbours)."""

    sampling_probability: float
    epsilon_per_token: float
    tokens: int


def amplified_pure_epsilon(epsilon: float, q: float) -> float:
    """Pure-DP epsilon of an eps-DP mechanism run on a Poisson sample of rate q (add/remove)."""
    if epsilon > 1.0:  # same value, written so that exp() cannot overflow
        return epsilon + math.log(q + (1.0 - q) * math.exp(-epsilon))
    return math.log1p(q * math.expm1(epsilon))


def block_rho(event: SampledBoundedRangeDpEvent) -> float:
    """zCDP of the block: ``min(L eta^2/8, eps'^2/2)`` (see the module docstring)."""
    e, n = event.epsilon_per_token, event.tokens
    return min(n * e * e / 8.0, amplified_pure_epsilon(n * e, event.sampling_probability) ** 2 / 2.0)


def _logaddexp(x: float, y: float) -> float:
    if x == -math.inf:
        return y
    hi, lo = max(x, y), min(x, y)
    return hi + math.log1p(math.exp(lo - hi))


def dominating_pair(epsilon: float, q: float) -> tuple[dict[int, float], dict[int, float]]:
    """``(log B, log (qA + (1-q)B))``: two-point log-pmfs of the amplified randomized response.

    ``B`` is the output distribution without the record, the mixture the one with it.
    """
    norm = _logaddexp(0.0, epsilon)
    log_a = (epsilon - norm, -norm)
    log_b = (-norm, epsilon - norm)
    log_q = math.log(q)
    log_1mq = math.log1p(-q) if q < 1 else -math.inf
    mix = tuple(_logaddexp(log_q + a, log_1mq + b) for a, b in zip(log_a, log_b))
    return dict(enumerate(log_b)), dict(enumerate(mix))


def block_pld(event: SampledBoundedRangeDpEvent, discretization: float) -> pld_lib.PrivacyLossDistribution:
    """Pessimistic PLD of one block, remove and add directions (see the module docstring)."""
    lower, upper = dominating_pair(event.tokens * event.epsilon_per_token, event.sampling_probability)
    return pld_lib.from_two_probability_mass_functions(
        lower, upper, pessimistic_estimate=True, value_discretization_interval=discretization, symmetric=False)


def _check(event: SampledBoundedRangeDpEvent) -> Optional[str]:
    if not 0 < event.sampling_probability <= 1:
        return "sampling probability must be in (0, 1]"
    if not (event.epsilon_per_token > 0 and math.isfinite(event.epsilon_per_token)):
        return "epsilon per token must be a positive finite number"
    if event.tokens < 1:
        return "a block has at least one token"
    return None


class PldAccountant(pld_privacy_accountant.PLDAccountant):
    """dp-accounting's PLD accountant (add/remove) that also composes the bounded-range block."""

    def _maybe_compose(self, event: dpa.DpEvent, count: int, do_compose: bool):
        if isinstance(event, SampledBoundedRangeDpEvent):
            error = _check(event) or (None if self.neighboring_relation == _ADD_OR_REMOVE
                                      else "bounded-range blocks are accounted for add/remove neighbours")
            if error:
                return self.CompositionErrorDetails(invalid_event=event, error_message=error)
            if do_compose and count > 0:
                block = block_pld(event, self._value_discretization_interval)
                self._pld = self._pld.compose(block.self_compose(count) if count > 1 else block)
            return None
        return super()._maybe_compose(event, count, do_compose)


class RdpAccountant(rdp_privacy_accountant.RdpAccountant):
    """dp-accounting's RDP accountant that also composes the block (as its zCDP bound)."""

    def _maybe_compose(self, event: dpa.DpEvent, count: int, do_compose: bool):
        if isinstance(event, SampledBoundedRangeDpEvent):
            error = _check(event)
            if error:
                return self.CompositionErrorDetails(invalid_event=event, error_message=error)
            return super()._maybe_compose(dpa.ZCDpEvent(block_rho(event)), count, do_compose)
        return super()._maybe_compose(event, count, do_compose)


class BestOfAccountant(dpa.PrivacyAccountant):
    """Composes every event into a PLD and an RDP accountant; reports the smaller epsilon/delta.

    Only for events both support (the ledger picks this kind when a bounded-range block is present
    and PLD supports everything). Each value is an upper bound, so the smaller is one too.
    """

    def __init__(self, discretization: float):
        super().__init__(_ADD_OR_REMOVE)
        self.pld = PldAccountant(value_discretization_interval=discretization)
        self.rdp = RdpAccountant()

    def _maybe_compose(self, event: dpa.DpEvent, count: int, do_compose: bool):
        for acc in (self.pld, self.rdp):
            error = acc._maybe_compose(event, count, False)
            if error is not None:
                return error
        if do_compose:
            self.pld.compose(event, count)
            self.rdp.compose(event, count)
        return None

    def get_epsilon(self, target_delta: float) -> float:
        """The smaller of the PLD and RDP epsilons at ``target_delta``."""
        return min(float(self.pld.get_epsilon(target_delta)), float(self.rdp.get_epsilon(target_delta)))

    def get_delta(self, target_epsilon: float) -> float:
        """The smaller of the PLD and RDP deltas at ``target_epsilon``."""
        return min(float(self.pld.get_delta(target_epsilon)), float(self.rdp.get_delta(target_epsilon)))


def contains_block(event: dpa.DpEvent) -> bool:
    """Whether ``event`` holds a :class:`SampledBoundedRangeDpEvent` anywhere inside."""
    if isinstance(event, SampledBoundedRangeDpEvent):
        return True
    if isinstance(event, dpa.ComposedDpEvent):
        return any(contains_block(e) for e in event.events)
    inner = getattr(event, "event", None)
    return isinstance(inner, dpa.DpEvent) and contains_block(inner)
