"""The two models' outputs, paired by order and shape and compared, one tolerance per output."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tracer.engine.compare import divergence, to_keras_layout
from tracer.engine.record import output_layout, to_numpy

DEFAULT_OUTPUT_ATOL = 1e-4  # max|Δ| on an output: float32 round-off through a deep model stays well within it


def flatten(value, name: str = "output") -> list[tuple[str, np.ndarray]]:
    """A model's outputs as (name, array) in order: a tensor, a tuple/list, a dict or a transformers ModelOutput
    (its non-None fields)."""
    if value is None:
        return []
    if hasattr(value, "shape") and hasattr(value, "dtype") and not isinstance(value, dict):
        array = to_numpy(value)
        return [] if array is None else [(name, array)]
    if hasattr(value, "to_tuple") and hasattr(value, "keys"):  # ModelOutput: an ordered dict of what is set
        value = {k: value[k] for k in value.keys()}
    if isinstance(value, dict):
        return [item for k, v in value.items() for item in flatten(v, str(k))]
    if isinstance(value, (list, tuple)):
        return [item for i, v in enumerate(value) for item in flatten(v, f"{name}[{i}]")]
    return []


@dataclass
class OutputPair:
    keras_name: str
    torch_name: str
    keras_shape: tuple[int, ...]
    torch_shape: tuple[int, ...]
    atol: float
    max_abs: float
    rel_l2: float
    cosine: float

    @property
    def ok(self) -> bool:
        return self.max_abs <= self.atol  # NaN fails


@dataclass
class Outputs:
    """The outputs compared; the "parity" of a traced run (what `report` and `diagnose` ask of it)."""

    pairs: list[OutputPair]
    keras_unpaired: list[str] = field(default_factory=list)
    torch_unpaired: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.pairs) and all(p.ok for p in self.pairs)

    def describe(self) -> str:
        return "; ".join(self.summary_lines({})) or "no outputs compared"

    def off(self, part: str) -> bool:
        return not self.ok

    def reasons(self) -> list[str]:
        out = [f"output {p.keras_name} max|Δ| {p.max_abs:.2e} > atol {p.atol:g}" for p in self.pairs if not p.ok]
        if not self.pairs:
            out.append("no output of the Keras model pairs with one of the torch model's by shape")
        return out

    def tolerances(self) -> dict:
        return {f"output_max_abs[{p.keras_name}]": p.atol for p in self.pairs}

    def summary_fields(self) -> dict:
        return {"outputs": [{"keras": p.keras_name, "torch": p.torch_name, "shape": list(p.keras_shape),
                             "max_abs": p.max_abs, "rel_l2": p.rel_l2, "cosine": p.cosine, "atol": p.atol,
                             "ok": p.ok} for p in self.pairs],
                "outputs_unpaired": {"keras": self.keras_unpaired, "torch": self.torch_unpaired}}

    def summary_lines(self, data: dict) -> list[str]:
        lines = [f"output {p.keras_name} ~ {p.torch_name}: max|Δ| {p.max_abs:.2e} (cos {p.cosine:.7f}), "
                 f"atol {p.atol:g}" for p in self.pairs]
        if self.keras_unpaired or self.torch_unpaired:
            lines.append(f"outputs not paired: Keras {self.keras_unpaired}, torch {self.torch_unpaired}")
        return lines

    def cards(self, data: dict) -> list[tuple[str, str, str, str]]:
        return [(f"{p.keras_name} max|Δ|", f"{p.max_abs:.2e}", f"cosine {p.cosine:.7f} · atol {p.atol:g}",
                 "good" if p.ok else "bad") for p in self.pairs]


def compare_outputs(keras_out: list[tuple[str, np.ndarray]], torch_out: list[tuple[str, np.ndarray]],
                    tolerances: dict | float | None = None, by_name: bool = False) -> Outputs:
    """Pair each Keras output with the next unused torch output of the same shape (up to NCHW/NHWC and singleton
    axes), in order, and compare; `by_name`: outputs of the same name only (an adapter named both sides').
    `tolerances`: one atol for all, or per Keras output name."""
    def atol_of(name: str) -> float:
        if isinstance(tolerances, (int, float)):
            return float(tolerances)
        return float((tolerances or {}).get(name, DEFAULT_OUTPUT_ATOL))

    pairs, used, start = [], set(), 0
    keras_unpaired = []
    for k_name, k in keras_out:
        found = None
        for j in range(start, len(torch_out)):
            t_name, t = torch_out[j]
            if by_name and t_name != k_name:
                continue
            if j not in used and (layout := output_layout(k.shape, t.shape, prefer_nchw=t.ndim == 4)) is not None:
                found = (j, t_name, t, layout)
                break
        if found is None:
            keras_unpaired.append(k_name)
            continue
        j, t_name, t, layout = found
        used.add(j)
        start = 0 if by_name else j + 1
        d = divergence(k, to_keras_layout(t, k.shape, layout))
        pairs.append(OutputPair(k_name, t_name, tuple(k.shape), tuple(t.shape), atol_of(k_name), d.max_abs,
                                d.rel_l2, d.cosine))
    torch_unpaired = [name for j, (name, _) in enumerate(torch_out) if j not in used]
    return Outputs(pairs, keras_unpaired, torch_unpaired)
