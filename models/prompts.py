"""Prompt building, exactly as the reference weak-to-strong implementation does it.

Zero-shot:  ``Question: {q}\\nAnswer:``
Few-shot:   K blocks ``Question: {q}\\nAnswer: {a}\\n\\n`` then the zero-shot prompt.
Training targets are the response text after the prompt, no chat template ("vanilla").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

# Never "#": it would cut the "#### X" answer line.
STOP_STRINGS: tuple[str, ...] = ("Question", "Answer")


def zero_shot(question: str) -> str:
    return f"Question: {question.strip()}\nAnswer:"


def few_shot(question: str, demonstrations: Sequence[tuple[str, str]]) -> str:
    """Prompt with in-context (question, response) demonstrations before the target question."""
    blocks = "".join(f"Question: {q.strip()}\nAnswer: {a.strip()}\n\n" for q, a in demonstrations)
    return blocks + zero_shot(question)


@dataclass(frozen=True)
class FittedPrompt:
    """A question's prompt cut to fit the model: ``prompt`` None means skipped, ``reason`` says why."""

    prompt: str | None
    demonstrations: int  # how many demonstrations it holds
    tokens: int  # its length in the model's tokens
    reason: str | None = None


def fit_few_shot(
    questions: Sequence[str],
    demonstrations: Sequence[tuple[str, str]],
    count_tokens: Callable[[Sequence[str]], list[int]],
    *,
    context: int | None,
    max_new_tokens: int,
) -> list[FittedPrompt]:
    """Each question's few-shot prompt with as many of ``demonstrations`` as leave room for
    ``max_new_tokens`` in a ``context``-token model (prompt + max_new_tokens <= context).

    A question that does not fit with all of them drops the longest demonstrations first (the
    others keep their order), one at a time, down to the zero-shot prompt; one whose zero-shot
    prompt does not fit is skipped with the reason. ``context`` None: no limit known, all fit."""
    demonstrations = list(demonstrations)
    # Longest first, by the tokens of their blocks: dropping them frees the most room per demonstration.
    block_tokens = count_tokens([few_shot("", [d])[: -len(zero_shot(""))] for d in demonstrations]) if demonstrations else []
    drop_order = sorted(range(len(demonstrations)), key=lambda i: (-block_tokens[i], -i))
    subsets = [[demonstrations[i] for i in range(len(demonstrations)) if i not in set(drop_order[:dropped])]
               for dropped in range(len(demonstrations) + 1)]
    per_question = len(subsets)
    candidates = [few_shot(question, subset) for question in questions for subset in subsets]
    lengths = count_tokens(candidates) if context is not None and candidates else [0] * len(candidates)
    fitted = []
    for start in range(0, len(candidates), per_question):
        options = range(start, start + per_question)
        chosen = next((i for i in options if context is None or lengths[i] + max_new_tokens <= context), None)
        if chosen is None:
            shortest = lengths[start + per_question - 1]
            fitted.append(FittedPrompt(None, 0, shortest, prompt_too_long(shortest, max_new_tokens, context)))
        else:
            fitted.append(FittedPrompt(candidates[chosen], len(subsets[chosen - start]), lengths[chosen]))
    return fitted


def prompt_too_long(prompt_tokens: int, max_new_tokens: int, context: int | None) -> str:
    """Why a prompt is refused: the one wording for the skip reason and the error message."""
    return (f"prompt too long: {prompt_tokens} prompt tokens + max_new_tokens {max_new_tokens} "
            f"exceed the model's context of {context} tokens")


def training_target(response: str) -> str:
    """The text a student is trained to produce after the prompt (a leading space, as generated)."""
    return " " + response.strip()


PROMPT_FORMATS = ("plain", "chat")


def model_text(tokenizer, prompt: str, prompt_format: str = "plain") -> str:
    """The text the model reads for a w2s prompt: the prompt itself (``plain``, the reference's
    format, right for base models) or the prompt as one user turn of the tokenizer's chat template,
    ready for the assistant's answer (``chat``, for instruct checkpoints). The one place w2s
    applies a prompt format: the transformers backend calls it on every prompt it reads, and
    training calls it on every training prompt, so a model is trained on what it is asked.

    A template that writes the BOS token itself loses it here when the tokenizer adds one anyway
    (Gemma, Llama 3): the model reads one BOS, not two.
    """
    if prompt_format == "plain":
        return prompt
    if prompt_format != "chat":
        raise ValueError(f"prompt_format: expected one of {', '.join(PROMPT_FORMATS)}, got {prompt_format!r}")
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(f"prompt_format chat: the tokenizer of {name} has no chat template "
                         "(use prompt_format plain, or a checkpoint whose tokenizer_config.json has one)")
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer("", add_special_tokens=True)["input_ids"][:1] == [tokenizer.bos_token_id]:
        text = text[len(bos):]
    return text


