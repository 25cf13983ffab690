"""The keras.applications EfficientNet adapter: what the converter needs to turn EfficientNetB0-B7 checkpoints into
transformers' EfficientNetForImageClassification (or EfficientNetModel without the top) plus its image processor."""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import Any, Callable

import numpy as np

from tracer.errors import BadInputError
from tracer.engine.mapping import WeightMap, map_by_rules
from tracer.families.base import Example, Family, KerasReference
from tracer.families.efficientnet import hf, keras_ref, processor as proc
from tracer.families.efficientnet.rules import PROCESSOR_WEIGHTS, efficientnet_rules
from tracer.families.efficientnet.spec import (EfficientNetSpec, derive_spec, detect_imagenet_multiply,
                                               looks_like_efficientnet)

logger = logging.getLogger(__name__)

TOLERANCE = 1e-4
DEFAULT_IMAGES = 4


class EfficientNetFamily(Family):
    # The HF side's pixels come from the processor in float32, the Keras side normalises them itself: in float64
    # the two would start apart by float32 round-off (~1e-7) at the first layer, far above float64 tolerances.
    float64 = False
    name = "efficientnet"
    tolerances = {"logits": TOLERANCE, "pooler_output": TOLERANCE}

    def detect(self, names: dict[str, tuple[int, ...]], extra: dict[str, Any]) -> bool:
        return looks_like_efficientnet(names)

    def derive(self, checkpoint, options) -> EfficientNetSpec:
        """Variant, head and padding from the names and shapes; the input scaling from the file's layers (or the
        `imagenet_multiply` option); the processor's values from the Normalization weights."""
        multiply = getattr(options, "imagenet_multiply", None)
        if multiply is None:
            multiply = detect_imagenet_multiply(checkpoint.path, checkpoint.format)
        spec = derive_spec(checkpoint.shapes(), getattr(options, "image_size", None), bool(multiply))
        if multiply is None:  # the file does not list its layers: ImageNet-file statistics imply weights="imagenet"
            variance = np.asarray(checkpoint.read(f"{spec.normalization_layer}/variance"), np.float32)
            multiply = bool(np.allclose(variance, np.float32(proc.imagenet_stddev()), rtol=1e-6, atol=0))
            logger.warning("%s does not record whether its model applied keras.applications' ImageNet multiply; "
                           "assuming %s from its Normalization variance (pass imagenet_multiply to decide)",
                           checkpoint.path, multiply)
            spec = replace(spec, imagenet_multiply=multiply)
        return replace(spec, preprocessing=proc.derive_preprocessing(spec, checkpoint.read))

    def weight_names(self, checkpoint, spec: EfficientNetSpec) -> dict[str, str]:
        """The Normalization layer may be `normalization_N` in the file; the reference reads it as `normalization`."""
        out = {}
        for name in checkpoint.shapes():
            m = PROCESSOR_WEIGHTS.match(name)
            out[name] = f"{keras_ref.CANONICAL_NORMALIZATION}/{m.group('leaf')}" if m else name
        return out

    def build_hf(self, spec: EfficientNetSpec, options) -> Any:
        labels = getattr(options, "labels", None)
        id2label = hf.read_labels(labels, spec.num_labels) if labels and spec.include_top else None
        if labels and not spec.include_top:
            raise BadInputError("--labels given, but the checkpoint has no `predictions` layer (include_top=False): "
                                "there are no classes to name; drop --labels")
        return hf.build_empty(spec, hf.efficientnet_config(spec, id2label))

    def rules(self, spec: EfficientNetSpec) -> tuple:
        return efficientnet_rules(spec.include_top)

    def block_index(self, spec: EfficientNetSpec) -> dict[str, int]:
        return spec.block_index

    def accounted(self, spec: EfficientNetSpec) -> dict[str, str]:
        """Checkpoint weights that are no HF model weights, and what became of them (the processor)."""
        return dict(spec.preprocessing.accounted) if spec.preprocessing else {}

    def weight_map(self, checkpoint, spec: EfficientNetSpec) -> tuple[WeightMap, dict[str, str]]:
        """The rules applied to the checkpoint, with the processor's weights taken out of `unmatched` (accounted
        for, returned beside the map) so that a strict transfer sees only model weights."""
        weight_map = map_by_rules(checkpoint.shapes(), self.rules(spec), self.block_index(spec))
        accounted = self.accounted(spec)
        weight_map.unmatched = [n for n in weight_map.unmatched if n not in accounted]
        return weight_map, accounted

    def processor(self, spec: EfficientNetSpec, options) -> Any:
        return proc.build_processor(spec, resample=getattr(options, "resample", None) or "bicubic")

    def example(self, spec: EfficientNetSpec, processor, options) -> Example:
        """`inputs_file` (.npz with `pixel_values` NHWC 0..255 at the input size, optional reference `logits` /
        `pooler_output`), else `images` (paths), else fixed plus natural-spectrum synthetic images. Both models see
        the same resized pixels: Keras raw (its own layers preprocess), HF through the processor."""
        import torch

        reference: dict[str, np.ndarray] = {}
        if getattr(options, "inputs_file", None):
            pixels, reference = _pixels_from_npz(options.inputs_file, spec)
            source = f"npz:{options.inputs_file}"
        elif getattr(options, "images", None):
            from tracer.families.align.inputs import load_image

            pixels = proc.pixels_0_255([load_image(p) for p in options.images], processor)
            source = "--image"
        else:
            pixels = proc.pixels_0_255(default_images(spec, getattr(options, "num_images", None)), processor)
            source = "defaults"
        torch_pixels = torch.from_numpy(proc.normalized(pixels, processor))
        return Example(keras=pixels, torch={"pixel_values": torch_pixels}, reference=reference, source=source)

    def keras_reference(self, spec: EfficientNetSpec, read: Callable[[str], np.ndarray]) -> KerasReference:
        return keras_ref.load_reference(spec, read)

    def output_name(self, spec_or_model) -> str:
        include_top = getattr(spec_or_model, "include_top", None)
        if include_top is None:  # a model: the classifier has a head
            include_top = hasattr(spec_or_model, "classifier")
        return "logits" if include_top else "pooler_output"

    def keras_outputs(self, reference: KerasReference, example: Example) -> dict[str, np.ndarray]:
        out = keras_ref.keras_logits(reference.model, example.keras)
        if out.ndim == 4:  # no top: the feature map, which HF's pooler averages
            return {"pooler_output": out.mean(axis=(1, 2))}
        return {"logits": out}

    def hf_outputs(self, model, example: Example) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            out = model(**example.torch)
        name = self.output_name(model)
        return {name: getattr(out, name).float().numpy()}

    def describe(self, spec: EfficientNetSpec) -> str:
        return spec.describe()


