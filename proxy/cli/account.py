"""``dpicl account``: the epsilon a demonstration plan costs, or its noise for a target epsilon.

It builds the same events and calls the same calibration as a task's plan
(:func:`aggregation.mechanisms.demonstration_event`, :func:`aggregation.calibration.calibrate_noise`),
so every mode and mechanism a task can use is covered and the numbers agree with the service.
"""

from __future__ import annotations

import json
import math
from typing import Optional

import typer

from proxy.cli.common import MechanismOpt, ModeOpt, fail as _fail


def _check(ok: bool, message: str) -> None:
    if not ok:
        _fail(message)


def account(
    mode: ModeOpt = typer.Option(ModeOpt.resample, help="Sampling mode: a Poisson sample per token (resample), per demonstration (fixed) or per block of --block-tokens (block)."),
    block_tokens: Optional[int] = typer.Option(None, "--block-tokens", help="Tokens per Poisson sample in block mode, k."),
    mechanism: MechanismOpt = typer.Option(MechanismOpt.gaussian, help="gaussian (sigma), exponential (epsilon per token) or public_prior (clip C and temperature tau)."),
    sigma: Optional[float] = typer.Option(None, help="Gaussian noise multiplier; prints the epsilon it costs."),
    epsilon_per_token: Optional[float] = typer.Option(None, "--epsilon-per-token", help="Exponential mechanism: epsilon of one token."),
    clip: Optional[float] = typer.Option(None, help="Public prior: clip C of private-minus-public log-probabilities."),
    temperature: Optional[float] = typer.Option(None, help="Public prior: sampling temperature tau (default 1 when calibrating C)."),
    epsilon: Optional[float] = typer.Option(None, help="Target epsilon; prints the calibrated noise instead."),
    num_subsets: int = typer.Option(10, "--num-subsets", "-M", help="Subsets (parallel prompts), M; sets the public prior's eta = 4C/(M tau)."),
    shots_per_subset: int = typer.Option(2, "--shots-per-subset", "-N", help="Private examples per prompt, N."),
    sample_size: Optional[int] = typer.Option(None, "--sample-size", help="Expected records per sample (default M*N)."),
    pool_size: int = typer.Option(..., "--pool-size", help="Records (privacy units) in the label's pool, n."),
    tokens: int = typer.Option(..., help="Private tokens per demonstration, charged in full: T, or P when only the first P are private (a task's private_tokens)."),
    delta: float = typer.Option(..., help="Target delta."),
    demonstrations: int = typer.Option(1, help="Demonstrations from the same pool (composed)."),
    clusters: int = typer.Option(0, help="Clusters K the pool is split into (0 = off): each cluster holds n/K, demonstrations spread over the clusters compose in parallel; the clustering's own release is not included."),
    accountant: str = typer.Option("auto", help="auto (PLD; best of PLD and RDP for exponential / public prior), pld, or rdp."),
) -> None:
    """Epsilon of DP demonstration generation for given noise, or the noise for a target epsilon."""
    import dp_accounting as dpa

    from aggregation import accounting
    from aggregation.calibration import calibrate_noise
    from aggregation.mechanisms import block_length, demonstration_event, public_prior_epsilon_per_token

    mech = mechanism.value
    given = {"gaussian": [sigma], "exponential": [epsilon_per_token],
             "public_prior": [clip, temperature] if epsilon is None else [clip or temperature]}[mech]
    foreign = {"gaussian": [epsilon_per_token, clip, temperature], "exponential": [sigma, clip, temperature],
               "public_prior": [sigma, epsilon_per_token]}[mech]
    _check(all(v is None for v in foreign), f"--mechanism {mech} takes "
           + {"gaussian": "--sigma", "exponential": "--epsilon-per-token",
              "public_prior": "--clip and --temperature"}[mech] + " (or --epsilon)")
    if epsilon is None:
        _check(all(v is not None for v in given), "give the mechanism's noise ("
               + {"gaussian": "--sigma", "exponential": "--epsilon-per-token",
                  "public_prior": "--clip and --temperature"}[mech] + ") or a target --epsilon")
    elif mech == "public_prior":
        _check(clip is None or temperature is None, "with --epsilon give at most one of --clip / --temperature")
    else:
        _check(all(v is None for v in given), "give exactly one of the noise or --epsilon")
    for name, value in (("--sigma", sigma), ("--epsilon-per-token", epsilon_per_token), ("--clip", clip),
                        ("--temperature", temperature)):
        _check(value is None or (value > 0 and math.isfinite(value)), f"{name} must be a positive finite number")
    _check(epsilon is None or (epsilon > 0 and math.isfinite(epsilon)), "--epsilon must be a positive finite number")
    _check(num_subsets >= 1 and shots_per_subset >= 1, "--num-subsets and --shots-per-subset must be at least 1")
    size = sample_size if sample_size is not None else num_subsets * shots_per_subset
    _check(size >= 1 and pool_size >= size, "--sample-size (default M*N) must be at least 1 and at most --pool-size")
    _check(tokens >= 1 and demonstrations >= 1, "--tokens and --demonstrations must be at least 1")
    _check(0 < delta < 1, "--delta must be in (0, 1)")
    _check(accountant in ("auto", "pld", "rdp"), "--accountant must be auto, pld or rdp")
    _check(clusters >= 0, "--clusters must be 0 (off) or a positive number")
    try:
        k = block_length(mode.value, tokens, block_tokens)
    except ValueError as exc:
        _fail(f"{exc} (--block-tokens)")
    # Clusters partition the pool: a demonstration samples inside one cluster (rate from its size)
    # and demonstrations of different clusters compose in parallel, so the worst partition holds
    # ceil(D/K) of them.
    parts = max(1, min(clusters, demonstrations)) if clusters else 1
    q = size * max(clusters, 1) / pool_size
    _check(q <= 1, f"a cluster of {pool_size / max(clusters, 1):g} records is smaller than the sample size {size}")
    shots = math.ceil(demonstrations / parts)
    family = "gaussian" if mech == "gaussian" else "bounded_range"

    def event(value: float) -> dpa.DpEvent:
        kw = {"sigma": value} if family == "gaussian" else {"epsilon_per_token": value}
        e = demonstration_event("block", q, tokens, block_tokens=k, **kw)  # type: ignore[arg-type]
        return e if shots == 1 else dpa.SelfComposedDpEvent(e, shots)

    out: dict = {"mode": mode.value, "block_tokens": k, "mechanism": mech, "q": q, "tokens": tokens,
                 "delta": delta, "demonstrations": demonstrations, "clusters": clusters,
                 "demonstrations_per_partition": shots, "neighbours": "add/remove one record"}
    if epsilon is not None:
        value = calibrate_noise(family, k, q, tokens, shots, epsilon, delta)  # type: ignore[arg-type]
        out["target_epsilon"] = epsilon
    else:
        value = {"gaussian": sigma, "exponential": epsilon_per_token}.get(mech) or \
            public_prior_epsilon_per_token(clip, temperature, num_subsets)  # type: ignore[arg-type]
    if mech == "gaussian":
        out["sigma"] = value
    else:
        out["epsilon_per_token"] = value
    if mech == "public_prior":
        if epsilon is not None and clip is None:
            temperature = temperature or 1.0
            clip = value * num_subsets * temperature / 4.0
        elif epsilon is not None:
            temperature = 4.0 * clip / (num_subsets * value)  # type: ignore[operator]
        out.update(num_subsets=num_subsets, clip=clip, temperature=temperature)
    ev = event(value)
    kind = accounting.kind_of([ev]) if accountant == "auto" else accountant
    out["accountant"] = kind
    out["epsilon"] = accounting.epsilon_of([ev], delta, accountant=kind)
    out["event"] = accounting.event_to_dict(ev)
    typer.echo(json.dumps(out, indent=2))
