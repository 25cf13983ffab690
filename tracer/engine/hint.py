"""A cause hint: its class (a fault class of `diagnose.CLASSES`, or `within` / `upstream` / `amplified` /
`unexplained`) and the evidence, a sentence that names the numbers. Rows keep their hints as objects
(`row.LayerRow.hints`); layers.csv and summary.json hold them as text, `[class] evidence`, several joined by ` | `."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Hint:
    cls: str
    evidence: str

    def __str__(self) -> str:
        return f"[{self.cls}] {self.evidence}"

