"""Decide on dev, report on test; training grids: the pure rules (no database, no model)."""

from __future__ import annotations

import itertools

import pytest

from services.config import ConfigError, parse_round_config
from services.contracts import JobKey
from services.contracts.graph import candidate_subject, expand_grid, grid_candidates, stage_steps, variants_of
from services.promotion import SplitAccuracy, gate_on_dev
from services.registry import split_indices

SFT = {"stage": "sft", "weak": "w", "strong": "s", "pool": "p", "eval": {"dataset": "dev"}, "variants": ["hybrid"]}


# --- the gate never decides on the report_on split ------------------------------------------------

def test_a_candidate_better_on_test_but_worse_on_dev_is_not_promoted():
    student = SplitAccuracy(decide=0.40, report=0.40)
    decision = gate_on_dev("student", student, {"cand": SplitAccuracy(decide=0.38, report=0.90)}, decided_on="dev")
    assert decision.promoted is None
    assert decision.reason.startswith("on dev: ") and "does not beat" in decision.reason


def test_a_candidate_better_on_dev_but_worse_on_test_is_promoted():
    student = SplitAccuracy(decide=0.40, report=0.40)
    decision = gate_on_dev("student", student, {"cand": SplitAccuracy(decide=0.45, report=0.05)}, decided_on="dev")
    assert decision.promoted == "cand"


def test_among_candidates_the_best_on_dev_wins_whatever_test_says():
    student = SplitAccuracy(decide=0.30, report=0.30)
    candidates = {"a": SplitAccuracy(0.50, 0.10), "b": SplitAccuracy(0.40, 0.95), "c": SplitAccuracy(0.45, 0.60)}
    assert gate_on_dev("student", student, candidates).promoted == "a"


def test_the_report_on_figures_cannot_change_any_decision():
    """Every assignment of report_on figures (including none) gives the decision the dev figures alone give."""
    dev = {"a": 0.42, "b": 0.47, "c": 0.47}
    for student_dev in (0.40, 0.47, 0.50):
        expected = gate_on_dev("s", SplitAccuracy(student_dev), {n: SplitAccuracy(v) for n, v in dev.items()})
        for reports in itertools.product((None, 0.0, 0.5, 1.0), repeat=4):
            student = SplitAccuracy(student_dev, reports[0])
            candidates = {n: SplitAccuracy(v, r) for (n, v), r in zip(dev.items(), reports[1:])}
            assert gate_on_dev("s", student, candidates) == expected
    assert expected.promoted is None  # 0.50 beats every candidate: the loop's last case rejects


# --- report_on in the config and the step graph --------------------------------------------------

def test_report_on_is_a_held_out_split_of_its_own():
    config = parse_round_config({**SFT, "eval": {"dataset": "dev", "report_on": "test", "report_limit": 50}})
    assert config.eval.report_on == "test" and config.eval.report_limit == 50
    with pytest.raises(ConfigError, match="eval: .*report_on: 'dev' is the eval dataset itself"):
        parse_round_config({**SFT, "eval": {"dataset": "dev", "report_on": "dev"}})
    with pytest.raises(ConfigError, match="report_limit: needs report_on"):
        parse_round_config({**SFT, "eval": {"dataset": "dev", "report_limit": 5}})


def test_report_on_keys_and_steps():
    key = JobKey.evaluate("hybrid-lr1e-4", report_on=True)
    assert str(key) == "evaluate:report-on:hybrid-lr1e-4" and JobKey.parse(str(key)) == key
    assert JobKey.parse("evaluate:hybrid") != JobKey.parse("evaluate:report-on:hybrid")
    steps = [str(s) for s in stage_steps("weak-sft", ["gold"], report_on=True)]
    assert steps == ["evaluate:baseline", "evaluate:report-on:baseline", "train:gold", "evaluate:gold",
                     "evaluate:report-on:gold", "promote"]
    assert "evaluate:report-on:gold" not in [str(s) for s in stage_steps("weak-sft", ["gold"])]


# --- training grids ------------------------------------------------------------------------------

