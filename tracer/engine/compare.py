"""Compare the two models' outputs: metrics and tolerances, for the final embeddings and for every paired layer
(accumulated error, and local error from running the HF module on the Keras layer's own input)."""

from __future__ import annotations

import inspect
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from tracer.engine.row import LayerRow, Status

DEFAULT_ATOL = 1e-3  # the original converter's tolerance on L2-normalised embeddings


def as_float(value) -> float:
    """A row's cell as a float (NaN where it holds none: '', None, text)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))) if np.size(a) else 0.0


def cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    """The smallest row-wise cosine similarity between two batches of vectors."""
    a = np.asarray(a, np.float64).reshape(len(a), -1)
    b = np.asarray(b, np.float64).reshape(len(b), -1)
    num = np.sum(a * b, axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.min(num / np.maximum(den, 1e-30))) if len(a) else 1.0


def nhwc_to_nchw(array: np.ndarray) -> np.ndarray:
    """A 4-D channels-last array in torch's axis order (NCHW, a view); other ranks as they are."""
    return np.transpose(array, (0, 3, 1, 2)) if array.ndim == 4 else array


def to_keras_layout(torch_array: np.ndarray, keras_shape: tuple[int, ...], layout: str = "nchw") -> np.ndarray:
    """A torch activation in Keras layout: NCHW -> NHWC (`layout` "nchw", see `Pair.layout`), then singleton axes
    reconciled by a reshape."""
    a = np.transpose(torch_array, (0, 2, 3, 1)) if torch_array.ndim == 4 and layout == "nchw" else torch_array
    if tuple(a.shape) != tuple(keras_shape) and a.size == int(np.prod(keras_shape)):
        a = a.reshape(keras_shape)
    return a


def to_torch_layout(keras_array: np.ndarray, torch_shape: tuple[int, ...]) -> np.ndarray:
    """A Keras activation in torch layout: NHWC -> NCHW, then singleton axes reconciled by a reshape."""
    a = nhwc_to_nchw(keras_array) if len(torch_shape) == 4 else keras_array
    if tuple(a.shape) != tuple(torch_shape) and a.size == int(np.prod(torch_shape)):
        a = a.reshape(torch_shape)
    return a


@dataclass
class Divergence:
    max_abs: float
    mean_abs: float
    rel_l2: float
    cosine: float


