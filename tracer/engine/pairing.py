"""Pair the two execution-ordered record sequences of one tower by a global sequence alignment.

Needleman-Wunsch with gaps: a match needs compatible kinds, equal output shapes up to layout (NHWC vs NCHW,
singleton axes ignored) and, for weighted layers, equal weight shapes under the layout transforms. A Keras
layer with a fused activation (`Conv2D(..., activation="swish")`) may match a torch layer plus the activation
module that follows it. Each row is filled with vectorised numpy (the left-gap recurrence is a prefix max), so
ALIGN-base's ~1,000 x ~1,200 vision sequences align in well under a second.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from tracer.engine.record import GAP_KINDS, Record, nchw_to_nhwc, output_layout, squeezed
from tracer.engine.record.kinds import roles_agree
from tracer.engine.transforms import get_transform

NEG = -1e9
MATCH, MATCH_WEIGHTS, MATCH_ROLE, MATCH_ACTIVATION = 4.0, 2.0, 2.0, 0.5
MATCH_BIASLESS = 1.0  # weights equal but for a bias torch lacks: below a full weight match
CONTAINER_MATCH = 1.0
GAP_FREE, GAP_ACTIVATION, GAP_COSTLY = 0.0, -0.5, -3.0
DIAG, UP, FUSED = 1, 2, 3

# How a Keras variable of a given kind and rank is laid out for torch (rank-1 vectors and embeddings: as is).
KERNEL_TRANSFORMS = {("conv", 4): "conv", ("depthwise", 4): "depthwise", ("linear", 2): "dense"}


@dataclass
class Pair:
    tower: str
    keras: Record | None
    torch: Record | None  # whose output is compared
    torch_weights: Record | None = None  # whose parameters hold the Keras weights (differs when fused)
    score: float = 0.0
    # Set by a streaming run (`compare.Measured`): the metrics, computed while the arrays existed.
    measured: object = field(default=None, repr=False, compare=False)

    @property
    def fused(self) -> bool:
        return self.torch_weights is not None and self.torch_weights is not self.torch

    @property
    def paired(self) -> bool:
        return self.keras is not None and self.torch is not None

    @property
    def layout(self) -> str:
        """How the torch output is laid out against the Keras one (`same` or `nchw`), from their shapes."""
        if not self.paired:
            return "same"
        return (output_layout(self.keras.shape, self.torch.shape, prefer_nchw=_spatial(self.torch))
                or _guess(self.keras.shape, self.torch))

    @property
    def input_layout(self) -> str:
        """How the torch module's input is laid out against the Keras layer's, from the shapes both received."""
        weights = self.torch_weights if self.fused else self.torch
        if not self.paired or not self.keras.input_shape or weights is None or not weights.input_shape:
            return "same"
        return (output_layout(self.keras.input_shape, weights.input_shape, prefer_nchw=_spatial(weights))
                or _guess(self.keras.input_shape, weights))


def _guess(keras_shape: tuple, torch: Record) -> str:
    """Shapes that do not correspond (a port with another padding): an image layer's maps are NCHW still."""
    return "nchw" if len(keras_shape) == 4 and _spatial(torch) else "same"


def _spatial(record: Record) -> bool:
    """A torch record of a layer that works on images (where a square NCHW shape is read as NCHW)."""
    return record.kind in ("conv", "depthwise", "batchnorm", "pad", "pool") or len(record.shape) == 4


