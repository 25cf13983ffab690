"""The reference's own sensitivity: how far the original model moves when its input moves by float32 round-off.

When the outputs miss tolerance but no layer diverges locally, the difference between the two models may be the
model's conditioning rather than the port: two correct float32 implementations differ by round-off at every op,
and an ill-conditioned input (an image far from what BatchNorm was calibrated on) grows that round-off to O(1)
through a deep network. The tracer then runs the Keras side once more on the input perturbed by one unit in the
last place (`perturb`) and, at each paired layer, sets the Keras-vs-HF accumulated error beside the
Keras-vs-perturbed-Keras error (`reference_sensitivity`). Where the port's error is within `SAME_SIZE` of the
reference's own, the verdict is `ill-conditioned` (rendered "match (ill-conditioned input)"); where it stands far
above, it is a fault.

Both runs are one Keras call on the batch [x; perturb(x)] (inference-mode layers act per example), and each
layer's two halves are compared as they come (`Meter`), so nothing of a layer is kept past its comparison.
Only float inputs are perturbed: a model fed only integers (token ids) has no sensitivity measured here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from tracer.engine.compare import ACCUMULATED_REL_L2, Sums, max_abs
from tracer.engine.hint import Hint
from tracer.engine.row import LayerRow, Status

SEED = 0
# "Of the same size": the port's error at most this many times the reference's own under a one-ulp input change.
# A correct port rounds differently at every op, not only at the input, so its error may stand a few times above
# the reference's single input perturbation; a fault the local re-runs missed adds an error of its own that is not
# amplified round-off and stands orders of magnitude above it (a BN eps change: >= 1e-3 relative where round-off
# gives 1e-7).
SAME_SIZE = 10.0
VERDICT = "ill-conditioned"
VERDICT_TEXT = "match (ill-conditioned input)"


def perturb(array: np.ndarray, seed: int = SEED) -> np.ndarray:
    """`array` with every element moved by one unit in the last place of its own dtype, up or down at random
    (fixed seed): the size of one rounding, the least any float implementation already differs by after its first
    op. Smaller would round back to the same numbers; larger would measure more than round-off. Non-float arrays
    (ids, masks) are returned unchanged."""
    a = np.asarray(array)
    if a.dtype.kind != "f":
        return a
    signs = np.random.default_rng(seed).integers(0, 2, size=a.shape).astype(a.dtype) * 2 - 1
    return (a + signs * np.spacing(a)).astype(a.dtype)


def perturbable(array: np.ndarray) -> bool:
    return np.asarray(array).dtype.kind == "f"


def doubled(array: np.ndarray, seed: int = SEED) -> np.ndarray:
    """[array; perturb(array)] along the batch axis (non-float arrays repeated as they are)."""
    a = np.asarray(array)
    return np.concatenate([a, perturb(a, seed)])


class Meter:
    """A record sink for a run on a `doubled` batch of `n` examples: for the records of `orders`, the `Sums` of the
    perturbed half against the plain half (`sums`, by order); `last`: both halves of the last record seen (the
    tower's or model's output). Every record's arrays are dropped once measured."""

    def __init__(self, orders: Iterable[int] | None, n: int):
        self.orders = None if orders is None else set(orders)
        self.n = n
        self.sums: dict = {}
        self.last: tuple[np.ndarray, np.ndarray] | None = None

    def __call__(self, record) -> None:
        from tracer.engine.lockstep import drop_arrays

        out = record.output
        if out is not None and getattr(out, "ndim", 0) and out.shape[0] == 2 * self.n:
            out = np.asarray(out)
            if self.orders is None or record.order in self.orders:
                self.sums.setdefault(record.order, Sums()).add(out[:self.n], out[self.n:])
            self.last = (out[:self.n], out[self.n:])
        drop_arrays(record)


def merge(into: dict[str, Sums], more: dict[str, Sums]) -> dict[str, Sums]:
    """Add one chunk's per-path sums to the run's (the chunks' examples add up as one pass over all gives)."""
    for path, s in more.items():
        into.setdefault(path, Sums()).merge(s)
    return into


def annotate(rows: list[LayerRow], sums: dict) -> None:
    """Set `reference_sensitivity` (and its max|Δ|) of the rows whose (tower, Keras layer) `sums` holds: the Keras
    layer against itself on the perturbed input. The others keep theirs (NaN until measured)."""
    for row in rows:
        s = sums.get((row.tower, row.keras_layer or ""))
        if s is not None:
            d = s.result()
            row.reference_sensitivity, row.reference_sensitivity_max_abs = d.rel_l2, d.max_abs


def explained(error: float, sensitivity: float) -> bool:
    """The port's `error` is of the size the reference itself moves by (`sensitivity`) under round-off: at most
    `SAME_SIZE` times it. NaN, or a reference that does not move at all, explains nothing."""
    return sensitivity > 0 and error <= SAME_SIZE * sensitivity


def row_explained(row: LayerRow) -> bool:
    return explained(row.rel_l2, row.reference_sensitivity)


def over_tolerance(row: dict, accumulated: float = ACCUMULATED_REL_L2) -> bool:
    """The row's accumulated error exceeds `accumulated` (the run's `Tolerances.accumulated_rel_l2`)."""
    return not row.rel_l2 <= accumulated  # NaN is over


def wanted(rows: list[LayerRow], off: bool, accumulated: float = ACCUMULATED_REL_L2) -> bool:
    """Whether the sensitivity is worth a second reference run: no layer diverges locally, and the outputs miss
    tolerance (`off`) or a row exceeds the accumulated tolerance."""
    if any(r.diverged for r in rows):
        return False
    return off or any(over_tolerance(r, accumulated) for r in rows)


