"""The stage II pair rules (ALGORITHMS.md, "Stage II") on constructed votes, through the pure function."""

from __future__ import annotations

import random

import pytest

from services.selection import Pair, PairDecision, decide_pairs


def preference_pairs(*args, **kwargs) -> list[Pair]:
    """The pairs alone, for the tests that look at nothing else."""
    return decide_pairs(*args, **kwargs).pairs


WEAK = "weak says #### 72"


def votes(*counts: tuple[str, int]) -> list[tuple[str, str]]:
    """Samples as (answer, response); each response text is unique: 'r<answer>-<k>'."""
    return [(answer, f"r{answer}-{k}") for answer, count in counts for k in range(count)]


def decide(weak_answer: str, samples, seed: int = 0, **kwargs) -> PairDecision:
    return decide_pairs(weak_answer, WEAK, samples, rng=random.Random(seed), **kwargs)


# --- skips before any pair ---------------------------------------------------------------------


def test_below_floor_is_skipped():
    decision = decide("72", votes(("72", 5), ("5", 3), ("6", 2)))
    assert decision == PairDecision(pairs=[], skipped="below_floor", confidence=0.5, majority_answer="72")


def test_exactly_at_floor_is_kept():
    decision = decide("72", votes(("72", 6), ("5", 4)))
    assert decision.confidence == 0.6
    assert decision.skipped is None
    assert len(decision.pairs) == 1


def test_empty_majority_is_skipped():
    decision = decide("72", votes(("", 7), ("72", 3)))
    assert decision.skipped == "empty_majority"
    assert decision.confidence == 0.7
    assert decision.majority_answer == ""
    assert decision.pairs == []


def test_empty_answers_form_one_class():
    # 6 empties would be the majority only if they grouped together; "" never answers_match "".
    decision = decide("72", votes(("", 6), ("72", 4)))
    assert (decision.skipped, decision.confidence) == ("empty_majority", 0.6)


# --- weak as chosen ----------------------------------------------------------------------------


def test_weak_chosen_rejects_a_non_majority_sample():
    samples = votes(("72", 8), ("5", 1), ("6", 1))
    decision = decide("72", samples)
    assert decision.skipped is None
    assert decision.majority_answer == "72"
    [pair] = decision.pairs
    assert pair.case == "weak_chosen"
    assert pair.chosen == WEAK
    assert pair.rejected in {"r5-0", "r6-0"}


def test_weak_chosen_may_reject_an_empty_answer():
    decision = decide("72", votes(("72", 9), ("", 1)))
    assert decision.pairs == [Pair(chosen=WEAK, rejected="r-0", case="weak_chosen")]


def test_weak_chosen_without_a_non_majority_sample_is_too_easy():
    decision = decide("72", votes(("72", 10)))
    assert decision == PairDecision(pairs=[], skipped="too_easy", confidence=1.0, majority_answer="72")


def test_weak_chosen_does_not_need_tau():
    decision = decide("72", votes(("72", 6), ("5", 4)), tau=0.9)
    assert [pair.case for pair in decision.pairs] == ["weak_chosen"]


# --- weak as rejected --------------------------------------------------------------------------


@pytest.mark.parametrize(("majority", "skipped"), [(7, "below_tau"), (8, None), (9, None), (10, None)])
def test_weak_rejected_only_at_or_above_tau(majority, skipped):
    decision = decide("5", votes(("72", majority), ("6", 10 - majority)))
    assert decision.confidence == majority / 10
    assert decision.skipped == skipped
    if skipped is None:
        [pair] = decision.pairs
        assert pair.case == "weak_rejected"
        assert pair.rejected == WEAK
        assert pair.chosen.startswith("r72-")
    else:
        assert decision.pairs == []


def test_weak_without_answer_is_rejected_against_a_confident_majority():
    decision = decide("", votes(("72", 8), ("5", 2)))
    assert [(pair.case, pair.rejected) for pair in decision.pairs] == [("weak_rejected", WEAK)]


def test_weak_rejected_when_weak_response_is_also_sampled():
    # The weak response itself among the minority samples does not change the rule.
    samples = votes(("72", 9)) + [("5", WEAK)]
    [pair] = decide("5", samples).pairs
    assert pair.case == "weak_rejected" and pair.chosen != WEAK


# --- equivalence -------------------------------------------------------------------------------


def test_equivalent_answers_are_one_class():
    samples = [("72", "a"), ("72.0", "b"), ("72.00", "c"), ("$72", "d"), ("72 dollars", "e"), ("72", "f"),
               ("5", "g"), ("6", "h"), ("7", "i"), ("8", "j")]
    decision = decide("72.0", samples)
    assert decision.confidence == 0.6
    assert decision.majority_answer == "72"  # the class's first sampled answer
    [pair] = decision.pairs
    assert pair.case == "weak_chosen"
    assert pair.rejected in {"g", "h", "i", "j"}


