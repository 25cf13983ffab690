"""Cause hints for the classic TF->PyTorch port faults: one small checker per fault class, each returning
evidence (a sentence that names the numbers) or nothing.

Every row checker tests one hypothesis concretely, mostly by re-running the HF module on the Keras layer's own
input (as `compare.local_output` does) with the suspected fault undone: a transposed or flipped kernel, permuted
query/key/value weights, the Keras epsilon, the Keras padding, an activation variant. A hypothesis is reported
when the re-run fits the Keras output within the local tolerance (`compare.LOCAL_REL_L2`), or, for the checks that
need no re-run (a weight at its initial value, the input pixels off by an affine map), when the numbers show it.

Rows that get a hint: every row that diverged locally; the first row of a tower whose accumulated error exceeds
tolerance when that tower is off (where the error enters, e.g. the preprocessing); a container whose diverged
layer inside already has a hint points to it. Run-level hints (the temperature, the preprocessing) are returned.
Each hint is a `hint.Hint` (class, evidence); rows hold them in `hints`, and as text in `hint`.
"""

from __future__ import annotations

import itertools
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from tracer.engine.compare import (ACCUMULATED_REL_L2, LOCAL_REL_L2, divergence, local_output, nhwc_to_nchw,
                                   to_keras_layout)
from tracer.engine.hint import Hint
from tracer.engine.record import output_layout
from tracer.engine.row import LayerRow, Status
from tracer.engine.sensitivity import amplified_hint

logger = logging.getLogger(__name__)

FIT = LOCAL_REL_L2  # a re-run "fits" when its local rel_l2 against the Keras output is within the local tolerance
# Under the local tolerance but ten times a reduction's float32 round-off (~1e-6): a GELU variant on small
# pre-activations (transformers' BertIntermediate, demo-scale weights) differs by only ~6e-5. Only the activation
# check, whose evidence is exact (each side fits a different named function), may call such a layer diverged.
SUSPECT_LOCAL = 1e-5
CANDIDATE_FIT = 1e-5  # an activation candidate "is" what a side computes (float32 round-off is ~1e-7)
SAMPLE = 20_000  # elementwise checks look at most this many values
CLASSES = {
    "never_written": "a weight never written, or left at its initial value",
    "transposed": "a kernel transposed or spatially flipped",
    "qkv_swap": "query, key and value weights swapped",
    "epsilon": "a normalisation epsilon mismatch",
    "padding": "padding (a spatial shape off by one, or a one-pixel shift)",
    "activation": "an activation variant",
    "preprocessing": "the preprocessing scale or offset",
    "temperature": "the temperature not carried over",
    "bias": "a bias dropped (bias=False, or left at zero) where Keras has one",
    "mapping": "a weight the table sends where the tracer's measured candidate fits and the table's does not",
}


# ---------------------------------------------------------------------------------------------------- context


def _key(tower: str, keras_path: str, torch_path: str) -> tuple[str, str, str]:
    return tower, keras_path, torch_path


@dataclass
class Context:
    """What the checkers share: the pairs indexed several ways, the mapping, the parity and a cache."""

    pairs: list
    rows: list[LayerRow]
    entries: list
    parity: object
    by_row: dict = field(default_factory=dict)  # (tower, keras path, torch path) -> Pair
    by_torch_path: dict = field(default_factory=dict)
    entry_of_parameter: dict = field(default_factory=dict)
    entry_of_variable: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)
    entry_rows: set = field(default_factory=set)  # id(row) of each off tower's first row over tolerance

    block_of: Callable = None  # pair -> its row's block (`compare.layer_rows`' `block_of`)

    @classmethod
    def build(cls, pairs, rows, entries, parity, block_of: Callable | None = None) -> "Context":
        from tracer.engine.compare import module_blocks

        ctx = cls(list(pairs), rows, list(entries or []), parity, block_of=block_of or module_blocks(pairs))
        for p in ctx.pairs:
            ctx.by_row[_key(p.tower, p.keras.path if p.keras else "", p.torch.path if p.torch else "")] = p
            if p.torch is not None:
                ctx.by_torch_path.setdefault(p.torch.path, p)
        ctx.entry_of_parameter = {e.parameter: e for e in ctx.entries}
        ctx.entry_of_variable = {e.variable: e for e in ctx.entries}
        return ctx

    def pair_of(self, row: LayerRow):
        """The row's pair among the diagnosis's own (a streamed run's capture pass, which kept the arrays; not
        `row.pair`, measured without them)."""
        return self.by_row.get(_key(row.tower, row.keras_layer, row.hf_module))

    def keras_variables(self) -> dict:
        """name -> tf.Variable for every Keras layer the recording saw (read lazily, once)."""
        if "keras_variables" not in self.cache:
            found = {}
            for p in self.pairs:
                layer = getattr(p.keras, "layer", None) if p.keras is not None else None
                for v in getattr(layer, "weights", ()) if layer is not None else ():
                    found.setdefault(v.name.removesuffix(":0"), v)
            self.cache["keras_variables"] = found
        return self.cache["keras_variables"]

    def keras_value(self, name: str) -> np.ndarray | None:
        v = self.keras_variables().get(name)
        return None if v is None else np.asarray(v.numpy())

    def tower_off(self, tower: str) -> bool:
        """The part's outputs miss their tolerance, or one of its layers diverged."""
        if self.parity is not None and self.parity.off(tower):
            return True
        return any(r.tower == tower and r.diverged for r in self.rows)