@dataclass
class Sums:
    """The sums `Divergence` is made of (d = candidate - reference, r = reference), so that a layer measured in
    several chunks of examples adds up to what one pass over all of them gives. Float32 in numpy, block by block
    (`_blocks`): a block's r, c and d stay in cache while every statistic is taken from them, so memory is read
    once (one subtraction into a small reused buffer, BLAS dot products r·r, r·d, d·d, then |d| in place, its sum
    and max); ‖c‖² and r·c follow from r·r, r·d and d·d. Blocks add up in float64, which keeps the sums within a
    few 1e-6 relative of float64 even on 10^7 terms. Single-threaded: the two models run in other threads, and
    torch's intra-op pool stalls when they hold the cores. A NaN anywhere makes the metrics NaN, and
    `layer_status` calls that diverged."""

    n: int = 0
    d2: float = 0.0
    r2: float = 0.0
    rd: float = 0.0
    abs_sum: float = 0.0
    max_abs: float = 0.0

    def add(self, reference: np.ndarray, candidate: np.ndarray) -> "Sums":
        """Add one pair of same-shape arrays (any strides: a transposed view is not copied first)."""
        Sums.add_each(reference, [(self, candidate)])
        return self

    @staticmethod
    def add_each(reference: np.ndarray, targets: list[tuple["Sums", np.ndarray]]) -> None:
        """`sums.add(reference, candidate)` for each (sums, candidate) of `targets`, in one pass over `reference`
        (its blocks and r·r are shared)."""
        # Float32 unless a side is float64 (a `--float64` run): its differences at 1e-16 need float64 to exist.
        wide = np.asarray(reference).dtype == np.float64 or any(np.asarray(c).dtype == np.float64 for _, c in targets)
        dtype = np.float64 if wide else np.float32
        r = np.atleast_1d(np.asarray(reference, dtype))
        candidates = []
        for _, c in targets:
            c = np.asarray(c, dtype)
            if c.shape != r.shape:
                if c.size != r.size:
                    raise ValueError(f"compared arrays differ in shape: {r.shape} and {c.shape}")
                c = c.reshape(r.shape)
            candidates.append(c)
        if r.size == 0:
            return
        buffer = np.empty(min(r.size, _BLOCK), dtype)
        ones = np.ones(buffer.size, dtype)  # Σ|d| as a BLAS dot: 3x faster than np.sum's pairwise sum
        with np.errstate(all="ignore"):  # inf - inf is NaN, as torch gave it, without a warning
            for index in _blocks(r.shape, _BLOCK):
                rb = r[index]
                rf = rb.reshape(-1)  # a view (a copy only for a non-contiguous reference)
                r2 = float(np.dot(rf, rf))
                for (sums, _), c in zip(targets, candidates):
                    d = buffer[:rf.size]
                    # In the reference's order: a transposed candidate (an NCHW output seen as NHWC) is read
                    # strided here, a cache-sized block at a time, rather than copied whole first.
                    np.subtract(c[index], rb, out=d.reshape(rb.shape))
                    sums.n += d.size
                    sums.r2 += r2
                    sums.rd += float(np.dot(rf, d))
                    sums.d2 += float(np.dot(d, d))
                    np.abs(d, out=d)
                    sums.abs_sum += float(np.dot(d, ones[:d.size]))
                    high = float(np.maximum.reduce(d))
                    # NaN anywhere makes every metric NaN (Python's max would silently drop it).
                    sums.max_abs = high if high != high else max(sums.max_abs, high)

    def merge(self, other: "Sums") -> "Sums":
        """Add another chunk's sums (the chunks' examples add up as one pass over all of them gives)."""
        self.n += other.n
        self.d2 += other.d2
        self.r2 += other.r2
        self.rd += other.rd
        self.abs_sum += other.abs_sum
        self.max_abs = other.max_abs if other.max_abs != other.max_abs else max(self.max_abs, other.max_abs)
        return self

    def result(self) -> Divergence:
        if self.n == 0:
            return Divergence(0.0, 0.0, 0.0, 1.0)
        c2 = max(self.r2 + 2 * self.rd + self.d2, 0.0)
        rn, cn = np.sqrt(self.r2), np.sqrt(c2)
        if rn and cn:
            rc = self.r2 + self.rd
            if rc > 0:  # near 1: 1 - cos without cancellation, (|r|²|d|² - (r·d)²) / (|r||c| (|r||c| + r·c))
                cosine = 1.0 - max(self.r2 * self.d2 - self.rd ** 2, 0.0) / (rn * cn * (rn * cn + rc))
            else:
                cosine = max(rc / (rn * cn), -1.0)
        else:
            cosine = float(rn == cn)
        return Divergence(
            max_abs=self.max_abs,
            mean_abs=self.abs_sum / self.n,
            rel_l2=float(np.sqrt(self.d2) / max(rn, 1e-30)),
            cosine=float(cosine),
        )


# Elements per block of `Sums`: a block of the reference, of each candidate and of the difference (0.5 MB each)
# stay in L2/L3 while all the statistics are taken; smaller blocks cost more in per-call overhead than they save.
_BLOCK = 1 << 17


def _blocks(shape: tuple[int, ...], size: int):
    """Index tuples cutting an array of `shape` into blocks of at most `size` elements, in C order: whole trailing
    axes, a range of the axis before them, each index of the axes before that."""
    inner, axis = 1, len(shape)
    while axis > 0 and inner * shape[axis - 1] <= size:
        axis -= 1
        inner *= shape[axis]
    if axis == 0:
        yield ()
        return
    step = size // inner
    for outer in np.ndindex(*shape[:axis - 1]):
        for begin in range(0, shape[axis - 1], step):
            yield outer + (slice(begin, begin + step),)


