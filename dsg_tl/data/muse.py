"""MUSE benchmark files (the authors' JSON layout): KnowMem QA, VerbMem prompts, raw forget articles.

Each loader reads one local JSON list and raises one :class:`DataError` naming the file and the item index for any
malformed input (missing field, non-string value, empty list or file, invalid JSON, non-UTF-8 bytes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dsg_tl.data.corpora import PathLike, read_json_list
from dsg_tl.data.types import DataError

__all__ = ["load_knowmem", "load_muse_raw", "load_verbmem"]


def _local_file(path: PathLike) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{path}: no such file")
    return p


def _string_records(path: PathLike, fields: tuple[str, str]) -> list[dict[str, str]]:
    """A JSON list of objects, each with non-empty string ``fields``; extra keys are dropped."""
    p = _local_file(path)
    out: list[dict[str, str]] = []
    for i, rec in enumerate(read_json_list(p)):
        where = f"{p}: item {i}"
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected an object with fields {list(fields)}, got {type(rec).__name__}")
        row: dict[str, str] = {}
        for key in fields:
            if key not in rec:
                raise DataError(f"{where}: missing field {key!r} (fields: {sorted(rec)})")
            value: Any = rec[key]
            if not isinstance(value, str):
                raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
            if not value.strip():
                raise DataError(f"{where}: field {key!r} is empty")
            row[key] = value
        out.append(row)
    return out


def load_knowmem(path: PathLike) -> list[dict[str, str]]:
    """KnowMem QA (``knowmem/forget_qa.json`` etc.): a list of ``{"question": str, "answer": str}``."""
    return _string_records(path, ("question", "answer"))


def load_verbmem(path: PathLike) -> list[dict[str, str]]:
    """VerbMem prompts (``verbmem/forget.json``): a list of ``{"prompt": str, "gt": str}`` (gt: the continuation)."""
    return _string_records(path, ("prompt", "gt"))


def load_muse_raw(path: PathLike) -> list[str]:
    """Raw articles (``raw/forget.json``): a JSON list of strings, returned verbatim.

    Empty strings are kept (the released News forget file has one), so counts match the source.
    """
    p = _local_file(path)
    items = read_json_list(p)
    for i, text in enumerate(items):
        if not isinstance(text, str):
            raise DataError(f"{p}: item {i}: expected a string, got {type(text).__name__}")
    return items