# ---------------------------------------------------------------------------------------------------- helpers


def _fmt(x: float) -> str:
    return f"{x:.1e}"


def _rel(reference: np.ndarray, candidate: np.ndarray) -> float:
    return divergence(reference, candidate).rel_l2


def _local_error(pair, out) -> float:
    return _rel(pair.keras.output, out) if out is not None else float("inf")


@contextmanager
def _patched(changes):
    """Temporarily set attributes: `[(object, name, value), ...]` (module parameters, eps, padding, submodules)."""
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in changes]
    try:
        for obj, name, value in changes:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


def _rerun(pair, changes=()) -> np.ndarray | None:
    """`compare.local_output` with the changes applied: the HF module on the Keras input, in Keras layout."""
    with _patched(changes):
        return local_output(pair)


def _parameter(tensor):
    import torch

    return torch.nn.Parameter(tensor.detach().clone(), requires_grad=False)


def _as_of(row: LayerRow) -> str:
    return _fmt(row.local_rel_l2)


def _own_tensors(module) -> dict:
    own = dict(module.named_parameters(recurse=False))
    own.update((k, b) for k, b in module.named_buffers(recurse=False)
               if k not in module._non_persistent_buffers_set and not k.endswith("num_batches_tracked"))
    return own


def _weights_pair(pair):
    """(torch record holding the weights, its module), or (None, None)."""
    rec = pair.torch_weights if pair.torch_weights is not None else pair.torch
    module = getattr(rec, "module", None) if rec is not None else None
    return (rec, module) if module is not None else (None, None)


def _ancestors(ctx: Context, torch_path: str):
    """Pairs of the torch modules that contain `torch_path`, innermost first."""
    parts = torch_path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        p = ctx.by_torch_path.get(".".join(parts[:i]))
        if p is not None:
            yield p


def _sample(a: np.ndarray) -> np.ndarray:
    flat = np.asarray(a).ravel()
    return flat if flat.size <= SAMPLE else flat[:: int(math.ceil(flat.size / SAMPLE))]


def _keras_members(ctx: Context, pair) -> list:
    """The Keras records inside a Keras container: `path/...` (subclassed layers) or `blockNx_...` siblings
    (coyo's functional EfficientNet, whose blocks exist only as name prefixes)."""
    k = pair.keras
    if k is None:
        return []
    parent, _, name = k.path.rpartition("/")
    out = []
    for p in ctx.pairs:
        r = p.keras
        if r is None or r is k or p.tower != pair.tower:
            continue
        if r.path.startswith(k.path + "/"):
            out.append(r)
        elif k.is_container and r.path.rpartition("/")[0] == parent and r.path.rpartition("/")[2].startswith(name + "_"):
            out.append(r)
    return out


# ---------------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Checker:
    name: str  # the class of the hints it gives
    check: Callable  # (pair, row, ctx) -> evidence (str) or None; run checkers: (ctx) -> ...

    def __call__(self, *args, where: str = "") -> Hint | None:
        """Its hint for these arguments, or None; a check that fails logs a warning and finds nothing (it must
        not cost the report)."""
        try:
            evidence = self.check(*args)
        except Exception as exc:
            logger.warning("diagnose: check %s%s failed: %s", self.name, where, exc)
            return None
        return Hint(self.name, evidence) if evidence else None


CHECKERS: list[Checker] = []  # row checkers, in the order their evidence is listed
RUN_CHECKERS: list[Checker] = []  # run-level checkers: (ctx) -> str | None


def row_checker(name: str):
    def register(fn):
        CHECKERS.append(Checker(name, fn))
        return fn
    return register


def run_checker(name: str):
    def register(fn):
        RUN_CHECKERS.append(Checker(name, fn))
        return fn
    return register


# ---------------------------------------------------------------------------------------------------- 1. never written


def _init_like(value: np.ndarray) -> str | None:
    """How a tensor looks like an initial value: all ones, all zeros, or one constant."""
    flat = np.asarray(value, np.float64).ravel()
    if flat.size < 2 or not np.isfinite(flat).all():
        return None
    if np.all(flat == 0):
        return "all zeros"
    if np.all(flat == 1):
        return "all ones"
    if np.all(flat == flat[0]):
        return f"the constant {flat[0]:.6g}"
    return None


def _describe_values(value: np.ndarray) -> str:
    v = np.asarray(value, np.float64)
    return f"ranges {v.min():.3g}…{v.max():.3g} (mean {v.mean():.3g})"


def _layer_tensors(pair, ctx: Context) -> dict[str, tuple[object, str, object]]:
    """full name -> (owning module, attribute, tensor) for the HF tensors that hold this layer's weights: the
    weights module's own tensors, and (for a container) the parameters the mapping sends its Keras variables to."""
    rec, module = _weights_pair(pair)
    if module is None:
        return {}
    found = {}
    if not rec.is_container:
        found = {f"{rec.path}.{n}": (module, n, t) for n, t in _own_tensors(module).items()}
    for variable in pair.keras.variables if pair.keras is not None else ():
        entry = ctx.entry_of_variable.get(variable)
        if entry is None or not entry.parameter.startswith(rec.path + ".") or entry.parameter in found:
            continue
        owner_path, _, attr = entry.parameter[len(rec.path) + 1:].rpartition(".")
        try:
            owner = module.get_submodule(owner_path) if owner_path else module
        except AttributeError:
            continue
        tensor = _own_tensors(owner).get(attr)
        if tensor is not None:
            found[entry.parameter] = (owner, attr, tensor)
    return found


