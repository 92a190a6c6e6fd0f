"""What every token-level backend (transformers, vLLM) shares: from generated token ids to a
``Completion``'s text, token count and token pieces, and the LECO cut of a solution into kept
tokens. Only a Hugging Face tokenizer is needed here: no engine, no torch.

Engines differ in how they generate, not in what a generated sequence means: they hand their raw
ids (and chosen-token probabilities) to these functions, so stop strings, token counts and the
LECO cut come out the same whichever engine generated.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from models.backends.base import CallStats, StepOptions
from models.leco import Attempt, RethinkRequest, doubted_token
from models.stopping import current_signal


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def trim(tokenizer, ids: list[int], end_ids: set[int], stop_strings: Sequence[str]) -> tuple[list[int], str]:
    """Generated ids up to the first eos / pad, and their text cut before the first stop string."""
    ids = ids[: next((k for k, t in enumerate(ids) if t in end_ids), len(ids))]
    text = decode(tokenizer, ids)
    return ids, text[: min([text.find(s) for s in stop_strings if s in text], default=len(text))]


def count_tokens(tokenizer, ids: list[int], text: str) -> int:
    """How many leading tokens lie wholly within ``text`` (binary search on the decoded prefix)."""
    low, high = 0, len(ids)  # decode(ids[:low]) lies within text; find the largest such
    while low < high:
        mid = (low + high + 1) // 2
        if text.startswith(decode(tokenizer, ids[:mid]).rstrip("\ufffd")):  # unfinished character
            low = mid
        else:
            high = mid - 1
    return low


def token_pieces(tokenizer, ids: list[int], text: str) -> list[str]:
    """What each token adds to the text when decoding incrementally; the last piece runs to the
    end of ``text`` (the kept part of a token cut by the stop string), so the pieces join to it."""
    if not ids:
        return []
    prefixes = [decode(tokenizer, ids[: k + 1]) for k in range(len(ids) - 1)]
    # a prefix ending in an unfinished UTF-8 character (decoded as U+FFFD) adds nothing yet
    ends = [len(p) if text.startswith(p) else 0 for p in prefixes] + [len(text)]
    ends = list(itertools.accumulate(ends, max))
    return [text[start:end] for start, end in zip([0] + ends, ends)]


def stop_tail(stop_strings: Sequence[str]) -> int:
    """How many trailing tokens to decode to see a stop string that ends in the newest token:
    each token carries at least a character (but for rare empty ones)."""
    return 2 * max(len(stop) for stop in stop_strings) + 4


def chosen_token_prob(chosen: float, top: Sequence[float], total: float, mode: str) -> float:
    """The chosen token's probability at one step, from a few numbers an engine keeps per token.

    ``chosen``: the chosen token's logit; ``top``: the highest logits at that step (at least the
    top 5, any order); ``total``: the log-sum-exp of every logit. Log-probabilities work as well
    (``total`` 0: vLLM's ``logprobs=5``), as only differences of these values count.

    ``"full"``: the softmax over the vocabulary. ``"top5"`` (LECO's reference): renormalised over
    the 5 highest logits, ``exp(chosen) / sum(exp(top 5))``. A sampled token outside the top 5 is
    not added to the pool: it gets its share against the top 5 alone, which is below the 5th's,
    so it reads as at least as doubtful as any top-5 token (docs/design-notes.md says why).
    Always 0 < full <= top5 <= 1.
    """
    if mode == "full":
        return math.exp(chosen - total)
    if mode != "top5":
        raise ValueError(f"token prob mode must be 'top5' or 'full', got {mode!r}")
    best = sorted(top, reverse=True)[:5]
    peak = best[0]
    return min(1.0, math.exp(chosen - peak) / sum(math.exp(value - peak) for value in best))


# --- LECO: continuing kept steps ----------------------------------------------------------------


@dataclass
class Prefix:
    """What the engine has read for one question: the prompt, the current solution's tokens, and
    the engine's reusable state (a KV cache) for the first ``cached`` of ``prompt_ids + answer_ids``."""

    prompt_ids: list[int]
    answer_ids: list[int] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)  # one per answer token; they join to the solution text
    probs: list[float] = field(default_factory=list)
    state: object = None  # engine-specific; None when nothing can be reused
    cached: int = 0


@dataclass
class Row:
    """One sequence of a continuation batch, as the engine is to read it."""

    ids: list[int]  # everything the model reads: prompt + kept answer tokens (+ text re-tokenized)
    state: object  # the engine's reusable state for the leading ``cached`` ids, or None
    cached: int  # leading ids served from ``state``
    divert: tuple[int, list[int], int] | None = None  # (step, tokens expected before it, token banned there)
    kept_pieces: list[str] = field(default_factory=list)  # the answer tokens' pieces in ids (none: first attempt)
    kept_probs: list[float] = field(default_factory=list)


@dataclass
class Continued:
    """What the engine generated for one row (greedy, trimmed and counted with the functions above)."""

    ids: list[int]  # the counted new tokens
    text: str
    pieces: list[str]
    probs: list[float]
    encoded: int  # tokens the engine actually encoded for this row (not served from ``state``)
    state: object  # reusable state for the first ``cached`` of row.ids + ids, or None
    cached: int
    cache_lost: bool = False  # reuse was asked but the engine could not keep its state (a sliding window reached)


class TokenStepGenerator:
    """The LECO generator of a token-level backend: greedy step-by-step generation in which a
    rethink continues the kept steps as the model's own answer text.

    The prompt and the kept tokens are the very ids the model read and wrote before, so the
    engine can serve them from what it computed then (its ``state``): only what is new is
    encoded. This class makes the cut (``_row``): the kept text's whole tokens as generated, the
    rest of the kept text re-tokenized, and where a greedy rethink is to be diverted;
    ``continue_batch`` (the engine) generates a batch of rows.

    ``divert``: a greedy rethink would write the dropped step again; it is banned from taking the
    dropped step's least confident token (``leco.doubted_token``) at the same place, so it turns
    away where the step was most in doubt and decodes greedily everywhere else.

    States of every question live until the generator is dropped: give it one batch of questions
    (``solve`` does) rather than a whole dataset.
    """

    def __init__(self, tokenizer, prompts: Sequence[str], options: StepOptions,
                 continue_batch: Callable[[list[Row]], list[Continued]]):
        self.tokenizer, self.options, self.continue_batch = tokenizer, options, continue_batch
        ids = tokenizer(list(prompts))["input_ids"]
        self.prefixes = [Prefix(prompt_ids=list(p)) for p in ids]
        self.calls: list[CallStats] = []

    def __call__(self, requests: list[RethinkRequest]) -> list[Attempt]:
        rows = [self._row(request) for request in requests]
        attempts: list[Attempt] = []
        encoded = reencode = lost = 0
        size = self.options.batch_size
        signal = current_signal()
        for start in range(0, len(rows), size):  # a call is one round of rethinks: stoppable between batches
            signal.check()
            batch = list(range(start, min(start + size, len(rows))))
            for i, result in zip(batch, self.continue_batch([rows[i] for i in batch])):
                row, prefix = rows[i], self.prefixes[requests[i].question_index]
                prefix.answer_ids = row.ids[len(prefix.prompt_ids) :] + result.ids
                prefix.pieces = row.kept_pieces + result.pieces
                prefix.probs = row.kept_probs + result.probs
                prefix.state, prefix.cached = result.state, result.cached
                attempts.append(Attempt(text=result.text, token_texts=result.pieces, token_probs=result.probs,
                                        input_tokens=result.encoded, output_tokens=len(result.ids)))
                encoded += result.encoded
                reencode += len(row.ids)
                lost += result.cache_lost
        self.calls.append(CallStats(len(requests), encoded, reencode, sum(a.output_tokens for a in attempts),
                                    cache_lost=lost))
        return attempts

    def _row(self, request: RethinkRequest) -> Row:
        """The ids to read: the prompt, the kept answer tokens as generated, and (when a token
        straddles the cut) the rest of the kept text re-tokenized."""
        prefix = self.prefixes[request.question_index]
        prompt, text = prefix.prompt_ids, "".join(prefix.pieces)
        if not text.startswith(request.kept_text):
            raise ValueError(f"question {request.question_index}: kept_text is not a prefix of its current solution")
        cut = len(request.kept_text)
        ends = list(itertools.accumulate(len(p) for p in prefix.pieces))
        keep = sum(1 for end in ends if end <= cut)  # answer tokens wholly inside the kept text
        rest = request.kept_text[ends[keep - 1] if keep else 0 :]
        rest_ids = self.tokenizer(rest, add_special_tokens=False)["input_ids"] if rest else []
        ids = prompt + prefix.answer_ids[:keep] + rest_ids
        # the rest's tokens carry the probability of the token they were cut from (for a later doubted_token)
        kept_pieces = prefix.pieces[:keep] + token_pieces(self.tokenizer, rest_ids, rest)
        kept_probs = prefix.probs[:keep] + [prefix.probs[keep] if rest_ids else 0.0] * len(rest_ids)
        divert = None
        if self.options.divert and prefix.pieces and not rest_ids:  # a rethink that starts on a token boundary
            line_end = text.find("\n", cut)
            doubted = doubted_token(prefix.pieces, prefix.probs, cut, line_end if line_end >= 0 else len(text))
            if doubted is not None:
                divert = (doubted - keep, prefix.answer_ids[keep:doubted], prefix.answer_ids[doubted])
        cached = min(prefix.cached, len(prompt) + keep, len(ids) - 1)  # at least one id is read anew
        return Row(ids, prefix.state, cached, divert, kept_pieces, kept_probs)
