"""DP-SGD LoRA fine-tuning of the local causal LM, then sampling of synthetic text.

Where noise is added: Opacus' ``DPOptimizer`` clips each sequence's gradient to ``max_grad_norm``
(L2) and adds ``N(0, (noise_multiplier * max_grad_norm)^2)`` to the sum of a Poisson-sampled batch
before every step. The privacy unit is one training sequence (one private record).

Accounting: every record is included in each batch independently with probability ``q``
(:func:`poisson_batches`, drawn like Opacus' sampler but also for an empty dataset), and ``steps``
noisy steps are taken whatever the data (an empty batch is a noisy step too), so the ledger records ``SelfComposed(PoissonSampled(q, Gaussian(noise_multiplier)), steps)``
on the whole-dataset partition. We do not use Opacus' own accountant (its RDP estimate
over-reports against PLD) nor its ``q = 1/len(data_loader)``: ``q = batch_size / n`` is computed
from a DP estimate ``n`` of the dataset size (the noisy label counts), so neither the sampler nor
the gradient scaling depends on the exact private size; the sampler uses this ``q`` as is, which is
all the accountant assumes. Label proportions of the sampled synthetic dataset come from the same DP
label counts (charged on ``"*"``).

Training text = label control code (the task's generation header, e.g. ``"Answer type: location\\n
Question:"``) + `` text`` + EOS. The loss covers the text tokens only (prefix and padding labels are
-100) and is the mean per sequence, then the mean over the batch: HF's ``labels=`` loss averages
over all tokens of the batch, which would weight long sequences more and is not the per-example
loss Opacus clips.

Flow: :func:`plan_dpsgd` fixes the noise multiplier and the charges from public inputs only, so a
caller records them before :func:`run_dpsgd` reads a private record.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import dp_accounting as dpa
import numpy as np

from aggregation import accounting
from aggregation.fewshot import COUNT_SIGMA
from aggregation.pe import Cancelled, Progress, ShouldCancel, allocate, first_line
from aggregation.prompts import Example, TaskPrompt

#: Control codes when the caller gives no task (``"Label: <label>\nText:"``).
DEFAULT_TASK = TaskPrompt(instruction="")


@dataclass(frozen=True)
class DPSGDConfig:
    """Parameters of a DP-SGD fine-tuning job (public). Defaults finish on CPU in minutes."""

    epsilon: float | None = 4.0  # target for the job, label histogram included
    noise_multiplier: float | None = None  # explicit instead of a target epsilon
    batch_size: int = 16  # expected (Poisson) batch size B; q = B / n_estimate
    steps: int = 100
    learning_rate: float = 2e-3
    max_grad_norm: float = 1.0
    max_length: int = 48  # tokens per training sequence (prefix included)
    lora_r: int = 8
    lora_alpha: int = 16
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    num_samples: int = 120  # synthetic rows to sample after training
    temperature: float = 1.0
    top_p: float = 0.95
    max_new_tokens: int = 40
    sample_batch: int = 16
    count_sigma: float = COUNT_SIGMA

    def validate(self) -> None:
        if self.batch_size < 1 or self.steps < 1 or self.max_length < 4:
            raise ValueError("batch_size and steps must be at least 1, max_length at least 4")
        if not self.max_grad_norm > 0 or not self.learning_rate > 0:
            raise ValueError("max_grad_norm and learning_rate must be positive")
        accounting.check_noise_or_target(self.noise_multiplier, self.epsilon, "noise_multiplier")
        if self.num_samples < 1 or self.max_new_tokens < 1 or self.sample_batch < 1:
            raise ValueError("num_samples, max_new_tokens and sample_batch must be at least 1")
        if self.lora_r < 1 or not self.target_modules:
            raise ValueError("lora_r must be at least 1 and target_modules non-empty")


@dataclass
class DPSGDPlan:
    """Noise, sampling rate and charges of a DP-SGD job, fixed before private rows are read."""

    config: DPSGDConfig
    delta: float
    labels: list[str]
    label_counts: dict[str, float]  # DP label counts (released before planning)
    q: float
    noise_multiplier: float
    include_counts: bool

    @property
    def training_event(self) -> dpa.DpEvent:
        return training_event(self.q, self.noise_multiplier, self.config.steps)

    @property
    def counts_event(self) -> dpa.DpEvent:
        return dpa.GaussianDpEvent(self.config.count_sigma)

    def charges(self) -> list[tuple[str, dpa.DpEvent]]:
        """``(partition, event)`` pairs to record before :func:`run_dpsgd` (training touches every
        label, so it is charged on the whole dataset)."""
        out: list[tuple[str, dpa.DpEvent]] = [(accounting.WHOLE_DATASET, self.training_event)]
        if self.include_counts:
            out.append((accounting.WHOLE_DATASET, self.counts_event))
        return out

    def epsilon(self) -> float:
        return accounting.epsilon_of([e for _, e in self.charges()], self.delta)

    def summary(self) -> dict:
        return {"noise_multiplier": self.noise_multiplier, "q": self.q, "steps": self.config.steps,
                "batch_size": self.config.batch_size, "max_grad_norm": self.config.max_grad_norm,
                "count_sigma": self.config.count_sigma, "labels": list(self.labels), "epsilon": self.epsilon()}


@dataclass
class DPSGDResult:
    rows: list[Example]
    adapter_dir: Path
    per_label: dict[str, int] = field(default_factory=dict)
    step_seconds: list[float] = field(default_factory=list)
    sample_seconds: float = 0.0


def training_event(q: float, noise_multiplier: float, steps: int) -> dpa.DpEvent:
    """The event DP-SGD's sampler and optimizer implement (Poisson rate q, ``steps`` steps)."""
    return dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(noise_multiplier)), steps)