@dataclass
class PartSensitivity:
    """One output (ALIGN: a tower's embeddings; a generic model: each output): the port's error (Keras vs HF,
    max|Δ|) beside the reference's own (Keras vs Keras on the perturbed input); NaN where not measured."""

    part: str
    error: float
    sensitivity: float
    tolerance: float
    tower: str = ""  # the rows' tower this output ends ("" : every row)

    @property
    def missed(self) -> bool:
        return not self.error <= self.tolerance

    @property
    def explained(self) -> bool:
        return explained(self.error, self.sensitivity)

    def as_dict(self) -> dict:
        return {"part": self.part, "error": self.error, "sensitivity": self.sensitivity,
                "tolerance": self.tolerance, "missed": self.missed, "explained": self.explained,
                "ratio": self.error / self.sensitivity if self.sensitivity > 0 else None}


def part(name: str, keras: np.ndarray, hf: np.ndarray, perturbed: np.ndarray, tolerance: float,
         tower: str = "") -> PartSensitivity:
    return PartSensitivity(name, max_abs(keras, hf), max_abs(keras, perturbed), tolerance, tower)


def breakdown(rows: list[LayerRow], accumulated: float = ACCUMULATED_REL_L2) -> dict | None:
    """Where the conditioning breaks down: the first row where the reference itself moves by more than the
    accumulated tolerance under round-off of its input."""
    row = next((r for r in rows if r.reference_sensitivity > accumulated), None)
    return _where(row) if row is not None else None


@dataclass
class Sensitivity:
    """The reference's own sensitivity on a run: per output (`parts`), and where it breaks down; the per-row
    figures are in the rows (`LayerRow.reference_sensitivity`)."""

    parts: list[PartSensitivity]
    breakdown: dict | None = None
    factor: float = SAME_SIZE
    perturbation: str = "one ulp per input element, random sign (seed 0)"
    accumulated: float = ACCUMULATED_REL_L2  # the run's accumulated tolerance (`Tolerances.accumulated_rel_l2`)

    def unexplained(self, rows: list[LayerRow]) -> list[LayerRow]:
        """The rows over the accumulated tolerance, in the towers of the missed outputs, that the reference's
        own sensitivity does not account for."""
        towers = {p.tower for p in self.parts if p.missed}
        return [r for r in rows if ("" in towers or r.tower in towers) and over_tolerance(r, self.accumulated)
                and not row_explained(r)]

    def as_dict(self, rows: list[LayerRow] | None = None) -> dict:
        out = {"parts": [p.as_dict() for p in self.parts], "breakdown": self.breakdown, "factor": self.factor,
               "perturbation": self.perturbation}
        if rows is not None:
            left = self.unexplained(rows)
            out["rows_measured"] = sum(math.isfinite(r.reference_sensitivity) for r in rows)
            out["rows_over_tolerance"] = sum(over_tolerance(r, self.accumulated) for r in rows)
            out["rows_unexplained"] = len(left)
            out["first_unexplained"] = _where(left[0]) if left else None
        return out


def rule(rows: list[LayerRow], sensitivity: Sensitivity | None) -> bool:
    """The verdict rule: the run is `ill-conditioned` (a match) when no layer diverges (locally, or by a jump where
    no local error is measured), an output misses its tolerance, and every missed output is within `SAME_SIZE` of
    what the reference itself moves by there. The outputs decide, not the rows: a single perturbation's
    per-layer figures scatter (a saturated gate moves little itself yet passes on what reaches it), so rows
    above the factor are reported (`Sensitivity.unexplained`) but do not overrule the outputs. A fault shows
    in a layer's own error (the local re-run) or, where none is measured, as a jump: both make a row diverged."""
    if sensitivity is None or any(r.diverged for r in rows):
        return False
    missed = [p for p in sensitivity.parts if p.missed]
    return bool(missed) and all(p.explained for p in missed)


def explanation(sensitivity: Sensitivity) -> str:
    """The verdict's sentence for an ill-conditioned run."""
    figures = "; ".join(f"{p.part}: Keras vs HF max|Δ| {p.error:.2e}, the original against itself "
                        f"{p.sensitivity:.2e}" for p in sensitivity.parts if p.missed)
    b = sensitivity.breakdown
    where = (f"; conditioning breaks down at {b['keras_layer'] or b['hf_module']} [{b['block']}]" if b else "")
    return (f"no layer is off on its own, and the original model itself moves as much under float32 round-off "
            f"of its input (within x{sensitivity.factor:g}): {figures}{where}. The input is ill-conditioned for "
            f"this model; no end-to-end tolerance means anything on it")


def amplified_hint(row: LayerRow) -> Hint | None:
    """The hint of an amplified row the reference's sensitivity explains, or None."""
    if row.status != Status.AMPLIFIED or not row_explained(row):
        return None
    moves, moves_abs = row.reference_sensitivity, row.reference_sensitivity_max_abs
    return Hint("amplified", f"amplified round-off: the original model itself moves by rel_l2 {moves:.2e} (max|Δ| "
                             f"{moves_abs:.2e}) here under round-off of its input; the port's accumulated rel_l2 "
                             f"{row.rel_l2:.2e} is of that size")


def _where(row: LayerRow) -> dict:
    keys = ("tower", "order", "block", "keras_layer", "hf_module", "rel_l2", "max_abs", "reference_sensitivity",
            "reference_sensitivity_max_abs")
    return {k: getattr(row, k) for k in keys}