def default_images(spec: EfficientNetSpec, n: int | None = None) -> list:
    """Natural-spectrum (1/f**alpha, alpha 1..1.5) synthetic photographs-alike, as PIL images larger than the input
    (so the processor's resize is exercised). Not flat gradients or checkerboards: a demo network calibrated on
    natural statistics amplifies those by 1e3 and any comparison on them measures that amplification."""
    from PIL import Image

    from tracer.families.align.demo import synthetic_images

    n = DEFAULT_IMAGES if n is None else int(n)
    if n < 1:
        raise BadInputError(f"num_images {n}: need at least one image to compare on")
    size = max(64, int(spec.image_size * 1.25))
    rng = np.random.default_rng([5, 17])
    alphas = np.linspace(1.0, 1.5, n) if n > 1 else [1.0]
    images = [synthetic_images(1, size, rng, alpha=float(a))[0] for a in alphas]
    return [Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8)) for a in images]


def _pixels_from_npz(path: str | os.PathLike, spec: EfficientNetSpec) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise BadInputError(f"inputs file {p}: no such file; check the --inputs path")
    try:
        with np.load(p, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError) as e:
        raise BadInputError(f"inputs file {p}: cannot be read as .npz ({e}); write it with np.savez(path, "
                            "pixel_values=...)") from e
    allowed = {"pixel_values", "logits", "pooler_output"}
    if "pixel_values" not in arrays or set(arrays) - allowed:
        raise BadInputError(f"inputs file {p}: needs `pixel_values` (and optionally reference `logits` / "
                            f"`pooler_output`); found {sorted(arrays)}: rename or remove the others")
    px = arrays["pixel_values"]
    want = (spec.image_size, spec.image_size, 3)
    if px.ndim != 4 or px.shape[1:] != want or px.shape[0] == 0 or px.dtype.kind not in "fiu":
        hint = " (NCHW: transpose to (0, 2, 3, 1))" if px.ndim == 4 and px.shape[1] == 3 else ""
        raise BadInputError(f"inputs file {p}: `pixel_values` must be (N, {want[0]}, {want[1]}, 3) NHWC numbers; got "
                            f"{px.dtype} {px.shape}{hint}")
    if not np.isfinite(px).all() or px.min() < 0 or px.max() > 255:
        raise BadInputError(f"inputs file {p}: `pixel_values` must be finite raw pixels in 0..255 (the Keras model "
                            f"rescales them itself); got range [{px.min():g}, {px.max():g}]")
    reference = {k: np.asarray(v, np.float32) for k, v in arrays.items() if k != "pixel_values"}
    return px.astype(np.float32), reference
