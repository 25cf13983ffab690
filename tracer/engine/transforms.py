"""Named, invertible layout transforms from Keras tensors to PyTorch parameters.

Each transform is data (a name, a forward and an inverse), so a mapping can name it in a CSV and a test can
check that it inverts exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from tracer.errors import ConversionError


@dataclass(frozen=True)
class Transform:
    name: str
    forward: Callable[[np.ndarray], np.ndarray]  # Keras layout -> PyTorch layout
    inverse: Callable[[np.ndarray], np.ndarray]  # PyTorch layout -> Keras layout
    keras_rank: tuple[int, ...]  # ranks accepted on the Keras side

    def __call__(self, array: np.ndarray) -> np.ndarray:
        return np.asarray(self.view(array), order="C")  # contiguous, for torch.from_numpy

    def view(self, array: np.ndarray) -> np.ndarray:
        """The PyTorch-layout array as a view where it can be (no copy): for a caller that copies it anyway."""
        if array.ndim not in self.keras_rank:
            raise ConversionError(f"transform `{self.name}` expects rank {self.keras_rank}, got shape {array.shape}")
        return self.forward(array)

    def shape(self, keras_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The PyTorch shape this transform produces, computed without data."""
        return tuple(self(np.empty(keras_shape, dtype=np.int8)).shape)


def _transpose(*axes: int) -> Callable[[np.ndarray], np.ndarray]:
    return lambda a: np.transpose(a, axes)


TRANSFORMS: dict[str, Transform] = {
    t.name: t
    for t in (
        Transform("identity", lambda a: a, lambda a: a, (1, 2)),
        Transform("scalar", lambda a: a.reshape(()), lambda a: a.reshape(()), (0,)),
        # Conv2D kernels are (H, W, in, out); torch wants (out, in, H, W).
        Transform("conv", _transpose(3, 2, 0, 1), _transpose(2, 3, 1, 0), (4,)),
        # DepthwiseConv2D kernels are (H, W, C, multiplier=1); torch's grouped conv wants (C, 1, H, W).
        Transform("depthwise", _transpose(2, 3, 0, 1), _transpose(2, 3, 0, 1), (4,)),
        # Dense kernels are (in, out); nn.Linear stores (out, in).
        Transform("dense", _transpose(1, 0), _transpose(1, 0), (2,)),
        # BatchNormalization(virtual_batch_size=...) keeps its vectors as [1, 1, 1, 1, C].
        Transform("bn_squeeze", lambda a: a.reshape(-1), lambda a: a.reshape(1, 1, 1, 1, -1), (1, 5)),
    )
}


def get_transform(name: str) -> Transform:
    try:
        return TRANSFORMS[name]
    except KeyError:
        raise ConversionError(f"unknown transform `{name}`; known: {', '.join(TRANSFORMS)}") from None
