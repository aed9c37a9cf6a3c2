"""``dpicl account`` (:mod:`proxy.cli.account`) and ``dpicl generate``: the DP engine from the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from proxy.cli.common import ClusteringOpt, MechanismOpt, ModeOpt, PrecisionOpt, fail as _fail


def generate(
    data: Path = typer.Option(..., exists=False, help="JSONL (or CSV) file with 'text' and 'label'."),
    label: str = typer.Option(..., help="Label to generate demonstrations for."),
    shots: int = typer.Option(1, help="Number of demonstrations."),
    epsilon: float = typer.Option(..., help="Target epsilon of the whole output ('inf' = no noise)."),
    delta: float = typer.Option(1e-5, help="Target delta (default 1e-5, like the service; it must not be read from the data)."),
    mode: ModeOpt = typer.Option(ModeOpt.resample, help="Sampling mode."),
    block_tokens: Optional[int] = typer.Option(None, "--block-tokens", help="Tokens per Poisson sample in block mode, k."),
    mechanism: MechanismOpt = typer.Option(MechanismOpt.public_prior, help="public_prior (default: clipped private-minus-public log-probabilities, sampled), or gaussian / exponential noisy argmax."),
    num_subsets: int = typer.Option(10, "--num-subsets", "-M", help="Disjoint subsets (parallel prompts), M."),
    shots_per_subset: int = typer.Option(2, "--shots-per-subset", "-N", help="Private examples per prompt, N."),
    max_tokens: int = typer.Option(20, "--max-tokens", "-T", help="Max tokens per demonstration, T."),
    private_tokens: Optional[int] = typer.Option(None, "--private-tokens", "-P", min=1, help="P: only the first P tokens are drawn from the private rows (and charged); the rest continue the public prompt (default: all T)."),
    top_k: int = typer.Option(100, help="Candidates from the public prompt (0 = full vocabulary)."),
    guidance: float = typer.Option(1.0, "--guidance", help="Public prior: each prompt's private-minus-public shift is scaled by this before the clip (classifier-free guidance; epsilon unchanged)."),
    instruction: str = typer.Option("Generate an example text for the given label.", help="Task instruction."),
    input_prefix: str = typer.Option("Text:", help="Prefix of the text field."),
    label_prefix: str = typer.Option("Label:", help="Prefix of the label field."),
    model: Optional[str] = typer.Option(None, help="Local HF model directory (default: SmolLM2-135M-Instruct)."),
    precision: PrecisionOpt = typer.Option(PrecisionOpt.float32, help="Local model precision: float32, bfloat16, or int8 (one row per forward)."),
    api_base: Optional[str] = typer.Option(None, help="Use an OpenAI-compatible server's logprobs instead of a local model."),
    api_model: Optional[str] = typer.Option(None, help="Model name on --api-base (litellm form, e.g. openai/name)."),
    clusters: int = typer.Option(0, "--clusters", min=0, help="K private clusters of the label's units (0 = off): shots go one per usable cluster, largest noisy cluster first, and compose in parallel (docs/privacy.md)."),
    clustering: ClusteringOpt = typer.Option(ClusteringOpt.dp, "--clustering", help="Centroids of --clusters: dp (DP k-means, charged on the label) or public (embeddings of epsilon-0 demonstrations)."),
    seed: Optional[int] = typer.Option(None, help="Seed for reproducible noise and sampling (default: OS CSPRNG); needs --public-data."),
    public_data: bool = typer.Option(False, "--public-data", help="Declare that the file holds no private records (tests, benchmarks); required by --seed."),
) -> None:
    """Generate DP few-shot demonstrations for one label and print them as JSON with their epsilon."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.console import Console

    from aggregation import accounting
    from aggregation.datasets import DataError, read_jsonl
    from aggregation.fewshot import GenerationConfig, generate_demonstration, noisy_pool_sizes, plan_demonstrations
    from aggregation.units import unit_counts, unit_pools
    from aggregation.mechanisms import Noise
    from aggregation.prompts import TaskPrompt

    if seed is not None and not public_data:
        # As the service refuses a job seed on a private dataset: anyone holding the seed could
        # recompute the noise and the samples, and remove them.
        _fail("--seed is only allowed with --public-data: the noise on private data must come from the OS CSPRNG")
    if not data.exists():
        _fail(f"no such file: {data}")
    if shots < 1:
        _fail("--shots must be at least 1")
    if not epsilon > 0:
        _fail("--epsilon must be positive (use 'inf' for no noise)")
    try:
        records = read_jsonl(data)
    except DataError as exc:
        _fail(f"{data}: {exc}")
    if not 0 < delta < 1:
        _fail("--delta must be in (0, 1)")
    # The label on the command line is declared, not looked up: an absent label has an empty pool,
    # and whether it is generated from private data follows from its DP pool estimate only.
    domain = sorted({r.label for r in records} | {label})
    pools = unit_pools(records, domain)  # pools over privacy units (rows carry privacy_unit)
    config = GenerationConfig(mode=mode.value, block_tokens=block_tokens, mechanism=mechanism.value, num_subsets=num_subsets,
                              shots_per_subset=shots_per_subset, max_tokens=max_tokens,
                              private_tokens=private_tokens, top_k=top_k or None, epsilon=epsilon, guidance=guidance)
    try:
        config.validate()
    except ValueError as exc:
        _fail(str(exc))
    noise = Noise(seed)
    ledger = accounting.PartitionedLedger(delta)
    prompt = TaskPrompt(instruction, input_prefix, label_prefix)
    if clusters and config.private:
        from aggregation.clusters import ClusterConfig
        from aggregation.embeddings import minilm_path

        cluster_config = ClusterConfig(clusters=clusters, method=clustering.value)
        try:
            minilm_path()
        except FileNotFoundError as exc:
            _fail(f"--clusters: {exc}")
    source = _source(api_base, api_model, model, precision)
    counts = unit_counts(pools, domain)
    released: dict = {}
    if clusters and config.private:
        plan, released, member_pools = _plan_in_clusters(cluster_config, config, source, prompt, pools[label],
                                                         shots, delta, ledger, noise)
    else:
        member_pools = {label: pools[label]}
        if config.private:
            sizes, count_event = noisy_pool_sizes(counts, noise)
            ledger.add(accounting.WHOLE_DATASET, count_event)
        else:
            sizes = {k: float(v) for k, v in counts.items()}
        try:
            plan = plan_demonstrations(config, {label: shots}, sizes, delta)
        except ValueError as exc:
            _fail(str(exc))
        for part, ev in plan.charges():
            ledger.add(part, ev)
    demos = []
    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as progress:
        bar = progress.add_task(f"generating {shots} x {label}", total=shots * max_tokens)
        jobs = [(part, lp) for part, lp in plan.labels.items() for _ in range(lp.shots) if lp.decision != "skip"]
        for i, (part, lp) in enumerate(jobs):
            done = i * max_tokens
            demo = generate_demonstration(source, prompt, member_pools[part], label, config, lp, noise,
                                          on_token=lambda step: progress.update(bar, completed=done + step + 1))
            progress.update(bar, completed=(i + 1) * max_tokens)
            demos.append(demo)
    lp = next(iter(plan.labels.values()))
    out = {
        "demonstrations": [{"text": d.text, "label": d.label} for d in demos],
        "epsilon": ledger.spent(),
        "epsilon_demonstrations": plan.epsilon(),
        "delta": delta,
        "mode": mode.value,
        "mechanism": mechanism.value,
        "sigma": lp.sigma,
        "epsilon_per_token": lp.epsilon_per_token,
        "clip": lp.clip,  # public_prior only (None otherwise)
        "temperature": lp.temperature,
        "q": lp.q,
        # the DP estimate the decision used (units); with --clusters the clusters' ids and DP sizes
        **({"clusters": released} if released else {"noisy_pool_size": sizes.get(label)}),
        "decision": lp.decision,
        "rule": lp.rule,
        "accountant": accounting.kind_of([e for _, e in plan.charges()]),  # pld, best (of PLD and RDP) or rdp
        "stats": {"tokens": sum(d.tokens for d in demos), "model_calls": sum(d.model_calls for d in demos),
                  "seconds": round(sum(d.seconds for d in demos), 3)},
    }
    typer.echo(json.dumps(out, indent=2, ensure_ascii=False))


