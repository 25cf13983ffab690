"""Demo checkpoints in keras.applications' format, with trained-looking weights.

`write_demo_checkpoint` builds `EfficientNetB{n}(weights=None)` (plus tf_keras' ImageNet multiply when asked, as a
`weights="imagenet"` model has it), gives every variable a realistic value (deterministic per name), calibrates the
BatchNorm moving statistics on natural-spectrum synthetic images (a training-mode pass with momentum 0) and saves it
as `save_weights` HDF5, whole-model `model.save` HDF5, and a TF object-based checkpoint.

    python -m tracer.families.efficientnet.demo --variant b0 --out demo/efficientnet-b0
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tracer.errors import BadInputError
# The ALIGN demo's per-name initialisation and 1/f images serve any EfficientNet.
from tracer.families.align.demo import CALIBRATION_ALPHA, realistic_value, synthetic_images
from tracer.families.efficientnet.spec import VARIANTS, EfficientNetSpec, derive_spec, expected_shapes

FORMATS = ("h5", "full_h5", "tf")
CALIBRATION_BATCH = 16
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_COUNT = 1281167  # ImageNet-1k's training images: what an adapt() over it would have counted


@dataclass
class DemoCheckpoint:
    spec: EfficientNetSpec
    paths: dict[str, str]  # format -> path
    model: object  # the tf_keras model that wrote them
    timings: dict[str, float] = field(default_factory=dict)


def demo_spec(variant: str = "b0", image_size: int | None = None, include_top: bool = True, num_labels: int = 10,
              imagenet_multiply: bool = False) -> EfficientNetSpec:
    matches = [v for v in VARIANTS if v.name == variant.lower()]
    if not matches:
        raise BadInputError(f"unknown variant {variant!r}; expected one of {', '.join(v.name for v in VARIANTS)}")
    return derive_spec(expected_shapes(matches[0], include_top, num_labels), image_size, imagenet_multiply)


def normalization_values(imagenet_multiply: bool) -> dict[str, np.ndarray]:
    """As keras' ImageNet files hold them when the multiply is in use (the std stored as the variance,
    tensorflow#49930); else what adapt() on ImageNet gives (the std squared)."""
    from tf_keras.src.applications.efficientnet import IMAGENET_STDDEV_RGB

    std = np.float32(IMAGENET_STDDEV_RGB)
    return {"mean": np.float32(IMAGENET_MEAN), "variance": std if imagenet_multiply else std * std,
            "count": np.int64(IMAGENET_COUNT)}


def set_realistic_weights(model, seed: int, imagenet_multiply: bool) -> None:
    from tracer.families.efficientnet.keras_ref import reference_name

    norm = normalization_values(imagenet_multiply)
    for variable in model.weights:
        name = reference_name(variable)
        layer, leaf = name.rsplit("/", 1)
        if layer == "normalization":
            variable.assign(norm[leaf])
        else:
            variable.assign(realistic_value(name, tuple(variable.shape), seed))
    for layer in model.submodules:
        if hasattr(layer, "finalize_state"):
            layer.finalize_state()


def calibrate_batch_norm(model, images: np.ndarray) -> None:
    """Every BatchNorm's moving statistics := the batch statistics it sees on `images` (momentum 0, drop-connect and
    dropout off for the pass; both restored). Layer by layer each BN then normalises what it was calibrated on, so
    inference on similar images stays O(1) through all blocks (see the ALIGN demo's calibrate_batch_norm)."""
    import tf_keras

    layers = list(model.submodules)
    norms = [layer for layer in layers if isinstance(layer, tf_keras.layers.BatchNormalization)]
    drops = [layer for layer in layers if isinstance(layer, tf_keras.layers.Dropout)]
    saved = [layer.momentum for layer in norms], [layer.rate for layer in drops]
    try:
        for layer in norms:
            layer.momentum = 0.0
        for layer in drops:
            layer.rate = 0.0
        model(images, training=True)
    finally:
        for layer, momentum in zip(norms, saved[0]):
            layer.momentum = momentum
        for layer, rate in zip(drops, saved[1]):
            layer.rate = rate


def write_demo_checkpoint(outdir: str | os.PathLike, variant: str = "b0", image_size: int | None = None,
                          include_top: bool = True, num_labels: int = 10, seed: int = 0,
                          imagenet_multiply: bool = False, formats: tuple[str, ...] = FORMATS) -> DemoCheckpoint:
    """Write the checkpoint in each of `formats` under `outdir` (`weights.h5`, `model.h5`, `ckpt/weights.*`)."""
    from tracer.families.efficientnet.keras_ref import build_application

    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise BadInputError(f"unknown format(s) {unknown}; expected some of {', '.join(FORMATS)}")
    spec = demo_spec(variant, image_size, include_top, num_labels, imagenet_multiply)
    times, clock = {}, time.perf_counter()

    def lap(step: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        times[step], clock = now - clock, now

    model = build_application(spec)
    lap("build")
    set_realistic_weights(model, seed, imagenet_multiply)
    images = synthetic_images(CALIBRATION_BATCH, spec.image_size, np.random.default_rng([seed, 11]),
                              alpha=CALIBRATION_ALPHA)
    calibrate_batch_norm(model, images)
    lap("calibrate")
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    if "h5" in formats:
        paths["h5"] = str(out / "weights.h5")
        model.save_weights(paths["h5"], save_format="h5")
    if "full_h5" in formats:
        paths["full_h5"] = str(out / "model.h5")
        with warnings.catch_warnings():  # "HDF5 is legacy": that legacy file is what this format is for
            warnings.simplefilter("ignore", UserWarning)
            model.save(paths["full_h5"], save_format="h5")
    if "tf" in formats:
        paths["tf"] = str(out / "ckpt" / "weights")
        model.save_weights(paths["tf"], save_format="tf")
    lap("save")
    return DemoCheckpoint(spec, paths, model, times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="b0", choices=[v.name for v in VARIANTS])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--image_size", type=int, default=None, help="calibration resolution (default: the variant's)")
    parser.add_argument("--num_labels", type=int, default=1000)
    parser.add_argument("--no_top", action="store_true", help="without the `predictions` layer")
    parser.add_argument("--imagenet_multiply", action="store_true", help='as built with weights="imagenet"')
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    demo = write_demo_checkpoint(args.out, args.variant, args.image_size, not args.no_top, args.num_labels, args.seed,
                                 args.imagenet_multiply)
    print(json.dumps({"paths": demo.paths, "timings": {k: round(v, 2) for k, v in demo.timings.items()}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
