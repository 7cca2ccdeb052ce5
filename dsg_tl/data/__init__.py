"""Corpora and multiple-choice loaders (world, WMDP, MMLU, MUSE, WikiText), one interface."""

from dsg_tl.data.types import DataError, MCQItem

__all__ = ["DataError", "MCQItem"]
