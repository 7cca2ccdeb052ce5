"""Text corpora loaders (jsonl, raw text, JSON list, parquet, save_to_disk, hub) and streaming token chunking."""

from __future__ import annotations

import inspect
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _data_paths import shared_path

from dsg_tl.data.corpora import chunk_token_ids, load_texts
from dsg_tl.data.types import DataError

DOCS = ["First document about proteins.", "Second one.", "Third, with ünïcödé."]


def _fail_hub(*args: Any, **kwargs: Any) -> None:
    raise AssertionError(f"the hub must not be called here: {args} {kwargs}")


# --------------------------------------------------------------------------------------------- formats


def test_muse_raw_json_list_of_strings() -> None:
    texts = load_texts(shared_path("muse_news", "raw", "forget.json"))
    assert len(texts) == 889 and all(isinstance(t, str) for t in texts)
    assert texts[821] == ""  # the released file has one empty article; structured formats keep it
    assert len(load_texts(shared_path("muse_news", "raw", "forget.json"), max_docs=10)) == 10


def test_jsonl_bio_forget_format(tmp_path: Path) -> None:
    path = tmp_path / "bio_forget.jsonl"
    lines = [json.dumps({"title": f"t{i}", "abstract": "a", "text": d, "doi": "x"}) for i, d in enumerate(DOCS)]
    path.write_text(lines[0] + "\n\n" + lines[1] + "\r\n" + lines[2], encoding="utf-8")  # blank line, CRLF, no EOL
    assert load_texts(path) == DOCS
    assert load_texts(path, max_docs=2) == DOCS[:2]
    assert load_texts(path, text_field="title") == ["t0", "t1", "t2"]
    path.write_bytes(lines[0].encode() + b"\n" + lines[1].encode() + b"\n{broken \xff\n")
    assert load_texts(path, max_docs=2) == DOCS[:2]  # streams: the bad third line is never read
    with pytest.raises(DataError, match=r"bio_forget\.jsonl: line 3: not valid UTF-8"):
        load_texts(path)


def test_raw_text_lines_skip_blanks(tmp_path: Path) -> None:
    path = tmp_path / "cyber-forget-corpus.txt"
    path.write_text("line one\n\n   \nline two\r\nline three", encoding="utf-8")
    assert load_texts(path) == ["line one", "line two", "line three"]
    assert load_texts(path, max_docs=2) == ["line one", "line two"]


def test_raw_text_streams_with_max_docs(tmp_path: Path) -> None:
    path = tmp_path / "retain.txt"
    path.write_bytes(b"good one\ngood two\n\xff bad bytes later\n")
    assert load_texts(path, max_docs=2) == ["good one", "good two"]  # stops before the bad line
    with pytest.raises(DataError, match=r"retain\.txt: line 3: not valid UTF-8"):
        load_texts(path)


def test_json_list_of_objects_and_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "docs.json"
    path.write_text(json.dumps([{"text": d} for d in DOCS]), encoding="utf-8")
    assert load_texts(path) == DOCS
    pq.write_table(pa.table({"id": [1, 2, 3], "content": DOCS}), tmp_path / "docs.parquet")
    assert load_texts(tmp_path / "docs.parquet", text_field="content") == DOCS
    assert load_texts(tmp_path / "docs.parquet", text_field="content", max_docs=1) == DOCS[:1]
    with pytest.raises(DataError, match=r"docs\.parquet: missing column 'text'"):
        load_texts(tmp_path / "docs.parquet")


def test_save_to_disk_folders(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(tmp_path / "single"))
    assert load_texts(tmp_path / "single") == DOCS
    assert load_texts(tmp_path / "single", max_docs=2) == DOCS[:2]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": DOCS}),
                               "test": datasets.Dataset.from_dict({"text": ["only test"]})})
    dd.save_to_disk(str(tmp_path / "dict"))
    assert load_texts(tmp_path / "dict", split="test") == ["only test"]
    with pytest.raises(DataError, match=r"holds splits \['test', 'train'\]; name one"):
        load_texts(tmp_path / "dict")
    with pytest.raises(DataError, match="missing column 'body'"):
        load_texts(tmp_path / "single", text_field="body")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="not a datasets.save_to_disk folder"):
        load_texts(tmp_path / "plain")


def test_hub_branch(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls: list[tuple[Any, ...]] = []

    def fake(name: str, config: str | None = None, split: str | None = None, **kw: Any) -> datasets.Dataset:
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"text": DOCS})

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert load_texts("wikitext", config="wikitext-2-raw-v1", split="test") == DOCS
    assert calls[-1] == ("wikitext", "wikitext-2-raw-v1", "test")
    assert load_texts("cais/wmdp-corpora", config="cyber-forget-corpus", max_docs=1) == DOCS[:1]
    assert calls[-1] == ("cais/wmdp-corpora", "cyber-forget-corpus", "train")


def test_missing_path_never_calls_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", _fail_hub)
    for source in [tmp_path / "bio.jsonl", "corpora/bio.jsonl", "retain.txt"]:
        with pytest.raises(DataError, match="no such file"):
            load_texts(source)


# ------------------------------------------------------------------------------------------- malformed