def _plan_in_clusters(cluster_config, config, source, prompt, pool, shots, delta, ledger, noise):
    """Charge the clustering on the label, cluster its units, plan and charge the shots per cluster.

    Returns the plan, what is shown of the clusters (ids, DP sizes, shots: public) and the member
    pools by partition.
    """
    from aggregation.accounting import cluster_partition
    from aggregation.clusters import cluster_label, clustering_events, plan_in_clusters
    from aggregation.embeddings import MiniLMEmbedder
    from aggregation.evaluation.clustered import public_centroid_texts

    texts: dict[str, list[str]] = {}
    if cluster_config.method == "public":  # epsilon 0: the public prompt alone
        texts = public_centroid_texts(source, prompt, [pool.label], config, cluster_config.clusters, 0)
    for event in clustering_events(cluster_config):  # spend before a row is embedded
        ledger.add(pool.label, event)
    release = cluster_label(pool, MiniLMEmbedder(), cluster_config, noise, texts.get(pool.label, ()))
    plan, members = plan_in_clusters(config, release, shots, delta)
    for part, ev in plan.charges():
        ledger.add(part, ev)
    shots_in = {accounting_key: lp.shots for accounting_key, lp in plan.labels.items()}
    released = [{"cluster": j, "noisy_size": round(s, 2),
                 "shots": shots_in.get(cluster_partition(pool.label, j), 0)} for j, s in enumerate(release.noisy_sizes)]
    return plan, released, members


def _source(api_base: str | None, api_model: str | None, model: str | None, precision: PrecisionOpt):
    """The next-token source: an OpenAI-compatible server, or the local model."""
    if api_base:
        from aggregation.sources.openai_compat import OpenAICompatSource

        return OpenAICompatSource(model=api_model or "openai/default", api_base=api_base)
    from aggregation.sources.local import LocalSource

    try:
        return LocalSource.from_pretrained(model, precision.value)
    except FileNotFoundError as exc:
        _fail(str(exc))


def register(app: typer.Typer) -> None:
    """Add the engine commands to the ``dpicl`` app."""
    from proxy.cli.account import account

    app.command("account")(account)
    app.command("generate")(generate)