def _expected(ctx: Context, full: str, shape: tuple) -> tuple[object, np.ndarray | None]:
    """(the mapping entry that writes `full`, the value it should hold in torch layout), either may be None."""
    from tracer.engine.transforms import get_transform

    entry = ctx.entry_of_parameter.get(full)
    raw = ctx.keras_value(entry.variable) if entry is not None else None
    if raw is None:
        return entry, None
    try:
        value = get_transform(entry.transform)(raw)
    except Exception:  # a transform that does not apply to this variable: another checker's business
        return entry, None
    return entry, (value if tuple(value.shape) == tuple(shape) else None)


@row_checker("never_written")
def check_never_written(pair, row, ctx: Context) -> str | None:
    """A tensor of the diverged layer equals a typical initial value (ones, zeros, a constant) or another parameter
    beside it, while the checkpoint variable mapped to it differs: re-run with the checkpoint's value."""
    import torch

    tensors = _layer_tensors(pair, ctx)
    if not tensors:
        return None
    rec, _ = _weights_pair(pair)
    parent = next(_ancestors(ctx, rec.path), None)
    siblings = None  # the tensors beside this layer's (its parent module's), read when first needed
    found, fixes = [], []
    for full, (owner, attr, tensor) in tensors.items():
        value = tensor.detach().cpu().numpy()
        entry, expected = _expected(ctx, full, value.shape)
        if expected is not None and np.allclose(value, expected, rtol=1e-6, atol=1e-8):
            continue  # it holds what the mapping says
        how = _init_like(value)
        if how is None and parent is not None:
            if siblings is None:
                siblings = dict(_own_tensors_deep(parent.torch.module, parent.torch.path))
            same = [n for n, t in siblings.items() if n != full and tuple(t.shape) == value.shape
                    and np.array_equal(t.detach().cpu().numpy(), value)]
            how = f"identical to `{same[0]}`" if same else None
        if how is None or (expected is not None and _init_like(expected) == how):
            continue
        if expected is not None:
            source = f"the checkpoint's `{entry.variable}` (mapped to it) {_describe_values(expected)}"
        elif entry is not None:
            source = f"the mapping writes `{entry.variable}` into it"
        else:
            source = "no mapping entry writes it"
        found.append(f"HF `{full}` is {how} but {source}")
        if expected is not None:
            fixed = torch.from_numpy(np.ascontiguousarray(expected)).to(tensor.dtype)
            fixes.append((owner, attr, _parameter(fixed) if isinstance(tensor, torch.nn.Parameter) else fixed))
    if not found:
        return None
    text = "; ".join(found) + ": never written, or reset to its initial value after writing"
    if fixes:
        err = _local_error(pair, _rerun(pair, fixes))
        verdict = "fits" if err <= FIT else "does not fit alone"
        text += f" (re-running with the checkpoint values {verdict}: local rel_l2 {_fmt(err)}, as converted {_as_of(row)})"
    return text


def _own_tensors_deep(module, path: str):
    for name, sub in module.named_modules():
        for attr, t in _own_tensors(sub).items():
            yield f"{path}.{name + '.' if name else ''}{attr}", t


# ---------------------------------------------------------------------------------------------------- 2. transposed


def _kernel_variants(kind: str, weight) -> list[tuple[str, object]]:
    """(description, candidate weight) for the layout faults a kernel of this kind and shape can have."""
    w = weight.detach()
    out = []
    if w.ndim == 2 and w.shape[0] == w.shape[1]:
        out.append(("transposed ((in, out) copied as (out, in): the Dense kernel lacks its transpose)", w.t()))
    if w.ndim == 4:
        o, i, kh, kw = w.shape
        if o == i and kind == "conv":
            out.append(("with its in/out channel axes swapped", w.transpose(0, 1)))
        if kh > 1 or kw > 1:
            out.append(("flipped in both spatial axes (rotated 180°: convolution vs cross-correlation)",
                        w.flip(-1, -2)))
            if kh > 1:
                out.append(("flipped vertically", w.flip(-2)))
            if kw > 1:
                out.append(("flipped horizontally", w.flip(-1)))
            if kh == kw:
                out.append(("with its height and width axes transposed", w.transpose(-1, -2)))
    return out


@row_checker("transposed")
def check_transposed(pair, row, ctx: Context) -> str | None:
    """Re-run the layer with its kernel transposed / flipped; a variant that fits names the layout fault."""
    rec, module = _weights_pair(pair)
    if module is None or rec.kind not in ("conv", "depthwise", "linear") or not hasattr(module, "weight"):
        return None
    for what, candidate in _kernel_variants(rec.kind, module.weight):
        err = _local_error(pair, _rerun(pair, [(module, "weight", _parameter(candidate))]))
        if err <= FIT:
            entry = ctx.entry_of_parameter.get(f"{rec.path}.weight")
            via = f" (mapping transform `{entry.transform}` for `{entry.variable}`)" if entry is not None else ""
            return (f"re-running HF `{rec.path}` with its weight {what.split(' (')[0]} fits the Keras output "
                    f"(local rel_l2 {_fmt(err)}, as converted {_as_of(row)}): the kernel was {what}{via}")
    return None


# ---------------------------------------------------------------------------------------------------- 3. q/k/v


_QKV_NAMES = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("q", "k", "v"))


