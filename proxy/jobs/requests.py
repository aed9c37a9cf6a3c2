"""Job requests and records: the request models validated at the HTTP boundary, their conversion to
the algorithms' configs, job states and errors, and the record's public view. Records and errors
hold no private text (labels, numbers, states and exception type names only).
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from aggregation.pe import PEConfig
from aggregation.prompts import TaskPrompt

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
FINISHED_STATES = frozenset({SUCCEEDED, FAILED, CANCELLED})


class JobError(Exception):
    """A job-level failure whose message is safe to show (never contains private text)."""


class JobRequestError(ValueError):
    """A submission is invalid (HTTP 400); the message names fields, never data."""


class JobConflict(Exception):
    """The job is not in a state that allows the operation (HTTP 409)."""


class PromptSpec(BaseModel):
    """Prompt fields of the synthetic texts (same meaning as a task's fields)."""

    model_config = ConfigDict(extra="forbid")
    instruction: str = Field("Write one example text.", min_length=1, max_length=2000)
    input_prefix: str = Field("Text:", min_length=1, max_length=100)
    label_prefix: str = Field("Label:", min_length=1, max_length=100)
    label_words: dict[str, str] = Field(default_factory=dict)


class _JobBase(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dataset: str = Field(min_length=1, max_length=200, description="dataset id (or name: latest version)")
    epsilon: float | None = Field(4.0, gt=0, description="target epsilon of the whole job")
    seed: int | None = Field(None, description="reproducible noise and sampling: public datasets only (tests, "
                                               "benchmarks); refused on private data and never shown in job views")
    labels: list[str] | None = Field(None, description="labels to synthesise (default: all of the dataset)")
    task: str | None = Field(None, description="take prompt fields from this configured task")
    prompt: PromptSpec | None = None
    num_samples: int = Field(120, ge=1, le=100_000)
    model: str | None = Field(None, description="'local' (default), a model_list name (PE), or a local model directory")
    # No count_sigma here: the label counts a job uses are the dataset's shared release
    # (BudgetService.noisy_counts, drawn at COUNT_SIGMA), so the plan must assume that sigma.


class PEJobRequest(_JobBase):
    """``POST /admin/jobs`` body for Private Evolution."""

    kind: Literal["pe"]
    sigma: float | None = Field(None, gt=0)
    iterations: int = Field(4, ge=1, le=100)
    population: int = Field(32, ge=1, le=10_000)
    k: int = Field(1, ge=1, le=100)
    threshold: float | None = Field(None, ge=0)
    temperature: float = Field(1.0, gt=0, le=2)
    max_new_tokens: int = Field(40, ge=1, le=512)


class DPSGDJobRequest(_JobBase):
    """``POST /admin/jobs`` body for DP-SGD fine-tuning."""

    kind: Literal["dpsgd"]
    noise_multiplier: float | None = Field(None, gt=0)
    steps: int = Field(100, ge=1, le=100_000)
    batch_size: int = Field(16, ge=1, le=4096)
    learning_rate: float = Field(2e-3, gt=0, le=1)
    max_grad_norm: float = Field(1.0, gt=0)
    max_length: int = Field(48, ge=4, le=1024)
    lora_r: int = Field(8, ge=1, le=256)
    temperature: float = Field(1.0, gt=0, le=2)
    max_new_tokens: int = Field(40, ge=1, le=512)


#: Discriminated by ``kind``: a request is validated against its own kind only, so an error names
#: only that kind's fields (a PE error never lists DP-SGD's).
JobRequest = Annotated[Union[PEJobRequest, DPSGDJobRequest], Field(discriminator="kind")]


def pe_config(req: PEJobRequest) -> PEConfig:
    return PEConfig(epsilon=req.epsilon, sigma=req.sigma, iterations=req.iterations, population=req.population,
                    num_samples=req.num_samples, k=req.k, threshold=req.threshold)


def dpsgd_config(req: DPSGDJobRequest):
    from aggregation.dpsgd import DPSGDConfig

    return DPSGDConfig(epsilon=req.epsilon, noise_multiplier=req.noise_multiplier, batch_size=req.batch_size,
                       steps=req.steps, learning_rate=req.learning_rate, max_grad_norm=req.max_grad_norm,
                       max_length=req.max_length, lora_r=req.lora_r, num_samples=req.num_samples,
                       temperature=req.temperature, max_new_tokens=req.max_new_tokens)


def job_prompt(record: dict) -> TaskPrompt:
    """The prompt fields stored with a job (PromptSpec's defaults for any left out)."""
    # model_construct: the fields were checked at submission; a stored task's longer
    # instruction must not fail a job whose cost is already spent.
    p = PromptSpec.model_construct(**(record.get("prompt") or {}))
    return TaskPrompt(p.instruction, p.input_prefix, p.label_prefix, tuple(sorted((p.label_words or {}).items())))


def public_view(rec: dict) -> dict:
    """The record as the API shows it (everything in it is already free of private text).

    The seed is never shown: a seed is allowed on public datasets only, and even there echoing
    it would invite reusing it (docs/jobs.md)."""
    keys = ("id", "kind", "dataset_id", "dataset_version", "state", "progress", "step", "error",
            "epsilon_target", "epsilon_job", "epsilon_charged", "delta", "plan", "label_counts",
            "label_decisions", "params", "runner", "worker", "cancel_requested", "created_at", "started_at",
            "finished_at", "heartbeat_at", "rows", "per_label", "seconds_per_iteration", "steps_per_second")
    view = {k: rec.get(k) for k in keys}
    if isinstance(view["params"], dict):
        view["params"] = {k: v for k, v in view["params"].items() if k != "seed"}
    return view
