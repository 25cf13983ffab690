"""Fault-injection suite for the cause hints (issue 14, item 3): are hints right, not only well worded?

For each fault class, small Keras models with realistic scale (random weights, BatchNorm statistics calibrated on
the inputs) are paired with their correct hand-written torch ports (or transformers' `BertModel` against the
project's tf_keras BERT); the right weights are copied once (`tracer.trace(k, t, x)`), ONE fault is injected into
a copy of the torch side at a chosen layer, and `tracer.trace(k, faulty, x, copy_weights=False)` is scored:

  * located: `run.first_local_divergence` is the faulty layer (by hf_module, or the module holding its weights
    where Keras fuses an activation into a conv). A preprocessing fault leaves every layer's own computation
    right, so there it means: no local divergence, and the first row over the accumulated tolerance is the first
    layer, where the error enters.
  * named: that row's hints name the fault's class (`LayerRow.hint_classes`).

Controls (the correct ports) must give no local divergence and verdict "match".

    python benchmarks/fault_suite.py [--cases 5] [--out benchmarks/results/fault_suite]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's tracer, not an installed one
import tracer  # noqa: F401  (sets TensorFlow's environment first)
import tf_keras
import torch
from torch import nn
import torch.nn.functional as F

from tracer.engine.report import first_divergences
from tracer.families.efficientnet.demo import calibrate_batch_norm  # BatchNorm statistics: activations O(1)

ROOT = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------------------ helpers
def smooth_images(rng, n: int, size: int, scale: float = 1.0) -> np.ndarray:
    """Low-pass noise (natural-looking images), mean 0 and std about `scale`."""
    noise = rng.standard_normal((n, size // 4, size // 4, 3)).astype(np.float32)
    return (scale * np.kron(noise, np.ones((1, 4, 4, 1), np.float32))).astype(np.float32)


def randomise_norms(model: nn.Module, rng) -> None:
    """Give torch's BatchNorm/LayerNorm affine weights non-trivial values before the copy, so a later
    "never written" reset is distinguishable from the copied value (the copy overwrites them anyway)."""
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)) and m.weight is not None:
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)


def randomise_keras(model, rng) -> None:
    """Keras initialises biases/betas to zeros and gammas to ones: give them random values, so a bias left at
    zero or a gamma left at ones on the torch side is a real fault."""
    for v in model.weights:
        leaf = v.name.removesuffix(":0").rsplit("/", 1)[-1]
        if leaf in ("bias", "beta"):
            v.assign(rng.normal(0, 0.2, v.shape).astype(np.float32))
        elif leaf == "gamma":
            v.assign(rng.uniform(0.5, 1.5, v.shape).astype(np.float32))


class TFSameConv2d(nn.Conv2d):
    """A conv padded as TF's `padding="same"` does (the odd pixel after): the correct port of a strided Keras
    'same' conv, which torch's symmetric `padding=` cannot express."""

    def forward(self, x):
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        pads = []
        for size, k, s in ((x.shape[-1], kw, sw), (x.shape[-2], kh, sh)):
            total = max((-(-size // s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return self._conv_forward(F.pad(x, pads), self.weight, self.bias)


# ------------------------------------------------------------------------------------------------ model pairs
@dataclass
class Pair:
    keras: object
    torch: nn.Module
    inputs: object
    torch_inputs: object = None  # None: derived from `inputs` by tracer
    first: str = ""  # hf_module of the first layer (where a preprocessing error enters)


_KERAS_ACT = {"relu": "relu", "swish": "swish", "gelu": "gelu", "tanh": "tanh"}
_TORCH_ACT = {"relu": nn.ReLU, "swish": nn.SiLU, "gelu": nn.GELU, "tanh": nn.Tanh}


def cnn(seed: int, act: str = "swish", rescale: bool = False, stride: int = 1, zero_pad: bool = False) -> Pair:
    """Conv(act) -> BN -> [ZeroPad -> valid conv] -> depthwise -> BN -> conv(act) -> BN -> GAP -> Dense.

    `rescale`: the Keras model takes 0..255 pixels and rescales them itself (Rescaling(1/127.5, offset=-1)); the
    torch port takes the rescaled pixels. `stride`: the first conv's stride ('same' padding either way)."""
    rng = np.random.default_rng(seed)
    tf_keras.utils.set_random_seed(seed)
    L = tf_keras.layers
    layers = [tf_keras.Input((16, 16, 3))]
    if rescale:
        layers.append(L.Rescaling(1 / 127.5, offset=-1))
    layers += [L.Conv2D(8, 3, strides=stride, padding="same", activation=_KERAS_ACT[act]),
               L.BatchNormalization(epsilon=1e-3)]
    if zero_pad:
        layers += [L.ZeroPadding2D(((0, 1), (0, 1))), L.Conv2D(8, 3, strides=2, padding="valid")]
    layers += [L.DepthwiseConv2D(3, padding="same"), L.BatchNormalization(epsilon=1e-3),
               L.Conv2D(8, 3, padding="same", activation=_KERAS_ACT[act]), L.BatchNormalization(epsilon=1e-3),
               L.GlobalAveragePooling2D(), L.Dense(10)]
    keras_model = tf_keras.Sequential(layers)
    if rescale:
        images = np.clip(127.5 + 60 * smooth_images(rng, 8, 16), 0, 255).astype(np.float32)
    else:
        images = smooth_images(rng, 8, 16)
    keras_model(images[:1])
    randomise_keras(keras_model, rng)
    calibrate_batch_norm(keras_model, images)
    first = TFSameConv2d(3, 8, 3, stride=stride) if stride > 1 else nn.Conv2d(3, 8, 3, padding=1)
    modules = [first, _TORCH_ACT[act](), nn.BatchNorm2d(8, eps=1e-3)]
    if zero_pad:
        modules += [nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(8, 8, 3, stride=2)]
    modules += [nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8, eps=1e-3),
                nn.Conv2d(8, 8, 3, padding=1), _TORCH_ACT[act](), nn.BatchNorm2d(8, eps=1e-3),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)]
    torch_model = nn.Sequential(*modules).eval()
    randomise_norms(torch_model, rng)
    x = images[:3]
    torch_inputs = None
    if rescale:
        torch_inputs = np.ascontiguousarray(np.transpose(x / 127.5 - 1, (0, 3, 1, 2))).astype(np.float32)
    return Pair(keras_model, torch_model, x, torch_inputs, first="1")


def mlp(seed: int, act: str = "gelu") -> Pair:
    """Dense(act) -> LayerNorm -> Dense(act) -> Dense: square 32-wide kernels, so a transpose keeps the shape."""
    rng = np.random.default_rng(seed)
    tf_keras.utils.set_random_seed(seed)
    L = tf_keras.layers
    keras_model = tf_keras.Sequential([
        tf_keras.Input((32,)), L.Dense(32, activation=act), L.LayerNormalization(epsilon=1e-6),
        L.Dense(32, activation=act), L.Dense(32), L.Dense(8)])
    torch_model = nn.Sequential(nn.Linear(32, 32), _TORCH_ACT[act](), nn.LayerNorm(32, eps=1e-6),
                                nn.Linear(32, 32), _TORCH_ACT[act](), nn.Linear(32, 32), nn.Linear(32, 8)).eval()
    randomise_norms(torch_model, rng)
    x = rng.standard_normal((6, 32)).astype(np.float32)
    keras_model(x)
    randomise_keras(keras_model, rng)
    return Pair(keras_model, torch_model, x, first="1")


def bert(seed: int) -> Pair:
    """The project's tf_keras BERT against transformers' BertModel (2 layers, 32 wide)."""
    from transformers import BertConfig, BertModel

    from tracer.families.align.keras_ref.bert import TFBertModel
    from tracer.families.align.spec import TextSpec

    rng = np.random.default_rng(seed)
    spec = TextSpec(vocab_size=120, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                    max_position_embeddings=40, type_vocab_size=2, seq_length=12)
    tf_keras.utils.set_random_seed(seed)
    keras_model = TFBertModel(spec)
    ids = rng.integers(1, 120, (3, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 8:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    keras_model(inputs)
    randomise_keras(keras_model, rng)
    config = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=40, type_vocab_size=2, layer_norm_eps=1e-12,
                        hidden_act="gelu", attn_implementation="eager")
    torch.manual_seed(seed)
    return Pair(keras_model, BertModel(config).eval(), inputs, first="embeddings")


_PAIRS: dict = {}


def converted(builder: Callable, *args, **kwargs) -> Pair:
    """A model pair with the right weights copied into the torch side (built once per arguments)."""
    key = (builder.__name__, args, tuple(sorted(kwargs.items())))
    if key not in _PAIRS:
        pair = builder(*args, **kwargs)
        tracer.trace(pair.keras, pair.torch, pair.inputs, torch_inputs=pair.torch_inputs)
        _PAIRS[key] = pair
    return _PAIRS[key]


# ------------------------------------------------------------------------------------------------ faults
@dataclass
class Case:
    cls: str  # the checker class the hint must name ("control": none)
    name: str  # what was done, e.g. "bert seed 2: encoder.layer.1.output.LayerNorm eps 1e-3"
    pair: Callable  # () -> Pair, converted
    module: str = ""  # the faulty torch module path
    inject: Callable | None = None  # (torch model) -> None, on a copy
    torch_inputs: Callable | None = None  # (Pair) -> the faulty torch inputs


def _get(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path)


def zero_weight(path: str):
    def inject(model):
        with torch.no_grad():
            _get(model, path).weight.zero_()
    return inject


def reset_weight(path: str, value: float):
    """The tensor left at its init (a LayerNorm/BatchNorm gamma of ones)."""
    def inject(model):
        with torch.no_grad():
            _get(model, path).weight.fill_(value)
    return inject


def transpose(path: str, dims=(0, 1)):
    def inject(model):
        with torch.no_grad():
            w = _get(model, path).weight
            w.copy_(w.transpose(*dims).clone())
    return inject


def flip(path: str, dims=(-1, -2)):
    def inject(model):
        with torch.no_grad():
            w = _get(model, path).weight
            w.copy_(w.flip(dims).clone())
    return inject


def swap(path: str, a: str, b: str, bias: bool = True):
    def inject(model):
        attention = _get(model, path)
        names = ("weight", "bias") if bias else ("weight",)
        with torch.no_grad():
            for n in names:
                x, y = getattr(getattr(attention, a), n), getattr(getattr(attention, b), n)
                held = x.clone()
                x.copy_(y)
                y.copy_(held)
    return inject


def set_eps(path: str, eps: float):
    def inject(model):
        _get(model, path).eps = eps
    return inject


def drop_bias(path: str):
    """bias=False: the module rebuilt without a bias, its weight kept."""
    def inject(model):
        parent_path, _, name = path.rpartition(".")
        parent = _get(model, parent_path) if parent_path else model
        old = getattr(parent, name)
        with torch.no_grad():
            if isinstance(old, nn.Linear):
                new = nn.Linear(old.in_features, old.out_features, bias=False)
            else:
                new = type(old)(old.in_channels, old.out_channels, old.kernel_size, stride=old.stride,
                                padding=old.padding, groups=old.groups, bias=False)
            new.weight.copy_(old.weight)
        if isinstance(parent, nn.Sequential):
            parent[int(name)] = new
        else:
            setattr(parent, name, new)
    return inject


def zero_bias(path: str):
    def inject(model):
        with torch.no_grad():
            _get(model, path).bias.zero_()
    return inject


def replace(path: str, make: Callable):
    """Swap a module for another (an activation variant, a symmetric-padded conv), keeping its tensors."""
    def inject(model):
        parent_path, _, name = path.rpartition(".")
        parent = _get(model, parent_path) if parent_path else model
        old = getattr(parent, name)
        new = make(old)
        if isinstance(parent, nn.Sequential):
            parent[int(name)] = new
        else:
            setattr(parent, name, new)
    return inject


def symmetric_conv(old: nn.Conv2d) -> nn.Conv2d:
    """torch's padding=k//2 where the Keras conv pads 'same' with stride 2."""
    new = nn.Conv2d(old.in_channels, old.out_channels, old.kernel_size, stride=old.stride,
                    padding=old.kernel_size[0] // 2)
    new.load_state_dict(old.state_dict())
    return new


def set_attr(path: str, attr: str, value):
    def inject(model):
        setattr(_get(model, path), attr, value)
    return inject


def scaled_inputs(a: float, b: float):
    """The torch side fed a·k + b where k is what the correct port takes."""
    def build(pair: Pair):
        base = pair.torch_inputs if pair.torch_inputs is not None else np.transpose(pair.inputs, (0, 3, 1, 2))
        return np.ascontiguousarray(a * base + b).astype(np.float32)
    return build


def raw_pixels(pair: Pair):
    """The rescaled port fed pixels / 255 where it expects pixels / 127.5 - 1."""
    return np.ascontiguousarray(np.transpose(pair.inputs / 255.0, (0, 3, 1, 2))).astype(np.float32)


def cases(per_class: int = 5) -> list[Case]:
    """Every class's cases (at most `per_class` each), then the controls."""
    def P(builder, *args, **kwargs):
        return lambda: converted(builder, *args, **kwargs)

    B = "encoder.layer"
    table = {
        "never_written": [
            Case("never_written", "cnn: conv 0 weight zeros", P(cnn, 10), "0", zero_weight("0")),
            Case("never_written", "mlp: Linear 3 weight zeros", P(mlp, 11), "3", zero_weight("3")),
            Case("never_written", "bert: layer 1 attention.output.dense weight zeros", P(bert, 12),
                 f"{B}.1.attention.output.dense", zero_weight(f"{B}.1.attention.output.dense")),
            Case("never_written", "mlp: LayerNorm gamma left at ones", P(mlp, 13), "2", reset_weight("2", 1.0)),
            Case("never_written", "cnn: BatchNorm 7 gamma left at ones", P(cnn, 14), "7", reset_weight("7", 1.0)),
        ],
        "transposed": [
            Case("transposed", "mlp: Linear 3 kernel untransposed", P(mlp, 20), "3", transpose("3")),
            Case("transposed", "mlp: Linear 5 kernel untransposed", P(mlp, 21), "5", transpose("5")),
            Case("transposed", "bert: layer 0 attention.output.dense untransposed", P(bert, 22),
                 f"{B}.0.attention.output.dense", transpose(f"{B}.0.attention.output.dense")),
            Case("transposed", "bert: layer 1 attention.self.value untransposed", P(bert, 23),
                 f"{B}.1.attention.self.value", transpose(f"{B}.1.attention.self.value")),
            Case("transposed", "cnn: conv 5 in/out channels swapped", P(cnn, 24), "5", transpose("5")),
        ],
        "flipped": [
            Case("transposed", "cnn: conv 0 kernel rotated 180°", P(cnn, 30), "0", flip("0")),
            Case("transposed", "cnn: conv 5 kernel rotated 180°", P(cnn, 31), "5", flip("5")),
            Case("transposed", "cnn: depthwise 3 kernel flipped vertically", P(cnn, 32), "3", flip("3", (-2,))),
            Case("transposed", "cnn: conv 0 kernel flipped horizontally", P(cnn, 33), "0", flip("0", (-1,))),
            Case("transposed", "cnn: conv 5 kernel h/w transposed", P(cnn, 34), "5", transpose("5", (-1, -2))),
        ],
        "qkv_swap": [
            Case("qkv_swap", "bert: layer 1 query<->key", P(bert, 40), f"{B}.1.attention.self.query",
                 swap(f"{B}.1.attention.self", "query", "key")),
            Case("qkv_swap", "bert: layer 0 query<->value", P(bert, 41), f"{B}.0.attention.self.query",
                 swap(f"{B}.0.attention.self", "query", "value")),
            Case("qkv_swap", "bert: layer 0 key<->value", P(bert, 42), f"{B}.0.attention.self.key",
                 swap(f"{B}.0.attention.self", "key", "value")),
            Case("qkv_swap", "bert: layer 1 key<->value kernels only", P(bert, 43), f"{B}.1.attention.self.key",
                 swap(f"{B}.1.attention.self", "key", "value", bias=False)),
            Case("qkv_swap", "bert: layer 1 query<->value kernels only", P(bert, 44), f"{B}.1.attention.self.query",
                 swap(f"{B}.1.attention.self", "query", "value", bias=False)),
        ],
        "bn_epsilon": [
            Case("epsilon", "cnn: BatchNorm 2 eps 1e-5 (torch default)", P(cnn, 50), "2", set_eps("2", 1e-5)),
            Case("epsilon", "cnn: BatchNorm 4 eps 1e-5", P(cnn, 51), "4", set_eps("4", 1e-5)),
            Case("epsilon", "cnn: BatchNorm 7 eps 1e-1", P(cnn, 52), "7", set_eps("7", 1e-1)),
            Case("epsilon", "cnn: BatchNorm 2 eps 1e-2", P(cnn, 53), "2", set_eps("2", 1e-2)),
            Case("epsilon", "cnn relu: BatchNorm 7 eps 1e-5", P(cnn, 54, act="relu"), "7", set_eps("7", 1e-5)),
        ],
        "ln_epsilon": [
            Case("epsilon", "bert: layer 1 output.LayerNorm eps 1e-3", P(bert, 60), f"{B}.1.output.LayerNorm",
                 set_eps(f"{B}.1.output.LayerNorm", 1e-3)),
            Case("epsilon", "bert: embeddings.LayerNorm eps 1e-3", P(bert, 61), "embeddings.LayerNorm",
                 set_eps("embeddings.LayerNorm", 1e-3)),
            Case("epsilon", "bert: layer 0 attention.output.LayerNorm eps 1e-2", P(bert, 62),
                 f"{B}.0.attention.output.LayerNorm", set_eps(f"{B}.0.attention.output.LayerNorm", 1e-2)),
            Case("epsilon", "mlp: LayerNorm eps 1e-1", P(mlp, 63), "2", set_eps("2", 1e-1)),
            Case("epsilon", "mlp: LayerNorm eps 1e-2", P(mlp, 64), "2", set_eps("2", 1e-2)),
        ],
        "padding": [
            Case("padding", "cnn stride 2: conv 0 padding=1 for Keras 'same'", P(cnn, 70, stride=2), "0",
                 replace("0", symmetric_conv)),
            Case("padding", "cnn stride 2 relu: conv 0 padding=1 for Keras 'same'", P(cnn, 71, act="relu", stride=2),
                 "0", replace("0", symmetric_conv)),
            Case("padding", "cnn: ZeroPad2d (1, 0, 1, 0) for Keras ((0, 1), (0, 1))", P(cnn, 72, zero_pad=True),
                 "3", set_attr("3", "padding", (1, 0, 1, 0))),
            Case("padding", "cnn: ZeroPad2d (0, 1, 1, 0) for Keras ((0, 1), (0, 1))", P(cnn, 73, zero_pad=True),
                 "3", set_attr("3", "padding", (0, 1, 1, 0))),
            Case("padding", "cnn: ZeroPad2d (1, 0, 0, 1) for Keras ((0, 1), (0, 1))", P(cnn, 74, zero_pad=True),
                 "3", set_attr("3", "padding", (1, 0, 0, 1))),
        ],
        "activation": [
            Case("activation", "mlp: GELU tanh for Keras gelu (erf)", P(mlp, 80), "1",
                 replace("1", lambda m: nn.GELU(approximate="tanh"))),
            Case("activation", "mlp: ReLU for Keras gelu", P(mlp, 81), "4", replace("4", lambda m: nn.ReLU())),
            Case("activation", "cnn: ReLU for Keras swish", P(cnn, 82), "1", replace("1", lambda m: nn.ReLU())),
            Case("activation", "cnn relu: SiLU for Keras relu", P(cnn, 83, act="relu"), "6",
                 replace("6", lambda m: nn.SiLU())),
            Case("activation", "bert: layer 1 intermediate gelu_new for gelu", P(bert, 84), f"{B}.1.intermediate",
                 set_attr(f"{B}.1.intermediate", "intermediate_act_fn", nn.GELU(approximate="tanh"))),
        ],
        "preprocessing": [
            Case("preprocessing", "cnn rescale: pixels/255 for pixels/127.5 - 1", P(cnn, 90, rescale=True),
                 torch_inputs=raw_pixels),
            Case("preprocessing", "cnn rescale: 2k + 1", P(cnn, 91, rescale=True), torch_inputs=scaled_inputs(2, 1)),
            Case("preprocessing", "cnn: k/2", P(cnn, 92), torch_inputs=scaled_inputs(0.5, 0)),
            Case("preprocessing", "cnn: k - 0.5", P(cnn, 93), torch_inputs=scaled_inputs(1, -0.5)),
            Case("preprocessing", "cnn relu: 1.1k + 0.1", P(cnn, 94, act="relu"), torch_inputs=scaled_inputs(1.1, 0.1)),
        ],
        "bias (zeroed)": [
            Case("bias", "mlp: Linear 3 bias zeroed", P(mlp, 100), "3", zero_bias("3")),
            Case("bias", "cnn: conv 5 bias zeroed", P(cnn, 101), "5", zero_bias("5")),
            Case("bias", "bert: layer 0 intermediate.dense bias zeroed", P(bert, 102), f"{B}.0.intermediate.dense",
                 zero_bias(f"{B}.0.intermediate.dense")),
            Case("bias", "bert: layer 1 attention.output.dense bias zeroed", P(bert, 103),
                 f"{B}.1.attention.output.dense", zero_bias(f"{B}.1.attention.output.dense")),
            Case("bias", "cnn: depthwise 3 bias zeroed", P(cnn, 104), "3", zero_bias("3")),
        ],
        "bias (bias=False)": [
            Case("bias", "mlp: Linear 3 bias=False", P(mlp, 105), "3", drop_bias("3")),
            Case("bias", "mlp: Linear 6 bias=False", P(mlp, 106), "6", drop_bias("6")),
            Case("bias", "cnn: conv 5 bias=False", P(cnn, 107), "5", drop_bias("5")),
            Case("bias", "cnn: conv 0 bias=False", P(cnn, 108), "0", drop_bias("0")),
            Case("bias", "bert: layer 1 output.dense bias=False", P(bert, 109), f"{B}.1.output.dense",
                 drop_bias(f"{B}.1.output.dense")),
        ],
    }
    controls = [Case("control", "cnn", P(cnn, 10)), Case("control", "cnn stride 2", P(cnn, 70, stride=2)),
                Case("control", "cnn zero pad", P(cnn, 72, zero_pad=True)),
                Case("control", "cnn rescale", P(cnn, 90, rescale=True)), Case("control", "mlp", P(mlp, 11)),
                Case("control", "bert", P(bert, 12))]
    out = []
    for group, items in table.items():
        out += [(group, c) for c in items[:per_class]]
    out += [("control", c) for c in controls[:max(per_class, 1) + 1]]
    return out


# ------------------------------------------------------------------------------------------------ scoring
@dataclass
class Result:
    group: str
    cls: str
    name: str
    located: bool
    named: bool
    row: str  # the hf_module scored
    hint: str
    seconds: float
    verdict: str = ""
    classes: list = field(default_factory=list)  # the classes of the scored row's hints


def _weights_path(run, row: dict) -> str:
    """The torch module that holds the row's weights (the conv before a fused activation), else its own."""
    for p in run.pairs:
        if p.torch is not None and p.torch.path == row.hf_module and p.keras is not None \
                and p.keras.path == row.keras_layer:
            return p.torch_weights.path if p.torch_weights is not None else p.torch.path
    return row.hf_module


def run_case(group: str, case: Case) -> Result:
    """Inject the case's fault into a copy of the converted port, trace, and score."""
    pair = case.pair()
    faulty = copy.deepcopy(pair.torch)
    if case.inject is not None:
        case.inject(faulty)
    torch_inputs = case.torch_inputs(pair) if case.torch_inputs is not None else pair.torch_inputs
    start = time.perf_counter()
    run = tracer.trace(pair.keras, faulty, pair.inputs, torch_inputs=torch_inputs, copy_weights=False)
    seconds = time.perf_counter() - start
    local, accumulated = first_divergences(run.rows)
    if case.cls == "control":
        clean = local is None and run.verdict == "match"
        return Result(group, case.cls, case.name, clean, clean, local.hf_module if local else "",
                      local.hint if local else "", seconds, run.verdict, local.hint_classes if local else [])
    if case.cls == "preprocessing":
        row = accumulated
        located = local is None and row is not None and row.hf_module == pair.first
    else:
        row = local
        located = row is not None and case.module in (row.hf_module, _weights_path(run, row))
    named = row is not None and case.cls in row.hint_classes
    return Result(group, case.cls, case.name, located, named and located, row.hf_module if row else "",
                  row.hint if row else "", seconds, run.verdict, row.hint_classes if row else [])


def table(results: list[Result]) -> str:
    groups = list(dict.fromkeys(r.group for r in results))
    lines = ["| fault | class named | cases | first local divergence is the faulty layer | hint names the class |",
             "|---|---|---:|---:|---:|"]
    for g in groups:
        rs = [r for r in results if r.group == g]
        cls = rs[0].cls if g != "control" else "(none: no local divergence, verdict match)"
        lines.append(f"| {g} | {cls} | {len(rs)} | {sum(r.located for r in rs)}/{len(rs)} | "
                     f"{sum(r.named for r in rs)}/{len(rs)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=5, help="cases per fault class")
    parser.add_argument("--out", default=str(ROOT / "results" / "fault_suite"), help="writes OUT.md and OUT.json")
    args = parser.parse_args(argv)
    import logging

    logging.disable(logging.WARNING)
    results = []
    for group, case in cases(args.cases):
        r = run_case(group, case)
        results.append(r)
        mark = "ok" if r.located and r.named else "MISS"
        print(f"{mark:4} {group:14} {case.name}: row {r.row or '-'} {r.classes}", flush=True)
    text = table(results)
    misses = [r for r in results if not (r.located and r.named)]
    body = (f"# Fault-injection suite\n\n`python benchmarks/fault_suite.py --cases {args.cases}`\n\n{text}\n")
    if misses:
        body += "\nMisses:\n\n" + "\n".join(f"- {r.group}: {r.name}: row `{r.row}`, hint `{r.hint[:300]}`"
                                           for r in misses) + "\n"
    print("\n" + text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(body)
    out.with_suffix(".json").write_text(json.dumps([asdict(r) for r in results], indent=1))
    return 0 if not misses else 1


if __name__ == "__main__":
    sys.exit(main())