def _attention_of(ctx: Context, pair):
    """The self-attention pair this pair is (or lies inside), with its q/k/v child names."""
    for p in ([pair] if pair.torch is not None else []) + list(_ancestors(ctx, pair.torch.path if pair.torch else "")):
        module = getattr(p.torch, "module", None)
        if module is None or not p.paired:
            continue
        for names in _QKV_NAMES:
            if all(hasattr(module, n) and hasattr(getattr(module, n), "weight") for n in names):
                return p, names
    return None, None


@row_checker("qkv_swap")
def check_qkv(pair, row, ctx: Context) -> str | None:
    """Re-run the self-attention with its query/key/value weights permuted; a permutation that fits names the swap."""
    attention, names = _attention_of(ctx, pair)
    if attention is None:
        return None
    key = ("qkv", attention.torch.path)
    if key in ctx.cache:
        return ctx.cache[key]
    module = attention.torch.module
    layers = [getattr(module, n) for n in names]
    tensors = [{k: v for k, v in layer.named_parameters(recurse=False)} for layer in layers]
    as_converted = _local_error(attention, _rerun(attention))
    found = None
    # role r takes the tensors now held by names[perm[r]]: kernels and biases together, then kernels alone
    for which, perm in itertools.product((("weight", "bias"), ("weight",)), itertools.permutations(range(3))):
        if perm == (0, 1, 2):
            continue
        changes = [(layers[r], k, _parameter(tensors[perm[r]][k])) for r in range(3) for k in which
                   if k in tensors[r] and k in tensors[perm[r]] and tensors[perm[r]][k].shape == tensors[r][k].shape]
        err = _local_error(attention, _rerun(attention, changes))
        if err <= FIT:
            what = "weights and biases" if len(which) == 2 else "weights (biases in place)"
            held = ", ".join(f"HF {names[perm[r]]} holds Keras {names[r]}" for r in range(3) if perm[r] != r)
            found = (f"re-running HF `{attention.torch.path}` with the {what} of {names} taken from "
                     f"{tuple(names[i] for i in perm)} fits the Keras output (local rel_l2 {_fmt(err)}, as converted "
                     f"{_fmt(as_converted)}): {held}")
            break
    ctx.cache[key] = found
    return found


# ---------------------------------------------------------------------------------------------------- 4. epsilon


@row_checker("epsilon")
def check_epsilon(pair, row, ctx: Context) -> str | None:
    """Recompute a BatchNorm / LayerNorm with the Keras layer's epsilon."""
    rec, module = _weights_pair(pair)
    if module is None or not hasattr(module, "eps") or pair.keras is None:
        return None
    keras_eps = pair.keras.config.get("epsilon")
    if keras_eps is None or math.isclose(float(keras_eps), float(module.eps), rel_tol=1e-6):
        return None
    err = _local_error(pair, _rerun(pair, [(module, "eps", float(keras_eps))]))
    head = (f"HF `{rec.path}` uses eps {float(module.eps):g}, Keras `{pair.keras.path.rsplit('/', 1)[-1]}` "
            f"epsilon {float(keras_eps):g}")
    if err <= FIT:
        return f"{head}: re-running with {float(keras_eps):g} fits (local rel_l2 {_fmt(err)}, as converted {_as_of(row)})"
    return f"{head}; re-running with Keras' epsilon alone does not fit (local rel_l2 {_fmt(err)})"


# ---------------------------------------------------------------------------------------------------- 5. padding


def _keras_pad(record) -> tuple[int, int, int, int] | None:
    """A ZeroPadding2D's amounts as torch's (left, right, top, bottom)."""
    pad = record.config.get("padding")
    if pad is None or isinstance(pad, str):
        return None
    if isinstance(pad, int):
        return (pad,) * 4
    (top, bottom), (left, right) = (p if isinstance(p, (tuple, list)) else (p, p) for p in pad)
    return (int(left), int(right), int(top), int(bottom))


def _torch_pads(module) -> list[tuple[str, object]]:
    import torch

    return [(n, m) for n, m in module.named_modules() if isinstance(m, torch.nn.ZeroPad2d)]


