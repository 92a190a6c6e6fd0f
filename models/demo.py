"""Tiny models and synthetic tasks for the embedded demo, built locally from scratch.

``build_demo(root)`` makes everything ``w2sctl demo`` needs, on a CPU, in a few minutes, with no
download:

* procedurally generated arithmetic word problems (single-digit operands, one to three
  operations) in two phrasings: the *target* phrasing (the weak model's labelled training set, the
  unlabelled pool, the test split) and a *related* phrasing of the same kind of problems (the
  strong model's "related knowledge");
* a word-level tokenizer trained here (digits one per token, a space folded into the token after
  it), saved as a ``PreTrainedTokenizerFast`` with left padding;
* two ``LlamaForCausalLM`` models trained from scratch with a plain AdamW loop: a small weak
  teacher on the labelled target phrasing, a larger strong student on the related phrasing only.

The strong model never sees a pool or test question, and its phrasing shares only one sentence
template per operation with the target phrasing. It answers the target phrasing zero-shot by
transfer, better than the weak model and far from perfectly: what it lacks is the target phrasing
(its arithmetic is ~99% right in its own phrasing), and that is what the vote's kept examples
(weak-labelled, filtered by agreement) can teach it.

Measured with the full build (greedy, zero-shot; seed 0, then seed 1 in brackets): weak 25.5% on
the pool, 26.0% on the test split (32.8%, 32.8%); strong 38.7%, 40.4% (43.8%, 46.8%). The vote
keeps 468 of 4,000 pool questions, 90.8% of them right (848, 89.2%). Fully fine-tuning the strong
model on the kept weak responses (batch 8, 2 epochs) lifts it on the test split to 42.6% at lr 1e-4
and 50.0% at lr 3e-4 (59.0%, 54.6%); on kept weak + strong responses ("hybrid"), 44.6% at 1e-4
(57.6%) and 48.2% at 3e-4. So the demo's round should train at lr ~3e-4. Builds vary by seed
(weak 21-46%, strong 40-51% over the designs tried), hence the fixed seeds. These numbers come
from a stand-alone loop like ``train_lm`` (cosine schedule), not the project's SFT job itself.
DEMO-NOTES.md has the earlier measurements behind the model sizes.

The build is cached in ``root`` (``demo.json`` is written last) and atomic (built in a temporary
sibling directory, then renamed).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from models.prompts import clean_response, training_target, zero_shot

MANIFEST = "demo.json"
MANIFEST_VERSION = 1  # bump when the build's code changes what it makes: older caches are rebuilt

# --- tasks -------------------------------------------------------------------------------------

NAMES = ("Tom", "Ann", "Sam", "Mia", "Ben", "Eva", "Max", "Lea", "Leo", "Zoe", "Dan", "Amy")
SHE = frozenset({"Ann", "Mia", "Eva", "Lea", "Zoe", "Amy"})
ITEMS = (
    "apples", "pens", "cards", "books", "shells", "stamps", "marbles", "cookies", "rocks", "beads"
)


@dataclass(frozen=True)
class Phrasing:
    """Sentence templates of one phrasing. ``{name}``, ``{He}``/``{he}``, ``{item}`` and ``{n}``
    (the amount or operand) are filled in; one template is drawn per sentence."""

    name: str
    start: tuple[str, ...]
    add: tuple[str, ...]
    sub: tuple[str, ...]
    mul: tuple[str, ...]
    ask: tuple[str, ...]


# The target phrasing: weak_train, pool and test.
TARGET = Phrasing(
    name="target",
    start=("{name} has {n} {item}.",),
    add=("{He} buys {n} more.", "{He} finds {n} more.", "{He} picks up {n}."),
    sub=("{He} gives away {n}.", "{He} loses {n}.", "{He} sells {n}."),
    mul=("Then {he} has {n} times as many.", "{He} makes the pile {n} times as big."),
    ask=("How many {item} does {name} have now?",),
)

# The strong model's related knowledge: the same problems, a few verbs and frames changed. It shares
# one template per operation with the target phrasing. "finds {n} more" carries its "more" over
# (add). The other target templates are new and ambiguous to the strong model by design: "picks up
# {n}." looks like both "takes in {n}." (add) and "gives away {n}." (sub); "loses {n}." and "sells
# {n}." look like both "wins {n}." (add) and "spends {n}." (sub); "makes the pile {n} times as big"
# only shares "pile" and "times". So the strong model guesses them, sometimes right, and the vote's
# kept examples can teach it which guess is right. Measured on the test split (full build, seeds 0
# and 1): the shared templates are right ~50-65% of the time, the ambiguous ones 12-51%.
# (With unambiguous new verbs the strong model was systematically wrong on them, so the vote never
# kept them and fine-tuning gained nothing on two seeds in three.)
RELATED = Phrasing(
    name="related",
    start=("{name} has {n} {item}.",),
    add=("{He} buys {n} more.", "{He} wins {n}.", "{He} takes in {n}."),
    sub=("{He} gives away {n}.", "{He} spends {n}.", "{He} drops {n} of them."),
    mul=("Then {he} has {n} times as many.", "The pile grows {n} times."),
    ask=("How many {item} does {name} have now?",),
)

PHRASINGS = {p.name: p for p in (TARGET, RELATED)}

# How many operations a problem has. The vote keeps easy questions more often (DEMO-NOTES saw a
# student learn to stop after one step), and on short questions the weak model's wrong answers meet
# the strong model's by chance (small numbers). With 20% one-step problems the kept set was ~45%
# one-step and 84-90% right, and fine-tuning on it moved the student by -1 to +1 points on two seeds
# in three; with 10% the kept set is ~17-21% one-step and ~90% right (full build, seeds 0 and 1).
OPS_WEIGHTS = {1: 0.1, 2: 0.45, 3: 0.45}
# Multiply only a single-digit amount, by 2-9: the products (up to 81) are facts the strong model
# learns from its 20,000 problems and the weak one only partly from 600 (with factors 2-4 the weak
# model reached 70% and stopped being weak); a two-digit amount times a digit is out of reach.
MAX_MUL_BASE = 9
MUL_FACTORS = (2, 9)


class Problem(NamedTuple):
    question: str
    solution: str  # GSM8K-style lines ending with "#### X"
    answer: int


def make_problem(
    rng: random.Random, phrasing: Phrasing | str = TARGET, n_ops: int | None = None
) -> Problem:
    """One word problem: a start amount and ``n_ops`` operations, each with a one-digit operand.

    Returns ``(question, solution, answer)``; the solution is one ``a op b = c.`` line per
    operation and a last line ``#### answer``.
    """
    if isinstance(phrasing, str):
        phrasing = PHRASINGS[phrasing]
    if n_ops is None:
        n_ops = rng.choices(list(OPS_WEIGHTS), weights=list(OPS_WEIGHTS.values()))[0]
    name = rng.choice(NAMES)
    she = name in SHE
    fill = {
        "name": name,
        "item": rng.choice(ITEMS),
        "He": "She" if she else "He",
        "he": "she" if she else "he",
    }
    value = rng.randint(1, 9)
    sentences = [rng.choice(phrasing.start).format(n=value, **fill)]
    lines = []
    for _ in range(n_ops):
        ops = ["add"]
        if value >= 2:
            ops.append("sub")
        if value <= MAX_MUL_BASE:
            ops.append("mul")
        op = rng.choice(ops)
        if op == "add":
            n = rng.randint(1, 9)
            new, sign = value + n, "+"
        elif op == "sub":
            n = rng.randint(1, min(9, value - 1))
            new, sign = value - n, "-"
        else:
            n = rng.randint(*MUL_FACTORS)
            new, sign = value * n, "*"
        sentences.append(rng.choice(getattr(phrasing, op)).format(n=n, **fill))
        lines.append(f"{value} {sign} {n} = {new}.")
        value = new
    sentences.append(rng.choice(phrasing.ask).format(**fill))
    solution = "\n".join(lines) + f"\n#### {value}"
    return Problem(" ".join(sentences), solution, value)


def make_problems(
    rng: random.Random,
    phrasing: Phrasing | str,
    count: int,
    exclude: set[str] | frozenset[str] = frozenset(),
) -> list[Problem]:
    """``count`` problems with distinct questions, none of them in ``exclude``."""
    seen = set(exclude)
    out: list[Problem] = []
    for _ in range(count * 50):
        if len(out) == count:
            return out
        p = make_problem(rng, phrasing)
        if p.question not in seen:
            seen.add(p.question)
            out.append(p)
    raise ValueError(f"could not draw {count} distinct {phrasing!r} problems")


def write_jsonl(path: Path, problems: Iterable[Problem]) -> None:
    with path.open("w") as f:
        for p in problems:
            f.write(json.dumps({"question": p.question, "answer": p.solution}) + "\n")


# --- tokenizer ---------------------------------------------------------------------------------

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
# Metaspace turns each space into "▁" glued to what follows; then this splits words, single digits,
# runs of "#" and any other single character, each keeping a leading "▁".
_PIECES = r"▁?[0-9]|▁?[A-Za-z]+|▁?#+|▁?[^A-Za-z0-9▁]|▁"


def build_tokenizer(texts: Iterable[str]):
    """Word-level tokenizer trained on ``texts``: ~1 token per word, digit or punctuation mark."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False),
            pre_tokenizers.Split(Regex(_PIECES), behavior="isolated"),
        ]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never", split=False)
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=[PAD, BOS, EOS, UNK]))
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",  # batched generation pads on the left
        clean_up_tokenization_spaces=False,
        model_max_length=256,
    )


