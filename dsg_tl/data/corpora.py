"""Text corpora (WMDP forget/retain, MUSE raw, WikiText) and streaming token chunking.

``load_texts`` reads jsonl (``{"text": ...}`` per line, the WMDP bio-forget format), parquet, raw text read line by
line (WMDP cyber-forget and the retain corpora), a JSON list of strings (MUSE raw), a ``datasets.save_to_disk``
folder, or a Hugging Face hub name. Every malformed input raises one :class:`DataError` naming the file and the
item (line) at fault.

The small readers below (``read_text_file``, ``read_json_file``, ``read_json_list``, ``iter_text_lines``,
``iter_jsonl``, ``read_parquet_rows``, ``load_disk_split``, ``load_hub_split``, ``resolve_source``) are shared by the MCQ and MUSE loaders. Local files are read without
``datasets.load_dataset``, so nothing is ever written to a cache directory.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from dsg_tl.data.types import DataError

if TYPE_CHECKING:
    import datasets

__all__ = [
    "chunk_token_ids",
    "iter_jsonl",
    "iter_text_lines",
    "load_disk_split",
    "load_hub_split",
    "load_texts",
    "read_json_file",
    "read_json_list",
    "read_parquet_rows",
    "read_text_file",
    "resolve_source",
]

PathLike = str | Path

_FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".txt", ".arrow", ".gz", ".zip", ".tsv")
_HUB_NAME_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


# --------------------------------------------------------------------------------------------------- sources


def resolve_source(source: PathLike) -> tuple[Literal["file", "dir", "hub"], Path | str]:
    """Classify ``source`` as an existing local file, an existing folder, or a hub dataset name.

    A string that names no existing path is taken for a hub name only when it looks like one (``name`` or
    ``owner/name``, no file suffix, not absolute); anything else raises :class:`DataError` (file not found), so a
    mistyped local path never triggers a network call.
    """
    path = Path(source).expanduser()
    if path.is_file():
        return "file", path
    if path.is_dir():
        return "dir", path
    text = str(source)
    if (
        isinstance(source, str)
        and _HUB_NAME_RE.match(text)
        and not text.lower().endswith(_FILE_SUFFIXES)
        and not text.startswith(".")
    ):
        return "hub", text
    raise DataError(f"{source}: no such file or folder (and not a hub dataset name)")


def read_text_file(path: Path) -> str:
    """Read a whole file as strict UTF-8 (a leading BOM is dropped)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read file: {e.strerror or e}") from e
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}: not valid UTF-8 (byte {e.start}, line {line}): {e.reason}") from e


def read_json_file(path: Path) -> Any:
    """Parse a JSON file; empty files, invalid JSON and non-UTF-8 bytes raise :class:`DataError`."""
    text = read_text_file(path)
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e


def read_json_list(path: Path) -> list[Any]:
    """Parse a JSON file that must hold a non-empty list."""
    data = read_json_file(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of items, got a JSON {type(data).__name__}")
    if not data:
        raise DataError(f"{path}: the JSON list is empty")
    return data


def iter_text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, line)`` (1-based, line ending stripped), decoding each line as strict UTF-8.

    Streams the file, so a corpus is never held in memory at once.
    """
    try:
        f = path.open("rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read file: {e.strerror or e}") from e
    with f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: line {lineno}: not valid UTF-8 (byte {e.start} of the line): {e.reason}") from e
            yield lineno, line.rstrip("\r\n")


def iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, value)`` for each non-blank line of a jsonl file."""
    for lineno, line in iter_text_lines(path):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {lineno}: invalid JSON at column {e.colno}: {e.msg}") from e