def _keras_same(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """Keras/TF `padding="same"`: (before, after), the odd pixel after."""
    total = max((-(-size // stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _same_padding(pair, weights, row) -> str | None:
    """A Keras `same` conv ported with torch's symmetric padding: re-run the conv padded as TF pads."""
    module, k = weights.module, pair.keras
    if k.config.get("padding") != "same" or k.input is None or k.input.ndim != 4 or module is None:
        return None
    (h, w), (kh, kw) = k.input.shape[1:3], module.kernel_size
    (sh, sw), (dh, dw) = module.stride, module.dilation
    top, bottom = _keras_same(h, kh, sh, dh)
    left, right = _keras_same(w, kw, sw, dw)
    if isinstance(module.padding, str) or (top, bottom, left, right) == (module.padding[0],) * 2 + (module.padding[1],) * 2:
        return None
    changes = [(module, "padding_mode", "constant"), (module, "padding", (0, 0)),
               (module, "_reversed_padding_repeated_twice", (left, right, top, bottom))]
    err = _local_error(pair, _rerun(pair, changes))
    if err > FIT:
        return None
    return (f"HF `{weights.path}` pads {tuple(module.padding)} on each side where Keras `{k.path.rsplit('/', 1)[-1]}` "
            f"pads `same` as TF does: (top, bottom, left, right) = {(top, bottom, left, right)}; re-running so fits "
            f"(local rel_l2 {_fmt(err)}, as converted {_as_of(row)})")


def _shift_fit(pair, local: np.ndarray) -> tuple[tuple[int, int], float] | None:
    """The ±1-pixel shift (dy, dx) of the HF output that fits the Keras output on their overlap, if any."""
    ref = pair.keras.output
    if ref is None or local is None or ref.ndim != 4 or ref.shape != local.shape:
        return None
    h, w = ref.shape[1:3]
    if h < 4 or w < 4:
        return None  # a shift needs a spatial map to show on
    best = None
    for dy, dx in itertools.product((-1, 0, 1), repeat=2):
        if (dy, dx) == (0, 0):
            continue
        k = ref[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)]
        t = local[:, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
        err = _rel(k, t)
        if best is None or err < best[1]:
            best = ((dy, dx), err)
    return best if best is not None and best[1] <= FIT else None


def _unpaired_pads(ctx: Context, pair, row) -> str | None:
    """Unpaired pad layers of the same block whose spatial sizes differ: the shape off by one."""
    key = ("unpaired pads", pair.tower, row.block)
    if key in ctx.cache:
        return ctx.cache[key]
    keras_pads, torch_pads = [], []
    for p in ctx.pairs:
        r = p.keras or p.torch
        if p.tower != pair.tower or p.paired or r.kind != "pad" or len(r.shape) != 4:
            continue
        if ctx.block_of(p) == row.block:
            (keras_pads if p.keras else torch_pads).append(r)
    found = None
    for k, t in zip(keras_pads, torch_pads):
        (kh, kw), (th, tw) = k.shape[1:3], t.shape[2:4]
        if (kh, kw) != (th, tw):
            found = (f"HF `{t.path}` outputs {th}x{tw} where Keras `{k.path.rsplit('/', 1)[-1]}` outputs {kh}x{kw}: "
                     f"pads of different sizes (HF {tuple(t.config.get('padding', ()))}, Keras {_keras_pad(k)} as "
                     "(left, right, top, bottom))")
            break
    ctx.cache[key] = found
    return found


@row_checker("padding")
def check_padding(pair, row, ctx: Context) -> str | None:
    """Re-run with the Keras padding; compare the HF output shifted by ±1 pixel; or name pad shapes off by one."""
    if not pair.paired or len(pair.keras.shape) != 4:  # padding is spatial
        return None
    evidence = []
    module = getattr(pair.torch, "module", None) if pair.paired else None
    if module is not None and pair.keras.output is not None and pair.keras.output.ndim == 4:
        pads = _torch_pads(module)
        keras_pads = [r for r in _keras_members(ctx, pair) + [pair.keras] if r.kind == "pad"] if pads else []
        changes, named = [], []
        if pads and len(pads) == len(keras_pads):
            for (name, pad), k in zip(pads, keras_pads):
                want = _keras_pad(k)
                if want is not None and tuple(pad.padding) != want:
                    changes.append((pad, "padding", want))
                    named.append(f"HF `{pair.torch.path}{'.' + name if name else ''}` pads {tuple(pad.padding)} "
                                 f"where Keras `{k.path.rsplit('/', 1)[-1]}` pads {want} (left, right, top, bottom)")
        if changes:
            err = _local_error(pair, _rerun(pair, changes))
            if err <= FIT:
                evidence.append("; ".join(named) + f": re-running with Keras' padding fits (local rel_l2 {_fmt(err)}, "
                                f"as converted {_as_of(row)})")
        weights = pair.torch_weights if pair.fused else pair.torch  # Conv2D(activation=...): torch's conv
        if not evidence and row.diverged and weights.kind in ("conv", "depthwise"):
            evidence += filter(None, [_same_padding(pair, weights, row)])
        if not evidence and row.diverged and weights.kind in ("conv", "depthwise", "pad"):
            shift = _shift_fit(pair, local_output(pair))
            if shift is not None:
                (dy, dx), err = shift
                evidence.append(f"the HF output shifted by (dy, dx) = ({dy:+d}, {dx:+d}) pixels fits the Keras output "
                                f"on their overlap (rel_l2 {_fmt(err)}, unshifted {_as_of(row)}): a one-pixel shift")
    if not evidence and (shapes := _unpaired_pads(ctx, pair, row)):
        evidence.append(shapes)
    return "; ".join(evidence) or None


# ---------------------------------------------------------------------------------------------------- 6. activation


def _candidates():
    """name -> function on a float64 torch tensor: the activations a port can confuse."""
    import torch
    import torch.nn.functional as F

    def gelu_tanh(x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    return {
        "identity": lambda x: x,
        "relu": torch.relu,
        "relu6": lambda x: torch.clamp(x, 0, 6),
        "leaky_relu": lambda x: F.leaky_relu(x, 0.01),
        "elu": F.elu,
        "selu": F.selu,
        "sigmoid": torch.sigmoid,
        "hard_sigmoid": lambda x: torch.clamp(x + 3, 0, 6) / 6,
        "tanh": torch.tanh,
        "swish (x·sigmoid(x))": F.silu,
        "hard_swish": lambda x: x * torch.clamp(x + 3, 0, 6) / 6,
        "gelu (erf)": lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))),
        "gelu_new (tanh approximation)": gelu_tanh,
        "quick_gelu (x·sigmoid(1.702x))": lambda x: x * torch.sigmoid(1.702 * x),
        "mish": F.mish,
        "softplus": F.softplus,
    }


def _fitting(z, target: np.ndarray) -> list[tuple[str, float]]:
    """Candidates whose output on z matches target within CANDIDATE_FIT, best first."""
    import torch

    x = torch.from_numpy(np.asarray(z, np.float64))
    t = np.asarray(target, np.float64)
    errs = [(name, _rel(t, fn(x).numpy())) for name, fn in _candidates().items()]
    return sorted([(n, e) for n, e in errs if e <= CANDIDATE_FIT], key=lambda ne: ne[1])


def _torch_input(array: np.ndarray, layout: str = "nchw"):
    """A Keras float activation as the HF module takes it (NHWC -> NCHW for 4-D maps laid out so); float64 stays
    float64 (a `--float64` run's modules are double)."""
    import torch

    a = nhwc_to_nchw(array) if layout == "nchw" else array
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64 if a.dtype == np.float64 else np.float32))


