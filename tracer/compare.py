"""Compare the two models' outputs: metrics and tolerances for the final embeddings."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

DEFAULT_ATOL = 1e-3  # the original converter's tolerance on L2-normalised embeddings


def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))) if np.size(a) else 0.0


def cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    """The smallest row-wise cosine similarity between two batches of vectors."""
    a = np.asarray(a, np.float64).reshape(len(a), -1)
    b = np.asarray(b, np.float64).reshape(len(b), -1)
    num = np.sum(a * b, axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.min(num / np.maximum(den, 1e-30))) if len(a) else 1.0


@dataclass
class Parity:
    image_embeds_max_abs: float
    text_embeds_max_abs: float
    image_embeds_cosine_min: float
    text_embeds_cosine_min: float
    temperature_checkpoint: float
    temperature_hf: float
    atol: float

    @property
    def ok(self) -> bool:
        return (
            self.image_embeds_max_abs <= self.atol
            and self.text_embeds_max_abs <= self.atol
            and abs(self.temperature_checkpoint - self.temperature_hf) <= 1e-7 * max(1.0, abs(self.temperature_checkpoint))
        )

    def as_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}

    def describe(self) -> str:
        return (
            f"image_embeds max|Δ| {self.image_embeds_max_abs:.2e} (cos ≥ {self.image_embeds_cosine_min:.7f}), "
            f"text_embeds max|Δ| {self.text_embeds_max_abs:.2e} (cos ≥ {self.text_embeds_cosine_min:.7f}), "
            f"temperature checkpoint {self.temperature_checkpoint:.6g} / hf {self.temperature_hf:.6g}, atol {self.atol:g}"
        )


def compare_embeddings(keras: dict, hf: dict, temperature_checkpoint: float, temperature_hf: float,
                       atol: float = DEFAULT_ATOL) -> Parity:
    """`keras` and `hf` each hold `image_embeds` and `text_embeds` (L2-normalised, numpy)."""
    return Parity(
        image_embeds_max_abs=max_abs(keras["image_embeds"], hf["image_embeds"]),
        text_embeds_max_abs=max_abs(keras["text_embeds"], hf["text_embeds"]),
        image_embeds_cosine_min=cosine_min(keras["image_embeds"], hf["image_embeds"]),
        text_embeds_cosine_min=cosine_min(keras["text_embeds"], hf["text_embeds"]),
        temperature_checkpoint=float(temperature_checkpoint),
        temperature_hf=float(temperature_hf),
        atol=atol,
    )


def to_keras_layout(torch_array: np.ndarray, keras_shape: tuple[int, ...]) -> np.ndarray:
    """A torch activation in Keras layout: NCHW -> NHWC, then singleton axes reconciled by a reshape."""
    a = np.transpose(torch_array, (0, 2, 3, 1)) if torch_array.ndim == 4 else torch_array
    if tuple(a.shape) != tuple(keras_shape) and a.size == int(np.prod(keras_shape)):
        a = a.reshape(keras_shape)
    return a


def to_torch_layout(keras_array: np.ndarray, torch_shape: tuple[int, ...]) -> np.ndarray:
    """A Keras activation in torch layout: NHWC -> NCHW, then singleton axes reconciled by a reshape."""
    a = np.transpose(keras_array, (0, 3, 1, 2)) if keras_array.ndim == 4 and len(torch_shape) == 4 else keras_array
    if tuple(a.shape) != tuple(torch_shape) and a.size == int(np.prod(torch_shape)):
        a = a.reshape(torch_shape)
    return a


@dataclass
class Divergence:
    max_abs: float
    mean_abs: float
    rel_l2: float
    cosine: float


def divergence(reference: np.ndarray, candidate: np.ndarray) -> Divergence:
    """How far `candidate` is from `reference` (same shape), in float64."""
    r = np.asarray(reference, np.float64).ravel()
    c = np.asarray(candidate, np.float64).ravel()
    d = c - r
    rn, cn = np.linalg.norm(r), np.linalg.norm(c)
    return Divergence(
        max_abs=float(np.max(np.abs(d))) if d.size else 0.0,
        mean_abs=float(np.mean(np.abs(d))) if d.size else 0.0,
        rel_l2=float(np.linalg.norm(d) / max(rn, 1e-30)),
        cosine=float(np.dot(r, c) / max(rn * cn, 1e-30)) if rn and cn else float(rn == cn),
    )
