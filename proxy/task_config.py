"""A task's specification: the exposed model name, its prompt formats and its DP generation settings.

Defaults follow the README's fidelity grid. A spec the service stored (admin-created tasks and the
snapshot in every warm-up record) is a full dump written with the defaults of its day, so fields
added since then are read with the values they had before they existed (:func:`stored_task`):
a stored task keeps its cache key and its paid-for demonstrations across upgrades.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Annotated, Any, Literal, Mapping

from pydantic import AfterValidator, AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

#: Name under which the built-in local model is exposed (and how tasks refer to it).
LOCAL_MODEL_NAME = "local/smollm2"
#: Generator / upstream names that all mean "the built-in local model".
LOCAL_ALIASES = frozenset({"local", LOCAL_MODEL_NAME, "smollm2"})
#: A task's generation prompt width when it sets none (``auto`` derives one from the data instead).
DEFAULT_PROMPT_TOKENS = 256
#: Public-prior guidance of a task that gives none (other mechanisms take none: 1).
DEFAULT_GUIDANCE = 3.0
#: Private tokens per demonstration of a task that gives none (public_only tasks: none private).
DEFAULT_PRIVATE_TOKENS = 4
#: What a stored spec without these generation fields meant: the behaviour before each existed.
LEGACY_GENERATION = {"label_hint": "word", "guidance": 1.0, "private_tokens": None}

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


def _model_name(v: str) -> str:
    if not _NAME_RE.match(v):
        raise ValueError("must be 1-128 characters of letters, digits and ._:/-")
    return v


#: What clients send as ``model``: a task's name or a ``model_list`` entry's ``model_name``.
ModelName = Annotated[str, AfterValidator(_model_name)]


class Strict(BaseModel):
    """A settings model that refuses unknown keys (a typo must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid")


class GenerationSettings(Strict):
    """DP generation parameters of a task (aggregation.fewshot.GenerationConfig, minus epsilon)."""

    #: fixed is the default: no mode that warms the example task in a minute on two cores beat it
    #: beyond the spread on the README's grid; block keeps one Poisson sample for ``block_tokens`` tokens.
    mode: Literal["resample", "fixed", "block"] = "fixed"
    block_tokens: int | None = Field(None, ge=1, le=512)
    #: public_prior: clipped private-minus-public log-probabilities sampled at a temperature
    #: (docs/privacy.md); ``clip``/``temperature`` are its knobs (one given, the other calibrated).
    #: The default since it beat Gaussian noisy-max at epsilon 1-4 (docs/evaluation.md).
    mechanism: Literal["gaussian", "exponential", "public_prior"] = "public_prior"
    clip: float | None = Field(None, gt=0)
    temperature: float | None = Field(1.0, gt=0)
    #: public_prior: scales each prompt's shift before the clip; epsilon unchanged (docs/privacy.md).
    #: Left out, 3 with the public prior (the README's grid) and 1 (none) with the other mechanisms.
    guidance: float = Field(DEFAULT_GUIDANCE, gt=0, le=100)
    num_subsets: int = Field(10, ge=1, le=1000)
    shots_per_subset: int = Field(2, ge=1, le=100)
    max_tokens: int = Field(30, ge=1, le=512)
    #: P: only the first P tokens are private (and charged), the rest continue the public prompt;
    #: null = all. Left out, 4 (the README's grid), or null with public_only.
    private_tokens: int | None = Field(DEFAULT_PRIVATE_TOKENS, ge=1, le=512)
    top_k: int | None = Field(100, ge=1)
    #: Explicit noise multiplier instead of calibrating to epsilon (the ledger records its exact event).
    sigma: float | None = Field(None, gt=0)
    #: epsilon 0: generate from the public prompt only (reads no private data, costs nothing).
    public_only: bool = False
    #: Alternatives per call of an OpenAI-compatible generator (aggregation.sources.openai_compat).
    top_logprobs: int = Field(20, ge=1, le=100_000)
    #: Token budget (and the public batch width of a KV-cached source) of one generation prompt;
    #: ``auto`` derives it from the dataset's DP row-length release (proxy.serving.widths).
    max_prompt_tokens: Annotated[int, Field(ge=16, le=32_768)] | Literal["auto"] = DEFAULT_PROMPT_TOKENS
    #: What the generation prompt shows for a label: ``word`` (its label word) or ``alias`` (a
    #: neutral public alias, "type A", "type B", ... by position in the task's label domain, also
    #: in the instruction); the injected demonstrations always carry the real label words. Left out,
    #: ``alias`` (the README's grid: level or better on trec, trec-opaque and an unseen mapping), or
    #: ``word`` with public_only (without private rows nothing tells the model what an alias means).
    label_hint: Literal["word", "alias"] = "alias"
    #: K private clusters per label (0 = off): each demonstration reads one cluster of similar
    #: units, charged on partition ``label#j`` (proxy.serving.clusters); centroids by DP k-means
    #: (``dp``) or from epsilon-0 demonstrations (``public``). Not part of the cache key while 0.
    clusters: int = Field(0, ge=0, le=32)
    clustering: Literal["dp", "public"] = "dp"

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        # ``sigma`` is the Gaussian mechanism's noise multiplier: a task that gives one and no
        # mechanism (written before public_prior became the default) keeps meaning Gaussian.
        if data.get("sigma") is not None and "mechanism" not in data:
            data["mechanism"] = "gaussian"
        # Defaults that depend on other fields; an explicit value (null included) is kept.
        if "guidance" not in data:
            data["guidance"] = DEFAULT_GUIDANCE if data.get("mechanism", "public_prior") == "public_prior" else 1.0
        if "private_tokens" not in data:
            data["private_tokens"] = None if data.get("public_only") else DEFAULT_PRIVATE_TOKENS
        if "label_hint" not in data:  # an alias means nothing without private rows to give it one
            data["label_hint"] = "word" if data.get("public_only") else "alias"
        return data

    @model_validator(mode="after")
    def _mechanism_knobs(self) -> "GenerationSettings":
        # Refused at load time rather than at the first warm-up (GenerationConfig.validate agrees).
        if self.mode == "block" and self.block_tokens is None:
            raise ValueError("mode 'block' needs block_tokens")
        if self.mechanism == "public_prior":
            if self.sigma is not None:
                raise ValueError("the public_prior mechanism takes clip and temperature, not sigma")
            if self.clip is None and self.temperature is None:
                raise ValueError("the public_prior mechanism needs clip or temperature (the other is calibrated)")
        elif self.clip is not None or self.guidance != 1.0:
            raise ValueError(f"{'clip' if self.clip is not None else 'guidance'} applies to the public_prior mechanism only")
        if self.public_only and (self.clusters or self.private_tokens is not None):
            raise ValueError(f"{'clusters' if self.clusters else 'private_tokens'} need private generation: "
                             "public_only reads no private row")
        return self


class TaskConfig(Strict):
    """A task: an exposed model name whose requests get DP demonstrations injected."""

    name: ModelName
    upstream: str = LOCAL_MODEL_NAME
    #: Model whose next-token distributions generate the demonstrations: None = the local model,
    #: or the ``model_name`` of an OpenAI-compatible ``model_list`` entry.
    generator: str | None = None
    dataset: str
    instruction: str
    input_prefix: str = "Text:"
    label_prefix: str = "Label:"
    label_words: dict[str, str] = Field(default_factory=dict)
    labels: list[str] | None = None
    shots: int = Field(1, ge=1, le=50)
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    #: Target epsilon of one demonstration set (``.inf`` = no noise, public datasets only).
    epsilon: float = 1.0
    #: Part of the cache key: change it to force a new (charged) set. It is not a noise seed (the
    #: noise is always CSPRNG), hence the name; ``seed`` is accepted as a deprecated alias.
    revision: int = Field(0, validation_alias=AliasChoices("revision", "seed"))
    on_missing: Literal["generate", "error"] = "error"
    #: What a request's answer is: ``text`` (the upstream's own completion) or ``label`` (one of the
    #: task's label words: the one the built-in local model scores highest after the prompt, as the
    #: evaluation scores them; proxy/upstreams/labels.py). ``label`` needs a local upstream.
    answer: Literal["text", "label"] = "text"

    @field_validator("epsilon")
    @classmethod
    def _eps(cls, v: float) -> float:
        if math.isnan(v) or v <= 0:
            raise ValueError("epsilon must be positive (set generation.public_only for epsilon 0)")
        return v

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (not v or len(set(v)) != len(v)):
            raise ValueError("labels must be a non-empty list without duplicates")
        return v

    @field_validator("instruction")
    @classmethod
    def _instruction(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("instruction must not be empty")
        return v

    def template_hash(self) -> str:
        """SHA-256 of the prompt fields (part of the demonstration cache key)."""
        fields = {
            "instruction": self.instruction, "input_prefix": self.input_prefix,
            "label_prefix": self.label_prefix, "label_words": sorted(self.label_words.items()),
        }
        if self.generation.label_hint != "word":  # only then: existing tasks keep their cache keys
            fields["label_hint"] = self.generation.label_hint
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def stored_task(spec: Mapping[str, Any]) -> TaskConfig:
    """The task of a spec the service stored (``TaskConfig.model_dump``): generation fields it
    lacks take :data:`LEGACY_GENERATION`, the values they had before they existed, not today's
    defaults, so the task's cache key (and the demonstrations already paid for) stay the same.
    Raises pydantic's ValidationError for a spec this version cannot read."""
    data = dict(spec)
    generation = data.get("generation")
    if generation is None or isinstance(generation, dict):
        data["generation"] = {**LEGACY_GENERATION, **(generation or {})}
    return TaskConfig.model_validate(data)