def read_parquet_rows(path: Path) -> list[dict[str, Any]]:
    """Read a parquet file into a list of row dicts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot read parquet file: {e}") from e
    return table.to_pylist()


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def load_disk_split(folder: Path, split: str | None) -> datasets.Dataset:
    """Open a ``datasets.save_to_disk`` folder and return one split.

    A ``DatasetDict`` needs ``split`` (unless it holds only one). A single saved ``Dataset`` that records its split
    must match ``split`` when one is asked for, so a dev split is never silently used as test.
    """
    if not _is_saved_dataset(folder):
        raise DataError(f"{folder}: not a datasets.save_to_disk folder (no dataset_dict.json or state.json)")
    import datasets

    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as e:  # datasets raises many types; report one DataError
        raise DataError(f"{folder}: cannot load saved dataset: {e}") from e
    if isinstance(loaded, datasets.DatasetDict):
        if split is None:
            if len(loaded) != 1:
                raise DataError(f"{folder}: holds splits {sorted(loaded)}; name one with split=")
            return next(iter(loaded.values()))
        if split not in loaded:
            raise DataError(f"{folder}: no split {split!r}; available: {sorted(loaded)}")
        return loaded[split]
    if not isinstance(loaded, datasets.Dataset):
        raise DataError(f"{folder}: expected a saved Dataset or DatasetDict, got {type(loaded).__name__}")
    saved_split = str(loaded.split) if loaded.split is not None else None
    if split is not None and saved_split is not None and saved_split != split:
        raise DataError(f"{folder}: holds split {saved_split!r}, but split {split!r} was asked for")
    if len(loaded) == 0:
        raise DataError(f"{folder}: the saved dataset is empty")
    return loaded


def load_hub_split(name: str, config: str | None, split: str) -> datasets.Dataset:
    """``datasets.load_dataset(name, config, split=split)``; any failure becomes one :class:`DataError`."""
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # network, auth and missing-config errors all end up here
        raise DataError(f"hub dataset {name!r} (config {config!r}, split {split!r}): cannot load: {e}") from e
    if len(ds) == 0:
        raise DataError(f"hub dataset {name!r} (config {config!r}, split {split!r}) is empty")
    return ds


# ------------------------------------------------------------------------------------------------- load_texts


def _check_text(value: Any, where: str, text_field: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: field {text_field!r} must be a string, got {type(value).__name__}")
    return value


def _texts_from_records(records: Iterable[tuple[str, Any]], text_field: str, max_docs: int | None) -> list[str]:
    """Pull ``text_field`` out of ``(where, record)`` pairs; a record that is a bare string is the text itself."""
    out: list[str] = []
    for where, rec in records:
        if isinstance(rec, str):
            out.append(rec)
        elif not isinstance(rec, dict):
            raise DataError(f"{where}: expected an object with field {text_field!r} or a string, "
                            f"got {type(rec).__name__}")
        elif text_field not in rec:
            raise DataError(f"{where}: missing field {text_field!r} (fields: {sorted(rec)})")
        else:
            out.append(_check_text(rec[text_field], where, text_field))
        if max_docs is not None and len(out) >= max_docs:
            break  # stop before reading any further record
    return out


def _texts_from_dataset(ds: datasets.Dataset, label: str, text_field: str, max_docs: int | None) -> list[str]:
    if text_field not in ds.column_names:
        raise DataError(f"{label}: missing column {text_field!r} (columns: {ds.column_names})")
    if max_docs is not None:
        ds = ds.select(range(min(max_docs, len(ds))))
    column = ds.select_columns([text_field])
    return [_check_text(row[text_field], f"{label}: item {i}", text_field) for i, row in enumerate(column)]


def load_texts(
    source: PathLike,
    *,
    text_field: str = "text",
    max_docs: int | None = None,
    config: str | None = None,
    split: str | None = None,
) -> list[str]:
    """Load a list of documents from a local file, a ``save_to_disk`` folder or a hub dataset.

    - ``.jsonl``: one JSON object per line with ``text_field`` (a bare JSON string is also accepted);
    - ``.json``: a list of strings (MUSE raw) or of objects with ``text_field``;
    - ``.parquet``: a column ``text_field``;
    - any other file: raw text, one document per line, blank lines skipped;
    - a folder: ``datasets.save_to_disk`` output (``split`` picks from a ``DatasetDict``);
    - otherwise a hub name, e.g. ``load_texts("wikitext", config="wikitext-2-raw-v1", split="test")``
      (``split`` defaults to ``"train"``).

    Structured formats return every document verbatim (empty strings included, so counts match the source);
    ``max_docs`` keeps the first documents only and stops reading early where the format allows.
    """
    if max_docs is not None and max_docs <= 0:
        raise ValueError(f"max_docs must be a positive integer or None, got {max_docs}")
    kind, where = resolve_source(source)
    if kind == "hub":
        ds = load_hub_split(str(where), config, split or "train")
        texts = _texts_from_dataset(ds, f"hub dataset {where!r}", text_field, max_docs)
    elif kind == "dir":
        assert isinstance(where, Path)
        texts = _texts_from_dataset(load_disk_split(where, split), str(where), text_field, max_docs)
    else:
        assert isinstance(where, Path)
        suffix = where.suffix.lower()
        if suffix == ".jsonl":
            records = ((f"{where}: line {n}", rec) for n, rec in iter_jsonl(where))
            texts = _texts_from_records(records, text_field, max_docs)
        elif suffix == ".json":
            items = read_json_list(where)
            texts = _texts_from_records(((f"{where}: item {i}", r) for i, r in enumerate(items)), text_field, max_docs)
        elif suffix == ".parquet":
            rows = read_parquet_rows(where)
            if rows and text_field not in rows[0]:
                raise DataError(f"{where}: missing column {text_field!r} (columns: {sorted(rows[0])})")
            texts = _texts_from_records(((f"{where}: row {i}", r) for i, r in enumerate(rows)), text_field, max_docs)
        else:
            texts = []
            for _, line in iter_text_lines(where):
                if line.strip():
                    texts.append(line)
                    if max_docs is not None and len(texts) >= max_docs:
                        break  # stop before reading any further line
    if not texts:
        raise DataError(f"{source}: contains no documents")
    return texts


# --------------------------------------------------------------------------------------------------- chunking


def chunk_token_ids(
    docs_token_ids: Iterable[Sequence[int]],
    chunk_len: int,
    bos_id: int,
    eos_id: int,
    max_chunks: int | None = None,
) -> Iterator[list[int]]:
    """Pack tokenised documents into fixed-length training chunks, streaming.

    Documents are joined with ``eos_id`` between consecutive documents (none after the last; empty documents are
    skipped), and the stream is cut into pieces of ``chunk_len - 1`` tokens, each yielded as ``[bos_id, *piece]``
    (exactly ``chunk_len`` tokens). The incomplete last piece is dropped. Documents are consumed lazily: no more
    of ``docs_token_ids`` is read than needed for the chunks yielded, and at most one document plus one chunk is
    buffered. Stops after ``max_chunks`` chunks when given.
    """
    if chunk_len < 2:
        raise ValueError(f"chunk_len must be >= 2 (BOS plus at least one token), got {chunk_len}")
    if max_chunks is not None and max_chunks < 0:
        raise ValueError(f"max_chunks must be >= 0 or None, got {max_chunks}")
    if max_chunks == 0:
        return
    body = chunk_len - 1
    buf: list[int] = []
    emitted = 0
    first = True
    for doc in docs_token_ids:
        tokens = doc.tolist() if hasattr(doc, "tolist") else list(doc)
        if not tokens:
            continue
        if not first:
            buf.append(eos_id)
        first = False
        buf.extend(tokens)
        start = 0
        while len(buf) - start >= body:
            yield [bos_id, *buf[start : start + body]]
            start += body
            emitted += 1
            if max_chunks is not None and emitted >= max_chunks:
                return
        del buf[:start]