def plan_dpsgd(config: DPSGDConfig, label_counts: Mapping[str, float], delta: float,
               include_counts: bool = False) -> DPSGDPlan:
    """Fix ``q`` and calibrate the noise multiplier from DP label counts (public after release).

    ``label_counts`` must be a DP release (e.g. ``fewshot.noisy_pool_sizes``) charged by the
    caller, or by this plan with ``include_counts=True``. The target epsilon covers training
    composed with the label histogram even when the histogram was charged earlier (conservative).
    """
    config.validate()
    labels = sorted(label_counts)
    if not labels:
        raise ValueError("no labels")
    n_est = sum(max(0.0, float(c)) for c in label_counts.values())
    if n_est < 2 * config.batch_size:
        raise ValueError(f"the dataset is too small for batch_size {config.batch_size} "
                         f"(estimated {max(0, round(n_est))} rows); lower batch_size")
    q = config.batch_size / n_est
    if config.noise_multiplier is not None:
        nm = float(config.noise_multiplier)
    else:
        nm = accounting.calibrate_after(dpa.GaussianDpEvent(config.count_sigma),
                                        lambda s: training_event(q, s, config.steps), float(config.epsilon), delta)
    return DPSGDPlan(config, delta, labels, {k: float(v) for k, v in label_counts.items()}, q, nm, include_counts)


# ---------------------------------------------------------------------------------------------
# Data and loss.


def encode_examples(records: Sequence[Example], tokenizer: Any, task: TaskPrompt, max_length: int):
    """``(input_ids, attention_mask, labels)`` tensors, right-padded to ``max_length``; labels are
    -100 on the control code and padding so the loss covers the text (and its EOS) only."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    n = len(records)
    ids = torch.full((n, max_length), int(pad), dtype=torch.long)
    mask = torch.zeros((n, max_length), dtype=torch.long)
    labels = torch.full((n, max_length), -100, dtype=torch.long)
    prefix_cache: dict[str, list[int]] = {}
    for i, ex in enumerate(records):
        prefix = prefix_cache.get(ex.label)
        if prefix is None:
            prefix = tokenizer(task.generation_header(ex.label), add_special_tokens=False)["input_ids"]
            prefix_cache[ex.label] = prefix
        body = tokenizer(" " + ex.text, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        seq = (prefix + body)[:max_length]
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        start = min(len(prefix), len(seq))
        labels[i, start: len(seq)] = torch.tensor(seq[start:], dtype=torch.long)
    return ids, mask, labels


def per_sequence_loss(logits: Any, labels: Any) -> Any:
    """Mean next-token cross-entropy over each sequence's labelled tokens -> ``[batch]``."""
    import torch.nn.functional as F

    shift_logits = logits[:, :-1, :]
    shift_labels = labels[:, 1:]
    tok = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]).float(), shift_labels.reshape(-1),
                          ignore_index=-100, reduction="none").view(shift_labels.shape)
    counts = (shift_labels != -100).sum(dim=1).clamp(min=1)
    return tok.sum(dim=1) / counts


