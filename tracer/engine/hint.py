"""A cause hint: its class (a fault class of `diagnose.CLASSES`, or `within` / `upstream` / `amplified` /
`unexplained`) and the evidence, a sentence that names the numbers. Rows keep their hints as objects (`hints`);
the `hint` column and summary.json hold them as text, `[class] evidence`, several joined by ` | `."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Hint:
    cls: str
    evidence: str

    def __str__(self) -> str:
        return f"[{self.cls}] {self.evidence}"


def set_hints(row: dict, hints: list[Hint]) -> None:
    """Give `row` these hints, as objects and as its `hint` text."""
    row["hints"] = list(hints)
    row["hint"] = " | ".join(map(str, hints))


def classes(row: dict) -> list[str]:
    """The classes of a row's hints, in order."""
    return [h.cls for h in row.get("hints") or ()]