def test_a_grid_makes_one_named_candidate_per_setting_in_a_fixed_order():
    grid = {"learning_rate": [1e-4, 3e-4], "epochs": [1, 2]}
    assert expand_grid(grid) == [{"learning_rate": 1e-4, "epochs": 1}, {"learning_rate": 1e-4, "epochs": 2},
                                 {"learning_rate": 3e-4, "epochs": 1}, {"learning_rate": 3e-4, "epochs": 2}]
    assert candidate_subject("hybrid", {"learning_rate": 1e-4}) == "hybrid-lr1e-4"
    assert candidate_subject("dpo", {"learning_rate": 5e-5, "beta": 0.1, "epochs": 2}) == "dpo-lr5e-5-beta0.1-ep2"
    assert list(grid_candidates(["weak", "hybrid"], grid))[:2] == ["weak-lr1e-4-ep1", "weak-lr1e-4-ep2"]
    assert len(grid_candidates(["weak", "hybrid"], grid)) == 8
    assert grid_candidates(["hybrid"], None) == {"hybrid": ("hybrid", {})}

    config = parse_round_config({**SFT, "training": {"grid": grid}})
    assert variants_of("sft", config.model_dump(mode="json")) == [
        "hybrid-lr1e-4-ep1", "hybrid-lr1e-4-ep2", "hybrid-lr3e-4-ep1", "hybrid-lr3e-4-ep2"]
    assert config.training.settings()[3] == {"learning_rate": 3e-4, "epochs": 2}
    assert isinstance(config.training.settings()[0]["epochs"], int)


@pytest.mark.parametrize("grid, message", [
    ({"learning_rat": [1e-4]}, "training: .*grid.learning_rat: not a hyper-parameter a grid can vary here"),
    ({"beta": [0.1]}, "grid.beta: not a hyper-parameter a grid can vary here"),  # stage I has no beta
    ({"learning_rate": []}, "grid.learning_rate: needs at least one value"),
    ({"learning_rate": [2.0]}, "grid.learning_rate: 2.0: Input should be less than or equal to 1"),
    ({"epochs": [0, 1]}, "grid.epochs: 0: Input should be greater than or equal to 1"),
    ({"epochs": [1.5]}, "grid.epochs: 1.5: "),
    ({"learning_rate": [1e-4, 1e-4]}, "grid.learning_rate: each value at most once"),
    ({}, "grid: give at least one hyper-parameter"),
    ({"learning_rate": [i / 1000 for i in range(1, 66)]}, "grid: 65 settings, at most 64"),
])
def test_a_bad_grid_is_refused_naming_the_field(grid, message):
    with pytest.raises(ConfigError, match=message):
        parse_round_config({**SFT, "training": {"grid": grid}})


def test_a_preference_grid_may_vary_beta():
    config = parse_round_config({"stage": "preference", "student": "s", "weak": "w", "pool": "p",
                                 "eval": {"dataset": "dev"}, "training": {"grid": {"beta": [0.1, 0.5]}}})
    assert variants_of("preference", config.model_dump(mode="json")) == ["dpo-beta0.1", "dpo-beta0.5"]


# --- dev / test splits ---------------------------------------------------------------------------

def test_a_split_is_deterministic_disjoint_and_complete():
    dev, test = split_indices(1319, 500, seed=0)
    assert (dev, test) == split_indices(1319, 500, seed=0)
    assert len(dev) == 500 and len(test) == 819 and not set(dev) & set(test)
    assert sorted(dev + test) == list(range(1319)) and dev == sorted(dev)
    assert split_indices(1319, 500, seed=1)[0] != dev
    # Pinned: random.Random(seed).sample is the same on every machine and Python 3 version.
    assert dev[:5] == [0, 2, 3, 4, 6]


@pytest.mark.parametrize("dev", [0, 100, 101])
def test_a_split_needs_questions_on_both_sides(dev):
    from services.errors import InputError

    with pytest.raises(InputError, match=f"--dev {dev}: must be between 1 and 99"):
        split_indices(100, dev, seed=0)


# --- figures over seeds --------------------------------------------------------------------------

def _run(strong_dev: float, hybrid: tuple[float, float], outcome: str) -> dict:
    report = {"stage": "sft", "iteration": 1, "outcome": outcome,
              "student_before": {"name": "demo-strong", "accuracy": strong_dev, "report_accuracy": 0.40},
              "variants": {"hybrid": {"accuracy": hybrid[0], "report_accuracy": hybrid[1]}}}
    return {"rounds": [{"round_id": 1, "state": "done", "report": report}]}


def test_headline_figures_over_seeds_are_mean_and_sample_sd_with_each_value():
    from services.demo import headline_figures, seed_table

    per_seed = {0: headline_figures(_run(0.40, (0.50, 0.44), "promoted")),
                1: headline_figures(_run(0.42, (0.40, 0.46), "rejected")),
                2: headline_figures(_run(0.44, (0.45, 0.48), "promoted"))}
    assert per_seed[0] == {"strong model, dev": 0.40, "strong model, test": 0.40, "stage I it1 hybrid, dev": 0.50,
                           "stage I it1 hybrid, test": 0.44, "stage I it1 promoted (share of seeds)": 1.0}
    rows = {name: (mean, sd, values) for name, mean, sd, values in seed_table(per_seed)}
    mean, sd, values = rows["stage I it1 hybrid, dev"]
    assert values == {0: 0.50, 1: 0.40, 2: 0.45}
    assert mean == pytest.approx(0.45) and sd == pytest.approx(0.05)  # sample sd: sqrt(0.005 / 2)
    assert rows["stage I it1 promoted (share of seeds)"][0] == pytest.approx(2 / 3)
    # A figure one seed lacks (a round that did not run) averages over the seeds that have it.
    per_seed[3] = {"strong model, dev": 0.5}
    rows = {name: (mean, sd, values) for name, mean, sd, values in seed_table(per_seed)}
    assert rows["stage I it1 hybrid, dev"][2] == {0: 0.50, 1: 0.40, 2: 0.45}
    assert rows["strong model, dev"][0] == pytest.approx(0.44)


