"""ALIGN's two parts, as the engine sees them: the towers, their outputs and the probe's size."""

from __future__ import annotations

import numpy as np

TOWERS = ("vision", "text")
FEATURES = {"vision": "image_features", "text": "text_features"}  # each tower's output, as AlignModel names it
PROBE_IMAGE_SIZE = 65  # the probe run's image side: call order and kinds do not depend on it (5 stride-2 steps: 65 -> 3)


def tower_of(name: str) -> str | None:
    """The tower an `AlignModel` parameter or module belongs to (None: the temperature)."""
    if name.startswith("vision_model"):
        return "vision"
    if name.startswith(("text_model", "text_projection")):
        return "text"
    return None


def largest_output(records, tower: str, image_size: int) -> float:
    """Elements per example of the largest output among a probe run's `records`, in a run on `image_size` pixel
    images: a vision activation grows with the image's area, a text one does not."""
    largest = max((int(np.prod(r.shape[1:])) for r in records if r.shape), default=1)
    return largest * ((image_size / PROBE_IMAGE_SIZE) ** 2 if tower == "vision" else 1.0)
