"""LECO: step scores against hand-computed values, the rethink loop on scripted generations, the vote."""

from __future__ import annotations

import math

import pytest

from models.leco import Attempt, RethinkRequest, final_vote, leco_solve, score_steps, suspect_step

# --- score_steps -------------------------------------------------------------------------------


def test_worked_example_from_the_docs():
    (step,) = score_steps(["Jan", "et", " has", " 3"], [0.99, 0.98, 0.50, 0.97])
    kl = (math.exp(step.diver) - 1) ** 3  # diver = ln(KL^(1/3) + 1)
    assert kl == pytest.approx(0.033, abs=5e-4)
    assert step.diver == pytest.approx(0.278, abs=5e-4)
    assert step.avg == pytest.approx(0.86)
    assert step.trans == pytest.approx(0.86)  # no "Step N:" and fewer than 5 tokens: all of them
    assert step.score == pytest.approx(0.86 + 0.86 - step.diver)
    assert (step.text, step.start, step.end, step.n_tokens) == ("Janet has 3", 0, 11, 4)


def test_step_prefix_is_stripped_by_characters_and_trans_reads_the_next_five_tokens():
    pieces = ["Step", " 12", ":", " Jan", "et", " has", " 3", " eggs", " and", "\n"]
    probs = [0.1, 0.2, 0.3, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.01]
    (step,) = score_steps(pieces, probs)
    assert step.text == "Step 12: Janet has 3 eggs and"
    assert step.n_tokens == 9  # the newline belongs to no step
    assert step.avg == pytest.approx(4.5 / 9)
    # "Step", " 12", ":" lie inside the prefix "Step 12: "; " Jan" straddles its end, so it counts
    assert step.trans == pytest.approx((0.9 + 0.8 + 0.7 + 0.6 + 0.5) / 5)
    assert score_steps(pieces, probs, k=2)[0].trans == pytest.approx(0.85)


def test_prefix_matches_any_case_and_spacing():
    (step,) = score_steps(["step", "3", " :", " x"], [0.1, 0.1, 0.1, 0.7])
    assert step.trans == pytest.approx(0.7)


def test_a_step_with_nothing_after_its_prefix_uses_its_own_tokens_for_trans():
    (step,) = score_steps(["Step", " 3", ":"], [0.5, 0.6, 0.7])
    assert step.trans == pytest.approx(0.6)
    assert step.avg == pytest.approx(0.6)


def test_a_piece_holding_two_newlines_belongs_to_the_step_its_first_character_ends():
    steps = score_steps(["Step 1: a", ".\n\nStep", " 2: b"], [0.9, 0.6, 0.7])
    assert [(s.text, s.start, s.end, s.n_tokens) for s in steps] == [
        ("Step 1: a.", 0, 10, 2),
        ("Step 2: b", 12, 21, 1),
    ]
    first, second = steps
    assert first.avg == first.trans == pytest.approx(0.75)
    p_hat = [0.9 / 1.5, 0.6 / 1.5]
    kl = sum(q * math.log(2 * q) for q in p_hat)
    assert first.diver == pytest.approx(math.log(kl ** (1 / 3) + 1))
    # " 2: b" straddles the end of "Step 2: " so it counts for trans; one token: diver 0
    assert (second.avg, second.trans, second.diver, second.score) == pytest.approx((0.7, 0.7, 0.0, 1.4))


def test_one_token_step_has_zero_divergence_not_nan():
    steps = score_steps(["x = 3", "\n", "y"], [0.4, 0.9, 1.0])
    assert [(s.avg, s.trans, s.diver, s.score, s.n_tokens) for s in steps] == [
        (0.4, 0.4, 0.0, 0.8, 1),
        (1.0, 1.0, 0.0, 2.0, 1),
    ]


def test_equal_probabilities_give_zero_divergence_despite_rounding():
    (step,) = score_steps(["a"] * 7, [0.1] * 7)
    assert step.diver == pytest.approx(0.0, abs=1e-5)
    assert not math.isnan(step.score)


def test_empty_and_blank_lines_are_no_step_and_newlines_carry_no_probability():
    pieces = ["a", "\n", "\n", "  ", "\n", "b", "\n\n"]
    probs = [0.5, 0.001, 0.002, 0.003, 0.004, 0.6, 0.005]
    steps = score_steps(pieces, probs)
    assert [(s.text, s.start, s.end, s.avg, s.n_tokens) for s in steps] == [
        ("a", 0, 1, 0.5, 1),
        ("b", 6, 7, 0.6, 1),
    ]
    assert score_steps([], []) == []
    assert score_steps(["\n", " \n"], [0.5, 0.5]) == []


