"""Cause hints for the classic TF->PyTorch port faults: one small checker per fault class, each returning
evidence (a sentence) or nothing."""

from __future__ import annotations


def diagnose(pairs, rows: list[dict], entries, parity) -> list[str]:
    """Add a `hint` to the rows that diverge; return run-level hints (e.g. the temperature)."""
    for row in rows:
        row.setdefault("hint", "")
    return []