@pytest.mark.parametrize(
    ("name", "content", "pattern"),
    [
        ("a.jsonl", b'{"text": "ok"}\n{"title": "no text"}\n', r"a\.jsonl: line 2: missing field 'text'"),
        ("a.jsonl", b'{"text": "ok"}\n{"text": 3}\n', r"a\.jsonl: line 2: field 'text' must be a string"),
        ("a.jsonl", b'{"text": "ok"}\n{"text": \n', r"a\.jsonl: line 2: invalid JSON"),
        ("a.jsonl", b'{"text": "ok"}\n[1, 2]\n', r"a\.jsonl: line 2: expected an object"),
        ("a.jsonl", b'{"text": "caf\xe9"}\n', r"a\.jsonl: line 1: not valid UTF-8"),
        ("a.jsonl", b"", r"a\.jsonl: contains no documents"),
        ("a.json", b"[]", r"a\.json: the JSON list is empty"),
        ("a.json", b"", r"a\.json: file is empty"),
        ("a.json", b'["ok", 5]', r"a\.json: item 1: expected an object with field 'text' or a string"),
        ("a.json", b'{"text": "x"}', r"a\.json: expected a JSON list"),
        ("a.json", b'["caf\xe9"]', r"a\.json: not valid UTF-8"),
        ("a.txt", b"\n  \n\n", r"a\.txt: contains no documents"),
    ],
)
def test_malformed_corpora(tmp_path: Path, name: str, content: bytes, pattern: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=pattern) as info:
        load_texts(path)
    assert str(path) in str(info.value)


def test_max_docs_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_docs"):
        load_texts(tmp_path, max_docs=0)


# -------------------------------------------------------------------------------------------- chunking

BOS, EOS = 0, 99


def test_chunks_hand_computed() -> None:
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    # stream: 1 2 3 EOS 4 5 EOS 6 7 8 9 -> pieces of 3: [1 2 3] [EOS 4 5] [EOS 6 7], [8 9] dropped
    assert list(chunk_token_ids(docs, 4, BOS, EOS, None)) == [[0, 1, 2, 3], [0, 99, 4, 5], [0, 99, 6, 7]]
    assert list(chunk_token_ids(docs, 4, BOS, EOS, max_chunks=2)) == [[0, 1, 2, 3], [0, 99, 4, 5]]
    assert list(chunk_token_ids(docs, 4, BOS, EOS, max_chunks=0)) == []
    # chunk_len 6 -> pieces of 5: [1 2 3 EOS 4] [5 EOS 6 7 8], [9] dropped
    assert list(chunk_token_ids(docs, 6, BOS, EOS)) == [[0, 1, 2, 3, 99, 4], [0, 5, 99, 6, 7, 8]]


def test_chunks_edges() -> None:
    assert list(chunk_token_ids([[1, 2, 3]], 4, BOS, EOS)) == [[0, 1, 2, 3]]  # no EOS after the last document
    assert list(chunk_token_ids([[1, 2]], 4, BOS, EOS)) == []  # incomplete chunk dropped
    assert list(chunk_token_ids([], 4, BOS, EOS)) == []
    # empty documents are skipped, not turned into a doubled EOS: 1 2 EOS 3 -> [1 2] [EOS 3]
    assert list(chunk_token_ids([[1, 2], [], [3]], 3, BOS, EOS)) == [[0, 1, 2], [0, 99, 3]]
    # one long document spans several chunks
    assert list(chunk_token_ids([list(range(1, 11))], 4, BOS, EOS)) == [[0, 1, 2, 3], [0, 4, 5, 6], [0, 7, 8, 9]]
    assert list(chunk_token_ids([[5, 6]], 2, BOS, EOS)) == [[0, 5], [0, 6]]  # one content token per chunk
    assert list(chunk_token_ids([[5], [6]], 2, BOS, EOS)) == [[0, 5], [0, 99], [0, 6]]


def test_chunks_accept_arrays() -> None:
    import numpy as np

    out = list(chunk_token_ids([np.array([1, 2, 3]), np.array([4])], 3, BOS, EOS))
    assert out == [[0, 1, 2], [0, 3, 99]] and all(type(t) is int for c in out for t in c)


def test_chunks_stream_lazily() -> None:
    consumed: list[int] = []

    def docs() -> Iterator[list[int]]:
        for i in itertools.count():
            consumed.append(i)
            yield [1, 2, 3, 4, 5]

    gen = chunk_token_ids(docs(), 6, BOS, EOS, max_chunks=2)
    assert inspect.isgenerator(gen) and consumed == []
    assert list(gen) == [[0, 1, 2, 3, 4, 5], [0, 99, 1, 2, 3, 4]]
    assert consumed == [0, 1]  # an infinite corpus is fine, and nothing past the second document was read
    first = next(chunk_token_ids(docs(), 3, BOS, EOS))
    assert first == [0, 1, 2]


def test_chunks_bad_arguments() -> None:
    with pytest.raises(ValueError, match="chunk_len"):
        list(chunk_token_ids([[1]], 1, BOS, EOS))
    with pytest.raises(ValueError, match="max_chunks"):
        list(chunk_token_ids([[1]], 4, BOS, EOS, max_chunks=-1))


def test_chunks_with_real_tokenizer_and_corpus() -> None:
    from transformers import GPT2TokenizerFast

    tok = GPT2TokenizerFast.from_pretrained(str(shared_path("tokenizers", "gpt2")))
    eos = tok.eos_token_id
    texts = load_texts(shared_path("muse_news", "raw", "forget.json"), max_docs=5)
    ids = [tok(t)["input_ids"] for t in texts]
    chunks = list(chunk_token_ids(iter(ids), 128, eos, eos))
    joined: list[int] = []
    for doc in ids:
        joined.extend(([eos] if joined else []) + doc)
    assert len(chunks) == len(joined) // 127
    assert all(len(c) == 128 and c[0] == eos for c in chunks)
    assert [t for c in chunks for t in c[1:]] == joined[: len(chunks) * 127]