def test_spaces_inside_a_step_count_and_an_empty_piece_goes_with_the_character_it_starts():
    # Llama-2 splits " 12" into " ", "1", "2"; a token ending inside "é" adds "" (generation.py)
    steps = score_steps(["x", " ", "1", "", "é", "\n", "y"], [0.2, 0.4, 0.6, 0.8, 1.0, 0.1, 0.3])
    assert steps[0].text == "x 1é"
    assert steps[0].n_tokens == 5
    assert steps[0].avg == pytest.approx(0.6)


def test_a_step_without_tokens_of_its_own_is_scored_on_the_tokens_overlapping_it():
    first, second = score_steps(["a\nb"], [0.5])
    assert (first.text, first.n_tokens, first.score) == ("a", 1, 1.0)
    assert (second.text, second.n_tokens, second.score) == ("b", 1, 1.0)


def test_score_steps_rejects_bad_input():
    with pytest.raises(ValueError, match="token_probs"):
        score_steps(["a", "b"], [0.5])
    with pytest.raises(ValueError, match="k"):
        score_steps(["a"], [0.5], k=0)


# --- the suspect -------------------------------------------------------------------------------


def _steps(*lines: tuple[str, float]):
    """Steps of one token per line: avg = trans = p, diver = 0, so score = 2p."""
    pieces, probs = _pieces(lines)
    return score_steps(pieces, probs)


def _pieces(lines):
    pieces, probs = [], []
    for n, (text, p) in enumerate(lines):
        if n:
            pieces.append("\n")
            probs.append(0.01)  # newlines belong to no step: never the suspect
        pieces.append(text)
        probs.append(p)
    return pieces, probs


def test_suspect_is_the_earlier_of_the_two_lowest_candidates():
    steps = _steps(("Let's think step by step.", 0.01), ("a", 0.9), ("b", 0.3), ("c", 0.8), ("d", 0.2),
                   ("The Answer Is 5", 0.01))
    assert [s.score for s in steps][1:5] == pytest.approx([1.8, 0.6, 1.6, 0.4])
    assert suspect_step(steps) == 2  # lowest two: d (4) and b (2)
    assert suspect_step(_steps(("a", 0.9))) == 0  # one candidate: itself
    assert suspect_step(_steps(("We go STEP BY STEP", 0.9), ("the answer is 3", 0.1))) is None


# --- the rethink loop --------------------------------------------------------------------------


def _attempt(*lines: tuple[str, float], input_tokens: int = 100) -> Attempt:
    pieces, probs = _pieces(lines)
    return Attempt("".join(pieces), pieces, probs, input_tokens=input_tokens, output_tokens=len(pieces))


class ScriptedGenerator:
    """Returns set attempts per question, in order; records every batch of requests."""

    def __init__(self, scripts: dict[int, list[Attempt]]):
        self.scripts = {i: list(attempts) for i, attempts in scripts.items()}
        self.calls: list[list[RethinkRequest]] = []
        self.input_tokens = self.output_tokens = 0

    def __call__(self, requests):
        self.calls.append(list(requests))
        attempts = [self.scripts[r.question_index].pop(0) for r in requests]
        self.input_tokens += sum(a.input_tokens for a in attempts)
        self.output_tokens += sum(a.output_tokens for a in attempts)
        return attempts


def _cut_then_repeat() -> list[Attempt]:
    return [
        _attempt(("Step 1: a", 0.9), ("Step 2: b", 0.3), ("Step 3: c", 0.4), ("Step 4: d", 0.2),
                 ("The answer is 5", 0.05), input_tokens=120),
        # continues "Step 1: a\n": its steps are 1..4 of the whole solution
        _attempt(("Step 2: e", 0.8), ("Step 3: f", 0.35), ("Step 4: g", 0.3), ("The answer is 6", 0.05),
                 input_tokens=9),
        _attempt(("Step 3: h", 0.9), ("The answer is 6", 0.9), input_tokens=8),
    ]