def divergence(reference: np.ndarray, candidate: np.ndarray) -> Divergence:
    """How far `candidate` is from `reference` (same shape)."""
    return Sums().add(reference, candidate).result()


@dataclass
class Measured:
    """One paired layer's accumulated error and local error (None: no local re-run for this layer)."""

    accumulated: Sums = field(default_factory=Sums)
    local: Sums | None = None

    def add(self, pair) -> "Measured":
        """Measure `pair` (its records hold this chunk's arrays) and add to the sums."""
        k, t = pair.keras, pair.torch
        local = local_output(pair)
        targets = [(self.accumulated, to_keras_layout(t.output, k.shape, pair.layout))]
        if local is not None:
            self.local = self.local or Sums()
            targets.append((self.local, local))
        Sums.add_each(k.output, targets)  # both against the same reference: read it once
        return self


# ------------------------------------------------------------------------------------------- per-layer metrics
# Containers whose HF forward takes the same tensors as the Keras call (first positional, the rest by name).
LOCAL_ROLES = {"Block", "Layer", "Attention", "SelfAttention", "SelfOutput", "Intermediate", "Output", "Pooler",
               "Embeddings", "Encoder"}
LOCAL_KINDS = {"conv", "depthwise", "batchnorm", "linear", "layernorm", "activation", "pad", "pool", "embedding"}


def _to_torch(array: np.ndarray, module_param_4d: bool):
    """A Keras-side array as the HF module's input: ids as int64; NHWC activations as NCHW *views* (channels-last
    strides, no copy: torch's kernels take them as they are); float64 stays float64 (a `--float64` run)."""
    import torch

    if array.dtype.kind in "iu":
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64))
    array = np.asarray(array, dtype=np.float64 if array.dtype == np.float64 else np.float32)
    return torch.from_numpy(nhwc_to_nchw(array) if module_param_4d else array)


_PARAMETERS: dict = {}  # forward's function -> the names it takes


def _parameters(forward) -> frozenset[str]:
    """The names a module's `forward` takes, cached per function: `inspect.signature` costs ~30 µs a call, a
    quarter of a small module's whole re-run."""
    key = getattr(forward, "__func__", forward)  # the class's function, shared by its instances' bound methods
    names = _PARAMETERS.get(key)
    if names is None:
        names = _PARAMETERS[key] = frozenset(inspect.signature(forward).parameters)
    return names


def local_output(pair) -> np.ndarray | None:
    """The HF module run on the Keras layer's own input (teacher forcing), in Keras layout; None when the
    module's inputs cannot be built from what the Keras layer received."""
    import torch

    from tracer.engine.record import first_tensor, to_numpy
    from tracer.engine.record.kinds import role_words
    from tracer.engine.record.torch import paused

    k, module = pair.keras, getattr(pair.torch, "module", None)
    if k is None or module is None or k.input is None:
        return None
    if not (k.kind in LOCAL_KINDS or (k.is_container and "".join(role_words(k.role)) in LOCAL_ROLES)):
        return None
    channels_first = pair.input_layout == "nchw"
    args = [_to_torch(a, channels_first) for a in k.inputs if a is not None][:1]
    params = _parameters(module.forward)
    kwargs = {n: _to_torch(a, channels_first) for n, a in k.input_kwargs.items() if n in params}
    with torch.inference_mode(), paused():
        if pair.fused:
            out = module(pair.torch_weights.module(*args))
        else:
            out = module(*args, **kwargs)
    array = to_numpy(first_tensor(out))
    if array is None or array.size != int(np.prod(k.shape)):
        return None
    return to_keras_layout(array, k.shape, pair.layout)


