"""What an evaluation runs and what one run records: the row kinds, the settings with their full and
quick presets, and the run record (numbers only: no text of any example).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from aggregation.clusters import ClusterConfig
from aggregation.fewshot import GenerationConfig

INF = math.inf

# Row identifiers (``row`` column of runs.csv), in table order.
ZERO_SHOT = "zero_shot"
PUBLIC = "epsilon_0"
REAL = "non_private"
DP = "dp"
ROW_TITLES = {
    ZERO_SHOT: "zero-shot",
    PUBLIC: "epsilon 0 (public prompt only)",
    REAL: "non-private (real examples)",
    DP: "DP demonstrations",
}


@dataclass(frozen=True)
class EvalSettings:
    """What to run. The defaults are the full preset; :data:`QUICK` is the CI preset."""

    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    n_test: int = 300
    held_out: int = 300
    split_seed: int = 0
    epsilons: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, INF)
    modes: tuple[str, ...] = ("resample", "fixed")
    mechanism: str = "gaussian"
    num_subsets: int = 10
    shots_per_subset: int = 2
    max_tokens: int = 15
    #: P: only the first P tokens of a DP demonstration are private (None: all T); the rest
    #: continue the public prompt (GenerationConfig.private_tokens).
    private_tokens: int | None = None
    top_k: int | None = 100
    block_tokens: int | None = None  # k, for mode "block"
    #: What generation shows for a label: its word, or a neutral alias ("type A", ...); the
    #: injected (scored) demonstrations carry the label words either way.
    label_hint: str = "word"
    #: Public-prior guidance ``g``: each prompt's private-minus-public shift is scaled by it before
    #: the clip (the per-token bound is unchanged; docs/privacy.md).
    guidance: float = 1.0
    #: Temperature of the public tokens (after the private prefix; every token of the epsilon-0
    #: row). None: the mechanism's ``tau``. It changes the epsilon-0 row too.
    public_temperature: float | None = None
    #: Public prior: sampling temperature ``tau`` of the private tokens (C is calibrated to it).
    temperature: float = 1.0
    calibrate: bool = False  # which accuracy the plot shows; both are always computed
    #: Demonstrations per label and seed that the fidelity metric scores (each an independent draw
    #: of a one-per-label set at the row's epsilon; the first set is also the ICL set). 0 = off.
    fidelity_demos: int = 4
    #: Records taken out of the pool (never private, never tested) to train the fidelity evaluator.
    evaluator_records: int = 1200
    #: The local model (``smollm2``, ``gemma3-270m`` or a model directory): it generates the
    #: demonstrations and scores the ICL questions, so a resumed directory must keep it.
    model: str = "smollm2"
    #: Numeric precision of the local model that generates the demonstrations (ICL scoring stays float32).
    precision: str = "float32"
    #: Private clusters per label (0 = off): DP rows draw each demonstration from the label's
    #: largest noisy cluster; ``clustering`` is ``dp`` (DP k-means) or ``public`` (epsilon-0 centroids).
    clusters: int = 0
    clustering: str = "dp"
    #: Public width every private prompt is padded to (a task's ``generation.max_prompt_tokens``;
    #: ``auto`` derives 89 for TREC at N=2: docs/serving.md).
    max_prompt_tokens: int = 256

    def __post_init__(self) -> None:
        # The generator ignores tau outside the public prior: refused here rather than silently dropped.
        if self.temperature != 1.0 and self.mechanism != "public_prior":
            raise ValueError("temperature applies to the public_prior mechanism only")
        self.generation("fixed", 1.0).validate()  # the generator's own checks, at creation

    def generation(self, mode: str, epsilon: float) -> GenerationConfig:
        return GenerationConfig(mode=mode, mechanism=self.mechanism,  # type: ignore[arg-type]
                                num_subsets=self.num_subsets, shots_per_subset=self.shots_per_subset,
                                max_tokens=self.max_tokens, private_tokens=self.private_tokens,
                                top_k=self.top_k, epsilon=epsilon,
                                guidance=self.guidance, public_temperature=self.public_temperature,
                                temperature=self.temperature,
                                block_tokens=self.block_tokens if mode == "block" else None,
                                max_prompt_tokens=self.max_prompt_tokens)

    def cluster_config(self) -> ClusterConfig:
        """The clustering of the DP rows (``clusters == 0``: off)."""
        return ClusterConfig(clusters=self.clusters, method=self.clustering)  # type: ignore[arg-type]

    @property
    def evaluator_size(self) -> int:
        """Records held out for the fidelity evaluator (0 when fidelity is off)."""
        return self.evaluator_records if self.fidelity_demos > 0 else 0


FULL = EvalSettings()
#: CI preset. Fixed mode only: a resample-mode demonstration re-encodes all M prompts for every
#: token and costs about 5x a fixed-mode one, which would take the preset past 10 minutes on two
#: cores (see docs/evaluation.md); add it with ``--modes resample,fixed``.
#: It covers what the fidelity goal compares (epsilon 0, 1 and 4) with 3 demonstrations per label
#: and seed; epsilon = infinity is left out for time (add it with ``--epsilons 1,4,inf``).
QUICK = EvalSettings(seeds=(0, 1), n_test=100, epsilons=(1.0, 4.0), modes=("fixed",), fidelity_demos=3)


@dataclass
class RunRecord:
    """One row of runs.csv (numbers only: no text of any example)."""

    dataset: str
    row: str
    mode: str
    epsilon: float
    epsilon_total: float
    delta: float
    seed: int
    accuracy: float
    accuracy_calibrated: float
    n_test: int
    demos: int
    missing_labels: int
    generate_seconds: float
    score_seconds: float
    # Added with the fidelity metric; runs.csv files written before it read as gaussian / NaN / 0.
    mechanism: str = "gaussian"
    fidelity: float = math.nan  # share of the scored demonstrations the evaluator gives their own label
    fidelity_demos: int = 0  # demonstrations scored (all labels, all sets of the run)


RUN_FIELDS = [f.name for f in dataclasses.fields(RunRecord)]


def eps_text(e: float) -> str:
    """An epsilon as tables and settings.json show it: ``∞`` or ``%g``."""
    return "∞" if math.isinf(e) else f"{e:g}"


def parse_epsilons(text: str) -> tuple[float, ...]:
    """``"1,2,4,inf"`` -> (1.0, 2.0, 4.0, inf); every value must be positive."""
    values = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        v = INF if part in ("inf", "infinity", "∞") else float(part)
        if not v > 0:
            raise ValueError("epsilons must be positive (epsilon 0 is always its own row)")
        values.append(v)
    if not values:
        raise ValueError("give at least one epsilon")
    return tuple(values)