def clean_response(text: str) -> str:
    """Cut a raw generation at the first stop string, strip white space and a trailing period."""
    cut = len(text)
    for stop in STOP_STRINGS:
        at = text.find(stop)
        if at != -1:
            cut = min(cut, at)
    response = text[:cut].strip()
    if response.endswith("."):
        response = response[:-1].rstrip()
    return response


# --- step-by-step prompts (LECO, CoT and self-consistency evaluation) ----------------------------
#
# Written for this project (not taken from a dataset): each answer is "Step N: ..." lines ending in
# "The answer is \boxed{X}", the shape LECO's step scores and its rethink loop read (ALGORITHMS.md).

GSM8K_STEP_DEMONSTRATIONS: tuple[tuple[str, str], ...] = (
    ("A baker fills 6 trays with 14 rolls each. She sells 59 rolls in the morning. How many rolls are left?",
     "Step 1: The trays hold 6 * 14 = 84 rolls.\n"
     "Step 2: After the morning sales, 84 - 59 = 25 rolls are left.\n"
     "The answer is \\boxed{25}"),
    ("Tom reads 12 pages on Monday and twice as many on Tuesday. His book has 100 pages. "
     "How many pages does he still have to read?",
     "Step 1: On Tuesday he reads 2 * 12 = 24 pages.\n"
     "Step 2: Over both days he reads 12 + 24 = 36 pages.\n"
     "Step 3: He still has 100 - 36 = 64 pages to read.\n"
     "The answer is \\boxed{64}"),
    ("A bike costs $240. Lena has saved $90 and saves $30 more every week. "
     "How many weeks does she need to buy the bike?",
     "Step 1: She still needs 240 - 90 = 150 dollars.\n"
     "Step 2: At 30 dollars a week that takes 150 / 30 = 5 weeks.\n"
     "The answer is \\boxed{5}"),
    ("A school orders 3 boxes of 48 pencils and shares them equally among 8 classes. "
     "Each class gives 5 pencils to its teacher. How many pencils does each class keep?",
     "Step 1: The boxes hold 3 * 48 = 144 pencils.\n"
     "Step 2: Each class gets 144 / 8 = 18 pencils.\n"
     "Step 3: After giving 5 to the teacher, each class keeps 18 - 5 = 13 pencils.\n"
     "The answer is \\boxed{13}"),
)

MATH_STEP_DEMONSTRATIONS: tuple[tuple[str, str], ...] = (
    ("Solve for $x$: $3x - 7 = 2x + 5$.",
     "Step 1: Subtract $2x$ from both sides: $x - 7 = 5$.\n"
     "Step 2: Add $7$ to both sides: $x = 12$.\n"
     "The answer is \\boxed{12}"),
    ("What is the sum of the roots of $x^2 - 5x + 6 = 0$?",
     "Step 1: The quadratic factors as $(x - 2)(x - 3) = 0$.\n"
     "Step 2: Its roots are $2$ and $3$.\n"
     "Step 3: Their sum is $2 + 3 = 5$.\n"
     "The answer is \\boxed{5}"),
    ("Simplify $\\frac{2}{3} + \\frac{1}{6}$.",
     "Step 1: Write both fractions over $6$: $\\frac{2}{3} = \\frac{4}{6}$.\n"
     "Step 2: Add the numerators: $\\frac{4}{6} + \\frac{1}{6} = \\frac{5}{6}$.\n"
     "The answer is \\boxed{\\frac{5}{6}}"),
    ("How many positive divisors does $36$ have?",
     "Step 1: Factor $36 = 2^2 \\cdot 3^2$.\n"
     "Step 2: A divisor is $2^a 3^b$ with $a$ and $b$ each in $\\{0, 1, 2\\}$.\n"
     "Step 3: That gives $(2 + 1)(2 + 1) = 9$ divisors.\n"
     "The answer is \\boxed{9}"),
)

STEP_DEMONSTRATIONS = {"gsm8k": GSM8K_STEP_DEMONSTRATIONS, "math": MATH_STEP_DEMONSTRATIONS}


def step_by_step(question: str, task: str, shots: int = 4) -> str:
    """The few-shot step-by-step prompt: ``shots`` of the task's demonstrations, then the
    zero-shot prompt (``shots=0`` gives the zero-shot prompt alone)."""
    demonstrations = STEP_DEMONSTRATIONS.get(task)
    if demonstrations is None:
        raise ValueError(f"task: no step-by-step demonstrations for {task!r}, expected one of {', '.join(STEP_DEMONSTRATIONS)}")
    if not 0 <= shots <= len(demonstrations):
        raise ValueError(f"shots: must be between 0 and {len(demonstrations)}, got {shots}")
    return few_shot(question, demonstrations[:shots])