@dataclass(frozen=True)
class Tolerances:
    """The thresholds a run judges its layers and outputs by, one named set per precision (`FLOAT32`,
    `FLOAT64`); a run picks one (`for_run`) and passes it on, nothing patches them at run time.

    local_rel_l2: the error one layer makes on the Keras layer's own input (rel L2, ‖hf − keras‖ / ‖keras‖).
    accumulated_rel_l2: the error carried from the input through every upstream layer. It grows with depth even
        when every layer is right, so above this a layer is only "amplified" unless its own local error is also
        too large.
    amplified_max_abs: an absolute difference carried from upstream beyond this, with every layer's own error at
        round-off, is also "amplified" (activations blown up by badly scaled weights make large absolute
        differences out of round-off).
    embeds_max_abs: the output tolerance (max|Δ| on the L2-normalised embeddings; `--atol` replaces it).
    fault_growth: without a local measurement, a jump of this factor over the previous layer's accumulated error
        is a fault."""

    name: str
    local_rel_l2: float
    accumulated_rel_l2: float
    amplified_max_abs: float
    embeds_max_abs: float
    fault_growth: float = 100.0

    def as_dict(self) -> dict:
        return {"local_rel_l2": self.local_rel_l2, "accumulated_rel_l2": self.accumulated_rel_l2,
                "amplified_max_abs": self.amplified_max_abs, "embeds_max_abs": self.embeds_max_abs}

    @staticmethod
    def for_run(float64: bool = False, atol: float | None = None) -> Tolerances:
        """The set for a run's precision, with the user's `--atol` (when given) as the output tolerance."""
        base = FLOAT64 if float64 else FLOAT32
        return base if atol is None else replace(base, embeds_max_abs=float(atol))


# Float32 on both sides. Round-off of one op is ~1e-7 relative; reductions over thousands of terms (a 3x3x640
# conv, a 3072-wide Dense, a softmax over 64 keys) reach ~1e-6. 1e-4 leaves two orders of margin and still
# catches the real faults we inject (eps, a swapped or transposed weight, padding: all >= 1e-3); a GELU variant
# on small pre-activations stays under it (diagnose.SUSPECT_LOCAL).
FLOAT32 = Tolerances("float32", local_rel_l2=1e-4, accumulated_rel_l2=1e-4, amplified_max_abs=DEFAULT_ATOL,
                     embeds_max_abs=DEFAULT_ATOL)
# Float64 on both sides (`--float64`): one op's round-off is ~1e-16. Measured on ALIGN-base's reference inputs
# (905 layers, README "--float64"): the worst local error 2.4e-15, the worst accumulated 1.5e-13 (it grows through
# the 55 vision blocks). Local 1e-12 is the bar ("agree to float64 round-off"), 400x above the worst
# measured, and below what a LayerNorm eps of 1e-11 instead of 1e-12 does to a layer of unit variance (~5e-12).
# Accumulated 1e-10: above it a layer is only "amplified" unless its own error is over too, and deeper models
# than ALIGN-base carry more; the float32 set's 1e-3 on absolute differences and outputs is ~1e4 times its
# round-off, 1e-9 is as far above float64's.
FLOAT64 = Tolerances("float64", local_rel_l2=1e-12, accumulated_rel_l2=1e-10, amplified_max_abs=1e-9,
                     embeds_max_abs=1e-9)
# The float32 set's values under their old names (the engine's float32-only helpers read them).
LOCAL_REL_L2 = FLOAT32.local_rel_l2
ACCUMULATED_REL_L2 = FLOAT32.accumulated_rel_l2
AMPLIFIED_MAX_ABS = FLOAT32.amplified_max_abs
TOLERANCES = FLOAT32.as_dict()
FAULT_GROWTH = FLOAT32.fault_growth

def _index_at(path: str) -> int | None:
    """Where the first numeric part of a module path is (`encoder.layer.3` -> 2), or None."""
    return next((i for i, part in enumerate(path.split(".")) if part.isdigit()), None)


