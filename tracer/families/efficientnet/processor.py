"""The image processor from the checkpoint's own preprocessing layers, reproducing Keras' arithmetic.

keras.applications' EfficientNet starts with `Rescaling(1/255)` and `Normalization(axis=-1)`, which computes
`(x - mean) / max(sqrt(variance), 1e-7)` from its stored `mean` and `variance`; models built with `weights="imagenet"`
then multiply by `1/sqrt(IMAGENET_STDDEV_RGB)` (tf_keras' fix for ImageNet files that store the std as the
variance, tensorflow#49930). `EfficientNetImageProcessorPil` computes `(x * rescale_factor - image_mean) /
image_std`, then divides by `image_std` once more when `include_top` is set: HF's own port of exactly that multiply.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from tracer.errors import BadInputError, ConversionError
from tracer.families.efficientnet.spec import EfficientNetSpec, Preprocessing

# keras.applications' Rescaling(1/255) (a constant of the architecture, no weight). The layer multiplies by the scale
# cast to float32; HF multiplies in float64 and rounds to float32, which for integer pixels is then the same product
# rounded once: bit-identical to Keras, where 1/255 in float64 would differ by an ulp.
RESCALE_FACTOR = float(np.float32(1.0 / 255.0))
KERAS_EPSILON = 1e-7  # tf_keras backend.epsilon(): Normalization's floor on sqrt(variance)


def imagenet_stddev() -> tuple[float, ...]:
    from tf_keras.src.applications.efficientnet import IMAGENET_STDDEV_RGB

    return tuple(float(s) for s in IMAGENET_STDDEV_RGB)


def derive_preprocessing(spec: EfficientNetSpec, read: Callable[[str], np.ndarray]) -> Preprocessing:
    """From the checkpoint's Normalization weights (read by checkpoint name)."""
    layer = spec.normalization_layer
    mean = np.asarray(read(f"{layer}/mean"), dtype=np.float32).reshape(-1)
    variance = np.asarray(read(f"{layer}/variance"), dtype=np.float32).reshape(-1)
    for what, value in (("mean", mean), ("variance", variance)):
        if value.shape != (3,) or not np.isfinite(value).all():
            raise ConversionError(f"`{layer}/{what}` is {value.tolist()}: expected 3 finite values (one per RGB "
                                  "channel); the checkpoint is damaged, re-export it")
    if (variance < 0).any():
        raise ConversionError(f"`{layer}/variance` {variance.tolist()} has negative entries; the checkpoint is damaged")
    # Keras' sqrt and max in float32; HF casts the Python floats back to these exact float32 values.
    std = np.maximum(np.sqrt(variance), np.float32(KERAS_EPSILON)).astype(np.float32)
    include_top = False
    if spec.imagenet_multiply:
        factors = np.float32([1.0 / math.sqrt(s) for s in imagenet_stddev()])
        if np.allclose(1.0 / factors, std, rtol=1e-6, atol=0):
            include_top = True  # the multiply is a second division by image_std: HF's include_top, as HF's port
        else:  # stored statistics that are not the ImageNet ones: fold the constant multiply into image_std
            std = (std.astype(np.float64) / factors.astype(np.float64)).astype(np.float32)
    accounted = {
        f"{layer}/mean": "image processor: image_mean",
        f"{layer}/variance": "image processor: image_std = sqrt(variance)",
        f"{layer}/count": "Normalization.adapt() sample count: unused at inference",
    }
    return Preprocessing(RESCALE_FACTOR, tuple(float(m) for m in mean), tuple(float(s) for s in std), include_top,
                         accounted)


def build_processor(spec: EfficientNetSpec, pre: Preprocessing | None = None, resample: str = "bicubic"):
    """`EfficientNetImageProcessorPil` (the torchvision-free backend) resizing straight to the model's input size;
    `pre` defaults to the spec's own (derived by the family from the checkpoint)."""
    pre = pre or spec.preprocessing
    if pre is None:
        raise ConversionError("the spec carries no preprocessing: derive it with EfficientNetFamily.derive (or pass "
                              "derive_preprocessing(spec, checkpoint.read))")
    from transformers import EfficientNetImageProcessorPil
    from transformers.image_utils import PILImageResampling

    try:
        method = PILImageResampling[resample.upper()]
    except KeyError:
        raise BadInputError(f"unknown resampling {resample!r}; use one of "
                            f"{', '.join(m.name.lower() for m in PILImageResampling)}") from None
    return EfficientNetImageProcessorPil(
        do_resize=True,
        size={"height": spec.image_size, "width": spec.image_size},
        resample=method,
        do_center_crop=False,
        crop_size={"height": spec.image_size, "width": spec.image_size},  # unused; not the class default's 289
        do_rescale=True,
        rescale_factor=pre.rescale_factor,
        rescale_offset=False,
        do_normalize=True,
        image_mean=list(pre.image_mean),
        image_std=list(pre.image_std),
        include_top=pre.include_top,
        do_convert_rgb=True,
    )


def pixels_0_255(images, processor) -> np.ndarray:
    """The processor's own resize with rescaling and normalisation off: float32 NHWC in 0..255 (the Keras input)."""
    out = np.asarray(processor(list(images), do_rescale=False, do_normalize=False, include_top=False,
                               return_tensors="np")["pixel_values"])
    return np.ascontiguousarray(out.transpose(0, 2, 3, 1)).astype(np.float32)


def normalized(pixels_nhwc: np.ndarray, processor) -> np.ndarray:
    """The processor's rescale + normalisation of 0..255 NHWC pixels already at the input size: float32 NCHW."""
    out = processor(list(pixels_nhwc), do_resize=False, input_data_format="channels_last", return_tensors="np")
    return np.asarray(out["pixel_values"], dtype=np.float32)
