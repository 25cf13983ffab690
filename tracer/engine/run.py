"""`Run`: the typed result of a traced pair of models, what `tracer.trace` returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from tracer.engine.compare import FLOAT32, Tolerances
from tracer.engine.outputs import Outputs
from tracer.engine.hint import Hint
from tracer.engine.transfer import Coverage
from tracer.engine.row import LayerRow


@dataclass
class Run:
    rows: list[LayerRow]  # one per paired (or unpaired, computing) layer, the columns of layers.csv
    pairs: list  # the layer pairs (`pairing.Pair`), with their records
    entries: list  # the weight mapping (`mapping.Entry`)
    outputs: Outputs  # the models' outputs paired and compared
    hints: list[Hint] = field(default_factory=list)  # run-level cause hints
    # Table entries the tracer's inference disagrees with (`mapping.Conflict`, measured): resolved ones were settled
    # by the numbers (`--mapping auto`), the others are in use as the table gives them.
    conflicts: list = field(default_factory=list)
    unmapped_keras: list[str] = field(default_factory=list)  # Keras weights with no torch place
    unwritten_torch: list[str] = field(default_factory=list)  # torch tensors no Keras weight maps to
    preprocessing: list[str] = field(default_factory=list)  # Keras weights of preprocessing layers (Normalization)
    copied: bool = True  # the Keras weights were copied into the torch model
    timings: dict = field(default_factory=dict)
    title: str = "tracer report"
    part_titles: dict = field(default_factory=dict)
    report: Path | None = None
    tolerances: Tolerances = FLOAT32  # the thresholds the rows were judged by (the run's precision's)
    sensitivity: object = None  # `sensitivity.Sensitivity`: measured when an output missed and no layer is off

    # what `report` reads
    @property
    def parity(self) -> Outputs:
        return self.outputs

    @property
    def coverage(self) -> Coverage:
        used = len({e.variable for e in self.entries})
        total = used + len(self.unmapped_keras)
        written = len({e.parameter for e in self.entries})
        return Coverage(written, written + len(self.unwritten_torch), used, total)

    @property
    def unresolved(self) -> list:
        """The conflicts in use as the table gives them (the run fails on them once the report is written)."""
        return [c for c in self.conflicts if not c.resolved]

    @property
    def gaps(self) -> list[str]:
        """What the mapping leaves out, one line each."""
        out = []
        if self.unmapped_keras:
            out.append(f"{len(self.unmapped_keras)} Keras weight(s) have no torch place: {self.unmapped_keras[:10]}")
        if self.unwritten_torch:
            out.append(f"{len(self.unwritten_torch)} torch tensor(s) no Keras weight maps to: "
                       f"{self.unwritten_torch[:10]}")
        if self.unresolved:
            out.append(f"{len(self.unresolved)} mapping conflict(s) with the table: "
                       + "; ".join(map(str, self.unresolved[:5])))
        return out

    @property
    def verdict(self) -> str:
        """`match`, `ill-conditioned` (outputs off by what the original model itself moves by under round-off, no
        layer off: `sensitivity.rule`), `diverged` (a layer or an output is off), or `incomplete` (all matches,
        but the mapping leaves weights out)."""
        from tracer.engine.report import verdict

        word, _ = verdict(self.rows, self.outputs, self.sensitivity)
        return "incomplete" if word in ("match", "ill-conditioned") and self.gaps else word

    @property
    def layers(self) -> pd.DataFrame:
        from tracer.engine.report import layers_frame

        return layers_frame(self.rows)

    @property
    def blocks(self) -> pd.DataFrame:
        from tracer.engine.report import blocks_frame

        return blocks_frame(self.rows)

    @property
    def mapping(self) -> pd.DataFrame:
        from tracer.engine.report import mapping_frame

        return mapping_frame(self.entries)

    @property
    def first_local_divergence(self) -> dict | None:
        """The first row whose own computation is off (its local error over tolerance), or None."""
        from tracer.engine.report import first_divergences

        return first_divergences(self.rows, self.tolerances)[0]

    @property
    def summary(self) -> dict:
        from tracer.engine.report import summary, verdict_text

        data = summary(self, "")
        data["verdict"] = self.verdict
        data["verdict_text"] = verdict_text(self.verdict)
        data["verdict_reasons"] = data["verdict_reasons"] + self.gaps
        data["preprocessing_weights"] = self.preprocessing
        return data

    def save(self, destination: str | Path) -> Path:
        """layers.csv, blocks.csv, mapping.csv, summary.json and report.html in `destination` (replaced whole)."""
        from tracer.engine.report import write_report

        self.report = write_report(self, destination, "", data=self.summary)
        return self.report

    def __repr__(self) -> str:
        counts = self.layers["status"].value_counts().to_dict() if self.rows else {}
        return f"Run(verdict={self.verdict!r}, layers={len(self.rows)}, statuses={counts})"
