"""Iterative rounds: pairing answers by their scores, the rounds' params, and one round's stages in process (generate
is seeded, the pairs report adds up, a judge that ties every answer stops the round with a clear message, a round's
base names the previous policy and its reference, evaluate judges against the other model, progress gathers it).
Caching across rounds under real DVC: tests/test_rounds_dvc.py."""

from __future__ import annotations

import copy

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import tiny_params
from pipeline.config.params import check_params, round_params
from pipeline.core.errors import PipelineError
from pipeline.judge.pairing import pairs_report, prompt_pairs, score_distribution
from pipeline.store.dvc_deps import stage_deps


def rounds_params(**round_two) -> dict:
    """Tiny params with two rounds: the first on a few original pairs, the second on pairs of its own answers."""
    params = tiny_params()
    raw = {
        "model": params["model"],
        "data": params["data"],
        "tokenize": params["tokenize"],
        "ref_logps": params["ref_logps"],
        "train": {**params["train"], "max_steps": 2},
        "evaluate": {**params["evaluate"], "do_sample": True, "num_generations": 6, "num_samples_per_prompt": 2},
        "generate": {"num_prompts": 6, "num_samples": 3, "max_new_tokens": 12, "batch_size": 4},
        "iterate": {
            "reference": "previous",
            "rounds": {
                "1": {"previous": "0", "pairs": "original", "original_pairs": 16, "train": {}},
                "2": {"previous": "1", "pairs": "generated", "original_pairs": None, "train": round_two},
            },
        },
    }
    return check_params(raw)


# ---- pairing: pure functions ---------------------------------------------------------------------------------


def test_best_worst_pairs_the_top_answer_with_the_bottom_one_and_margin_pairs_every_gap():
    answers, scores = ["a", "b", "c", "d"], [1.0, 3.0, -2.0, 3.0]
    assert prompt_pairs(answers, scores, "best_worst", 0.0) == ([(1, 2)], None)  # the first of two best
    pairs, reason = prompt_pairs(answers, scores, "margin", 1.5)
    assert reason is None and sorted(pairs) == [(0, 2), (1, 0), (1, 2), (3, 0), (3, 2)]  # b and d tie: never paired
    assert sorted(prompt_pairs(answers, scores, "margin", 2.5)[0]) == [(0, 2), (1, 2), (3, 2)]
    assert prompt_pairs(answers, scores, "best_worst", 5.0) == ([], "below_margin")


def test_ties_and_identical_answers_give_no_pair_with_their_reason():
    assert prompt_pairs(["x", "y", "z"], [0.5, 0.5, 0.5], "best_worst", 0.0) == ([], "all_tie")
    assert prompt_pairs(["same", "same"], [1.0, 1.0], "margin", 0.0) == ([], "identical_answers")
    # an answer written twice counts once: the copy never pairs with itself, and the score of its first copy counts
    assert prompt_pairs(["p", "p", "q"], [2.0, 2.0, 0.0], "margin", 0.0) == ([(0, 2)], None)


def test_the_pairs_report_adds_up_and_describes_the_scores():
    report = pairs_report([None, "all_tie", None, "below_margin", "all_tie"], 7, [1.0, 2.0, 2.0, -3.0])
    assert report["prompts_in"] == 5 == report["prompts_with_pairs"] + report["prompts_dropped"]
    assert report["dropped_by_reason"] == {"all_tie": 2, "below_margin": 1}
    assert report["pairs_out"] == 7
    assert report["scores"]["counts"] == {"-3.0": 1, "1.0": 1, "2.0": 2} and report["scores"]["p50"] == 1.5
    assert score_distribution([]) == {"count": 0}