def add_lora(model: Any, config: DPSGDConfig, device: str = "cpu") -> Any:
    """Freeze ``model`` and add LoRA adapters (the model is moved to ``device`` first: opacus
    issue 820, parameters moved after wrapping lose their grad-sample hooks' identity)."""
    from peft import LoraConfig, get_peft_model

    model.to(device)
    lcfg = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0, bias="none",
                      target_modules=list(config.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, lcfg)


# ---------------------------------------------------------------------------------------------
# The run.


def run_dpsgd(
    plan: DPSGDPlan,
    private: Sequence[Example],
    model: Any,
    tokenizer: Any,
    out_dir: str | Path,
    task: TaskPrompt = DEFAULT_TASK,
    seed: int | None = None,
    progress: Progress | None = None,
    should_cancel: ShouldCancel | None = None,
    private_training: bool = True,
) -> DPSGDResult:
    """Train LoRA with DP-SGD on ``private`` and sample ``config.num_samples`` synthetic rows.

    Call only after ``plan.charges()`` were recorded. ``seed`` makes sampling, noise and generation
    reproducible (tests, benchmarks); ``None`` seeds every generator from the OS CSPRNG.
    ``private_training=False`` trains without clipping or noise (benchmark baseline only).
    Records whose label is not in ``plan.labels`` are ignored. Raises :class:`Cancelled`.
    """
    import torch

    cfg = plan.config
    out_dir = Path(out_dir)
    seeds = np.random.default_rng(seed).integers(0, 2**62, 3) if seed is not None else \
        np.frombuffer(os.urandom(24), dtype=np.uint64) >> np.uint64(2)
    gen_data = torch.Generator().manual_seed(int(seeds[0]))
    gen_noise = torch.Generator().manual_seed(int(seeds[1]))

    keep = set(plan.labels)
    # No record with a planned label is not an error: the run is the same as with some (every
    # Poisson batch is empty, every step still adds the accounted noise), so whether a job
    # fails cannot tell D without such a record from D with one.
    records = [ex for ex in private if ex.label in keep]
    tensors = encode_examples(records, tokenizer, task, cfg.max_length)

    peft_model = add_lora(model, cfg)
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate)
    if private_training:
        module, optimizer = _make_private(peft_model, optimizer, plan, gen_noise)
        inner = module._module
    else:
        module, inner = peft_model, peft_model

    result = DPSGDResult(rows=[], adapter_dir=out_dir / "adapter")
    for step, batch in enumerate(poisson_batches(len(records), plan.q, cfg.steps, gen_data), start=1):
        if should_cancel is not None and should_cancel():
            raise Cancelled()
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        if batch.numel() == 0:
            if private_training:
                # An empty Poisson batch is still a noisy step (the accountant counts it).
                for p in params:
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
                optimizer.step()
        else:
            input_ids, attention_mask, labels = (t[batch] for t in tensors)
            logits = module(input_ids=input_ids, attention_mask=attention_mask).logits
            loss = per_sequence_loss(logits, labels).mean()
            loss.backward()
            optimizer.step()
        result.step_seconds.append(time.perf_counter() - started)
        if progress is not None:
            progress(0.9 * step / cfg.steps, f"training step {step}/{cfg.steps}")
    optimizer.zero_grad(set_to_none=True)

    inner.save_pretrained(str(result.adapter_dir))

    # Sampling: post-processing of the DP-trained adapter, in proportions of the DP label counts.
    started = time.perf_counter()
    sizes = allocate({lab: plan.label_counts.get(lab, 0.0) for lab in plan.labels}, cfg.num_samples)
    result.per_label = sizes
    if private_training:
        module.disable_hooks()  # GradSampleModule hooks would record activations during generate
    torch.manual_seed(int(seeds[2]))
    try:
        result.rows = sample_texts(inner, tokenizer, task, sizes, cfg, should_cancel)
    finally:
        if private_training:
            module.enable_hooks()
        inner.train()  # generate() leaves the model in eval mode
    result.sample_seconds = time.perf_counter() - started
    if progress is not None:
        progress(1.0, "sampled")
    return result


