"""TimedSource: counts the seconds inside the model and changes nothing else."""

from __future__ import annotations

import numpy as np

from aggregation.fewshot import GenerationConfig, generate_demonstration, plan_demonstrations
from aggregation.mechanisms import Noise
from aggregation.prompts import Example, TaskPrompt
from aggregation.sources.timing import TimedSource

PROMPT = TaskPrompt("Write a question.", "Question:", "Answer type:")
POOL = [Example(f"Where is place number {i} ?", "LOC") for i in range(40)]


def test_timed_source_gives_the_same_demonstration_and_counts_its_seconds():
    from tests.tiny_model import tiny_source

    source = tiny_source()
    config = GenerationConfig(mode="block", block_tokens=2, mechanism="public_prior", num_subsets=3,
                              shots_per_subset=2, max_tokens=5, top_k=10, epsilon=3.0, max_prompt_tokens=120)
    plan = plan_demonstrations(config, {"LOC": 1}, {"LOC": 40.0}, 1e-4).labels["LOC"]
    plain = generate_demonstration(source, PROMPT, POOL, "LOC", config, plan, Noise(3))
    timed = TimedSource(source)
    again = generate_demonstration(timed, PROMPT, POOL, "LOC", config, plan, Noise(3))
    assert again.token_ids == plain.token_ids and again.model_calls == plain.model_calls
    assert 0 < timed.seconds <= again.seconds
    state = timed.open(["Question:"], width=40)
    np.testing.assert_array_equal(state.probs([1, 2]), source.open(["Question:"], width=40).probs([1, 2]))