def test_progress_names_each_comparison_by_the_model_it_was_against():
    from pipeline.publish.progress import round_row

    metrics = {"win_rate": 0.6, "win_rate_low": 0.5, "win_rate_high": 0.7, "versus/win_rate": 0.8, "loss": 0.5}
    previous = round_row(2, "2", metrics, "previous")  # the reference is the round before; versus the initial
    assert (previous["win_rate_previous"], previous["win_rate_initial"], previous["win_rate_previous_low"]) == (
        0.6,
        0.8,
        0.5,
    )
    initial = round_row(2, "2", metrics, "initial")
    assert (initial["win_rate_initial"], initial["win_rate_previous"], initial["eval_loss"]) == (0.6, 0.8, 0.5)


# ---- the rounds' params ----------------------------------------------------------------------------------------


def test_a_round_sees_its_own_train_settings_over_the_train_section():
    params = rounds_params(beta=0.3)
    two = round_params(params, "2")
    assert two["train"]["beta"] == 0.3 and two["train"]["max_steps"] == 2 and "beta" not in params["train"]
    assert two["round"]["number"] == 2 and two["round"]["pairs"] == "generated"
    assert round_params(params, None) is params
    with pytest.raises(PipelineError, match="no such round"):
        round_params(params, "7")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: r["2"].update(previous="0"), "the round before it is '1'"),
        (lambda r: r["2"].pop("original_pairs"), "no original_pairs"),
        (lambda r: r["2"].update(pairs="mine"), "pairs"),
        (lambda r: r["2"]["train"].update(betta=0.2), "betta"),
        (lambda r: r.update({3: copy.deepcopy(r["2"])}), "quoted"),
    ],
)
def test_a_wrong_round_entry_is_refused_by_name(edit, message):
    rounds = copy.deepcopy(rounds_params()["iterate"]["rounds"])
    edit(rounds)
    with pytest.raises(PipelineError, match=message):
        check_params({"iterate": {"rounds": rounds}})


def test_a_foreach_stage_deps_are_resolved_for_the_dependency_check(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"rounds": {"2": {"previous": "1"}}}))
    (tmp_path / "dvc.yaml").write_text(
        yaml.safe_dump(
            {
                "stages": {
                    "gen": {
                        "foreach": "${rounds}",
                        "do": {"cmd": "x", "deps": ["a/round-${item.previous}/policy", "b/${key}"]},
                    }
                }
            }
        )
    )
    assert stage_deps(tmp_path / "dvc.yaml", "gen@2") == [
        (tmp_path / "a/round-1/policy").resolve(),
        (tmp_path / "b/2").resolve(),
    ]
    with pytest.raises(PipelineError, match="no stage 'gen@9'"):
        stage_deps(tmp_path / "dvc.yaml", "gen@9")


# ---- one round's stages, in process ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def round_one(tmp_path_factory):
    """The initial model, the original pairs, and round 1 trained on a few of them (2 steps)."""
    import stages.base as base_stage
    import stages.generate as generate_stage
    import stages.judge_pairs as judge_pairs_stage
    import stages.normalize as normalize_stage
    import stages.ref_logps as ref_stage
    import stages.tokenize as tokenize_stage
    import stages.train as train_stage

    root = tmp_path_factory.mktemp("rounds")
    params = rounds_params()
    one = round_params(params, "1")
    base_stage.run(params, root / "round-0")
    normalize_stage.run(params, root / "normalized")
    base_stage.run_round(one, root / "round-0", root / "round-0", root / "r1" / "base")
    generate_stage.run(one, root / "r1" / "base", root / "normalized", root / "r1" / "samples", say=lambda _: None)
    judge_pairs_stage.run(one, root / "r1" / "samples", root / "normalized", root / "r1" / "pairs")
    tokenize_stage.run(params, root / "r1" / "pairs", root / "r1" / "base", root / "r1" / "tokenized")
    ref_stage.run(params, root / "r1" / "tokenized", root / "r1" / "base", root / "r1" / "ref_logps")
    train_stage.run(
        one,
        root / "r1" / "tokenized",
        root / "r1" / "ref_logps",
        root / "r1" / "base",
        root / "r1" / "policy",
        root / "checkpoints",
        root / "live",
        say=lambda _: None,
    )
    return root, params


