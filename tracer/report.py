"""Write the divergence report of a traced run: layers.csv, blocks.csv, mapping.csv, summary.json, report.html.

Every file is written into a temporary folder beside the destination and renamed into place at the end, so an
interrupted run never leaves a half-written report.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd

from .mapping import write_mapping

LAYER_COLUMNS = [
    "tower", "order", "block", "keras_layer", "keras_class", "hf_module", "hf_class", "keras_shape", "hf_shape",
    "max_abs", "mean_abs", "rel_l2", "cosine", "local_max_abs", "local_rel_l2", "growth", "status",
    "weights", "mapping_source",
]


def default_run_name(checkpoint_path: str) -> str:
    path = Path(checkpoint_path.rstrip("/"))
    name = f"{path.parent.name}-{path.name}" if path.parent.name else path.name
    return f"{name or 'checkpoint'}-{time.strftime('%Y%m%d-%H%M%S')}"


def layers_frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=LAYER_COLUMNS)


def write_report(result, destination: str | Path, checkpoint_path: str) -> Path:
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{destination.name}.partial-", dir=destination.parent))
    try:
        layers_frame(result.rows).to_csv(tmp / "layers.csv", index=False)
        write_mapping(result.entries, tmp / "mapping.csv")
        (tmp / "summary.json").write_text(json.dumps(summary(result, checkpoint_path), indent=2) + "\n")
        if destination.exists():
            shutil.rmtree(destination)
        os.replace(tmp, destination)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return destination


def summary(result, checkpoint_path: str) -> dict:
    from collections import Counter

    p = result.parity
    statuses = Counter(r["status"] for r in result.rows)
    return {
        "checkpoint": str(checkpoint_path),
        "verdict": "diverged" if (statuses.get("diverged") or not p.ok) else "match",
        "image_embeds_max_abs": p.image_embeds_max_abs,
        "text_embeds_max_abs": p.text_embeds_max_abs,
        "image_embeds_cosine_min": p.image_embeds_cosine_min,
        "text_embeds_cosine_min": p.text_embeds_cosine_min,
        "temperature": {"checkpoint": p.temperature_checkpoint, "hf": p.temperature_hf},
        "coverage": result.coverage.as_dict() if result.coverage else None,
        "mapping_sources": dict(Counter(e.source for e in result.entries)),
        "mapping_statuses": dict(Counter(e.status for e in result.entries)),
        "layer_statuses": dict(statuses),
    }
