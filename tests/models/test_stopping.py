"""Cooperative stopping (models/stopping.py): generation on the tiny demo model looks at the job's
stop signal after every token and between batches and LECO rethinks, and raises Stopped there
itself; nothing is raised into the generating thread from outside."""

from __future__ import annotations

import json
import threading
import time
import traceback

import pytest
from transformers import StoppingCriteria

from models.backends import load_backend
from models.generation import generate, step_generator
from models.leco import leco_solve
from models.prompts import step_by_step
from models.stopping import Stopped, StopSignal, current_signal, stopping

LONG = 1500  # new tokens the model is asked for; eos is held back, so it would write them all


@pytest.fixture(scope="module")
def backend(demo_assets):
    backend = load_backend(demo_assets.strong_model)  # a copy of its own: its generation config is changed
    config = backend.model.generation_config
    config.suppress_tokens = [config.eos_token_id]  # no eos: every sequence runs the whole length
    return backend


@pytest.fixture(scope="module")
def prompts(demo_assets) -> list[str]:
    rows = [json.loads(line) for line in demo_assets.test.read_text().splitlines()[:6]]
    return [step_by_step(row["question"], "gsm8k", shots=0) for row in rows]


class _CountTokens(StoppingCriteria):
    """Counts the tokens a generate call has made; tells the test once a few are out."""

    def __init__(self, started: threading.Event):
        self.tokens, self.started = 0, started

    def __call__(self, input_ids, scores, **kwargs):
        self.tokens += 1
        if self.tokens == 5:
            self.started.set()
        return False


def _spy_generate(backend, monkeypatch):
    """Every model.generate call of the backend, with a token counter in its stopping criteria."""
    calls: list[_CountTokens] = []
    started = threading.Event()
    real = backend.model.generate

    def spy(*args, **kwargs):
        counter = _CountTokens(started)
        calls.append(counter)
        kwargs["stopping_criteria"].append(counter)
        return real(*args, **kwargs)

    monkeypatch.setattr(backend.model, "generate", spy)
    return calls, started


def _run_stopped(work, signal: StopSignal) -> dict:
    """Run ``work`` in a thread under ``signal``; the outcome (its exception, when it ended)."""
    outcome: dict = {}

    def target():
        with stopping(signal):
            try:
                outcome["result"] = work()
            except BaseException as exc:  # noqa: BLE001 - the test looks at what it was
                outcome["error"] = exc
        outcome["ended"] = time.monotonic()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return {"thread": thread, "outcome": outcome}


def _raised_by_check(error: BaseException) -> bool:
    """Stopped raised by the generating code's own look at the signal (StopSignal.check), not
    delivered into the thread from elsewhere."""
    frames = traceback.extract_tb(error.__traceback__)
    return frames[-1].name == "check" and frames[-1].filename.endswith("models/stopping.py")


def test_a_long_generation_stops_within_a_token_of_the_signal(backend, prompts, monkeypatch):
    calls, started = _spy_generate(backend, monkeypatch)
    signal = StopSignal()
    run = _run_stopped(lambda: generate(backend, prompts, max_new_tokens=LONG, stop_strings=(), batch_size=2), signal)
    assert started.wait(300), f"the generation did not get going: {len(calls)} generate calls"
    tokens_before, asked = calls[0].tokens, time.monotonic()
    signal.set("cancelled by the test")
    run["thread"].join(timeout=120)
    outcome = run["outcome"]
    assert not run["thread"].is_alive(), f"still generating after 120 s: {calls[0].tokens} tokens"
    error = outcome.get("error")
    assert isinstance(error, Stopped) and str(error) == "cancelled by the test", outcome
    assert _raised_by_check(error), traceback.format_exception(error)
    # the generate call ended within a token or two of the signal, far from its length; no later batch began
    assert len(calls) == 1 and calls[0].tokens <= tokens_before + 3 < LONG, (tokens_before, calls[0].tokens)
    assert outcome["ended"] - asked < 30, f"{outcome['ended'] - asked:.1f} s from the signal to the stop"


def test_a_set_signal_stops_generation_before_the_next_batch(backend, prompts, monkeypatch):
    calls, _ = _spy_generate(backend, monkeypatch)
    signal = StopSignal()

    def first_batch_then_stop():
        real = backend._generate_batch

        def batch(*args, **kwargs):
            completions = real(*args, **kwargs)
            signal.set("stopped after the first batch")
            return completions

        monkeypatch.setattr(backend, "_generate_batch", batch)
        return generate(backend, prompts, max_new_tokens=4, batch_size=2)

    run = _run_stopped(first_batch_then_stop, signal)
    run["thread"].join(timeout=300)
    assert isinstance(run["outcome"].get("error"), Stopped) and len(calls) == 1, (run["outcome"], len(calls))


def test_a_stopped_leco_run_rethinks_no_more(backend, prompts, monkeypatch):
    calls, _ = _spy_generate(backend, monkeypatch)
    signal = StopSignal()
    rounds = []

    def leco():
        generator = step_generator(backend, prompts[:2], max_new_tokens=8, batch_size=2, stop_strings=())

        def one_round(requests):
            rounds.append(len(requests))
            attempts = generator(requests)
            signal.set("cancelled after the original attempts")
            return attempts

        return leco_solve(prompts[:2], one_round, task="gsm8k", max_rethinks=3)

    run = _run_stopped(leco, signal)
    run["thread"].join(timeout=300)
    error = run["outcome"].get("error")
    assert isinstance(error, Stopped) and _raised_by_check(error), run["outcome"]
    assert rounds == [2, 2] and len(calls) == 1, (rounds, len(calls))  # the rethink round stopped before its generate


def test_outside_a_job_nothing_stops(backend, prompts):
    assert not current_signal().is_set()
    current_signal().set("a stray set")  # outside a job: a fresh signal each time, so this reaches nothing
    assert not current_signal().is_set()
    assert len(generate(backend, prompts[:1], max_new_tokens=2)) == 1