def test_rethink_cuts_at_the_suspect_continues_the_kept_text_and_stops_on_a_repeated_answer():
    generate = ScriptedGenerator({0: _cut_then_repeat()})
    (result,) = leco_solve(["q"], generate, task="gsm8k")

    assert generate.calls == [
        [RethinkRequest(0, "")],
        [RethinkRequest(0, "Step 1: a\n")],  # lowest two: d (3) and b (1); b and after are dropped
        [RethinkRequest(0, "Step 1: a\nStep 2: e\n")],  # lowest two: g (3) and f (2), whole-solution indices
    ]
    original, first, second = result.attempts
    assert [(a.answer, a.kept_steps, a.suspect) for a in result.attempts] == [
        ("5", 0, 1),
        ("6", 1, 2),
        ("6", 2, None),
    ]
    assert first.text == "Step 1: a\nStep 2: e\nStep 3: f\nStep 4: g\nThe answer is 6"
    assert first.steps[0] == original.steps[0]  # kept steps keep the scores they were generated with
    assert second.steps[:2] == first.steps[:2]
    for attempt in result.attempts:  # offsets point into the whole solution
        assert [attempt.text[s.start : s.end] for s in attempt.steps] == [s.text for s in attempt.steps]
    assert [s.score for s in first.steps[1:4]] == pytest.approx([1.6, 0.7, 0.6])

    assert result.stop_reason == "repeated"
    assert result.votes == (("5", 1.5), ("6", 2.0))
    assert result.answer == "6"
    assert result.text == "Step 1: a\nStep 2: e\nStep 3: h\nThe answer is 6"
    assert (result.input_tokens, result.output_tokens) == (120 + 9 + 8, 9 + 7 + 3)


def test_kept_steps_are_candidates_with_their_old_scores():
    generate = ScriptedGenerator({0: [
        _attempt(("Step 1: a", 0.3), ("Step 2: b", 0.25), ("Step 3: c", 0.2), ("Step 4: d", 0.9),
                 ("The answer is 5", 0.05)),
        # whole solution: a 0.6 (kept), x 1.6, y 0.7: lowest two a and y, so a is cut
        _attempt(("Step 2: x", 0.8), ("Step 3: y", 0.35), ("The answer is 7", 0.05)),
        _attempt(("Step 1: z", 0.9), ("The answer is 7", 0.9)),
    ]})
    (result,) = leco_solve(["q"], generate, task="gsm8k")
    assert [c[0].kept_text for c in generate.calls] == ["", "Step 1: a\n", ""]
    assert [(a.kept_steps, a.suspect) for a in result.attempts] == [(0, 1), (1, 0), (0, None)]
    assert result.answer == "7"


def _different_answers(numbers) -> list[Attempt]:
    return [_attempt(("Step 1: a", 0.9), ("Step 2: b", 0.2), (f"The answer is {n}", 0.5)) for n in numbers]


def test_at_most_three_rethinks_then_the_original_wins_the_vote():
    generate = ScriptedGenerator({0: _different_answers(range(1, 6))})
    (result,) = leco_solve(["q"], generate, task="gsm8k")
    assert len(generate.calls) == 4  # 4 generations at most
    assert [a.answer for a in result.attempts] == ["1", "2", "3", "4"]
    assert [a.suspect for a in result.attempts] == [0, 0, 0, None]
    assert result.stop_reason == "max_rethinks"
    assert result.answer == "1"  # 1.5 against 1.0 each
    assert result.text == result.attempts[0].text


@pytest.mark.parametrize("max_rethinks", [0, 1, 2])
def test_max_rethinks_is_honoured(max_rethinks):
    scripts = [_attempt(("Step 1: a", 0.9), (f"The answer is {n}", 0.5)) for n in range(1, 6)]
    generate = ScriptedGenerator({0: scripts})
    (result,) = leco_solve(["q"], generate, task="gsm8k", max_rethinks=max_rethinks)
    assert len(result.attempts) == len(generate.calls) == max_rethinks + 1
    assert result.stop_reason == "max_rethinks"


def test_no_candidates_stops_after_the_original():
    no_candidates = _attempt(("Let's think step by step.", 0.1), ("The answer is 5", 0.1))
    generate = ScriptedGenerator({0: [no_candidates]})
    (result,) = leco_solve(["q"], generate, task="gsm8k")
    assert len(generate.calls) == 1
    assert (result.stop_reason, result.answer, result.attempts[0].suspect) == ("no_candidates", "5", None)
    assert result.votes == (("5", 1.5),)


def test_no_answer_twice_counts_as_a_repeat():
    generate = ScriptedGenerator({0: [
        _attempt(("Step 1: a", 0.9), ("Step 2: b", 0.2)),
        _attempt(("Step 1: c", 0.5)),
    ]})
    (result,) = leco_solve(["q"], generate, task="gsm8k")
    assert result.stop_reason == "repeated"
    assert result.answer == ""
    assert result.votes == (("", 1.5), ("", 1.0))  # "" agrees with nothing in the vote