def torch_layout(kind: str, keras_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The torch shape a Keras variable of a layer of `kind` becomes."""
    if len(keras_shape) == 5:  # BatchNormalization(virtual_batch_size=...) vectors
        return get_transform("bn_squeeze").shape(keras_shape)
    name = KERNEL_TRANSFORMS.get((kind, len(keras_shape)))
    return get_transform(name).shape(keras_shape) if name else tuple(keras_shape)


def weight_signature(record: Record | None, bias: bool = True) -> tuple:
    """The record's weight shapes in torch's layout, counted; `bias=False`: without its bias (a port built with
    `bias=False` still pairs, and the bias checker names what it dropped)."""
    if record is None or not record.variables:
        return ()
    variables = {n: s for n, s in record.variables.items() if bias or not _is_bias(n)}
    if record.framework == "keras":
        shapes = [torch_layout(record.kind, s) for s in variables.values()]
    else:
        shapes = list(variables.values())
    return tuple(sorted(Counter(shapes).items()))


def _is_bias(name: str) -> bool:
    return name.rsplit("/", 1)[-1].rsplit(".", 1)[-1].removesuffix(":0") == "bias"


def shape_key(record: Record) -> tuple[int, ...]:
    """Output shape as it is, without the batch axis and singleton axes (`record.squeezed`)."""
    return squeezed(record.shape)


def nhwc_key(record: Record) -> tuple[int, ...]:
    """The shape key of a torch output read as NCHW, in channels-last order: what a Keras NHWC output has."""
    return squeezed(nchw_to_nhwc(record.shape)) if record.framework == "torch" else shape_key(record)


def gap_cost(record: Record) -> float:
    if record.kind in GAP_KINDS or record.kind in ("pad", "pool"):
        return GAP_FREE
    if record.kind == "activation":
        return GAP_ACTIVATION
    return GAP_COSTLY


def _codes(values: list) -> dict:
    return {v: i for i, v in enumerate(dict.fromkeys(values))}


def score_matrices(keras: list[Record], torch: list[Record]) -> tuple[np.ndarray, np.ndarray]:
    """S[i, j]: Keras i with torch j. F[i, j]: Keras i (fused activation) with torch j-1 (weights) + j (activation)."""
    kinds = _codes([r.kind for r in keras + torch])
    shapes = _codes([shape_key(r) for r in keras + torch] + [nhwc_key(r) for r in torch])
    sigs = _codes([weight_signature(r) for r in keras + torch] + [weight_signature(r, bias=False) for r in keras])
    k_roles, t_roles = _codes([r.role for r in keras]), _codes([r.role for r in torch])
    agree = np.array([[roles_agree(a, b) for b in t_roles] for a in k_roles]).reshape(len(k_roles), len(t_roles))
    acts = _codes([r.activation for r in keras + torch])

    def col(records, f, table):
        return np.array([table[f(r)] for r in records], dtype=np.int64)

    kk, tk = col(keras, lambda r: r.kind, kinds)[:, None], col(torch, lambda r: r.kind, kinds)[None, :]
    ks, ts = col(keras, shape_key, shapes)[:, None], col(torch, shape_key, shapes)[None, :]
    tn = col(torch, nhwc_key, shapes)[None, :]
    kw, tw = col(keras, weight_signature, sigs)[:, None], col(torch, weight_signature, sigs)[None, :]
    kb = col(keras, lambda r: weight_signature(r, bias=False), sigs)[:, None]
    role = agree[col(keras, lambda r: r.role, k_roles)[:, None], col(torch, lambda r: r.role, t_roles)[None, :]]
    ka, ta = col(keras, lambda r: r.activation, acts)[:, None], col(torch, lambda r: r.activation, acts)[None, :]
    k_container = np.array([r.is_container for r in keras])[:, None]
    none_sig = sigs.get((), -1)  # -1: no record is unweighted

    same_kind, same_shape = kk == tk, (ks == ts) | (ks == tn)  # torch NCHW or as Keras lays it out
    no_bias = (kb != kw) & (kb == tw) & (kb != none_sig)  # torch has all of Keras' weights but its bias
    weights_ok = (kw == tw) | no_bias
    leaf = same_kind & same_shape & weights_ok & ~k_container
    weights = MATCH_WEIGHTS * ((kw != none_sig) & ~no_bias) + MATCH_BIASLESS * no_bias
    s = np.where(leaf, MATCH + weights + MATCH_ACTIVATION * (ka == ta), NEG)
    container = same_kind & same_shape & k_container
    s = np.where(container, CONTAINER_MATCH + MATCH_ROLE * role, s)

    # Fused: torch j-1 carries the weights (same kind and weights as Keras i), torch j is the activation
    # whose output has Keras i's shape.
    f = np.full(s.shape, NEG)
    if len(torch) > 1:
        fusable = np.array([r.activation not in (None, "linear") and r.kind in ("conv", "depthwise", "linear")
                            for r in keras])[:, None]
        t_act = np.array([r.kind == "activation" for r in torch])[None, 1:]
        full, biasless = (kw == tw[:, :-1]) & (kw != none_sig), (kb != kw) & (kb == tw[:, :-1]) & (kb != none_sig)
        ok = fusable & (kk == tk[:, :-1]) & (full | biasless) & t_act & ((ks == ts[:, 1:]) | (ks == tn[:, 1:]))
        weights = np.where(full, MATCH_WEIGHTS, MATCH_BIASLESS)
        f[:, 1:] = np.where(ok, MATCH + weights + MATCH_ACTIVATION * (ka == ta[:, 1:]), NEG)
    return s, f


def align(keras: list[Record], torch: list[Record], tower: str = "") -> list[Pair]:
    """Globally align two record sequences; returns pairs and gaps in execution order."""
    n, m = len(keras), len(torch)
    s, f = score_matrices(keras, torch) if n and m else (np.zeros((n, m)), np.zeros((n, m)))
    gk = np.array([gap_cost(r) for r in keras])
    gt = np.array([gap_cost(r) for r in torch])
    c = np.concatenate([[0.0], np.cumsum(gt)])  # c[j]: cost of leaving torch[:j] unpaired

    prev = c.copy()
    move = np.zeros((n + 1, m + 1), dtype=np.int8)
    from_left = np.zeros((n + 1, m + 1), dtype=bool)
    from_left[0, 1:] = True
    for i in range(1, n + 1):
        d = np.full(m + 1, NEG)
        up = prev + gk[i - 1]
        d[:] = up
        mv = np.full(m + 1, UP, dtype=np.int8)
        if m:
            diag = prev[:-1] + s[i - 1]
            better = diag > d[1:]
            d[1:] = np.where(better, diag, d[1:])
            mv[1:] = np.where(better, DIAG, mv[1:])
        if m > 1:
            fused = prev[:-2] + f[i - 1, 1:]
            better = fused > d[2:]
            d[2:] = np.where(better, fused, d[2:])
            mv[2:] = np.where(better, FUSED, mv[2:])
        row = np.maximum.accumulate(d - c) + c
        from_left[i] = row > d + 1e-9
        move[i] = mv
        prev = row

    pairs: list[Pair] = []
    i, j = n, m
    while i > 0 or j > 0:
        if j > 0 and (i == 0 or from_left[i, j]):
            pairs.append(Pair(tower, None, torch[j - 1]))
            j -= 1
        elif move[i, j] == DIAG:
            k, t = keras[i - 1], torch[j - 1]
            pairs.append(Pair(tower, k, t, t if k.variables or t.variables else None, float(s[i - 1, j - 1])))
            i, j = i - 1, j - 1
        elif move[i, j] == FUSED:
            pairs.append(Pair(tower, keras[i - 1], torch[j - 1], torch[j - 2], float(f[i - 1, j - 1])))
            i, j = i - 1, j - 2
        else:
            pairs.append(Pair(tower, keras[i - 1], None))
            i -= 1
    pairs.reverse()
    return pairs


def pair_records(keras: list[Record], torch: list[Record]) -> list[Pair]:
    """Align each part separately, parts in the order of their first Keras record."""
    pairs: list[Pair] = []
    for part in dict.fromkeys(r.tower for r in keras + torch):
        pairs += align([r for r in keras if r.tower == part], [r for r in torch if r.tower == part], part)
    return pairs