def poisson_batches(n: int, q: float, steps: int, generator: Any):
    """``steps`` index tensors: each of the ``n`` rows in a batch independently with probability ``q``.

    The sampling the accountant assumes (``PoissonSampled(q, ...)`` per step), drawn as Opacus'
    ``UniformWithReplacementSampler`` draws it. Ours because that sampler (and ``DPDataLoader``)
    refuse ``n = 0``: here an empty dataset gives ``steps`` empty batches, exactly the run a
    dataset whose rows were never sampled gets.
    """
    import torch

    for _ in range(steps):
        yield (torch.rand(n, generator=generator) < q).nonzero(as_tuple=False).reshape(-1)


def _make_private(model: Any, optimizer: Any, plan: DPSGDPlan, generator: Any) -> tuple[Any, Any]:
    """Opacus' per-sample-gradient module and clipping+noise optimizer (``make_private`` without
    its data loader and accountant): noise ``plan.noise_multiplier * max_grad_norm`` per step,
    averaged by the public expected batch size, never one derived from the exact ``n``."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer
    from opacus.validators import ModuleValidator

    ModuleValidator.validate(model, strict=True)
    with warnings.catch_warnings():
        # Opacus warns that its secure RNG is off: the noise generator is seeded from os.urandom
        # when no seed is given (torchcsprng is not available here).
        warnings.simplefilter("ignore")
        module = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        dp_optimizer = DPOptimizer(optimizer, noise_multiplier=plan.noise_multiplier,
                                   max_grad_norm=plan.config.max_grad_norm,
                                   expected_batch_size=plan.config.batch_size, loss_reduction="mean",
                                   generator=generator)
    return module, dp_optimizer


def sample_texts(model: Any, tokenizer: Any, task: TaskPrompt, sizes: Mapping[str, int], cfg: DPSGDConfig,
                 should_cancel: ShouldCancel | None = None, max_rounds: int = 3) -> list[Example]:
    """Sample ``sizes[label]`` one-line texts per label from the control code (``model`` is the
    plain peft model: a GradSampleModule has no ``generate``). Empty generations are re-drawn up
    to ``max_rounds`` times."""
    import torch

    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows: list[Example] = []
    for label in sorted(sizes):
        want = sizes[label]
        prefix = tokenizer(task.generation_header(label), add_special_tokens=False)["input_ids"]
        got: list[str] = []
        for _ in range(max_rounds * max(1, math.ceil(want / cfg.sample_batch))):
            if len(got) >= want:
                break
            if should_cancel is not None and should_cancel():
                raise Cancelled()
            n = min(cfg.sample_batch, want - len(got))
            ids = torch.tensor([prefix] * n)
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                     temperature=cfg.temperature, top_p=cfg.top_p,
                                     max_new_tokens=cfg.max_new_tokens, pad_token_id=pad,
                                     eos_token_id=tokenizer.eos_token_id)
            for row in out[:, len(prefix):]:
                text = first_line(tokenizer.decode(row, skip_special_tokens=True))
                if text:
                    got.append(text)
        rows.extend(Example(t, label) for t in got[:want])
    return rows
