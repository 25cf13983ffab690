"""Demo checkpoints in coyo-align's format, written by the tf_keras reference model like a training run would.

`write_demo_checkpoint` builds the reference ALIGN for a spec, compiles it with Adam and takes one optimizer step (so
the checkpoint carries Adam slots), then gives it realistic weights (deterministic from the seed), calibrates the
BatchNorm moving statistics on batch statistics, and saves with `model.save_weights` (TF object-based format, or
HDF5).

Run `python -m tracer.families.align.demo --size tiny --out demo/tiny` to write a checkpoint plus `variables.json` and
`reference.npz` (inputs and the reference model's outputs) laid out like the coyo_mini fixture.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
import zlib
from pathlib import Path

import numpy as np

from tracer.errors import BadInputError
from tracer.families.align.spec import AlignSpec, TextSpec, VisionSpec

logger = logging.getLogger(__name__)

SIZES = ("tiny", "small", "base")
CALIBRATION_BATCH = 16  # = coyo's virtual_batch_size, so a training-mode BatchNorm call sees whole virtual batches
OPTIMIZERS = ("adam", "legacy_adam")


def demo_spec(size: str) -> AlignSpec:
    """`base`: ALIGN-base (EfficientNet-B7, BERT-base 12x768); `small`: width/depth 0.5 and a 4x256 BERT with the
    uncased vocabulary; `tiny`: one block per stage and a 2x64 BERT, for unit tests.

    Every spec here survives `derive_spec` of its own variables unchanged (the tiny depth is 0.2, the roundest
    coefficient giving one block per stage, which is what `derive_spec` picks).
    """
    if size == "base":
        vision = VisionSpec(width_coefficient=2.0, depth_coefficient=3.1)
        text = TextSpec(vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072)
    elif size == "small":
        vision = VisionSpec(width_coefficient=0.5, depth_coefficient=0.5)
        text = TextSpec(vocab_size=30522, hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024)
    elif size == "tiny":
        # Width 0.4 is the narrowest where every stride-1 stage changes width (see spec.derive_vision).
        vision = VisionSpec(width_coefficient=0.4, depth_coefficient=0.2)
        text = TextSpec(vocab_size=1024, hidden_size=64, num_layers=2, num_heads=1, intermediate_size=256)
    else:
        raise BadInputError(f"unknown demo size {size!r}; expected one of {', '.join(SIZES)}")
    # AlignModel projects the text to the image tower's width, so the embedding size is the image hidden size.
    return AlignSpec(vision=vision, text=text, embed_dim=vision.hidden_dim)


# --------------------------------------------------------------------------------------------------- inputs


CALIBRATION_ALPHA = 1.0  # natural images' amplitude spectrum falls like 1/f
INPUT_ALPHA = 1.25  # demo inputs: a little smoother than the calibration images


def synthetic_images(n: int, size: int, rng: np.random.Generator, alpha: float = INPUT_ALPHA) -> np.ndarray:
    """(n, size, size, 3) float32 in 0..255: random-phase fields with a 1/f**alpha amplitude spectrum.

    alpha 1 is the spectrum of natural photographs; larger alphas are smoother. Each channel mixes a shared
    luminance field with its own colour field and is stretched to a random range inside 0..255.
    """
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    freq = np.sqrt(fx**2 + fy**2)
    freq[0, 0] = 1.0
    amplitude = freq ** (-alpha)
    amplitude[0, 0] = 0.0  # no DC: the range is set below

    def field() -> np.ndarray:
        spectrum = amplitude * (rng.standard_normal(amplitude.shape) + 1j * rng.standard_normal(amplitude.shape))
        x = np.fft.irfft2(spectrum, s=(size, size))
        return x / x.std()

    out = np.empty((n, size, size, 3), dtype=np.float32)
    for i in range(n):
        luminance = field()
        for c in range(3):
            x = luminance + 0.5 * field()
            x = (x - x.min()) / (x.max() - x.min())
            lo, hi = rng.uniform(0, 60), rng.uniform(195, 255)
            out[i, :, :, c] = lo + (hi - lo) * x
    return out


def _special_ids(vocab_size: int) -> tuple[int, int, int]:
    """(cls, sep, first ordinary id): BERT-uncased's when the vocabulary is big enough, else small stand-ins."""
    if vocab_size > 2000:
        return 101, 102, 1996
    return 1, 2, 3


