"""models.answers against the published weak-to-strong pipeline's own outputs (../shared/data).

Where w2s disagrees with the reference, the tests name each case and why, so that they cannot
grow silently: the ref compared normalised strings, w2s compares values.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from pathlib import Path

import pytest

from models.answers import (
    answers_match,
    extract_answer,
    gold_answer_from_solution,
    grade,
    normalize_gsm8k,
)
from tests.support import read_reference

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
POOL_SIZE = 7000

# ALGORITHMS.md, "Figures the reference data shows": iteration 1 kept count, share and accuracy.
TABLE = {
    "llama2_7b": {"kept": 2683, "share": 0.383, "accuracy": 0.898},
    "gemma_2b": {"kept": 2177, "share": 0.311, "accuracy": 0.880},
}
LLAMA_WEAK_ACCURACY = 0.414
STAGE1_PAIRS = [("gsm8k", "llama2_7b"), ("gsm8k", "gemma_2b"), ("math", "gemma_2b")]

# Pairs the ref kept although their answers differ: accidents of its string normalisation.
REF_ACCIDENTAL_AGREEMENTS = {
    ("math", "gemma_2b"): {
        1202: "different planes '…=0': the ref kept only what follows '=', '0' on both sides",
        1557: "different planes '…=0', as above",
        3177: "different planes '…=0', as above",
        4914: "'12x-4y+3z=0' vs '12x-4y+3z+D=0', as above",
        4050: "'The answer is $\\binom{5}{2} = 10$' (no colon): the ref took its first number, 5",
        4339: "'1,2' vs '12': the ref deleted the comma",
    },
}
# Rows whose reference `pred` is a ref quirk that w2s deliberately does not copy.
REF_PRED_QUIRKS = {
    200: "'-615,000': the ref kept the separator of negative numbers",
    1033: "'1 hour, 45 minutes': the ref deleted a list of unit words",
    1704: "'27 1/2': the ref deleted the space, making the number 271/2",
    3964: "'2 hours 30 minutes': the ref made it '230'",
}


def _misgraded_by_ref(row: dict) -> bool:
    """Pred '13.50', gold '13.5': the ref compared strings and graded the right number as wrong."""
    try:
        return row["pred"] != row["gold"] and Decimal(row["pred"]) == Decimal(row["gold"])
    except InvalidOperation:
        return False


@pytest.fixture(scope="module")
def weak_outputs() -> list[dict]:
    rows = read_reference(DATA / "reference" / "weak_outputs" / "gsm8k_train_2.llama2_7b.jsonl")
    assert [row["id"] for row in rows] == list(range(POOL_SIZE))
    for row in rows:
        row["extracted"] = extract_answer(row["response"], "gsm8k")
    return rows


@pytest.fixture(scope="module")
def gold() -> list[str]:
    """Gold answers of the pool; a reference `id` is the 0-based line number in train_2.jsonl."""
    rows = read_reference(DATA / "gsm8k" / "train_2.jsonl")
    assert len(rows) == POOL_SIZE
    return [gold_answer_from_solution(row["answer"], "gsm8k") for row in rows]


@pytest.fixture(scope="module")
def stage1() -> dict[tuple[str, str], list[tuple[dict, dict]]]:
    """(task, weak model) -> (weak, icl) records paired by id."""
    pairs = {}
    for task, model in STAGE1_PAIRS:
        stem = DATA / "reference" / "stage1" / f"{task}.{model}.iter1"
        weak = read_reference(stem.with_name(stem.name + "_weak.json"))
        icl = {r["id"]: r for r in read_reference(stem.with_name(stem.name + "_icl.json"))}
        assert sorted(icl) == sorted(r["id"] for r in weak)
        pairs[(task, model)] = [(r, icl[r["id"]]) for r in weak]
    return pairs


def test_extraction_matches_reference_pred(weak_outputs: list[dict]) -> None:
    same = sum(row["extracted"] == row["pred"] for row in weak_outputs)
    assert same / POOL_SIZE >= 0.995
    # Every other row: the same number written differently ("67.50" is "67.5" in w2s) or a quirk.
    different = [row for row in weak_outputs if row["extracted"] != row["pred"]]
    unexplained = {
        row["id"]: (row["extracted"], row["pred"])
        for row in different
        if row["extracted"] != normalize_gsm8k(row["pred"]) and row["id"] not in REF_PRED_QUIRKS
    }
    assert unexplained == {}
    assert {row["id"] for row in different} >= set(REF_PRED_QUIRKS)


def test_grading_matches_reference_result(weak_outputs: list[dict]) -> None:
    graded = [grade(row["extracted"], row["gold"], "gsm8k") for row in weak_outputs]
    same = sum(ours == row["result"] for ours, row in zip(graded, weak_outputs))
    assert same / POOL_SIZE >= 0.995
    # w2s differs only where the ref's string comparison failed on equal numbers.
    for ours, row in zip(graded, weak_outputs):
        if ours != row["result"]:
            assert ours and _misgraded_by_ref(row), row["id"]


def test_reference_gold_is_train_2_gold(weak_outputs: list[dict], gold: list[str]) -> None:
    assert all(answers_match(row["gold"], gold[row["id"]], "gsm8k") for row in weak_outputs)


def test_weak_accuracy(weak_outputs: list[dict], gold: list[str]) -> None:
    ref_correct = {row["id"] for row in weak_outputs if row["result"]}
    assert len(ref_correct) / POOL_SIZE == pytest.approx(LLAMA_WEAK_ACCURACY, abs=0.001)
    ours = {r["id"] for r in weak_outputs if grade(r["extracted"], gold[r["id"]], "gsm8k")}
    misgraded = {r["id"] for r in weak_outputs if _misgraded_by_ref(r)}
    assert ours == ref_correct | misgraded  # 41.4% + 13 rows the ref misgraded = 41.6%


def test_full_weak_file_is_the_weak_outputs(weak_outputs: list[dict]) -> None:
    full = read_reference(DATA / "reference" / "stage1" / "gsm8k.llama2_7b.full_weak.json")
    assert [(r["id"], r["output"]) for r in full] == [
        (r["id"], r["response"]) for r in weak_outputs
    ]


@pytest.mark.parametrize(("task", "model"), STAGE1_PAIRS)
def test_reference_agreements_still_agree(task: str, model: str, stage1) -> None:
    disagree = {}
    for weak, icl in stage1[(task, model)]:
        a, b = extract_answer(weak["output"], task), extract_answer(icl["output"], task)
        if not answers_match(a, b, task):
            disagree[weak["id"]] = (a, b)
    # The ref kept some pairs where neither response has an answer (its `pred` is "" for them,
    # though its published rule drops empty answers); an empty answer never agrees in w2s.
    no_answer = {id_ for id_, (a, b) in disagree.items() if a == b == ""}
    accidental = REF_ACCIDENTAL_AGREEMENTS.get((task, model), {})
    assert set(disagree) - no_answer == set(accidental)
    assert len(no_answer) == {("gsm8k", "llama2_7b"): 8}.get((task, model), 0)


@pytest.mark.parametrize("model", sorted(TABLE))
def test_kept_share_and_accuracy(model: str, stage1, gold: list[str], weak_outputs) -> None:
    kept = [weak for weak, _ in stage1[("gsm8k", model)]]
    figures = TABLE[model]
    assert len(kept) == figures["kept"]
    assert len(kept) / POOL_SIZE == pytest.approx(figures["share"], abs=0.001)

    correct = {
        w["id"] for w in kept if grade(extract_answer(w["output"], "gsm8k"), gold[w["id"]], "gsm8k")
    }
    if model != "llama2_7b":
        assert len(correct) / len(kept) == pytest.approx(figures["accuracy"], abs=0.001)
        return
    # The table is the ref's grading; w2s also counts the kept rows the ref misgraded
    # ("13.50" vs "13.5"): 89.8% becomes 90.0%.
    rows = [weak_outputs[w["id"]] for w in kept]
    assert all(row["response"] == w["output"] for row, w in zip(rows, kept))
    ref_correct = {row["id"] for row in rows if row["result"]}
    assert len(ref_correct) / len(kept) == pytest.approx(figures["accuracy"], abs=0.001)
    misgraded = {row["id"] for row in rows if _misgraded_by_ref(row)}
    assert correct == ref_correct | misgraded


def test_math500_gold_extraction() -> None:
    for row in read_reference(DATA / "math" / "test.jsonl"):
        extracted = gold_answer_from_solution(row["solution"], "math")
        assert answers_match(extracted, row["answer"], "math"), row["solution"][-200:]
