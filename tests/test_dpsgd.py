"""DP-SGD: calibration round trips, the prefix-masked per-sequence loss, and a tiny training run."""

from __future__ import annotations

import copy

import dp_accounting as dpa
import pytest

from aggregation import accounting
from aggregation.dpsgd import (
    DPSGDConfig,
    encode_examples,
    per_sequence_loss,
    plan_dpsgd,
    poisson_batches,
    run_dpsgd,
    training_event,
)
from aggregation.prompts import Example, TaskPrompt

TASK = TaskPrompt("Write a question.", "Question:", "Answer type:", (("LOC", "location"), ("NUM", "number")))


@pytest.mark.parametrize("target,steps", [(1.0, 50), (4.0, 200)])
def test_calibrated_noise_multiplier_round_trip(target, steps):
    delta = 1e-5
    counts = {"LOC": 1000.0, "NUM": 1400.0}
    plan = plan_dpsgd(DPSGDConfig(epsilon=target, steps=steps, batch_size=16), counts, delta, include_counts=True)
    assert plan.q == pytest.approx(16 / 2400)
    assert plan.training_event == dpa.SelfComposedDpEvent(
        dpa.PoissonSampledDpEvent(plan.q, dpa.GaussianDpEvent(plan.noise_multiplier)), steps)
    spent = plan.epsilon()
    assert spent <= target and spent >= 0.97 * target
    assert all(p == accounting.WHOLE_DATASET for p, _ in plan.charges())
    smaller = training_event(plan.q, plan.noise_multiplier * 0.97, steps)
    assert accounting.epsilon_of([plan.counts_event, smaller], delta) > target


def test_plan_refuses_a_dataset_smaller_than_two_batches():
    with pytest.raises(ValueError):
        plan_dpsgd(DPSGDConfig(batch_size=16), {"a": 10.0, "b": 5.0}, 1e-5)


@pytest.fixture(scope="module")
def tiny():
    from tests.tiny_model import tiny_model_and_tokenizer

    return tiny_model_and_tokenizer()


def test_encoding_masks_the_control_code_and_padding(tiny):
    _, tok = tiny
    ids, mask, labels = encode_examples([Example("Where is Paris?", "LOC")], tok, TASK, 32)
    prefix = tok(TASK.generation_header("LOC"), add_special_tokens=False)["input_ids"]
    body = tok(" Where is Paris?", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n = len(prefix) + len(body)
    assert ids[0, :n].tolist() == prefix + body
    assert mask[0].tolist() == [1] * n + [0] * (32 - n)
    assert labels[0, : len(prefix)].tolist() == [-100] * len(prefix)
    assert labels[0, len(prefix): n].tolist() == body
    assert (labels[0, n:] == -100).all()


def test_loss_is_the_mean_per_sequence_then_over_the_batch(tiny):
    import torch
    import torch.nn.functional as F

    model, tok = tiny
    recs = [Example("Where is Paris?", "LOC"), Example("How many moons does Jupiter have in total today?", "NUM")]
    ids, mask, labels = encode_examples(recs, tok, TASK, 40)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        per_seq = per_sequence_loss(logits, labels)
        for i in range(2):
            lab = labels[i, 1:]
            keep = lab != -100
            manual = F.cross_entropy(logits[i, :-1][keep], lab[keep])
            assert per_seq[i].item() == pytest.approx(manual.item(), rel=1e-5)
        # HF's token-averaged loss weights the longer sequence more: not what DP-SGD clips.
        token_avg = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        assert abs(token_avg.item() - per_seq.mean().item()) > 1e-4


def test_tiny_dpsgd_run_trains_saves_and_samples(tiny, tmp_path):
    model, tok = tiny
    model = copy.deepcopy(model)
    recs = [Example(f"Where is the town number {i}?", "LOC") for i in range(40)]
    recs += [Example(f"How many cats live in house {i}?", "NUM") for i in range(20)]
    recs += [Example("a row whose label is not planned", "HUM")]
    cfg = DPSGDConfig(epsilon=8.0, batch_size=8, steps=4, num_samples=6, max_new_tokens=6, max_length=24)
    plan = plan_dpsgd(cfg, {"LOC": 40.0, "NUM": 20.0}, 1e-5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = []
    res = run_dpsgd(plan, recs, model, tok, tmp_path, task=TASK, seed=3, progress=lambda f, s: seen.append(s))
    assert (res.adapter_dir / "adapter_config.json").exists()
    assert len(res.step_seconds) == 4 and seen[-1] == "sampled"
    assert res.per_label == {"LOC": 4, "NUM": 2}
    assert {r.label for r in res.rows} <= {"LOC", "NUM"} and len(res.rows) <= 6
    # LoRA only: the base weights are untouched, and the model is back in train mode.
    compared = 0
    for n, p in model.named_parameters():
        if "lora_" not in n:
            base = n.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch_equal(p, before[base])
            compared += 1
    assert compared == len(before)
    assert model.training


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a.detach(), b))


def test_tiny_dpsgd_run_can_be_cancelled(tiny, tmp_path):
    from aggregation.pe import Cancelled

    model, tok = tiny
    cfg = DPSGDConfig(noise_multiplier=1.0, batch_size=4, steps=50, num_samples=2, max_length=16)
    plan = plan_dpsgd(cfg, {"LOC": 40.0}, 1e-5)
    recs = [Example(f"Where is {i}?", "LOC") for i in range(40)]
    steps = []
    with pytest.raises(Cancelled):
        run_dpsgd(plan, recs, copy.deepcopy(model), tok, tmp_path, seed=0,
                  progress=lambda f, s: steps.append(s), should_cancel=lambda: len(steps) >= 3)
    assert len(steps) == 3


def test_poisson_batches_draw_each_row_with_probability_q():
    import torch

    gen = torch.Generator().manual_seed(0)
    batches = list(poisson_batches(2000, 0.1, 20, gen))
    sizes = [b.numel() for b in batches]
    assert len(sizes) == 20 and 150 < sum(sizes) / 20 < 250
    assert all(len(set(b.tolist())) == b.numel() for b in batches)  # no row twice in a batch
    empty = torch.Generator().manual_seed(0)
    assert [b.numel() for b in poisson_batches(0, 0.5, 3, empty)] == [0] * 3  # Opacus' sampler refuses n = 0


def test_no_row_of_the_planned_labels_runs_like_any_dataset(tiny, tmp_path):
    # Issue 20, section 5: the run used to fail when no record had a planned label and proceed
    # with one such record, a failure one record could flip. Now it runs every noisy step on empty
    # batches, samples in the proportions of the DP counts, and releases the same structure.
    model, tok = tiny
    cfg = DPSGDConfig(noise_multiplier=1.0, batch_size=4, steps=3, num_samples=4, max_new_tokens=4, max_length=16)
    plan = plan_dpsgd(cfg, {"LOC": 30.0, "NUM": 10.0}, 1e-5)
    runs = {}
    for name, recs in {"empty": [Example("a row of an unplanned label", "HUM")],
                       "one": [Example("Where is the town?", "LOC")]}.items():
        m = copy.deepcopy(model)
        res = run_dpsgd(plan, recs, m, tok, tmp_path / name, task=TASK, seed=1)
        lora = [p for n, p in m.named_parameters() if "lora_B" in n]
        runs[name] = (res, lora)
    for res, lora in runs.values():
        assert len(res.step_seconds) == 3 and res.per_label == {"LOC": 3, "NUM": 1}
        assert (res.adapter_dir / "adapter_config.json").exists()
        assert any(p.detach().abs().sum() > 0 for p in lora)  # lora_B starts at 0: the noise moved it