def module_blocks(pairs) -> Callable:
    """`block_of(pair)` from the torch module tree: a row inside a repeated module belongs to it
    (`encoder.layer.3`, `bert.encoder.layer.3`, `encoder.blocks.5`); any other row to the module at the depth of
    the repeated list's parent (`embeddings`, `pooler` beside `encoder`; `bert.embeddings`, `cls.predictions`
    beside `bert.encoder`); a Keras-only row to the Keras path's first part."""
    indices = [i for p in pairs if p.torch is not None and (i := _index_at(p.torch.path)) is not None]
    depth = max(1, min(indices) - 1) if indices else 1

    def block_of(pair) -> str:
        if pair.torch is None:
            return pair.keras.path.split("/")[0] if pair.keras is not None else ""
        parts = pair.torch.path.split(".")
        at = _index_at(pair.torch.path)
        return ".".join(parts[:at + 1] if at is not None else parts[:depth])

    return block_of


def layer_rows(pairs, entries: list, block_of: Callable | None = None,
               tolerances: Tolerances = FLOAT32) -> list[LayerRow]:
    """One row per paired layer (and per unpaired layer that computes something), in execution order.
    `block_of(pair)`: the block its row is counted in (an adapter's names; default `module_blocks(pairs)`);
    `tolerances`: the run's (its precision's) thresholds for each row's status."""
    block_of = block_of or module_blocks(pairs)
    from tracer.engine.pairing import gap_cost

    source_of = {e.variable: e for e in entries}
    # An unpaired layer inside a paired container is covered by that container's row (torch's GELU module,
    # which TF's BERT applies inline; the embedding tables a Keras layer owns directly).
    covered = tuple([f"{p.torch.path}." for p in pairs if p.paired and p.torch.is_container]
                    + [f"{p.keras.path}/" for p in pairs if p.paired and p.keras.is_container])
    rows: list[LayerRow] = []
    count: Counter = Counter()
    previous: dict[str, float] = {}
    for pair in pairs:
        k, t = pair.keras, pair.torch
        if not pair.paired and (gap_cost(k or t) == 0.0 or (k or t).path.startswith(covered)):
            continue
        weights = [source_of[v] for v in (k.variables if k else {}) if v in source_of]
        row = LayerRow(
            pair.tower, count[pair.tower], block_of(pair),
            keras_layer=k.path if k else "", keras_class=k.cls if k else "",
            hf_module=t.path if t else "", hf_class=t.cls if t else "",
            keras_shape="x".join(map(str, k.shape)) if k else "",
            hf_shape="x".join(map(str, t.shape)) if t else "",
            weights="; ".join(f"{e.variable} -> {e.parameter}" for e in weights),
            mapping_source=",".join(sorted({e.source for e in weights})), pair=pair)
        count[pair.tower] += 1
        measured = pair.measured if pair.paired else None
        if measured is None and pair.paired and k.output is not None and t.output is not None:
            measured = Measured().add(pair)
        if measured is not None:
            acc = measured.accumulated.result()
            row.max_abs, row.mean_abs, row.rel_l2, row.cosine = acc.max_abs, acc.mean_abs, acc.rel_l2, acc.cosine
            if measured.local is not None:
                loc = measured.local.result()
                row.local_max_abs, row.local_rel_l2 = loc.max_abs, loc.rel_l2
            before = previous.get(pair.tower)
            row.growth = acc.rel_l2 / before if before else float("nan")
            previous[pair.tower] = max(acc.rel_l2, 1e-12)
            row.status = layer_status(acc.rel_l2, row.local_rel_l2, row.growth, acc.max_abs, tolerances)
        rows.append(row)
    return rows


def layer_status(rel_l2: float, local_rel_l2: float, growth: float, max_abs: float = 0.0,
                 tolerances: Tolerances = FLOAT32) -> Status:
    tol = tolerances
    if rel_l2 != rel_l2 or max_abs != max_abs:  # NaN: one side computed no number where the other did
        return Status.DIVERGED
    if local_rel_l2 == local_rel_l2 and local_rel_l2 > tol.local_rel_l2:  # measured (not NaN) and over
        return Status.DIVERGED
    if rel_l2 > tol.accumulated_rel_l2:
        unexplained = local_rel_l2 != local_rel_l2 and growth == growth and growth > tol.fault_growth
        return Status.DIVERGED if unexplained else Status.AMPLIFIED
    return Status.AMPLIFIED if max_abs > tol.amplified_max_abs else Status.OK
