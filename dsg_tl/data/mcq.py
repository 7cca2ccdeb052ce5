"""Multiple-choice loaders: WMDP and MMLU, from local files, ``save_to_disk`` folders or the Hugging Face hub.

Every loader returns ``list[MCQItem]`` with exactly four choices per item; every malformed input raises one
:class:`DataError` naming the file and the item index at fault (missing field, answer out of range, wrong number
of choices, empty file or list, invalid JSON or CSV, non-UTF-8 bytes).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from dsg_tl.data.corpora import (
    PathLike,
    iter_jsonl,
    load_disk_split,
    load_hub_split,
    read_json_list,
    read_parquet_rows,
    read_text_file,
    resolve_source,
)
from dsg_tl.data.types import DataError, MCQItem

if TYPE_CHECKING:
    import datasets

__all__ = ["MMLU_CSV_HEADER", "N_CHOICES", "load_mcq", "load_mmlu", "load_wmdp", "mcq_from_record"]

N_CHOICES = 4
MMLU_CSV_HEADER = ("question", "choice0", "choice1", "choice2", "choice3", "answer")
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


# ------------------------------------------------------------------------------------------------- records


def _parse_answer(value: Any, where: str, n_choices: int) -> int:
    """Answer as a 0-based index: an int, a digit string, or a letter (``"A"`` is 0)."""
    expected = f"expected 0-{n_choices - 1} or A-{_LETTERS[n_choices - 1]}"
    if isinstance(value, bool):
        raise DataError(f"{where}: answer must be an integer index, got a boolean ({expected})")
    if isinstance(value, int):
        index = value
    elif isinstance(value, str):
        token = value.strip()
        if token.lstrip("-").isdigit():
            index = int(token)
        elif len(token) == 1 and token.upper() in _LETTERS:
            index = _LETTERS.index(token.upper())
        else:
            raise DataError(f"{where}: answer {value!r} is not an index or a letter ({expected})")
    else:
        raise DataError(f"{where}: answer must be an integer index, got {type(value).__name__} ({expected})")
    if not 0 <= index < n_choices:
        raise DataError(f"{where}: answer {value!r} out of range for {n_choices} choices ({expected})")
    return index


def mcq_from_record(record: Any, where: str, *, subject: str = "", n_choices: int = N_CHOICES) -> MCQItem:
    """Validate one ``{question, choices, answer[, subject]}`` record; ``where`` prefixes every error message."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object with question, choices, answer; got {type(record).__name__}")
    for key in ("question", "choices", "answer"):
        if key not in record:
            raise DataError(f"{where}: missing field {key!r} (fields: {sorted(record)})")
    question = record["question"]
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: question must be a non-empty string, got {question!r:.60}")
    choices = record["choices"]
    if isinstance(choices, str) or not isinstance(choices, Sequence):
        raise DataError(f"{where}: choices must be a list of strings, got {type(choices).__name__}")
    if len(choices) != n_choices:
        raise DataError(f"{where}: expected {n_choices} choices, got {len(choices)}")
    for j, choice in enumerate(choices):
        if not isinstance(choice, str):
            raise DataError(f"{where}: choice {j} must be a string, got {type(choice).__name__}")
    answer = _parse_answer(record["answer"], where, n_choices)
    row_subject = record.get("subject")
    if isinstance(row_subject, str) and row_subject:
        subject = row_subject
    try:
        return MCQItem(question=question, choices=tuple(choices), answer=answer, subject=subject)
    except DataError as e:  # defensive: MCQItem's own checks, located
        raise DataError(f"{where}: {e}") from e


def _file_records(path: Path) -> list[tuple[str, Any]]:
    """``(where, record)`` pairs from a JSON list, jsonl or parquet file."""
    suffix = path.suffix.lower()
    if suffix == ".json":
        return [(f"{path}: item {i}", rec) for i, rec in enumerate(read_json_list(path))]
    if suffix == ".jsonl":
        return [(f"{path}: item {i} (line {n})", rec) for i, (n, rec) in enumerate(iter_jsonl(path))]
    if suffix == ".parquet":
        return [(f"{path}: item {i}", rec) for i, rec in enumerate(read_parquet_rows(path))]
    raise DataError(f"{path}: unsupported file type {suffix!r} (expected .json, .jsonl or .parquet)")


def _dataset_records(ds: datasets.Dataset, label: str) -> Iterable[tuple[str, Any]]:
    return ((f"{label}: item {i}", row) for i, row in enumerate(ds))


def _items(records: Iterable[tuple[str, Any]], label: str, *, subject: str = "") -> list[MCQItem]:
    items = [mcq_from_record(rec, where, subject=subject) for where, rec in records]
    if not items:
        raise DataError(f"{label}: contains no items")
    return items


# --------------------------------------------------------------------------------------------------- WMDP


def load_wmdp(
    source: PathLike, split: str = "test", *, config: str = "wmdp-bio", subject: str = ""
) -> list[MCQItem]:
    """Load WMDP questions.

    ``source`` is a local JSON list of ``{question, choices, answer}`` (the CAIS release, e.g.
    ``bio_questions.json``), a jsonl or parquet file with those fields, a folder of the CAIS release
    (``{bio,cyber,chem}_questions.json``, picked by ``config``), a ``save_to_disk`` folder (``split`` picks from a
    ``DatasetDict``), or, only when no such local path exists, a hub name such as ``"cais/wmdp"`` loaded with
    ``config`` and ``split``. ``subject`` is stored on every item.
    """
    kind, where = resolve_source(source)
    if kind == "hub":
        label = f"hub dataset {where!r} ({config}, {split})"
        return _items(_dataset_records(load_hub_split(str(where), config, split), label), label, subject=subject)
    assert isinstance(where, Path)
    if kind == "dir":
        release_file = where / f"{config.removeprefix('wmdp-')}_questions.json"
        if release_file.is_file():
            return _items(_file_records(release_file), str(release_file), subject=subject)
        ds = load_disk_split(where, split)
        return _items(_dataset_records(ds, str(where)), str(where), subject=subject)
    return _items(_file_records(where), str(where), subject=subject)


