"""Copy the checkpoint into both models, reading each tensor once, and account for coverage both ways."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import google_crc32c
import numpy as np
import torch

from tracer.errors import BadInputError, ConversionError
from tracer.engine.state import StateWriter
from tracer.engine.mapping import Entry, WeightMap
from tracer.progress import progress
from tracer.engine.transforms import get_transform

logger = logging.getLogger(__name__)


@dataclass
class Coverage:
    hf_tensors_written: int
    hf_tensors_total: int
    checkpoint_weights_used: int
    checkpoint_weights_total: int
    derived: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("hf_tensors_written", "hf_tensors_total",
                                              "checkpoint_weights_used", "checkpoint_weights_total")}


_CHUNK = 1 << 24


def tensor_checksum(array: np.ndarray) -> str:
    """A short content hash (dtype, shape, bytes; CRC32C, hardware-fast): the mapping file's `keras_checksum` /
    `hf_checksum`, and what the reload check compares."""
    a = np.ascontiguousarray(array)
    crc = google_crc32c.value(f"{a.dtype.str}:{'x'.join(map(str, a.shape))}:".encode())
    flat = a.reshape(-1).view(np.uint8)
    for start in range(0, flat.size, _CHUNK):  # the C extension takes bytes only: copy a bounded chunk at a time
        crc = google_crc32c.extend(crc, flat[start:start + _CHUNK].tobytes())
    return f"{crc:08x}"


def transfer(
    read: Callable[[str], np.ndarray],
    checkpoint_names: list[str],
    weight_map: WeightMap,
    hf_model: torch.nn.Module | StateWriter,
    allow_nonfinite: bool = False,
    target: str = "HF model",
    source: str = "",
) -> Coverage | None:
    """Write the checkpoint weights `weight_map` names into the HF model, reading each tensor once.

    Strict: a checkpoint weight no entry uses and an HF tensor left unwritten are errors that name the tensors.
    Given a model, every tensor must be written by this call; given a `StateWriter`, the caller writes the rest
    (another tower) and calls `finish()` itself: then this returns None. `target` (the HF class) and `source`
    (the checkpoint it expects, e.g. "coyo-align ALIGN"; default "<target>-style") name them in the errors: the
    engine names no model.
    """
    if weight_map.unmatched:
        raise ConversionError(
            f"{len(weight_map.unmatched)} checkpoint weight(s) have no place in {target}: "
            f"{weight_map.unmatched[:20]}; the checkpoint holds weights {target} does not have (is it a "
            f"{source or f'{target}-style'} checkpoint?), or your --mapping_file lacks them: add them to it, or run with --trace "
            "to infer them"
        )
    writer = hf_model if isinstance(hf_model, StateWriter) else StateWriter(hf_model)
    nonfinite, tensors = [], {}
    for entry in progress(weight_map.entries, desc="copy weights", unit="tensor"):
        array = read(entry.variable)
        if not np.isfinite(array).all():
            nonfinite.append(entry.variable)
            if not allow_nonfinite:
                continue
        transform, materialized = get_transform(entry.transform), writer.materialized(entry.parameter)
        value = transform.view(array) if materialized else transform(array)  # copied into place, or kept as is
        needed = writer.expected.get(entry.parameter, (value.shape,))[0]
        if tuple(value.shape) != tuple(needed):
            keras_needed = transform.inverse(np.empty(needed, array.dtype)).shape
            raise ConversionError(
                f"`{entry.variable}`: checkpoint shape {array.shape}, but the {target} derived from the checkpoint's other "
                f"variables needs {keras_needed} (as `{entry.parameter}` {tuple(needed)}); the checkpoint's layers "
                f"do not fit one {target} configuration, so it cannot be converted (was it edited or assembled from "
                "several models?)")
        entry.hf_shape = tuple(value.shape)
        entry.keras_checksum = tensor_checksum(array)
        if materialized:  # copied into place now (any strides): nothing accumulates
            writer.write({entry.parameter: torch.from_numpy(value)})
            entry.hf_checksum = tensor_checksum(writer.tensor(entry.parameter).numpy())
        else:  # becomes the parameter's storage: no second copy
            entry.hf_checksum = tensor_checksum(value)
            tensors[entry.parameter] = torch.from_numpy(value)
    if nonfinite:
        if not allow_nonfinite:
            raise BadInputError(
                f"{len(nonfinite)} weight(s) hold NaN or Inf: {nonfinite[:20]}; the checkpoint is damaged or its "
                "training diverged: use an earlier checkpoint, or pass --allow_nonfinite to convert it anyway"
            )
        logger.warning("converting %d weight(s) that hold NaN or Inf: %s", len(nonfinite), nonfinite[:20])
    writer.write(tensors)  # the arrays become the parameters' storage: no second copy
    if writer is hf_model:
        return None
    return coverage_of(writer, weight_map.entries, len(checkpoint_names))


def coverage_of(writer: StateWriter, entries: list[Entry], total: int) -> Coverage:
    """Finish the writer (strict) and count what was written. A tensor left unwritten is named with the checkpoint
    layer its siblings came from: that layer lacks a variable."""
    layer_of = {e.parameter.rsplit(".", 1)[0]: e.variable.rsplit("/", 1)[0] for e in entries}

    def missing(names: list[str]) -> str:
        where = [f"`{n}`" + (f" (the checkpoint's layer `{layer_of[n.rsplit('.', 1)[0]]}` lacks it)"
                             if n.rsplit(".", 1)[0] in layer_of else "") for n in names[:10]]
        return (f"{len(names)} weight(s) missing from the checkpoint: {', '.join(where)}; the checkpoint is "
                "incomplete: use the complete checkpoint its training saved")

    derived = writer.finish(missing)
    return Coverage(hf_tensors_written=len(writer.written), hf_tensors_total=len(writer.expected),
                    checkpoint_weights_used=len(entries), checkpoint_weights_total=total, derived=derived)