@pytest.mark.parametrize("args, says", [
    (["--seeds", "0,x"], "'0,x': expected comma-separated integers such as 0,1,2"),
    (["--seeds", "1,1"], "'1,1': give each seed once"),
    (["--deterministic"], "--deterministic: torch was imported before the pins could be set"),
])
def test_demo_refuses_bad_seeds_and_late_pins(tmp_path, args, says):
    import torch  # noqa: F401  (as in any process that loaded a model before)

    from tests.support import invoke_cli

    result = invoke_cli("demo", "--workdir", tmp_path / "demo", *args, ok=False)
    assert result.exit_code == 2 and says in " ".join(result.output.split())
    assert not (tmp_path / "demo").exists()  # nothing started


def test_a_run_is_compared_with_the_seeds_range_and_flagged_outside_two_sd():
    from services.demo import against_expected

    expected = {"strong model, dev": (0.40, 0.02), "stage II dpo, test": (0.45, 0.001), "never printed": (0.5, 0.1)}
    rows = against_expected({"strong model, dev": 0.45, "stage II dpo, test": 0.459, "extra": 0.3}, expected)
    assert [(name, inside) for name, _, _, _, inside in rows] == [
        ("strong model, dev", False),  # 5 points off, 2 sd is 4
        ("stage II dpo, test", True),  # 0.9 points off: inside the ±1 point floor though 2 sd is 0.2
    ]


def test_the_readme_figures_name_what_a_full_demo_prints():
    from services.demo import EXPECTED_FULL, headline_figures

    def variants(**accuracies):
        return {name: {"accuracy": dev, "report_accuracy": test} for name, (dev, test) in accuracies.items()}

    before = {"name": "demo-strong", "accuracy": 0.4, "report_accuracy": 0.4}
    full_run = {"rounds": [
        {"report": {"stage": "sft", "iteration": 1, "outcome": "promoted", "student_before": before,
                    "variants": variants(weak=(0.38, 0.37), hybrid=(0.44, 0.45))}},
        {"report": {"stage": "sft", "iteration": 2, "outcome": "promoted", "variants": variants(hybrid=(0.48, 0.44))}},
        {"report": {"stage": "preference", "iteration": 1, "outcome": "promoted", "variants": variants(orpo=(0.50, 0.45)),
                    "pass_at_k": {"k": 10, "student": 0.61, "orpo": 0.62}}}]}
    assert EXPECTED_FULL and set(EXPECTED_FULL) <= set(headline_figures(full_run))


def test_the_stage_two_verdict_needs_both_splits_and_names_the_pair_quality():
    from services.demo import stage_two_verdict

    def preference(dev, test, chosen=0.51):
        return {"stage": "preference", "chosen_accuracy": chosen,
                "student_before": {"name": "round2-hybrid", "accuracy": 0.48, "report_accuracy": 0.444},
                "variants": {"dpo": {"accuracy": dev, "report_accuracy": test}}}

    stage_one = {"stage": "sft", "variants": {"hybrid": {"accuracy": 0.9, "report_accuracy": 0.9}}}
    helped = stage_two_verdict([stage_one, preference(0.50, 0.46)])
    assert helped == ("Stage II helped on both splits: dpo 50.0% / 46.0% against round2-hybrid 48.0% / 44.4% "
                      "(dev / test).")
    # Better on dev (it would be promoted) but worse on the held-out test: not a help.
    not_helped = stage_two_verdict([stage_one, preference(0.518, 0.37)])
    assert not_helped.startswith("Stage II did not help on both splits: dpo 51.8% / 37.0%")
    assert "chosen answers were 51% right" in not_helped and "wrong too often" in not_helped
    sound_pairs = stage_two_verdict([stage_one, preference(0.518, 0.37, chosen=0.87)])
    assert "87% right" in sound_pairs and "the pairs were sound" in sound_pairs
    assert stage_two_verdict([stage_one]) is None  # no stage II round (the tiny scale)