def demo_inputs(spec: AlignSpec, n: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic inputs: NHWC images in 0..255 (`synthetic_images`, smoother than natural ones) and padded
    token batches ([CLS] ... [SEP] 0 0 ...).

    Every row but (when n >= 3) the last is padded; odd rows carry a second segment with token type 1.
    """
    if n < 1:
        raise BadInputError("n must be at least 1")
    rng = np.random.default_rng([seed, 7])
    seq, vocab = spec.text.seq_length, spec.text.vocab_size
    cls, sep, first = _special_ids(vocab)
    input_ids = np.zeros((n, seq), dtype=np.int32)
    attention_mask = np.zeros((n, seq), dtype=np.int32)
    token_type_ids = np.zeros((n, seq), dtype=np.int32)
    for i in range(n):
        length = seq if (n >= 3 and i == n - 1) else int(rng.integers(max(4, seq // 4), seq))
        body = rng.integers(first, vocab, size=length - 2)
        input_ids[i, :length] = np.concatenate([[cls], body, [sep]])
        attention_mask[i, :length] = 1
        if i % 2 == 1:
            middle = length // 2
            input_ids[i, middle - 1] = sep
            token_type_ids[i, middle:length] = 1
    return {
        "pixel_values": synthetic_images(n, spec.vision.image_size, rng),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": token_type_ids,
    }


# --------------------------------------------------------------------------------------------------- weights


def _rng_for(seed: int, name: str) -> np.random.Generator:
    # One stream per variable name: values do not depend on build order or on the other variables.
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def realistic_value(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """A trained-looking value for one variable, from its name and shape (BN moving statistics come out as 0/1
    here and are calibrated afterwards)."""
    rng = _rng_for(seed, name)
    leaf = name.rsplit("/", 1)[-1]

    def normal(std: float) -> np.ndarray:
        return rng.standard_normal(size=shape, dtype=np.float32) * np.float32(std)

    if leaf == "moving_mean":
        return np.zeros(shape, np.float32)
    if leaf == "moving_variance":
        return np.ones(shape, np.float32)
    if leaf == "gamma":
        return 1.0 + normal(0.1)
    if leaf in ("beta", "bias"):
        return normal(0.05)
    if leaf == "depthwise_kernel":
        return normal(math.sqrt(2.0 / (shape[0] * shape[1])))
    if leaf == "kernel":
        fan_in = int(np.prod(shape[:-1]))
        gain = 2.0 if len(shape) == 4 else 1.0  # convolutions feed swish (through BN), dense layers feed LN / softmax
        return normal(math.sqrt(gain / fan_in))
    if leaf in ("weight", "embeddings"):  # BERT's word / position / token-type tables
        return normal(0.05)
    raise ValueError(f"no demo initialisation rule for variable `{name}` {shape}")


def _set_realistic_weights(model, seed: int, temperature: float) -> None:
    from tracer.families.align.keras_ref.align import reference_variables

    for name, variable in reference_variables(model).items():
        if variable is model.temperature:
            variable.assign(np.float32(temperature))
        else:
            variable.assign(realistic_value(name, tuple(variable.shape), seed))


def randomize_batch_norm(model, seed: int) -> None:
    """Uncalibrated moving statistics: small variances, so each BatchNorm amplifies (x2.2-4.5)."""
    from tracer.families.align.keras_ref.align import reference_variables

    for name, variable in reference_variables(model).items():
        rng, shape = _rng_for(seed + 1, name), tuple(variable.shape)
        if name.endswith("moving_mean"):
            variable.assign(rng.normal(0.0, 0.5, size=shape).astype(np.float32))
        elif name.endswith("moving_variance"):
            variable.assign(rng.uniform(0.05, 0.2, size=shape).astype(np.float32))


def calibrate_batch_norm(model, images: np.ndarray) -> None:
    """Set every BatchNorm's moving statistics to the batch statistics it sees on `images`.

    With momentum 0 a training-mode call replaces the moving mean/variance by the batch ones; layer by layer each BN
    normalises with the statistics it just stored, so inference on similar images stays well-scaled through all the
    blocks (uncalibrated statistics let them blow up). Drop-connect is switched off for the pass so it is
    deterministic; both settings are restored afterwards.

    The images matter: with 16 very smooth images every deep feature map is nearly constant per image, each
    channel's variance is estimated from ~16 samples, and the underestimate compounds through B7's ~220 BNs (unseen
    images then reach ~1e2 at the output). Natural-spectrum images (1/f, `CALIBRATION_ALPHA`) give every map spatial
    detail, the estimates are good, and unseen images stay at O(1). Measured on B7: calibrated on 16 very smooth
    images, unseen ones reach max |feature| ~80-130; calibrated on 1/f images, max |feature| is ~1-5 on unseen
    1/f..1/f^1.5 and very smooth images alike.
    """
    import tf_keras

    effnet_layers = [layer for layer in model.image_encoder.layers if isinstance(layer, tf_keras.Model)]
    layers = [layer for net in effnet_layers for layer in net.layers] + list(model.image_encoder.layers)
    norms = [layer for layer in layers if isinstance(layer, tf_keras.layers.BatchNormalization)]
    drops = [layer for layer in layers if isinstance(layer, tf_keras.layers.Dropout)]
    saved_momentum = [layer.momentum for layer in norms]
    saved_rate = [layer.rate for layer in drops]
    try:
        for layer in norms:
            layer.momentum = 0.0
        for layer in drops:
            layer.rate = 0.0
        model.image_encoder(images, training=True)
    finally:
        for layer, momentum in zip(norms, saved_momentum):
            layer.momentum = momentum
        for layer, rate in zip(drops, saved_rate):
            layer.rate = rate


def _make_optimizer(kind: str):
    import tf_keras

    # A small learning rate; its value only shows up in the checkpoint's `learning_rate` entry.
    if kind == "adam":
        return tf_keras.optimizers.Adam(learning_rate=1e-4)
    if kind == "legacy_adam":
        return tf_keras.optimizers.legacy.Adam(learning_rate=1e-4)
    raise BadInputError(f"unknown optimizer {kind!r}; expected one of {', '.join(OPTIMIZERS)}")


def _synthetic_step(model, seed: int) -> None:
    """One optimizer step with small synthetic gradients (not the contrastive loss: a real backward pass through B7
    costs minutes on a CPU and its value does not matter here). It creates the Adam slots and sets `iterations` to 1,
    exactly as a training step would; the model weights are overwritten afterwards, so they stay as designed."""
    import tensorflow as tf

    variables = model.trainable_variables
    grads = [
        tf.random.stateless_normal(variable.shape, seed=[seed, zlib.crc32(variable.name.encode())], stddev=1e-3)
        for variable in variables
    ]
    model.optimizer.apply_gradients(zip(grads, variables))


def write_demo_checkpoint(
    prefix: str | os.PathLike,
    spec: AlignSpec,
    seed: int = 0,
    optimizer: str = "adam",
    h5: bool = False,
    temperature: float = 0.07,
    *,
    timings: dict | None = None,
    return_model: bool = False,
    calibrate: bool = True,
):
    """Write a coyo-style ALIGN checkpoint for `spec` and return its path.

    TF format (default): `prefix` is the checkpoint prefix (`prefix.index`, `prefix.data-*`, `checkpoint`), with the
    optimizer slots (`optimizer="adam"`: Keras 2.11+ layout `optimizer/_variables/N`, full names `Adam/m/<var>`;
    `"legacy_adam"`: `<var key>/.OPTIMIZER_SLOT/optimizer/m`) and the three loss trackers' `total`/`count`.
    `h5=True`: an HDF5 weights file (`prefix`, `.h5` appended if missing). tf_keras 2.21 writes one group per layer
    (`vision_encoder`, `text_encoder`, datasets named by variable name) plus `top_level_model_weights/Variable:0`
    for the temperature (a bare `tf.Variable` on the model), and it round-trips through `load_weights`; the optimizer
    slots and the metric variables are not written to HDF5.

    `timings`, if given, receives the seconds each step took; `return_model=True` returns `(path, model)`.
    """
    if optimizer not in OPTIMIZERS:
        raise BadInputError(f"unknown optimizer {optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
    from tracer.families.align.keras_ref.align import build_reference

    times = timings if timings is not None else {}
    clock = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        times[step] = now - clock
        clock = now

    model = build_reference(spec, temperature=1.0)
    lap("build")
    model.compile(optimizer=_make_optimizer(optimizer))
    _synthetic_step(model, seed)
    lap("optimizer_step")
    _set_realistic_weights(model, seed, temperature)
    lap("weights")
    images = synthetic_images(CALIBRATION_BATCH, spec.vision.image_size, np.random.default_rng([seed, 11]),
                              alpha=CALIBRATION_ALPHA)
    if calibrate:
        calibrate_batch_norm(model, images)
    else:  # what an untrained or badly converted checkpoint looks like: activations blow up with depth
        randomize_batch_norm(model, seed)
    lap("calibrate")
    # What the trackers would hold after a step: coyo's loss per direction is about log(batch) at the start.
    for tracker, value in zip(model.metrics, (2 * math.log(CALIBRATION_BATCH), math.log(CALIBRATION_BATCH),
                                              math.log(CALIBRATION_BATCH))):
        tracker.update_state(value)

    path = Path(prefix)
    if h5 and path.suffix != ".h5":
        path = path.with_name(path.name + ".h5")
    path.parent.mkdir(parents=True, exist_ok=True)
    if h5:
        model.save_weights(str(path), save_format="h5")
    else:
        model.save_weights(str(path), save_format="tf")
    lap("save")
    return (str(path), model) if return_model else str(path)


def write_demo_bundle(outdir: str | os.PathLike, size: str, seed: int = 0, optimizer: str = "adam",
                      n_inputs: int = 2) -> dict:
    """`outdir/model-weights*` + `variables.json` + `reference.npz` (inputs, reference outputs, temperature), the
    layout of the coyo_mini fixture. Returns the timings."""
    from tracer.families.align.keras_ref.align import embed, metric_variables, reference_variables

    spec = demo_spec(size)
    outdir = Path(outdir)
    timings: dict = {}
    start = time.perf_counter()
    _, model = write_demo_checkpoint(outdir / "model-weights", spec, seed=seed, optimizer=optimizer,
                                     timings=timings, return_model=True)
    inputs = demo_inputs(spec, n=n_inputs, seed=seed)
    outputs = embed(model, **inputs)
    np.savez(outdir / "reference.npz", **inputs, **outputs, temperature=np.float32(model.temperature.numpy()))
    variables = [[v.name, list(v.shape)] for v in reference_variables(model).values()]
    variables += [[v.name, list(v.shape)] for vs in metric_variables(model).values() for v in vs][:2]
    (outdir / "variables.json").write_text(json.dumps({
        "size": size, "spec": spec.to_dict(), "n_variables": len(variables),
        "variables": sorted(variables),
    }, indent=1))
    timings["total"] = time.perf_counter() - start
    return timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, default="tiny")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adam")
    args = parser.parse_args(argv)
    timings = write_demo_bundle(args.out, args.size, seed=args.seed, optimizer=args.optimizer)
    print(json.dumps({k: round(v, 2) for k, v in timings.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def ensure_demo_checkpoint(size: str, demo_dir: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """The demo bundle for `size` (written once, reused while its spec matches); returns the bundle folder."""
    folder = Path(demo_dir or Path("demo") / size)
    stamp = folder / "variables.json"
    if (folder / "model-weights.index").exists() and stamp.exists():
        if json.loads(stamp.read_text()).get("spec") == demo_spec(size).to_dict():
            logger.info("reusing the %s demo checkpoint in %s", size, folder)
            return folder
    logger.info("writing the %s demo checkpoint to %s (the base size takes about a minute and a half)", size, folder)
    write_demo_bundle(folder, size, seed=seed)
    return folder