def _tokenizer_corpus(
    labelled: Sequence[Sequence[Problem]], unlabelled: Sequence[Sequence[Problem]]
) -> Iterator[str]:
    """Training texts, the questions (only) of the unlabelled splits, and every template word."""
    for problems in labelled:
        for p in problems:
            yield zero_shot(p.question) + training_target(p.solution)
    for problems in unlabelled:
        for p in problems:
            yield zero_shot(p.question)
    words = list(NAMES + ITEMS) + ["She", "she", "He", "he", "+", "-", "*", "=", "####", "."]
    words += [str(d) for d in range(10)]
    for phrasing in PHRASINGS.values():
        for templates in (phrasing.start, phrasing.add, phrasing.sub, phrasing.mul, phrasing.ask):
            words += re.sub(r"\{\w+\}", "", " ".join(templates)).split()
    yield " ".join(words)  # each word after a space ("▁word") ...
    yield from words  # ... and at the start of a text ("word")


# --- models ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """A demo model's size and its from-scratch training run (AdamW, warm-up, cosine decay)."""

    layers: int
    hidden: int
    heads: int
    steps: int
    lr: float
    batch_size: int = 32
    warmup_steps: int = 40
    weight_decay: float = 0.01

    def config(self, tokenizer):
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=self.hidden,
            intermediate_size=self.hidden * 8 // 3 // 8 * 8,  # SwiGLU's usual 8/3 ratio
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.heads,
            max_position_embeddings=256,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        )