def test_round_one_trains_on_the_original_pairs_it_asks_for_and_writes_no_answers(round_one):
    root, _ = round_one
    assert pq.read_table(root / "r1" / "samples" / "samples.parquet").num_rows == 0
    assert pq.read_table(root / "r1" / "pairs" / "train.parquet").num_rows == 16  # original_pairs
    eval_rows = pq.read_table(root / "r1" / "pairs" / "eval.parquet").column("row_id").to_pylist()
    assert eval_rows == pq.read_table(root / "normalized" / "eval.parquet").column("row_id").to_pylist()


def test_the_next_round_starts_from_the_trained_policy_with_the_chosen_reference(round_one, tmp_path):
    import stages.base as base_stage
    from pipeline.store.base_record import base_source, reference_source

    root, params = round_one
    two = round_params(params, "2")
    base_stage.run_round(two, root / "r1" / "policy", root / "round-0", tmp_path / "previous")
    assert base_source(tmp_path / "previous") == (str(root / "r1" / "policy" / "model"), None)
    assert reference_source(tmp_path / "previous") is None  # the round's starting policy is its reference
    two["iterate"]["reference"] = "initial"
    base_stage.run_round(two, root / "r1" / "policy", root / "round-0", tmp_path / "initial")
    assert reference_source(tmp_path / "initial") == (str(root / "round-0" / "model"), None)
    with pytest.raises(PipelineError, match="the round before round 2 has not finished"):
        base_stage.run_round(two, tmp_path / "missing", root / "round-0", tmp_path / "early")
    own_adapter = copy.deepcopy(two)
    own_adapter["model"]["adapter"] = str(tmp_path)
    with pytest.raises(PipelineError, match="round 2: model.adapter .* is not supported in iterative rounds"):
        base_stage.run_round(own_adapter, root / "r1" / "policy", root / "round-0", tmp_path / "own")
    assert not (tmp_path / "own").exists()


@pytest.fixture(scope="module")
def round_two(round_one):
    import stages.base as base_stage
    import stages.generate as generate_stage

    root, params = round_one
    two = round_params(params, "2")
    base_stage.run_round(two, root / "r1" / "policy", root / "round-0", root / "r2" / "base")
    generate_stage.run(two, root / "r2" / "base", root / "normalized", root / "r2" / "samples")
    return root, two


def test_generate_with_the_same_seed_gives_the_same_answers(round_two, tmp_path):
    import stages.generate as generate_stage

    root, two = round_two
    first = pq.read_table(root / "r2" / "samples" / "samples.parquet")
    assert first.num_rows == 6 * 3 and set(first.column("sample").to_pylist()) == {0, 1, 2}
    assert len(set(first.column("row_id").to_pylist())) == 6
    assert set(first.column("policy").to_pylist()) == {
        __import__("pipeline.store.artifacts", fromlist=["x"]).manifest_digest(root / "r2" / "base")
    }
    generate_stage.run(two, root / "r2" / "base", root / "normalized", tmp_path / "again")
    assert pq.read_table(tmp_path / "again" / "samples.parquet").equals(first)
    reseeded = copy.deepcopy(two)
    reseeded["seed"] = 1
    generate_stage.run(reseeded, root / "r2" / "base", root / "normalized", tmp_path / "other")
    other = pq.read_table(tmp_path / "other" / "samples.parquet")
    assert other.column("answer").to_pylist() != first.column("answer").to_pylist()


def length_score(self, prompt, answer: str) -> float:
    """A judge for the tiny model's answers (the built-in program scores every one of them as malformed)."""
    return float(len(answer.split()))


