"""Dataset files: the mapping rules (pure), every format in and out, and the bad files a user has."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select

from services.dataset_files import (
    FieldMapping,
    Record,
    check_unique_ids,
    map_record,
    parse_questions,
    read_records,
    write_records,
)
from services.errors import InputError
from tests.conftest import SHARED_DATA

SVAMP = SHARED_DATA / "svamp" / "svamp.json"
SVAMP_MAPPING = FieldMapping(question="{Body} {Question}", answer="Answer", id="ID")


# --- the mapping rules ---------------------------------------------------------------------------


def test_template_joins_fields_and_a_bare_name_is_one_field():
    record = Record("f.json: item 0", {"Body": "Dan had 3 pens. ", "Question": "How many now?", "Answer": 51.0,
                                      "ID": "chal-1"})
    question = map_record(record, SVAMP_MAPPING, "gsm8k")
    assert question.text == "Dan had 3 pens. How many now?"
    assert question.gold_answer == "51"  # SVAMP's floats that are integers
    assert question.source_id == "chal-1"


def test_default_mapping_splits_a_gsm8k_solution_and_reads_the_id_field():
    record = Record("f.jsonl:1", {"id": 7, "question": "q?", "answer": "3 + 4 = 7\n#### 7"})
    question = map_record(record, FieldMapping(), "gsm8k")
    assert (question.text, question.gold_answer, question.gold_solution, question.source_id) == \
        ("q?", "7", "3 + 4 = 7\n#### 7", "7")


@pytest.mark.parametrize("mapping, record, fragments", [
    (FieldMapping(question="{Body} {Question}"), {"Body": "b"}, ["f.csv: row 3", "missing field 'Question'",
                                                                 "--question", "Body"]),
    (FieldMapping(answer="Answer"), {"question": "q", "Answer": "seven"}, ["f.csv: row 3", "'seven' is not a number",
                                                                           "--answer 'Answer'"]),
    (FieldMapping(answer="Answer"), {"question": "q", "Answer": "  "}, ["f.csv: row 3", "gold answer is empty"]),
    (FieldMapping(question="{Body}"), {"Body": " "}, ["f.csv: row 3", "the question is empty"]),
    (FieldMapping(id="ID"), {"question": "q", "ID": ""}, ["f.csv: row 3", "the id is empty"]),
])
def test_bad_rows_name_the_row_and_field(mapping, record, fragments):
    with pytest.raises(InputError) as raised:
        map_record(Record("f.csv: row 3", record), mapping, "gsm8k")
    for fragment in fragments:
        assert fragment in str(raised.value)


def test_a_non_numeric_answer_is_fine_for_math():
    question = map_record(Record("f:1", {"question": "q", "answer": "\\frac{1}{2}"}), FieldMapping(), "math")
    assert question.gold_answer == "\\frac{1}{2}"


@pytest.mark.parametrize("template, fragment", [("", "the template is empty"), ("  ", "the template is empty"),
                                                ("{Body", "not a valid template"), ("plain {}", "is not a field name"),
                                                ("{0}", "is not a field name")])
def test_bad_templates_are_refused_before_reading(template, fragment):
    with pytest.raises(InputError, match=fragment):
        FieldMapping(question=template)


def test_duplicate_ids_name_every_line():
    with pytest.raises(InputError) as raised:
        check_unique_ids([("f:1", "a"), ("f:2", "b"), ("f:5", "a"), ("f:9", None), ("f:10", None)])
    assert "duplicate id 'a' at f:1, f:5" in str(raised.value)
    check_unique_ids([("f:1", "a"), ("f:2", None), ("f:3", None)])  # rows without ids are not duplicates


# --- formats -------------------------------------------------------------------------------------


def test_svamp_reads_with_its_mapping():
    questions = parse_questions(read_records(SVAMP), SVAMP_MAPPING, "gsm8k")
    assert len(questions) == len(json.loads(SVAMP.read_text()))
    assert all(q.text and q.gold_answer and q.source_id for q in questions)
    assert len({q.source_id for q in questions}) == len(questions)


@pytest.mark.parametrize("fmt, name", [("jsonl", "out.jsonl"), ("json", "out.json"), ("csv", "out.csv"),
                                       ("parquet", "out.parquet"), ("disk", "saved")])
def test_every_format_round_trips(tmp_path, fmt, name):
    rows = [{"id": "a-1", "question": "What is 1 + 1?", "answer": "2", "solution": "1 + 1 = 2\n#### 2"},
            {"id": "007", "question": "Ümlaut, \"quoted\", comma?", "answer": "-3.5", "solution": None}]
    path = tmp_path / name
    write_records(rows, path, fmt)
    questions = parse_questions(read_records(path), FieldMapping(), "gsm8k")
    assert [(q.source_id, q.text, q.gold_answer) for q in questions] == \
        [("a-1", "What is 1 + 1?", "2"), ("007", "Ümlaut, \"quoted\", comma?", "-3.5")]
    assert questions[0].gold_solution == "1 + 1 = 2\n#### 2"
    assert not list(tmp_path.glob(".*partial"))


def test_a_saved_dataset_dict_needs_a_split(tmp_path):
    import datasets

    table = datasets.Dataset.from_list([{"question": "q?", "answer": "1"}])
    datasets.DatasetDict({"train": table, "test": table}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(InputError, match="splits: train, test"):
        read_records(tmp_path / "dd")
    records = read_records(tmp_path / "dd", split="test")
    assert records[0].where.endswith("dd[test]: row 1") and records[0].fields["question"] == "q?"


def test_unreadable_files_are_one_line(tmp_path):
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"question": "a?", "answer": "1"}\n{"question": "caf\xe9?", "answer": "2"}\n')
    with pytest.raises(InputError) as raised:
        read_records(latin)
    assert str(raised.value).startswith(f"{latin}:2: not UTF-8 text (byte 0xe9 at column 18)")

    latin_csv = tmp_path / "latin.csv"
    latin_csv.write_bytes(b"question,answer\nok,1\nok,2\ncaf\xe9,3\n")
    with pytest.raises(InputError, match=f"{latin_csv}:4: not UTF-8"):
        read_records(latin_csv)

    not_parquet = tmp_path / "broken.parquet"
    not_parquet.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(InputError) as raised:
        read_records(not_parquet)
    assert str(raised.value).startswith(f"{not_parquet}: cannot read as parquet") and "\n" not in str(raised.value)

    (tmp_path / "x.txt").write_text("q")
    with pytest.raises(InputError, match="unknown format '.txt'"):
        read_records(tmp_path / "x.txt")
    with pytest.raises(InputError, match="not one written by datasets' save_to_disk"):
        read_records(tmp_path)


# --- import and export through the service -------------------------------------------------------


def test_import_then_export_keeps_ids(w2s_home, tmp_path):
    from db.schema import Question
    from db.session import ensure_schema, session_scope
    from services.registry import export_dataset, import_dataset
    from services.settings import load_settings

    url = load_settings().database_url
    ensure_schema(url)
    with session_scope(url) as session:
        dataset = import_dataset(session, SVAMP, name="svamp", task="gsm8k", labelled=True, mapping=SVAMP_MAPPING)
        assert dataset.size == 1000
    with session_scope(url) as session:
        first = session.scalar(select(Question).where(Question.index == 0))
        assert (first.source_id, first.gold_answer) == ("chal-1", "51")
        assert export_dataset(session, "svamp", tmp_path / "svamp.parquet") == 1000
    with session_scope(url) as session:
        again = import_dataset(session, tmp_path / "svamp.parquet", name="svamp2", task="gsm8k", labelled=True)
        assert again.size == 1000
    with session_scope(url) as session:
        texts = [tuple(session.execute(select(Question.source_id, Question.text, Question.gold_answer)
                                       .where(Question.dataset_id == d).order_by(Question.index)).all())
                 for d in (dataset.id, again.id)]
        assert texts[0] == texts[1]


# --- the commands --------------------------------------------------------------------------------


def test_svamp_imports_with_one_command_and_exports(w2s_home, cli_runner, tmp_path):
    result = cli_runner("dataset", "import", SVAMP, "--name", "svamp", "--question", "{Body} {Question}",
                        "--answer", "Answer", "--id", "ID")
    assert "imported 1000 questions as dataset 'svamp'" in result.output
    out = tmp_path / "svamp.jsonl"
    assert "wrote 1000 questions" in cli_runner("dataset", "export", "svamp", "--out", out).output
    first = json.loads(out.read_text().splitlines()[0])
    assert first["id"] == "chal-1" and first["answer"] == "51" and first["question"].endswith("each pack?")
    cli_runner("dataset", "export", "svamp", "--out", tmp_path / "saved", "--format", "disk")
    assert "imported 1000" in cli_runner("dataset", "import", tmp_path / "saved", "--name", "svamp-again").output


@pytest.mark.parametrize("options, fragments", [
    (["--question", "{Body} {Query}", "--answer", "Answer"], [": item 0: missing field 'Query'", "--question"]),
    (["--question", "", "--answer", "Answer"], ["--question: the template is empty"]),
    (["--question", "{Body}", "--answer", "Type"], [": item 0: the gold answer 'Subtraction' is not a number",
                                                    "--answer 'Type'"]),
    (["--question", "{Body}", "--answer", "Answer", "--id", "Type"], ["duplicate id 'Subtraction' at",
                                                                      "item 0", "item 1"]),
])
def test_bad_mappings_name_the_row_and_field_and_import_nothing(w2s_home, cli_runner, options, fragments):
    from tests.embedded.test_bad_input import fails_with

    fails_with(cli_runner, ["dataset", "import", SVAMP, "--name", "svamp", *options], *fragments)


def test_unreadable_and_duplicated_files_import_nothing(w2s_home, cli_runner, tmp_path):
    from tests.embedded.test_bad_input import fails_with

    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"question": "a?", "answer": "1"}\n{"question": "caf\xe9?", "answer": "2"}\n')
    fails_with(cli_runner, ["dataset", "import", latin, "--name", "latin"], f"{latin}:2: not UTF-8 text")
    twice = tmp_path / "twice.jsonl"
    twice.write_text("".join(json.dumps({"id": i % 3, "question": f"q{i}?", "answer": str(i)}) + "\n" for i in range(5)))
    fails_with(cli_runner, ["dataset", "import", twice, "--name", "twice"],
               f"duplicate id '0' at {twice}:1, {twice}:4 (1 more duplicated ids)")
    fails_with(cli_runner, ["dataset", "export", "nope", "--out", tmp_path / "x.jsonl"], "unknown dataset 'nope'")
