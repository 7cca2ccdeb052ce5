"""MUSE loaders on the authors' real files, and every malformed variant."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _data_paths import shared_path

from dsg_tl.data.muse import load_knowmem, load_muse_raw, load_verbmem
from dsg_tl.data.types import DataError


@pytest.mark.parametrize(("name", "count"), [("forget_qa.json", 100), ("retain2_qa.json", 100),
                                             ("forget_qa_icl.json", 10), ("retain2_qa_icl.json", 10)])
def test_knowmem_real(name: str, count: int) -> None:
    items = load_knowmem(shared_path("muse_news", "knowmem", name))
    assert len(items) == count
    assert all(set(it) == {"question", "answer"} and it["question"] and it["answer"] for it in items)


def test_verbmem_real() -> None:
    items = load_verbmem(shared_path("muse_news", "verbmem", "forget.json"))
    assert len(items) == 100
    assert all(set(it) == {"prompt", "gt"} and it["prompt"] and it["gt"] for it in items)


def test_raw_real() -> None:
    texts = load_muse_raw(shared_path("muse_news", "raw", "forget.json"))
    assert len(texts) == 889 and all(isinstance(t, str) for t in texts)
    assert texts[821] == "" and sum(1 for t in texts if not t) == 1  # kept verbatim, as released


def test_extra_keys_dropped(tmp_path: Path) -> None:
    path = tmp_path / "qa.json"
    path.write_text(json.dumps([{"question": "Q?", "answer": "A", "id": 7}]), encoding="utf-8")
    assert load_knowmem(path) == [{"question": "Q?", "answer": "A"}]


GOOD_QA = {"question": "Who?", "answer": "Someone"}


@pytest.mark.parametrize(
    ("loader", "content", "pattern"),
    [
        (load_knowmem, json.dumps([GOOD_QA, {"question": "Q?"}]), r"item 1: missing field 'answer'"),
        (load_knowmem, json.dumps([GOOD_QA, {"question": "Q?", "answer": 4}]), r"item 1: field 'answer' must be a str"),
        (load_knowmem, json.dumps([{"question": " ", "answer": "A"}]), r"item 0: field 'question' is empty"),
        (load_knowmem, json.dumps([GOOD_QA, ["Q?", "A"]]), r"item 1: expected an object"),
        (load_knowmem, "[]", r"the JSON list is empty"),
        (load_knowmem, "", r"file is empty"),
        (load_knowmem, '{"question": "Q?", "answer": "A"}', r"expected a JSON list"),
        (load_knowmem, '[{"question": "Q?", "answer": "A"},', r"invalid JSON at line 1"),
        (load_verbmem, json.dumps([{"prompt": "p", "gt": "g"}, {"prompt": "p"}]), r"item 1: missing field 'gt'"),
        (load_verbmem, json.dumps([GOOD_QA]), r"item 0: missing field 'prompt'"),
        (load_verbmem, "[]", r"the JSON list is empty"),
        (load_muse_raw, json.dumps(["article", {"text": "x"}]), r"item 1: expected a string, got dict"),
        (load_muse_raw, "[]", r"the JSON list is empty"),
        (load_muse_raw, '"just a string"', r"expected a JSON list"),
    ],
)
def test_malformed(tmp_path: Path, loader: object, content: str, pattern: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=pattern) as info:
        loader(path)  # type: ignore[operator]
    assert str(path) in str(info.value)


@pytest.mark.parametrize("loader", [load_knowmem, load_verbmem, load_muse_raw])
def test_non_utf8_and_missing(tmp_path: Path, loader: object) -> None:
    path = tmp_path / "latin1.json"
    path.write_bytes(b'[{"question": "caf\xe9", "answer": "x", "prompt": "p", "gt": "g"}]')
    with pytest.raises(DataError, match=r"latin1\.json: not valid UTF-8 \(byte 18, line 1\)"):
        loader(path)  # type: ignore[operator]
    with pytest.raises(DataError, match=r"nope\.json: no such file"):
        loader(tmp_path / "nope.json")  # type: ignore[operator]