def test_judge_pairs_writes_canonical_pairs_that_tokenize_reads_and_a_report_that_adds_up(
    round_two, tmp_path, monkeypatch
):
    import stages.judge_pairs as judge_pairs_stage
    import stages.tokenize as tokenize_stage
    from pipeline.data.schema import NORMALIZED_SCHEMA, decoded_row
    from pipeline.judge.judges import BuiltinJudge

    root, two = round_two
    monkeypatch.setattr(BuiltinJudge, "score", length_score)
    report = judge_pairs_stage.run(two, root / "r2" / "samples", root / "normalized", tmp_path / "pairs")
    assert report["prompts_in"] == 6 == report["prompts_with_pairs"] + sum(report["dropped_by_reason"].values())
    assert report["scores"]["count"] == 18 and report["judge"] == "builtin"
    pairs = pq.read_table(tmp_path / "pairs" / "train.parquet")
    assert pairs.schema.equals(NORMALIZED_SCHEMA) and pairs.num_rows == report["pairs_out"] > 0
    for record in pairs.to_pylist():  # best over worst: the judge prefers every chosen answer
        row = decoded_row(record)
        assert length_score(None, None, row["chosen"][0]["content"]) > length_score(
            None, None, row["rejected"][0]["content"]
        )
    tokenized = tokenize_stage.run(two, tmp_path / "pairs", root / "r2" / "base", tmp_path / "tokenized")
    assert tokenized["train"]["rows_written"] == pairs.num_rows  # lineage: pairs → samples → round base


def test_the_stages_run_alone_on_a_trained_policy_as_the_docs_show(round_one, tmp_path, monkeypatch):
    import stages.generate as generate_stage
    import stages.judge_pairs as judge_pairs_stage
    import stages.tokenize as tokenize_stage
    from pipeline.judge.judges import BuiltinJudge

    root, params = round_one
    monkeypatch.setattr(BuiltinJudge, "score", length_score)
    r1 = root / "r1"
    generate_stage.run(params, r1 / "base", root / "normalized", tmp_path / "samples", train=r1 / "policy")
    report = judge_pairs_stage.run(params, tmp_path / "samples", root / "normalized", tmp_path / "pairs")
    tokenized = tokenize_stage.run(params, tmp_path / "pairs", r1 / "base", tmp_path / "tokenized")
    assert tokenized["train"]["rows_written"] == report["pairs_out"] > 0
    with pytest.raises(PipelineError, match="made from another base artifact"):
        generate_stage.run(params, root / "round-0", root / "normalized", tmp_path / "other", train=r1 / "policy")


def test_a_judge_that_ties_every_answer_stops_the_round_with_what_to_change(round_two, tmp_path, monkeypatch):
    import stages.judge_pairs as judge_pairs_stage
    from pipeline.judge.judges import BuiltinJudge

    root, two = round_two
    monkeypatch.setattr(BuiltinJudge, "score", lambda self, prompt, answer: 1.0)
    with pytest.raises(PipelineError, match=r"round 2: the judge's scores gave no pair among 6 prompts \(") as err:
        judge_pairs_stage.run(two, root / "r2" / "samples", root / "normalized", tmp_path / "pairs")
    assert "6 where the judge scored every answer equally" in str(err.value)
    assert "judge_pairs.min_margin" in str(err.value) and "pairs: original or both" in str(err.value)
    assert not (tmp_path / "pairs").exists()  # no empty artifact for train to run on


def test_evaluate_judges_the_round_against_the_initial_model_and_progress_gathers_the_rounds(round_one, tmp_path):
    import stages.evaluate as evaluate_stage
    import stages.progress as progress_stage

    root, params = round_one
    one = round_params(params, "1")
    r1 = root / "r1"
    for name in ("1", "2"):  # the same round twice stands for two rounds' results
        evaluate_stage.run(
            one,
            r1 / "policy",
            r1 / "tokenized",
            r1 / "ref_logps",
            r1 / "pairs",
            r1 / "base",
            tmp_path / "eval",
            tmp_path / "round" / name / "eval.json",
            root / "live",
            versus=root / "round-0",
        )
    metrics = yaml.safe_load((tmp_path / "round" / "1" / "eval.json").read_text())
    assert metrics["versus"]["num_comparisons"] == metrics["num_comparisons"] == 6 * 2
    assert metrics["versus"]["win_rate"] == metrics["win_rate"]  # round 1's reference is the initial model
    assert (tmp_path / "eval" / "generations_versus.jsonl").is_file()
    rows = progress_stage.run(params, tmp_path / "round", tmp_path)
    assert [r["round"] for r in rows] == [1, 2] and rows[0]["win_rate_initial"] == metrics["versus"]["win_rate"]
    tsv = (tmp_path / "progress.tsv").read_text().splitlines()
    assert tsv[0].split("\t")[:3] == ["round", "name", "win_rate_initial"] and len(tsv) == 3
    assert "judged win rate over the initial model" in (tmp_path / "progress.html").read_text()