def test_rounds_are_batched_over_the_questions_still_rethinking():
    generate = ScriptedGenerator({
        0: [_attempt(("Let's think step by step.", 0.1), ("The answer is 5", 0.1))],
        1: _cut_then_repeat(),
        2: _different_answers(range(5)),
    })
    results = leco_solve(["q0", "q1", "q2"], generate, task="gsm8k")
    assert [[r.question_index for r in call] for call in generate.calls] == [[0, 1, 2], [1, 2], [1, 2], [2]]
    assert [r.stop_reason for r in results] == ["no_candidates", "repeated", "max_rethinks"]
    assert [r.answer for r in results] == ["5", "6", "0"]
    # every token the generator reported is accounted to exactly one question
    assert sum(r.input_tokens for r in results) == generate.input_tokens
    assert sum(r.output_tokens for r in results) == generate.output_tokens
    for r in results:
        assert r.input_tokens == sum(a.input_tokens for a in r.attempts)
        assert r.output_tokens == sum(a.output_tokens for a in r.attempts)


def test_a_generator_that_breaks_its_contract_is_an_error():
    with pytest.raises(ValueError, match="returned 0 attempts"):
        leco_solve(["q"], lambda requests: [], task="gsm8k")
    bad = Attempt("abc", ["ab"], [0.5], input_tokens=1, output_tokens=1)
    with pytest.raises(ValueError, match="join"):
        leco_solve(["q"], lambda requests: [bad], task="gsm8k")
    with pytest.raises(ValueError, match="task"):
        leco_solve(["q"], lambda requests: [], task="aime")


def test_no_questions_no_calls():
    generate = ScriptedGenerator({})
    assert leco_solve([], generate, task="gsm8k") == []
    assert generate.calls == []


# --- the vote ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answers", "winner"),
    [
        (["5"], "5"),
        (["5", "6"], "5"),  # 1.5 > 1
        (["5", "6", "6"], "6"),  # 2 > 1.5
        (["5", "6", "7"], "5"),
        (["5", "6", "7", "7"], "7"),
        (["5", "6", "7", "5"], "5"),  # 2.5
        (["5", "6", "6", "7", "7"], "7"),  # 2 = 2 > 1.5: the most recent
        (["5", "7", "6", "7", "6"], "6"),
        (["1,000", "7", "7", "1000.0"], "1000.0"),  # grouped by equivalence: 2.5 > 2
        (["5", "", ""], "5"),  # non-answers never agree
        (["", "5"], ""),  # the original outweighs one rethink, even when it is no answer
    ],
)
def test_final_vote(answers, winner):
    assert final_vote(answers, "gsm8k") == winner


def test_final_vote_needs_answers():
    with pytest.raises(ValueError, match="answers"):
        final_vote([], "gsm8k")


# --- where a rethink turns away, self-consistency's majority -----------------------------------


def test_doubted_token_is_the_least_probable_token_of_the_line_past_its_prefix():
    from models.leco import doubted_token

    pieces = ["Step", " 1", ":", " a", "\n", "Step", " 2", ":", " 4", " +", " 5", " =", " 9", "\n", "x"]
    probs = [0.9, 0.9, 0.9, 0.5, 0.1, 0.01, 0.02, 0.03, 0.8, 0.6, 0.7, 0.9, 0.4, 0.05, 0.2]
    line_2 = "".join(pieces).index("Step 2")
    assert doubted_token(pieces, probs, line_2, line_2 + len("Step 2: 4 + 5 = 9")) == 12  # " 9"; the prefix's 0.01 never
    assert doubted_token(pieces, probs, 0, len("Step 1: a")) == 3
    assert doubted_token(["Step", " 3", ":"], [0.2, 0.1, 0.3], 0, 7) is None  # nothing past the prefix
    assert doubted_token(pieces, probs, 100, 110) is None


@pytest.mark.parametrize(
    ("answers", "index"),
    [
        (["5"], 0),
        (["5", "6", "6"], 1),
        (["5", "6", "5", "6"], 0),  # a tie goes to the group seen first
        (["", "", "7"], 2),  # no answer never wins over an answer
        (["", ""], 0),
        (["1,000", "7", "1000.0"], 0),  # grouped by equivalence
    ],
)
def test_majority_index(answers, index):
    from models.leco import majority_index

    assert majority_index(answers, "gsm8k") == index
