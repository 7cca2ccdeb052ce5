"""Record types shared by every loader: multiple-choice items and text corpora."""

from __future__ import annotations

from dataclasses import dataclass


class DataError(ValueError):
    """A data file is missing, empty, malformed or of the wrong encoding."""


@dataclass(frozen=True)
class MCQItem:
    """One multiple-choice question in the WMDP/MMLU record shape ``{question, choices[4], answer}``.

    ``subject`` names the MMLU subject or world domain; ``template`` names the question frame (world only).
    """

    question: str
    choices: tuple[str, ...]
    answer: int
    subject: str = ""
    template: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.question, str) or not self.question.strip():
            raise DataError("MCQ item has an empty question")
        if len(self.choices) < 2:
            raise DataError(f"MCQ item needs at least 2 choices, got {len(self.choices)}: {self.question[:60]!r}")
        if not (0 <= self.answer < len(self.choices)):
            raise DataError(
                f"MCQ answer index {self.answer} out of range for {len(self.choices)} choices: {self.question[:60]!r}"
            )

    def to_record(self) -> dict:
        return {"question": self.question, "choices": list(self.choices), "answer": self.answer,
                "subject": self.subject, "template": self.template}