@pytest.mark.parametrize("reference", ["previous", "initial"])
def test_a_lora_round_continues_the_adapter_of_the_round_before_against_the_chosen_reference(
    round_one, tmp_path, reference
):
    import stages.base as base_stage
    import stages.evaluate as evaluate_stage
    import stages.generate as generate_stage
    import stages.judge_pairs as judge_pairs_stage
    import stages.ref_logps as ref_stage
    import stages.tokenize as tokenize_stage
    import stages.train as train_stage
    from pipeline.model.loading import load_policy, load_trained_policy
    from pipeline.objective.reference import stage_reference
    from pipeline.store.base_record import adapter_source, base_source

    root, params = round_one
    params = copy.deepcopy(params)
    params["model"]["peft"].update(enabled=True, r=4, lora_alpha=8, lora_dropout=0.0)
    params["iterate"]["reference"] = reference
    one, two = round_params(params, "1"), round_params(params, "2")

    def train(round_params_, base, out):  # on the original pairs (the tiny model's answers all score alike)
        entry = {**round_params_["round"], "pairs": "original"}
        round_params_ = {**round_params_, "round": entry}
        generate_stage.run(round_params_, base, root / "normalized", out / "samples", say=lambda _: None)
        judge_pairs_stage.run(round_params_, out / "samples", root / "normalized", out / "pairs")
        tokenize_stage.run(round_params_, out / "pairs", base, out / "tokenized")
        ref_stage.run(round_params_, out / "tokenized", base, out / "ref_logps")
        train_stage.run(
            round_params_, out / "tokenized", out / "ref_logps", base, out / "policy", tmp_path / "ck", out / "live"
        )

    base_stage.run_round(one, root / "round-0", root / "round-0", tmp_path / "r1" / "base")
    train(one, tmp_path / "r1" / "base", tmp_path / "r1")  # a new adapter on the initial model
    base_stage.run_round(two, tmp_path / "r1" / "policy", root / "round-0", tmp_path / "r2" / "base")
    assert base_source(tmp_path / "r2" / "base")[0] == str(root / "round-0" / "model")
    assert adapter_source(tmp_path / "r2" / "base") == (str(tmp_path / "r1" / "policy" / "model"), None)
    start = load_policy(tmp_path / "r2" / "base", two, trainable=False)
    expected = {"previous": "policy", "initial": "adapter_off"}[reference]  # the round before, or the base
    assert stage_reference(tmp_path / "r2" / "base", two, start, "before_training").kind == expected
    train(two, tmp_path / "r2" / "base", tmp_path / "r2")  # continues that adapter (no second one)
    trained = load_trained_policy(tmp_path / "r2" / "policy" / "model", tmp_path / "r2" / "base", two)
    assert list(trained.peft_config) == ["default"]
    before = {k: v for k, v in start.state_dict().items() if "lora_B" in k}
    after = {k: v for k, v in trained.state_dict().items() if "lora_B" in k}
    assert before.keys() == after.keys() and any((before[k] != after[k]).any() for k in before)
    assert any(v.abs().sum() > 0 for v in before.values())  # round 2 started from round 1's trained adapter
    r2 = tmp_path / "r2"
    metrics = evaluate_stage.run(
        two,
        r2 / "policy",
        r2 / "tokenized",
        r2 / "ref_logps",
        r2 / "pairs",
        r2 / "base",
        r2 / "eval",
        r2 / "eval.json",
        r2 / "live",
        versus=root / "round-0",
    )
    assert metrics["versus/num_comparisons"] == metrics["num_comparisons"] > 0
