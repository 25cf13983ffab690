"""Copy the checkpoint into both models, reading each tensor once, and account for coverage both ways."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import torch

from .errors import BadInputError, ConversionError
from .hf import write_state
from .mapping import Entry, WeightMap
from .progress import progress
from .transforms import get_transform

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


def tensor_checksum(array: np.ndarray) -> str:
    """A short content hash (dtype, shape, bytes): the mapping file's `keras_checksum` / `hf_checksum`."""
    a = np.ascontiguousarray(array)
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{a.dtype.str}:{'x'.join(map(str, a.shape))}:".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def transfer(
    read: Callable[[str], np.ndarray],
    checkpoint_names: list[str],
    weight_map: WeightMap | None,
    hf_model: torch.nn.Module | None,
    keras_variables: Mapping[str, object] | None = None,
    allow_nonfinite: bool = False,
) -> Coverage | None:
    """Write every checkpoint weight into the HF model (through `weight_map`) and/or the Keras reference
    (by name), reading each tensor once.

    Strict both ways: a checkpoint weight no entry uses, a Keras variable left unassigned and an HF tensor left
    unwritten are all errors that name the tensors.
    """
    if weight_map is None:  # Keras only: every checkpoint weight, by its own name
        weight_map = WeightMap([Entry(n, "", "identity") for n in checkpoint_names])
    elif weight_map.unmatched:
        raise ConversionError(
            f"{len(weight_map.unmatched)} checkpoint weight(s) have no place in AlignModel: "
            f"{weight_map.unmatched[:20]}; the checkpoint holds weights ALIGN does not have (is it a coyo-align "
            "ALIGN checkpoint?), or your --mapping_file lacks them: add them to it, or run with --trace to infer them"
        )
    if keras_variables is not None:
        missing = sorted(set(keras_variables) - set(checkpoint_names))
        extra = sorted(set(checkpoint_names) - set(keras_variables))
        if missing or extra:
            raise ConversionError(
                f"checkpoint and the ALIGN derived from it disagree: {len(missing)} variable(s) missing from the "
                f"checkpoint {missing[:10]}, {len(extra)} extra checkpoint weight(s) {extra[:10]}; the checkpoint is "
                "incomplete or holds more than coyo-align's ALIGN: use the complete checkpoint its training saved"
            )

    tensors: dict[str, torch.Tensor] = {}
    nonfinite = []
    for entry in progress(weight_map.entries, desc="copy weights", unit="tensor"):
        array = read(entry.variable)
        if not np.isfinite(array).all():
            nonfinite.append(entry.variable)
            if not allow_nonfinite:
                continue
        if keras_variables is not None:
            var = keras_variables[entry.variable]
            if tuple(var.shape) != array.shape:
                raise ConversionError(
                    f"`{entry.variable}`: checkpoint shape {array.shape}, but the ALIGN derived from the checkpoint's "
                    f"other variables needs {tuple(var.shape)}; the checkpoint's layers do not fit one ALIGN "
                    "configuration, so it cannot be converted (was it edited or assembled from several models?)"
                )
            var.assign(array)
        if hf_model is not None:
            value = get_transform(entry.transform)(array)
            entry.hf_shape = tuple(value.shape)
            entry.keras_checksum, entry.hf_checksum = tensor_checksum(array), tensor_checksum(value)
            tensors[entry.parameter] = torch.from_numpy(value)
    if nonfinite:
        if not allow_nonfinite:
            raise BadInputError(
                f"{len(nonfinite)} weight(s) hold NaN or Inf: {nonfinite[:20]}; the checkpoint is damaged or its "
                "training diverged: use an earlier checkpoint, or pass --allow_nonfinite to convert it anyway"
            )
        logger.warning("converting %d weight(s) that hold NaN or Inf: %s", len(nonfinite), nonfinite[:20])

    if hf_model is None:
        return None
    derived = write_state(hf_model, tensors)
    total = len(list(hf_model.state_dict()))
    return Coverage(
        hf_tensors_written=len(tensors) + len(derived),
        hf_tensors_total=total,
        checkpoint_weights_used=len(weight_map.entries),
        checkpoint_weights_total=len(checkpoint_names),
        derived=derived,
    )