def test_thousands_separator_weak_answer_matches_majority():
    decision = decide("1,000", votes(("1000", 8), ("5", 2)))
    assert [pair.case for pair in decision.pairs] == ["weak_chosen"]


def test_math_equivalence():
    samples = [("\\frac{1}{2}", f"half{k}") for k in range(4)] + [("0.5", f"point{k}") for k in range(4)]
    samples += [("3", "three"), ("4", "four")]
    decision = decide("1/2", samples, task="math")
    assert decision.confidence == 0.8
    assert [pair.case for pair in decision.pairs] == ["weak_chosen"]


def test_ties_go_to_the_class_sampled_first():
    tied = votes(("5", 5), ("72", 5))
    assert decide("72", tied, floor=0.5, tau=0.5).majority_answer == "5"
    assert decide("72", tied[::-1], floor=0.5, tau=0.5).majority_answer == "72"
    # the empty class follows the same rule
    assert decide("72", votes(("", 5), ("72", 5)), floor=0.5, tau=0.5).skipped == "empty_majority"
    assert decide("72", votes(("72", 5), ("", 5)), floor=0.5, tau=0.5).majority_answer == "72"


# --- several pairs per question ----------------------------------------------------------------


def test_three_distinct_rejected_when_weak_chosen():
    samples = votes(("72", 6), ("5", 2), ("6", 1), ("7", 1))
    pairs = preference_pairs("72", WEAK, samples, per_question=3, rng=random.Random(1))
    assert len(pairs) == 3
    assert len({pair.rejected for pair in pairs}) == 3
    assert all(pair.chosen == WEAK and pair.case == "weak_chosen" for pair in pairs)


def test_three_distinct_chosen_when_weak_rejected():
    pairs = preference_pairs("5", WEAK, votes(("72", 9), ("6", 1)), per_question=3, rng=random.Random(1))
    assert len(pairs) == 3
    assert len({pair.chosen for pair in pairs}) == 3
    assert all(pair.rejected == WEAK and pair.case == "weak_rejected" for pair in pairs)


def test_distinct_by_response_text_not_by_sample():
    # Eight majority samples but only two distinct texts: two pairs, not three.
    samples = [("72", "same A")] * 5 + [("72", "same B")] * 3 + [("6", "x"), ("7", "y")]
    pairs = preference_pairs("5", WEAK, samples, per_question=3, rng=random.Random(0))
    assert sorted(pair.chosen for pair in pairs) == ["same A", "same B"]


def test_fewer_than_three_available():
    samples = votes(("72", 8), ("5", 2))
    pairs = preference_pairs("72", WEAK, samples, per_question=3, rng=random.Random(0))
    assert sorted(pair.rejected for pair in pairs) == ["r5-0", "r5-1"]
    # duplicates of one text count once
    samples = votes(("72", 8)) + [("5", "dup"), ("6", "dup")]
    assert [p.rejected for p in preference_pairs("72", WEAK, samples, per_question=3, rng=random.Random(0))] == ["dup"]


# --- determinism -------------------------------------------------------------------------------


def test_deterministic_given_a_seeded_rng():
    samples = votes(("72", 6), ("5", 1), ("6", 1), ("7", 1), ("8", 1))
    runs = {tuple(preference_pairs("72", WEAK, samples, per_question=2, rng=random.Random(42))) for _ in range(5)}
    assert len(runs) == 1
    # and the rng is really used: the seeds do not all draw the same rejected sample
    drawn = {preference_pairs("72", WEAK, samples, rng=random.Random(seed))[0].rejected for seed in range(30)}
    assert drawn == {"r5-0", "r6-0", "r7-0", "r8-0"}


def test_preference_pairs_is_decide_pairs_pairs():
    samples = votes(("72", 9), ("5", 1))
    for weak_answer in ("72", "5"):
        pairs = preference_pairs(weak_answer, WEAK, samples, rng=random.Random(3))
        assert pairs == decide(weak_answer, samples, 3).pairs


# --- argument validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"floor": -0.1}, "floor"),
        ({"floor": 1.1, "tau": 1.0}, "floor"),
        ({"tau": 1.5}, "tau"),
        ({"tau": -0.1, "floor": 0.0}, "tau"),
        ({"floor": 0.7, "tau": 0.6}, "tau"),
        ({"per_question": 0}, "per_question"),
        ({"per_question": 4}, "per_question"),
        ({"per_question": 1.5}, "per_question"),
        ({"per_question": True}, "per_question"),
        ({"task": "svamp"}, "task"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        decide("72", votes(("72", 10)), **kwargs)


@pytest.mark.parametrize("samples", [[], [("72", "only one")]])
def test_too_few_samples(samples):
    with pytest.raises(ValueError, match=r"^samples\b"):
        decide("72", samples)


def test_boundary_arguments_are_accepted():
    samples = votes(("72", 2))
    assert decide("72", samples, floor=0.0, tau=0.0).skipped == "too_easy"
    assert decide("72", samples, floor=1.0, tau=1.0, per_question=3).skipped == "too_easy"