# --------------------------------------------------------------------------------------------------- MMLU


def _read_mmlu_csv(path: Path, subject: str) -> list[MCQItem]:
    """One MMLU CSV: with the header ``question,choice0..choice3,answer`` (answer 0-3), or header-less (answer A-D)."""
    text = read_text_file(path)
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    reader = csv.reader(io.StringIO(text, newline=""))
    items: list[MCQItem] = []
    index = 0
    first = True
    try:
        for row in reader:
            if not row or all(not cell.strip() for cell in row):
                continue
            if first:
                first = False
                if [cell.strip().lower() for cell in row] == list(MMLU_CSV_HEADER):
                    continue
            where = f"{path}: item {index} (line {reader.line_num})"
            if len(row) != N_CHOICES + 2:
                raise DataError(
                    f"{where}: expected {N_CHOICES + 2} columns (question, {N_CHOICES} choices, answer), "
                    f"got {len(row)}"
                )
            record = {"question": row[0], "choices": row[1 : 1 + N_CHOICES], "answer": row[-1]}
            items.append(mcq_from_record(record, where, subject=subject))
            index += 1
    except csv.Error as e:
        raise DataError(f"{path}: line {reader.line_num}: malformed CSV: {e}") from e
    if not items:
        raise DataError(f"{path}: contains no items")
    return items


def _subject_from_filename(path: Path, split: str) -> str:
    return path.stem.removesuffix(f"_{split}")


def _load_mmlu_csv_dir(folder: Path, subjects: list[str] | None, split: str) -> list[MCQItem]:
    split_dir = folder / split if (folder / split).is_dir() else folder
    if subjects is None:
        files = sorted(split_dir.glob(f"*_{split}.csv"))
        if not files:
            raise DataError(f"{split_dir}: no MMLU files named '{{subject}}_{split}.csv'")
    else:
        files = [split_dir / f"{s}_{split}.csv" for s in subjects]
        for f in files:
            if not f.is_file():
                raise DataError(f"{f}: no such MMLU file (subject {f.stem.removesuffix('_' + split)!r})")
    items: list[MCQItem] = []
    for f in files:
        items.extend(_read_mmlu_csv(f, _subject_from_filename(f, split)))
    return items


def _filter_subjects(items: list[MCQItem], subjects: list[str] | None, label: str) -> list[MCQItem]:
    if subjects is None:
        return items
    wanted = set(subjects)
    kept = [item for item in items if item.subject in wanted]
    missing = sorted(wanted - {item.subject for item in kept})
    if missing:
        raise DataError(f"{label}: no items for subject(s) {missing}")
    return kept


def load_mmlu(
    source: PathLike, subjects: str | Sequence[str] | None = None, split: str = "test"
) -> list[MCQItem]:
    """Load MMLU questions, each item's ``subject`` set.

    ``source`` is one of: a folder holding ``{split}/{subject}_{split}.csv`` (header
    ``question,choice0,choice1,choice2,choice3,answer`` with answer 0-3, or the header-less original layout with
    answer A-D); a single such CSV file; a ``save_to_disk`` folder with features question, subject, choices,
    answer (ClassLabel or int); a JSON/jsonl/parquet file with those fields; or, only when no such local path
    exists, a hub name such as ``"cais/mmlu"`` (config ``"all"`` or one config per subject). ``subjects=None``
    loads every subject found; otherwise only those, and a subject with no items is an error.
    """
    wanted = [subjects] if isinstance(subjects, str) else (list(subjects) if subjects is not None else None)
    if wanted is not None and not wanted:
        raise ValueError("subjects must be None or a non-empty list of subject names")
    kind, where = resolve_source(source)
    if kind == "hub":
        name = str(where)
        items = []
        for config in wanted if wanted is not None else ["all"]:
            label = f"hub dataset {name!r} ({config}, {split})"
            ds = load_hub_split(name, config, split)
            items.extend(_items(_dataset_records(ds, label), label, subject="" if config == "all" else config))
        return _filter_subjects(items, wanted, f"hub dataset {name!r}")
    assert isinstance(where, Path)
    if kind == "dir":
        if (where / "state.json").is_file() or (where / "dataset_dict.json").is_file():
            ds = load_disk_split(where, split)
            return _filter_subjects(_items(_dataset_records(ds, str(where)), str(where)), wanted, str(where))
        return _load_mmlu_csv_dir(where, wanted, split)
    if where.suffix.lower() == ".csv":
        return _filter_subjects(_read_mmlu_csv(where, _subject_from_filename(where, split)), wanted, str(where))
    return _filter_subjects(_items(_file_records(where), str(where)), wanted, str(where))


def load_mcq(source: PathLike, kind: Literal["wmdp", "mmlu"], **kwargs: Any) -> list[MCQItem]:
    """Dispatch to :func:`load_wmdp` or :func:`load_mmlu` by ``kind``; ``kwargs`` go to the loader."""
    if kind == "wmdp":
        return load_wmdp(source, **kwargs)
    if kind == "mmlu":
        return load_mmlu(source, **kwargs)
    raise ValueError(f"unknown MCQ kind {kind!r}; expected 'wmdp' or 'mmlu'")