def _activation_site(pair, ctx: Context):
    """(pre-activation z, HF post-activation, Keras post-activation) as flat samples, or None.

    A leaf activation: z is the Keras input. A Keras layer with a fused activation: z is the HF weights module
    on the Keras input. A container whose last operation is an activation module (BERT's intermediate): z is what
    that module received during the local re-run."""
    import torch

    from tracer.engine.record.kinds import torch_kind

    k, t = pair.keras, pair.torch
    if not pair.paired or k.output is None or k.input is None or t.module is None:
        return None
    if t.kind == "activation" and not pair.fused:
        x = _torch_input(k.input, pair.input_layout)
        with torch.inference_mode():
            z, hf = x, t.module(x)
    elif pair.fused and t.kind == "activation":
        x = _torch_input(k.input, pair.input_layout)
        with torch.inference_mode():
            z = pair.torch_weights.module(x)
            hf = t.module(z)
    elif t.is_container:
        calls = []
        hooks = [m.register_forward_hook(lambda m, a, o: calls.append((a[0], o)))
                 for m in t.module.modules() if torch_kind(m) == "activation"]
        try:
            local = local_output(pair)
        finally:
            for h in hooks:
                h.remove()
        if not calls or local is None:
            return None
        z, hf = calls[-1]
        last = to_keras_layout(hf.detach().numpy(), k.shape, pair.layout) if hf.numel() == local.size else None
        if last is None or _rel(local, last) > 1e-7:
            return None  # the activation is not the container's last operation
    else:
        return None
    z_np = to_keras_layout(z.detach().numpy(), k.shape, pair.layout) if z.numel() == k.output.size else None
    if z_np is None:
        return None
    return _sample(z_np), _sample(to_keras_layout(hf.detach().numpy(), k.shape, pair.layout)), _sample(k.output)


@row_checker("activation")
def check_activation(pair, row, ctx: Context) -> str | None:
    """Apply the candidate activations to the layer's pre-activation: which one HF computes, which one Keras does."""
    site = _activation_site(pair, ctx)
    if site is None:
        return None
    z, hf, keras = site
    hf_fits, keras_fits = _fitting(z, hf), _fitting(z, keras)
    if not hf_fits or not keras_fits or {n for n, _ in hf_fits} & {n for n, _ in keras_fits}:
        return None

    def named(fits):
        first, err = fits[0]
        same = [n for n, _ in fits[1:]]
        return f"{first} (rel_l2 {_fmt(err)}{'; identical here to ' + ', '.join(same) if same else ''})"

    return (f"on this layer's pre-activation, HF computes {named(hf_fits)} where Keras computes {named(keras_fits)}; "
            f"the two differ by rel_l2 {_fmt(_rel(keras, hf))}")


# ---------------------------------------------------------------------------------------------------- 7. preprocessing


def _first_inputs(ctx: Context):
    """(keras record, torch record) of the first paired layer, in the first part that takes images, whose HF record
    kept its input (what the processor gave it)."""
    for p in ctx.pairs:
        if not p.paired or p.keras.input is None or p.keras.input.ndim != 4:
            continue
        # a Keras conv with a fused activation pairs with torch's activation; the conv before it took the pixels
        t = next((r for r in (p.torch_weights, p.torch) if r is not None and r.input is not None), None)
        if t is not None:
            return p.keras, t
    return None, None


def _image_part(ctx: Context) -> str | None:
    k, _ = _first_inputs(ctx)
    return None if k is None else k.tower


