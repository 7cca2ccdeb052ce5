"""WMDP and MMLU loaders: real public files, local stand-ins in every supported format, malformed inputs."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from _data_paths import shared_path

from dsg_tl.data.mcq import load_mcq, load_mmlu, load_wmdp, mcq_from_record
from dsg_tl.data.types import DataError, MCQItem

MMLU_TEST_COUNTS = {
    "college_biology": 144,
    "college_computer_science": 100,
    "high_school_geography": 198,
    "high_school_us_history": 204,
    "human_aging": 223,
}
RECORDS: list[dict[str, Any]] = [
    {"question": "Which gas do plants absorb?", "choices": ["O2", "CO2", "N2", "He"], "answer": 1},
    {"question": "2 + 2 = ?", "choices": ["3", "4", "5", "22"], "answer": 1},
    {"question": "Capital of France?", "choices": ["Paris", "Rome", "Oslo", "Bern"], "answer": 0},
]


def _write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _fail_hub(*args: Any, **kwargs: Any) -> None:
    raise AssertionError(f"the hub must not be called here: {args} {kwargs}")


# ------------------------------------------------------------------------------------------- real files


def test_wmdp_bio_real_file() -> None:
    items = load_wmdp(shared_path("wmdp", "bio_questions.json"))
    assert len(items) == 1273
    assert all(isinstance(it, MCQItem) and len(it.choices) == 4 for it in items)
    assert set(Counter(it.answer for it in items)) == {0, 1, 2, 3}
    first = items[0]
    assert first.question.startswith("What is a disseminating factor")
    assert first.choices[0] == "SpyCEP from Streptococcus pyogenes" and first.answer == 0


def test_wmdp_release_folder_picks_config_file() -> None:
    folder = shared_path("wmdp", "bio_questions.json").parent
    assert len(load_wmdp(folder, config="wmdp-bio")) == 1273
    assert len(load_mcq(folder, kind="wmdp")) == 1273


def test_mmlu_csv_folder_test_split() -> None:
    items = load_mmlu(shared_path("mmlu"))
    assert Counter(it.subject for it in items) == MMLU_TEST_COUNTS
    assert len(items) == 869
    aging = [it for it in items if it.subject == "human_aging"]
    assert aging[0].question == "The study of older adults and aging is referred to as"
    assert aging[0].choices == ("Gerontology", "Geropsychiatry", "Geriatrics", "Gero-education")
    assert aging[0].answer == 0


def test_mmlu_csv_subjects_and_dev_split() -> None:
    root = shared_path("mmlu")
    two = load_mmlu(root, subjects=["human_aging", "college_biology"])
    assert [it.subject for it in two] == ["human_aging"] * 223 + ["college_biology"] * 144
    assert len(load_mmlu(root, subjects="college_computer_science")) == 100
    dev = load_mmlu(root, split="dev")
    assert Counter(it.subject for it in dev) == {s: 5 for s in MMLU_TEST_COUNTS}
    single = load_mmlu(root / "test" / "human_aging_test.csv")
    assert len(single) == 223 and {it.subject for it in single} == {"human_aging"}


def test_mmlu_csv_unknown_subject() -> None:
    with pytest.raises(DataError, match=r"no_such_subject_test\.csv.*no such MMLU file"):
        load_mmlu(shared_path("mmlu"), subjects=["no_such_subject"])


def test_mmlu_hf_save_to_disk_dev() -> None:
    folder = shared_path("mmlu_hf_dev")
    items = load_mmlu(folder, split="dev")
    assert len(items) == 285
    by_subject = Counter(it.subject for it in items)
    assert len(by_subject) == 57 and set(by_subject.values()) == {5}
    assert items[0].subject == "abstract_algebra" and items[0].answer == 1  # ClassLabel "B"
    assert items[0].choices == ("0", "1", "2", "3")
    anatomy = load_mmlu(folder, subjects=["anatomy"], split="dev")
    assert len(anatomy) == 5 and {it.subject for it in anatomy} == {"anatomy"}


def test_mmlu_hf_save_to_disk_split_mismatch_and_missing_subject() -> None:
    folder = shared_path("mmlu_hf_dev")
    with pytest.raises(DataError, match="holds split 'dev'"):
        load_mmlu(folder, split="test")
    with pytest.raises(DataError, match="no items for subject"):
        load_mmlu(folder, subjects=["anatomy", "not_a_subject"], split="dev")


# ----------------------------------------------------------------------------------- local stand-ins


def test_wmdp_json_jsonl_parquet_and_disk(tmp_path: Path) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    expected = [mcq_from_record(r, "x") for r in RECORDS]
    assert load_wmdp(_write_json(tmp_path / "q.json", RECORDS)) == expected
    assert load_wmdp(_write_jsonl(tmp_path / "q.jsonl", RECORDS)) == expected
    pq.write_table(pa.Table.from_pylist(RECORDS), tmp_path / "q.parquet")
    assert load_wmdp(tmp_path / "q.parquet") == expected
    ds = datasets.Dataset.from_list(RECORDS)
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "dd"))
    assert load_wmdp(tmp_path / "dd") == expected
    with pytest.raises(DataError, match="no split 'train'"):
        load_wmdp(tmp_path / "dd", split="train")
    assert [it.subject for it in load_wmdp(tmp_path / "q.json", subject="wmdp-bio")] == ["wmdp-bio"] * 3


def test_wmdp_real_file_roundtrips_through_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = shared_path("wmdp", "bio_questions.json")
    pq.write_table(pa.Table.from_pylist(json.loads(src.read_text(encoding="utf-8"))), tmp_path / "bio.parquet")
    assert load_wmdp(tmp_path / "bio.parquet") == load_wmdp(src)


def test_mmlu_headerless_original_layout(tmp_path: Path) -> None:
    split_dir = tmp_path / "data" / "test"
    split_dir.mkdir(parents=True)
    (split_dir / "toy_math_test.csv").write_text(
        '"What is 2+2, exactly?",3,4,5,6,B\n'
        '"Multi-line\nquestion?",a,b,c,d,d\n',
        encoding="utf-8",
    )
    items = load_mmlu(tmp_path / "data")
    assert [(it.question, it.answer, it.subject) for it in items] == [
        ("What is 2+2, exactly?", 1, "toy_math"),
        ("Multi-line\nquestion?", 3, "toy_math"),
    ]
    assert items[0].choices == ("3", "4", "5", "6")


def test_mmlu_save_to_disk_with_int_answer(tmp_path: Path) -> None:
    import datasets

    rows = [dict(r, subject=s) for r, s in zip(RECORDS, ["bio", "math", "geo"])]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    items = load_mmlu(tmp_path / "ds")
    assert [(it.subject, it.answer) for it in items] == [("bio", 1), ("math", 1), ("geo", 0)]
    assert [it.subject for it in load_mmlu(tmp_path / "ds", subjects=["geo"])] == ["geo"]


def test_hub_branch_uses_load_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls: list[tuple[Any, ...]] = []

    def fake(name: str, config: str | None = None, split: str | None = None, **kw: Any) -> datasets.Dataset:
        calls.append((name, config, split))
        rows = [dict(r, subject=config if config != "all" else "anatomy") for r in RECORDS]
        return datasets.Dataset.from_list(rows if name == "cais/mmlu" else RECORDS)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert len(load_wmdp("cais/wmdp")) == 3
    assert calls[-1] == ("cais/wmdp", "wmdp-bio", "test")
    items = load_mmlu("cais/mmlu", subjects=["virology", "nutrition"], split="validation")
    assert calls[-2:] == [("cais/mmlu", "virology", "validation"), ("cais/mmlu", "nutrition", "validation")]
    assert [it.subject for it in items] == ["virology"] * 3 + ["nutrition"] * 3
    load_mmlu("cais/mmlu")
    assert calls[-1] == ("cais/mmlu", "all", "test")


def test_hub_failure_is_data_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def offline(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"hub dataset 'cais/wmdp'.*offline"):
        load_wmdp("cais/wmdp")


def test_missing_local_path_never_calls_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", _fail_hub)
    for source in [tmp_path / "nope.json", "data/wmdp_questions.json", "./cais/wmdp", str(tmp_path / "dir")]:
        with pytest.raises(DataError, match="no such file"):
            load_wmdp(source)


def test_load_mcq_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown MCQ kind"):
        load_mcq("x.json", kind="trivia")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------- malformed


def _bad(**changes: Any) -> list[dict[str, Any]]:
    rows = [dict(r) for r in RECORDS]
    for key, value in changes.items():
        if value is None:
            del rows[2][key]
        else:
            rows[2][key] = value
    return rows


@pytest.mark.parametrize(
    ("rows", "pattern"),
    [
        (_bad(answer=None), r"item 2: missing field 'answer'"),
        (_bad(choices=None), r"item 2: missing field 'choices'"),
        (_bad(question=None), r"item 2: missing field 'question'"),
        (_bad(answer=4), r"item 2: answer 4 out of range for 4 choices"),
        (_bad(answer=-1), r"item 2: answer -1 out of range"),
        (_bad(answer="E"), r"item 2: answer 'E' out of range"),
        (_bad(answer="four"), r"item 2: answer 'four' is not an index"),
        (_bad(answer=True), r"item 2: answer must be an integer index"),
        (_bad(answer=1.0), r"item 2: answer must be an integer index, got float"),
        (_bad(choices=["a", "b", "c"]), r"item 2: expected 4 choices, got 3"),
        (_bad(choices=["a", "b", "c", "d", "e"]), r"item 2: expected 4 choices, got 5"),
        (_bad(choices="abcd"), r"item 2: choices must be a list"),
        (_bad(choices=["a", "b", 3, "d"]), r"item 2: choice 2 must be a string"),
        (_bad(question="  "), r"item 2: question must be a non-empty string"),
        ([], r"the JSON list is empty"),
        ({"question": "q"}, r"expected a JSON list of items, got a JSON dict"),
        ([RECORDS[0], "not an object"], r"item 1: expected an object"),
    ],
)
def test_wmdp_malformed_json(tmp_path: Path, rows: Any, pattern: str) -> None:
    path = _write_json(tmp_path / "bad.json", rows)
    with pytest.raises(DataError, match=pattern) as info:
        load_wmdp(path)
    assert str(path) in str(info.value)


def test_wmdp_malformed_bytes(tmp_path: Path) -> None:
    empty = tmp_path / "empty.json"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.json: file is empty"):
        load_wmdp(empty)
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes(json.dumps(RECORDS).encode("utf-8").replace(b"France", b"Fran\xe7e"))
    with pytest.raises(DataError, match=r"latin1\.json: not valid UTF-8 \(byte \d+, line 1\)"):
        load_wmdp(latin1)
    broken = tmp_path / "broken.json"
    broken.write_text('[{"question": "q", "choices": ["a", "b", "c", "d"], "answer": 0},\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken\.json: invalid JSON at line 2"):
        load_wmdp(broken)


def test_wmdp_malformed_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n\n" + json.dumps(dict(RECORDS[1], answer=4)) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl: item 1 \(line 3\): answer 4 out of range"):
        load_wmdp(path)
    path.write_text(json.dumps(RECORDS[0]) + "\n{oops\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl: line 2: invalid JSON"):
        load_wmdp(path)
    path.write_bytes(json.dumps(RECORDS[0]).encode() + b"\n\xff\xfe\n")
    with pytest.raises(DataError, match=r"bad\.jsonl: line 2: not valid UTF-8"):
        load_wmdp(path)
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl: contains no items"):
        load_wmdp(path)


def test_wmdp_unsupported_suffix(tmp_path: Path) -> None:
    path = tmp_path / "q.yaml"
    path.write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match="unsupported file type"):
        load_wmdp(path)


HEADER = "question,choice0,choice1,choice2,choice3,answer\n"


@pytest.mark.parametrize(
    ("body", "pattern"),
    [
        (HEADER + "q1,a,b,c,d,0\nq2,a,b,c,d,4\n", r"item 1 \(line 3\): answer '4' out of range for 4 choices"),
        (HEADER + "q1,a,b,c,d,0\nq2,a,b,c,1\n", r"item 1 \(line 3\): expected 6 columns .* got 5"),
        (HEADER + "q1,a,b,c,d,e,0\n", r"item 0 \(line 2\): expected 6 columns .* got 7"),
        (HEADER + "q1,a,b,c,d,\n", r"item 0 \(line 2\): answer '' is not an index"),
        (HEADER + ",a,b,c,d,1\n", r"item 0 \(line 2\): question must be a non-empty string"),
        ("q1,a,b,c,d,A\nq2,a,b,c,d,E\n", r"item 1 \(line 2\): answer 'E' out of range"),
        (HEADER, r"contains no items"),
        ("", r"file is empty"),
    ],
)
def test_mmlu_malformed_csv(tmp_path: Path, body: str, pattern: str) -> None:
    (tmp_path / "test").mkdir()
    path = tmp_path / "test" / "toy_test.csv"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(DataError, match=pattern) as info:
        load_mmlu(tmp_path)
    assert str(path) in str(info.value)


def test_mmlu_non_utf8_csv(tmp_path: Path) -> None:
    (tmp_path / "test").mkdir()
    path = tmp_path / "test" / "toy_test.csv"
    prefix = HEADER.encode() + b"q1,a,b,c,d,0\ncaf"
    path.write_bytes(prefix + b"\xe9,a,b,c,d,1\n")
    with pytest.raises(DataError, match=rf"toy_test\.csv: not valid UTF-8 \(byte {len(prefix)}, line 3\)"):
        load_mmlu(tmp_path)


def test_mmlu_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no MMLU files"):
        load_mmlu(tmp_path)


def test_mmlu_save_to_disk_answer_out_of_range(tmp_path: Path) -> None:
    import datasets

    rows = [dict(r, subject="bio") for r in RECORDS]
    rows[1]["answer"] = 4
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(DataError, match=r"ds: item 1: answer 4 out of range"):
        load_mmlu(tmp_path / "ds")
