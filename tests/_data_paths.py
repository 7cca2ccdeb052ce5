"""Locate the real public data files used by the loader tests; skip cleanly when they are absent.

The folder is ``shared/data`` beside the repository root (``<repo>/../shared/data``), or ``$DSG_TL_SHARED_DATA``.
Its files are read in place and never copied into the repository.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the Hugging Face hub


def shared_data_dir() -> Path:
    """The shared data folder (it may not exist)."""
    override = os.environ.get("DSG_TL_SHARED_DATA")
    if override:
        return Path(override).expanduser().resolve()
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_path(*parts: str) -> Path:
    """A path inside the shared data folder; skips the calling test when it does not exist."""
    path = shared_data_dir().joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared test data not available: {path}")
    return path
