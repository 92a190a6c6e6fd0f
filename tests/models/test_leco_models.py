"""LECO, CoT and self-consistency end to end on the tiny demo models: the rethink continues the
kept tokens from the KV cache (same result as re-encoding them, fewer tokens encoded), and every
token count adds up."""

from __future__ import annotations

import json

import pytest

from models.backends import default_cache
from models.generation import step_generator
from models.leco import leco_solve
from models.prompts import step_by_step
from services.config import StrategyConfig
from services.evaluation import EvalMethod, GoldQuestion, SolveStats, evaluate_questions

N_QUESTIONS = 6
MAX_NEW_TOKENS = 40


@pytest.fixture(scope="module")
def strong(demo_assets):
    return default_cache().get(demo_assets.strong_model)


@pytest.fixture(scope="module")
def questions(demo_assets) -> list[GoldQuestion]:
    rows = [json.loads(line) for line in demo_assets.test.read_text().splitlines()[:N_QUESTIONS]]
    return [GoldQuestion(i, row["question"], row["answer"].rsplit("####", 1)[1].strip()) for i, row in enumerate(rows)]


def _prompts(questions):
    return [step_by_step(q.text, "gsm8k", shots=0) for q in questions]  # tiny models cannot learn in context


def _prompt_tokens(loaded, prompts) -> list[int]:
    return [len(ids) for ids in loaded.tokenizer(prompts)["input_ids"]]


def _solve(loaded, questions, **options):
    generator = step_generator(loaded, _prompts(questions), max_new_tokens=MAX_NEW_TOKENS, batch_size=4, **options)
    return generator, leco_solve([q.text for q in questions], generator, task="gsm8k")


@pytest.fixture(scope="module")
def solved(strong, questions):
    """LECO over the questions once per set of generator options, read by every test that needs
    that run (the default one, from the cache and diverting, is checked by two tests)."""
    runs: dict[tuple, tuple] = {}

    def run(**options):
        key = tuple(sorted(options.items()))
        if key not in runs:
            runs[key] = _solve(strong, questions, **options)
        return runs[key]

    return run


def test_rethinks_read_the_kept_prefix_from_the_cache_with_the_same_result_as_re_encoding(strong, questions, solved):
    cached_gen, cached = solved()
    fresh_gen, fresh = solved(reuse_cache=False)

    assert any(len(r.attempts) > 1 for r in cached), "no question was rethought: nothing tested"
    for a, b in zip(cached, fresh):
        assert [x.text for x in a.attempts] == [x.text for x in b.attempts]
        assert a.answer == b.answer
        for x, y in zip(a.attempts, b.attempts):
            assert [s.score for s in x.steps] == pytest.approx([s.score for s in y.steps], abs=1e-4)

    prompt_tokens = _prompt_tokens(strong, _prompts(questions))
    for result, prompt in zip(fresh, prompt_tokens):
        # re-encoding reads the prompt plus every kept answer token again on each call
        original, *rethinks = result.attempts
        assert original.input_tokens == prompt
        for previous, attempt in zip(result.attempts, rethinks):
            kept = attempt.text[: len(attempt.text) - _new_text_length(attempt, previous)]
            assert attempt.input_tokens == prompt + len(strong.tokenizer(kept, add_special_tokens=False)["input_ids"])
    for result, prompt in zip(cached, prompt_tokens):
        # from the cache: the prompt once, then one token per rethink (the cut falls between tokens
        # here, newlines are tokens of their own; the last kept token is read again for its logits)
        assert [a.input_tokens for a in result.attempts] == [prompt] + [1] * (len(result.attempts) - 1)

    # per call and per question, the counts add up; what the cache saved is what re-encoding cost more
    for generator, results in ((cached_gen, cached), (fresh_gen, fresh)):
        assert sum(c.input_tokens for c in generator.calls) == sum(r.input_tokens for r in results)
        assert sum(c.output_tokens for c in generator.calls) == sum(r.output_tokens for r in results)
        assert [c.questions for c in generator.calls] == [
            sum(len(r.attempts) > k for r in results) for k in range(len(generator.calls))]
    assert [c.reencode_tokens for c in cached_gen.calls] == [c.input_tokens for c in fresh_gen.calls]
    assert sum(c.input_tokens for c in cached_gen.calls) < sum(c.input_tokens for c in fresh_gen.calls)


def _new_text_length(attempt, previous) -> int:
    """Characters the attempt generated: its text past the kept steps."""
    kept_end = attempt.steps[attempt.kept_steps].start if attempt.kept_steps < len(attempt.steps) else len(attempt.text)
    return len(attempt.text) - kept_end