def _affine(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least-squares y ≈ a·x + b: (a, b, rel_l2 of the fit)."""
    x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    design = np.stack([x, np.ones_like(x)], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, y, rcond=None)
    return float(a), float(b), _rel(y, a * x + b)


def _number(v: float) -> str:
    """A coefficient as a person would write it: 0.5, 1/255, 1/127.5, -1."""
    if abs(v) < 1e-6:
        return "0"
    inverse = 1 / v
    for denominator in (round(inverse), round(inverse * 2) / 2):
        if abs(denominator) > 2 and math.isclose(inverse, denominator, rel_tol=1e-5):
            return f"{'-' if denominator < 0 else ''}1/{abs(denominator):g}"
    return f"{v:.6g}"


def _linear(a: float, b: float, x: str) -> str:
    text = f"{_number(a)}·{x}"
    if abs(b) >= 1e-6:
        text += f" {'+' if b > 0 else '−'} {_number(abs(b))}"
    return text


def _pixels_evidence(ctx: Context) -> str | None:
    if "pixels" in ctx.cache:
        return ctx.cache["pixels"]
    ctx.cache["pixels"] = None
    k, t = _first_inputs(ctx)
    if k is None:
        return None
    keras_in = np.asarray(k.input, np.float64)
    layout = output_layout(keras_in.shape, t.input.shape, prefer_nchw=True) or "same"
    hf_in = to_keras_layout(np.asarray(t.input, np.float64), keras_in.shape, layout)
    if hf_in.shape != keras_in.shape or _rel(keras_in, hf_in) <= FIT:
        return None
    rescale = next((p.keras for p in ctx.pairs if p.tower == k.tower and p.keras is not None
                    and p.keras.kind == "rescale" and p.keras.input is not None), None)
    found = None
    a, b, err = _affine(keras_in, hf_in)
    if err <= FIT:
        found = f"HF's first layer received {_linear(a, b, 'k')}, where k is what Keras' first layer received"
        if rescale is not None:
            s, o, _ = _affine(rescale.input, rescale.output)
            found += (f" (from the raw pixels p: HF {_linear(a * s, a * o + b, 'p')}, Keras {_linear(s, o, 'p')} "
                      f"by its {rescale.cls}(scale={rescale.config.get('scale', s):.6g}, "
                      f"offset={rescale.config.get('offset', o):g}))")
        found += f"; fit rel_l2 {_fmt(err)}: the processor's rescale/offset differs from Keras'"
    else:
        per_channel = [_affine(keras_in[..., c], hf_in[..., c]) for c in range(keras_in.shape[-1])]
        if max(e for _, _, e in per_channel) <= FIT:
            found = ("HF's first layer received a per-channel affine map of Keras' input ("
                     + ", ".join(f"{a:.4g}·x{'+' if b >= 0 else '−'}{abs(b):.4g}" for a, b, _ in per_channel)
                     + "): the processor normalises with a mean/std that the Keras model does not use")
        elif _rel(keras_in, hf_in[..., ::-1]) <= FIT:
            found = "HF's first layer received the channels in reverse order (BGR vs RGB)"
    if found is not None:
        found = f"{found} (inputs differ by rel_l2 {_fmt(_rel(keras_in, hf_in))})"
    ctx.cache["pixels"] = found
    return found


@row_checker("preprocessing")
def check_preprocessing(pair, row, ctx: Context) -> str | None:
    """The first vision layer is off by an affine map: fit a, b between what HF's and Keras' first layers received."""
    if pair.tower != _image_part(ctx) or (id(row) not in ctx.entry_rows and row.order != 0):
        return None
    return _pixels_evidence(ctx)


@run_checker("preprocessing")
def run_preprocessing(ctx: Context) -> str | None:
    return _pixels_evidence(ctx)


# ---------------------------------------------------------------------------------------------------- 8. temperature


@run_checker("temperature")
def run_temperature(ctx: Context) -> str | None:
    # The outputs' own check says what is wrong with a temperature (a model with none has no such check).
    fault = getattr(ctx.parity, "temperature_fault", None)
    return fault() if fault is not None else None


# ---------------------------------------------------------------------------------------------------- 9. bias


def _keras_bias(pair, rec, ctx: Context) -> tuple[str, np.ndarray] | None:
    """(name, value) of the Keras bias of this layer: the variable mapped to the HF bias, else the layer's own
    `.../bias` variable (a torch module built with bias=False has no mapping entry for it)."""
    entry = ctx.entry_of_parameter.get(f"{rec.path}.bias")
    names = [entry.variable] if entry is not None else []
    names += [v for v in (pair.keras.variables if pair.keras is not None else ()) if v.rsplit("/", 1)[-1] == "bias"]
    for name in names:
        value = ctx.keras_value(name)
        if value is not None and value.ndim == 1:
            return name, value
    return None


@row_checker("bias")
def check_bias(pair, row, ctx: Context) -> str | None:
    """HF's conv/linear has no bias (or an all-zero one) where the Keras layer has a non-zero one: re-run with the
    Keras bias added back."""
    import torch

    rec, module = _weights_pair(pair)
    if module is None or rec.kind not in ("conv", "depthwise", "linear") or not hasattr(module, "bias"):
        return None
    bias = module.bias
    if bias is not None and np.any(bias.detach().cpu().numpy() != 0):
        return None  # a bias that holds other values is never_written's (or the mapping's) business
    found = _keras_bias(pair, rec, ctx)
    if found is None:
        return None
    name, value = found
    out_features = module.weight.shape[0]
    if value.shape != (out_features,) or not np.any(value != 0):
        return None
    fixed = _parameter(torch.from_numpy(np.ascontiguousarray(value)).to(module.weight.dtype))
    err = _local_error(pair, _rerun(pair, [(module, "bias", fixed)]))
    if err > FIT:
        return None
    held = "no bias (bias=False)" if bias is None else "an all-zero bias"
    return (f"HF `{rec.path}` has {held} where Keras `{name}` {_describe_values(value)}: re-running with the Keras "
            f"bias added back fits (local rel_l2 {_fmt(err)}, as converted {_as_of(row)})")


@row_checker("mapping")
def check_mapping(pair, row, ctx: Context) -> str | None:
    """A weight of this layer in use as the table gives it, where the tracer's candidate was measured to fit
    (`numeric.settle`): the table is wrong there."""
    lines = []
    for variable in pair.keras.variables if pair.keras is not None else ():
        entry = ctx.entry_of_variable.get(variable)
        c = getattr(entry, "conflict", None)
        if c is None or c.resolved or c.winner != "tracer":
            continue
        lines.append(f"`{variable}` is written as the table gives it, to `{c.table_parameter}` ({c.table_transform}, "
                     f"local rel_l2 {_fmt(c.table_error)}), where the tracer's `{c.tracer_parameter}` "
                     f"({c.tracer_transform}) fits (local rel_l2 {_fmt(c.tracer_error)})")
    return "; ".join(lines) or None


# ---------------------------------------------------------------------------------------------------- driver


def _fallback(pair, row, ctx: Context) -> Hint:
    """A targeted row no checker explains: say what is known."""
    if row.diverged:
        return Hint("unexplained", f"local rel_l2 {_as_of(row)}: none of the checks "
                                   f"({', '.join(c.name for c in CHECKERS)}) fits it")
    if amplified := amplified_hint(row):  # the reference itself moves that much: nothing upstream to blame
        return amplified
    upstream = []
    at = next((i for i, p in enumerate(ctx.pairs) if p is pair), 0)
    for p in ctx.pairs[:at][::-1]:
        if p.tower != pair.tower:
            continue
        if p.paired:
            break
        r = p.keras or p.torch
        if _computes_nothing(r):
            continue
        upstream.append(f"{'Keras' if p.keras else 'HF'} `{r.path.rsplit('/', 1)[-1] if p.keras else r.path}` "
                        f"{'x'.join(map(str, r.shape))}")
    where = f": unpaired before it: {', '.join(upstream[::-1])}" if upstream else ""
    return Hint("upstream", f"its own computation matches (local rel_l2 {_as_of(row)}) but its input already "
                            f"differs (accumulated rel_l2 {_fmt(row.rel_l2)}): the error "
                            f"enters before it{where}")


# Kinds that pass their input on unchanged (in inference): an unpaired one cannot be where an error enters.
_PASS_THROUGH = {"dropout", "reshape", "input"}


def _computes_nothing(record) -> bool:
    """A container (its members compute, and have rows of their own) or a weightless pass-through."""
    return record.is_container or (record.kind in _PASS_THROUGH and not record.variables)


def target_rows(rows: list[LayerRow], tower_off: Callable[[str], bool]) -> tuple[list[LayerRow], set[int]]:
    """Rows to explain: every locally diverged row, and each off tower's first row over tolerance (where its error
    enters); returns them and the id()s of the latter."""
    first: dict[str, dict] = {}
    for row in rows:
        if row.tower not in first and row.status != Status.OK and row.rel_l2 > ACCUMULATED_REL_L2:
            first[row.tower] = row
    entry = {id(row) for tower, row in first.items() if tower_off(tower)}
    return [r for r in rows if r.diverged or id(r) in entry], entry


def suspect(row: LayerRow) -> bool:
    """Within the local tolerance but over SUSPECT_LOCAL: worth the activation check."""
    local = row.local_rel_l2
    return not row.diverged and SUSPECT_LOCAL < local <= LOCAL_REL_L2


def _targets(ctx: Context) -> list[LayerRow]:
    targets, entry = target_rows(ctx.rows, ctx.tower_off)
    ctx.entry_rows.update(entry)
    return targets


def _diverged_inside(pair, done: list[tuple[LayerRow, object]]):
    """The first diverged row inside this container pair, already hinted (rows come in post-order), or None."""
    if pair is None or pair.torch is None or not pair.torch.is_container:
        return None
    prefix = pair.torch.path + "."
    for row, p in done:
        if row.diverged and p is not None and p.torch is not None and p.torch.path.startswith(prefix):
            return row
    return None


def diagnose(pairs, rows: list[LayerRow], entries, parity, block_of: Callable | None = None) -> list[Hint]:
    """Give `hints` to the rows that diverge (and to where an off part's error enters); return run-level hints.
    `parity` answers `off(part)` (its outputs miss their tolerance); `block_of` is the rows' block function."""
    for row in rows:
        row.hints = []
    ctx = Context.build(pairs, rows, entries, parity, block_of)
    run_hints = [h for c in RUN_CHECKERS if (h := c(ctx, where=" (run)"))]
    done: list[tuple[LayerRow, object]] = []
    for row in _targets(ctx):
        pair = ctx.pair_of(row)
        inner = _diverged_inside(pair, done)
        if inner is not None:
            named = ", ".join(dict.fromkeys(inner.hint_classes)) or "no known cause"
            found = [Hint("within", f"`{inner.hf_module}` inside it diverges ({named}): see that row")]
        elif pair is None:
            found = [Hint("unexplained", f"local rel_l2 {_as_of(row)}: no recorded pair to re-run")]
        else:
            found = [h for c in CHECKERS if (h := c(pair, row, ctx, where=f" on {row.hf_module}"))]
            found = found or [_fallback(pair, row, ctx)]
        row.hints = found
        done.append((row, pair))
    _sub_tolerance_activations(ctx)
    for row in rows:  # amplified rows the reference's own sensitivity accounts for say so
        if not row.hints and (amplified := amplified_hint(row)):
            row.hints = [amplified]
    return run_hints


def _sub_tolerance_activations(ctx: Context) -> None:
    """Suspect rows whose activation check names two different functions: diverged, with that hint (a wrong
    activation must not pass because the pre-activations were small)."""
    activation = next(c for c in CHECKERS if c.name == "activation")
    for row in filter(suspect, ctx.rows):
        pair = ctx.pair_of(row)
        if pair is not None and (hint := activation(pair, row, ctx, where=f" on {row.hf_module}")):
            row.status = Status.DIVERGED
            row.hints = [hint]