def encode_example(tokenizer, question: str, response: str) -> tuple[list[int], list[int]]:
    """Ids of prompt + target + eos, and labels that mask the prompt (loss on the response only)."""
    return encode_examples(tokenizer, [(question, response)])[0]


def encode_examples(
    tokenizer, pairs: Sequence[tuple[str, str]]
) -> list[tuple[list[int], list[int]]]:
    """``encode_example`` for many (question, response) pairs at once (batched tokenizer calls).

    The prompt ``zero_shot(question)`` gets the bos token; the target ``training_target(response)``
    is tokenized on its own and ends with eos, so the prompt/response boundary is exact, as in
    models/train/sft.py.
    """
    prompts = tokenizer([zero_shot(q) for q, _ in pairs]).input_ids
    targets = tokenizer([training_target(r) for _, r in pairs], add_special_tokens=False).input_ids
    eos = tokenizer.eos_token_id
    return [(p + t + [eos], [-100] * len(p) + t + [eos]) for p, t in zip(prompts, targets)]


def _batch(examples: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (x, y) in enumerate(examples):
        ids[row, : len(x)] = torch.tensor(x)
        labels[row, : len(y)] = torch.tensor(y)
        mask[row, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def train_lm(
    model,
    examples: Sequence[tuple[list[int], list[int]]],
    spec: ModelSpec,
    *,
    pad_id: int,
    seed: int,
    log: Callable[[str], None] | None = None,
    label: str = "model",
) -> list[float]:
    """A plain AdamW loop over random batches (right padding); returns the loss of each step."""
    rng = random.Random(seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "embed" in n]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": spec.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=spec.lr,
        betas=(0.9, 0.98),
    )

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay to a tenth
        if step < spec.warmup_steps:
            return (step + 1) / spec.warmup_steps
        done = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    model.train()
    order: list[int] = []
    losses = []
    started = time.monotonic()
    for step in range(spec.steps):
        if len(order) < spec.batch_size:
            more = list(range(len(examples)))
            rng.shuffle(more)
            order += more
        batch = _batch([examples[i] for i in order[: spec.batch_size]], pad_id)
        del order[: spec.batch_size]
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if log and ((step + 1) % max(1, spec.steps // 5) == 0 or step + 1 == spec.steps):
            recent = losses[-20:]
            log(
                f"{label}: step {step + 1}/{spec.steps}, loss {sum(recent) / len(recent):.3f}, "
                f"{time.monotonic() - started:.0f}s"
            )
    model.eval()
    return losses


def _generation_config(tokenizer):
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=48,
    )


def train_model(
    tokenizer,
    problems: Sequence[Problem],
    spec: ModelSpec,
    *,
    seed: int,
    log: Callable[[str], None] | None = None,
    label: str = "model",
):
    """A fresh LlamaForCausalLM trained on ``problems``; returns (model, losses)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(spec.config(tokenizer))
    model.generation_config = _generation_config(tokenizer)
    examples = encode_examples(tokenizer, [(p.question, p.solution) for p in problems])
    losses = train_lm(
        model, examples, spec, pad_id=tokenizer.pad_token_id, seed=seed, log=log, label=label
    )
    return model, losses


# --- evaluation --------------------------------------------------------------------------------


def greedy_accuracy(model_dir: str | os.PathLike, problems: Sequence[Problem], *, batch_size: int = 128) -> float:
    """Zero-shot greedy accuracy of the checkpoint saved in ``model_dir`` on labelled problems,
    through the project's own loading, generation (stop strings, at most 48 new tokens) and
    answer grading: the figure a round's gate measures, without a database."""
    from models.answers import answers_match, extract_answer, gold_answer_from_solution
    from models.backends import load_backend
    from models.generation import generate

    if not problems:
        return 0.0
    loaded = load_backend(model_dir, device="cpu")
    completions = generate(loaded, [zero_shot(p.question) for p in problems], max_new_tokens=48,
                           batch_size=batch_size)
    right = sum(answers_match(extract_answer(clean_response(samples[0].text), "gsm8k"),
                              gold_answer_from_solution(p.solution, "gsm8k"), "gsm8k")
                for p, samples in zip(problems, completions))
    return right / len(problems)


# --- the build ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scale:
    """Split sizes and the two model runs of one demo scale."""

    weak_train: int  # labelled target-phrased problems for the weak teacher
    pool: int  # unlabelled pool (gold kept for reporting only)
    test: int  # labelled held-out test split
    strong_related: int  # related-phrasing problems for the strong student
    weak: ModelSpec
    strong: ModelSpec


SCALE_SPECS: dict[str, Scale] = {
    # Tests: ~35 s; both models reach 10-20% on the target phrasing, so that votes agree sometimes.
    "tiny": Scale(
        weak_train=600,
        pool=200,
        test=100,
        strong_related=4000,
        weak=ModelSpec(layers=1, hidden=64, heads=4, steps=250, lr=4e-3, batch_size=48),
        strong=ModelSpec(layers=2, hidden=64, heads=4, steps=300, lr=5e-3, batch_size=64),
    ),
    # The demo (~2 min): weak ~25-35% (2x48 on 800 labelled problems, 600 steps; with 600 problems
    # the vote's kept set was less accurate and fine-tuning on it gained less), strong ~40-47%
    # zero-shot (3x96, ~99% right in its own phrasing). Measurements at the top of this module.
    "full": Scale(
        weak_train=800,
        pool=4000,
        test=500,
        strong_related=20000,
        weak=ModelSpec(layers=2, hidden=48, heads=4, steps=600, lr=3e-3),
        strong=ModelSpec(layers=3, hidden=96, heads=4, steps=1000, lr=2e-3),
    ),
}


@dataclass(frozen=True)
class DemoAssets:
    root: Path
    weak_model: Path  # HF checkpoint dir (config.json, model.safetensors, tokenizer files)
    strong_model: Path  # HF checkpoint dir
    weak_train: Path  # JSONL, labelled: the weak model's training set
    pool: Path  # JSONL, the unlabelled pool (gold present for reporting only, never trained on)
    test: Path  # JSONL, the labelled held-out test split (reported on, never deciding)
    strong_related: Path  # JSONL, the strong model's "related knowledge" (another phrasing)
    dev: Path = Path()  # JSONL, the labelled dev split that decides promotion (DEV_SIZES)


_FILES = {
    "weak_model": "weak",
    "strong_model": "strong",
    "weak_train": "weak_train.jsonl",
    "pool": "pool.jsonl",
    "test": "test.jsonl",
    "strong_related": "strong_related.jsonl",
}


# The dev split's size per scale. It is drawn after the build, from its own generator, excluding
# every question of the other splits, so adding it changed neither the models nor the other files
# (and it is not part of the recipe's fingerprint: cached builds stay valid).
DEV_SIZES = {"tiny": 100, "full": 500}
DEV_FILE = "dev.jsonl"


def _ensure_dev(root: Path, scale: str, seed: int) -> Path:
    """Write the dev split into a finished build if it is not there yet (atomically: a rename)."""
    path = root / DEV_FILE
    if path.is_file():
        return path
    taken: set[str] = set()
    for name in ("weak_train", "pool", "test", "strong_related"):
        taken |= {json.loads(line)["question"] for line in (root / _FILES[name]).read_text().splitlines() if line}
    dev = make_problems(random.Random(f"dev:{seed}"), TARGET, DEV_SIZES[scale], exclude=taken)
    tmp = root / f".{DEV_FILE}.{os.getpid()}-{uuid.uuid4().hex[:8]}"
    write_jsonl(tmp, dev)
    os.replace(tmp, path)
    return path


def recipe_fingerprint(scale: str) -> str:
    """A short hash of everything that decides the assets: a changed recipe invalidates caches."""
    import hashlib

    recipe = {
        "version": MANIFEST_VERSION,
        "scale": asdict(SCALE_SPECS[scale]),
        "phrasings": [asdict(p) for p in PHRASINGS.values()],
        "names": NAMES,
        "items": ITEMS,
        "ops": {str(k): v for k, v in OPS_WEIGHTS.items()},
        "mul": [MAX_MUL_BASE, *MUL_FACTORS],
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def _assets(root: Path) -> DemoAssets:
    return DemoAssets(root=root, dev=root / DEV_FILE, **{field: root / name for field, name in _FILES.items()})


def read_manifest(root: str | os.PathLike) -> dict | None:
    """The manifest of a complete build in ``root``, or None."""
    try:
        return json.loads((Path(root) / MANIFEST).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def _cached(root: Path, scale: str, seed: int) -> DemoAssets | None:
    manifest = read_manifest(root)
    if not manifest or (manifest.get("scale"), manifest.get("seed"), manifest.get("recipe")) != (
        scale,
        seed,
        recipe_fingerprint(scale),
    ):
        return None
    assets = _assets(root)
    for model_dir in (assets.weak_model, assets.strong_model):
        needed = ("config.json", "model.safetensors", "tokenizer.json")
        if not all((model_dir / f).is_file() for f in needed):
            return None
    data = (assets.weak_train, assets.pool, assets.test, assets.strong_related)
    if not all(p.is_file() for p in data):
        return None
    return assets


def build_demo(
    root: str | os.PathLike,
    *,
    scale: str = "full",
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    threads: int = 1,
) -> DemoAssets:
    """Build (or return the cached) demo assets in ``root``.

    ``scale="full"`` is the real demo (a few minutes on 2 CPU cores); ``"tiny"`` is for tests
    (well under a minute). Deterministic given ``seed``. ``root`` is complete when ``demo.json``
    exists in it: the build happens in a temporary sibling directory that is renamed to ``root``
    at the end, so an interrupted build leaves nothing half-written. An existing ``root`` is
    replaced only if it is empty or a demo build of another scale, seed or recipe.
    ``threads`` sets ``torch.set_num_threads`` for the build (restored afterwards). The default is
    1: with models this small each step is many tiny ops, and on a 2-core machine shared with other
    work 2 threads measured 3-4x slower per step than 1 (0.14 s against 0.04 s for 2x64).
    """
    if scale not in SCALE_SPECS:
        raise ValueError(f"scale: {scale!r} is not one of {', '.join(SCALE_SPECS)}")
    root = Path(root).absolute()
    log = progress or (lambda message: None)
    cached = _cached(root, scale, seed)
    if cached:
        log(f"demo assets ({scale}, seed {seed}) already built in {root}")
        _ensure_dev(root, scale, seed)
        return cached
    _check_replaceable(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(root)
    tmp = root.parent / f".{root.name}.building-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        log(f"building demo assets ({scale}, seed {seed}) in {root}")
        _build(tmp, scale, seed, log)
        installed = _install(tmp, root, scale, seed, log)
        _ensure_dev(root, scale, seed)
        return installed
    finally:
        torch.set_num_threads(previous_threads)
        shutil.rmtree(tmp, ignore_errors=True)


def _check_replaceable(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise ValueError(f"demo root {root} exists and is not a directory")
    if root.is_dir() and any(root.iterdir()) and read_manifest(root) is None:
        raise ValueError(
            f"demo root {root} holds files that are not a demo build; refusing to replace them"
        )


def _remove_stale_builds(root: Path) -> None:
    """Temporary build directories left by processes that died (same host)."""
    for leftover in root.parent.glob(f".{root.name}.building-*"):
        try:
            pid = int(leftover.name.rsplit("-", 2)[-2])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(leftover, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            pass


def _install(
    tmp: Path, root: Path, scale: str, seed: int, log: Callable[[str], None]
) -> DemoAssets:
    """Rename the finished build to ``root``, moving an older build aside first."""
    try:
        os.rename(tmp, root)  # succeeds when root is absent or an empty directory
    except OSError:
        cached = _cached(root, scale, seed)  # another process finished the same build first
        if cached:
            return cached
        _check_replaceable(root)
        old = root.parent / f".{root.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(root, old)
        os.rename(tmp, root)
        shutil.rmtree(old, ignore_errors=True)
        log(f"replaced the older demo build in {root}")
    return _assets(root)


def _build(out: Path, scale: str, seed: int, log: Callable[[str], None]) -> None:
    spec = SCALE_SPECS[scale]
    started = time.monotonic()
    seconds: dict[str, float] = {}

    # data: test and pool first; nothing later may repeat one of their questions
    rng = random.Random(seed)
    test = make_problems(rng, TARGET, spec.test)
    pool = make_problems(rng, TARGET, spec.pool, exclude={p.question for p in test})
    held_out = {p.question for p in test + pool}
    weak_train = make_problems(rng, TARGET, spec.weak_train, exclude=held_out)
    related = make_problems(rng, RELATED, spec.strong_related, exclude=held_out)
    splits = {"weak_train": weak_train, "pool": pool, "test": test, "strong_related": related}
    for field, problems in splits.items():
        write_jsonl(out / _FILES[field], problems)
    log(
        "data: "
        + ", ".join(f"{field} {len(problems)}" for field, problems in splits.items())
        + f" (target phrasing; strong_related in the {RELATED.name} phrasing)"
    )

    # tokenizer: trained on the training texts and the unlabelled questions (never their gold)
    t0 = time.monotonic()
    tokenizer = build_tokenizer(_tokenizer_corpus([weak_train, related], [pool, test]))
    encoded = encode_examples(tokenizer, [(p.question, p.solution) for p in weak_train])
    lengths = [len(ids) for ids, _ in encoded]
    tokens = {"mean": round(sum(lengths) / len(lengths), 1), "max": max(lengths)}
    seconds["tokenizer"] = time.monotonic() - t0
    log(
        f"tokenizer: {len(tokenizer)} tokens; "
        f"{tokens['mean']} tokens per example (max {tokens['max']})"
    )

    # models
    accuracies: dict[str, dict[str, float]] = {}
    for role, problems, data_file, model_spec, model_seed in (
        ("weak", weak_train, "weak_train", spec.weak, seed * 1000 + 1),
        ("strong", related, "strong_related", spec.strong, seed * 1000 + 2),
    ):
        t0 = time.monotonic()
        model, losses = train_model(
            tokenizer, problems, model_spec, seed=model_seed, log=log, label=role
        )
        seconds[role] = time.monotonic() - t0
        model_dir = out / _FILES[f"{role}_model"]
        model.save_pretrained(model_dir, safe_serialization=True)
        tokenizer.save_pretrained(model_dir)
        t0 = time.monotonic()
        acc = greedy_accuracy(model_dir, test)
        seconds[f"{role}_eval"] = time.monotonic() - t0
        accuracies[role] = {"test": round(acc, 4)}
        log(
            f"{role}: {model.num_parameters():,} parameters, trained in {seconds[role]:.0f}s; "
            f"test accuracy {acc:.1%}"
        )
        (model_dir / "demo_training.json").write_text(
            json.dumps(
                {
                    "role": role,
                    "model": asdict(model_spec),
                    "train_file": _FILES[data_file],
                    "examples": len(problems),
                    "seed": model_seed,
                    "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
                    "test_accuracy": round(acc, 4),
                    "recipe": recipe_fingerprint(scale),
                },
                indent=2,
            )
        )
        del model

    seconds["total"] = time.monotonic() - started
    manifest = {
        "version": MANIFEST_VERSION,
        "scale": scale,
        "seed": seed,
        "recipe": recipe_fingerprint(scale),
        "files": dict(_FILES),
        "counts": {field: len(problems) for field, problems in splits.items()},
        "tokens_per_example": tokens,
        "accuracy": accuracies,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "threads": torch.get_num_threads(),
    }
    # last: its presence marks the build complete
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    log(f"demo assets built in {seconds['total']:.0f}s")