def test_a_rethink_keeps_the_steps_before_the_suspect_and_turns_away_from_the_dropped_step(solved):
    _, diverted = solved()
    _, greedy = solved(divert=False)
    for result in diverted:
        for previous, attempt in zip(result.attempts, result.attempts[1:]):
            kept = previous.steps[: previous.suspect]
            assert attempt.kept_steps == len(kept)
            assert attempt.steps[: len(kept)] == kept  # kept steps verbatim, with the scores they had
            assert attempt.text.startswith(previous.text[: previous.steps[previous.suspect].start])
            # the step that replaces the dropped one is not the dropped one
            assert attempt.steps[len(kept)].text != previous.steps[previous.suspect].text
    # plain greedy from the same context writes the dropped step again, so the answer repeats and the loop stops
    for result in greedy:
        if len(result.attempts) > 1:
            assert result.attempts[1].text == result.attempts[0].text
            assert result.stop_reason == "repeated" and len(result.attempts) == 2


@pytest.mark.parametrize("strategy", [StrategyConfig(strategy="cot"), StrategyConfig(strategy="sc", samples=4),
                                      StrategyConfig(strategy="leco")], ids=lambda s: s.label())
def test_strategies_end_to_end_with_token_counts_that_add_up(strong, questions, strategy):
    stats = SolveStats()
    method = EvalMethod(strategy, shots=0, max_new_tokens=MAX_NEW_TOKENS, batch_size=4)
    outcome = evaluate_questions(strong, questions, "gsm8k", method, stats=stats)
    prompt_tokens = _prompt_tokens(strong, _prompts(questions))

    assert outcome.n_questions == len(questions) == len(outcome.solutions)
    assert outcome.correct == sum(s.answer == q.gold for s, q in zip(outcome.solutions, questions))
    assert outcome.input_tokens == sum(s.input_tokens for s in outcome.solutions) == sum(c.input_tokens for c in stats.calls)
    assert outcome.output_tokens == sum(s.output_tokens for s in outcome.solutions) == sum(
        c.output_tokens for c in stats.calls)
    for solution, prompt in zip(outcome.solutions, prompt_tokens):
        assert solution.samples[0].steps, "every answer carries its step scores"
        assert all(step["score"] == pytest.approx(step["avg"] + step["trans"] - step["diver"])
                   for sample in solution.samples for step in sample.steps)
        if strategy.strategy == "cot":
            assert solution.input_tokens == prompt and len(solution.samples) == 1
            assert 0 < solution.output_tokens <= MAX_NEW_TOKENS
        elif strategy.strategy == "sc":
            assert len(solution.samples) == strategy.samples
            assert solution.input_tokens == strategy.samples * prompt  # generate() encodes the prompt per sample
            assert solution.output_tokens == sum(s.output_tokens for s in solution.samples)
            answers = [s.answer for s in solution.samples]
            assert answers.count(solution.answer) == max(answers.count(a) for a in answers if a) if any(answers) else True
        else:
            attempts = solution.leco.attempts
            assert solution.input_tokens == prompt + len(attempts) - 1
            assert solution.output_tokens == sum(a.output_tokens for a in attempts)
            assert all(0 < a.output_tokens <= MAX_NEW_TOKENS for a in attempts)
            assert solution.answer == solution.leco.answer


def test_a_cut_inside_a_token_encodes_the_rest_of_the_kept_text(strong, questions):
    from models.leco import RethinkRequest

    texts = {}
    for reuse in (True, False):
        generator = step_generator(strong, _prompts(questions[:2]), max_new_tokens=MAX_NEW_TOKENS, batch_size=2,
                                   reuse_cache=reuse)
        first = generator([RethinkRequest(0, ""), RethinkRequest(1, "")])
        # cut through the second token (" -" / " +" / " *": the space is kept, the operator is not)
        cuts = [a.token_texts[0] + a.token_texts[1][:1] for a in first]
        assert all(len(a.token_texts[1]) > 1 for a in first)
        second = generator([RethinkRequest(0, cuts[0]), RethinkRequest(1, cuts[1])])
        rest = [len(strong.tokenizer(a.token_texts[1][:1], add_special_tokens=False)["input_ids"]) for a in first]
        if reuse:  # the prompt and the first token from the cache; the cut token's kept part is encoded
            assert [a.input_tokens for a in second] == rest
        else:
            prompts = _prompt_tokens(strong, _prompts(questions[:2]))
            assert [a.input_tokens for a in second] == [p + 1 + r for p, r in zip(prompts, rest)]
        assert generator.calls[1].reencode_tokens == sum(
            p + 1 + r for p, r in zip(_prompt_tokens(strong, _prompts(questions[:2])), rest))
        texts[reuse] = [a.text for a in second]
        assert all(a.output_tokens > 0 for a in second)
    assert texts[True] == texts[False]
