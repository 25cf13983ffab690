"""`--float64` / `tracer.trace(float64=True)`: both sides in float64, judged by `compare.FLOAT64`.

A correct conversion agrees to float64 round-off at every layer (tiny ALIGN, a small BERT, a small generic pair);
a normalisation epsilon off by a factor of 10 is localised with the `epsilon` hint; the saved model stays float32.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pandas as pd
import pytest

import tracer  # before TensorFlow: legacy Keras

tf_keras = pytest.importorskip("tf_keras")
torch = pytest.importorskip("torch")

import convert
from tracer.engine.compare import FLOAT32, FLOAT64, Tolerances

ROUND_OFF = 1e-12  # the bar: "both sides agree to float64 round-off"


def run(*argv) -> int:
    return convert.main([*map(str, argv), "--log_level", "warning"])


def worst(rows) -> tuple[float, float]:
    """The largest accumulated and local rel L2 over the rows (NaN where a row has no local measurement)."""
    frame = pd.DataFrame(rows)
    return float(frame["rel_l2"].max()), float(frame["local_rel_l2"].max())


# ------------------------------------------------------------------------------------------------ tolerances


def test_the_float64_set_is_tighter_and_the_run_picks_it():
    assert FLOAT64.local_rel_l2 < FLOAT32.local_rel_l2 * 1e-6
    assert FLOAT64.accumulated_rel_l2 < FLOAT32.accumulated_rel_l2 * 1e-4
    assert FLOAT64.embeds_max_abs < FLOAT32.embeds_max_abs * 1e-4
    assert Tolerances.for_run(False) is FLOAT32 and Tolerances.for_run(True) is FLOAT64
    assert Tolerances.for_run(True, atol=1e-7).embeds_max_abs == 1e-7
    assert Tolerances.for_run(True, atol=1e-7).local_rel_l2 == FLOAT64.local_rel_l2


def test_float64_needs_trace(tiny_bundle, tmp_path):
    assert run("--checkpoint_path", tiny_bundle / "model-weights", "--float64") == 2
    from tracer.errors import BadInputError
    from tracer.output import preflight
    from tracer.pipeline import ConvertOptions

    with pytest.raises(BadInputError, match="add --trace"):  # the check every pipeline's preflight makes
        preflight(ConvertOptions(float64=True))
    preflight(ConvertOptions(float64=True, trace=True, report_dir=str(tmp_path / "r")))


# ------------------------------------------------------------------------------------------------ generic pair


def _pair(eps_torch: float = 1e-6):
    keras = tf_keras.Sequential([tf_keras.layers.Input((6,)),
                                 tf_keras.layers.Dense(8, activation="tanh", name="d1"),
                                 tf_keras.layers.LayerNormalization(epsilon=1e-6, name="ln"),
                                 tf_keras.layers.Dense(3, name="d2")])
    torch.manual_seed(0)
    port = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.LayerNorm(8, eps=eps_torch),
                               torch.nn.Linear(8, 3))
    return keras, port


def test_generic_trace_in_float64_agrees_to_round_off():
    x = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
    keras, port = _pair()
    result = tracer.trace(keras, port, x, float64=True)
    assert next(port.parameters()).dtype == torch.float64
    assert result.tolerances is FLOAT64 and result.verdict == "match"
    accumulated, local = worst(result.layers.to_dict("records"))
    assert accumulated <= ROUND_OFF and local <= ROUND_OFF, (accumulated, local)
    assert all(r.status == "ok" for r in result.rows)


def test_generic_trace_in_float64_localises_an_epsilon_float32_would_miss():
    x = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
    keras, port = _pair(eps_torch=1e-5)
    in_float32 = tracer.trace(keras, port, x)
    keras, port = _pair(eps_torch=1e-5)
    result = tracer.trace(keras, port, x, float64=True)
    first = result.first_local_divergence
    assert first is not None and first.hf_class == "LayerNorm", first
    assert "epsilon" in first.hint_classes, first.hint
    # The same fault in float32 is smaller than float32's own tolerance would call a fault.
    assert in_float32.first_local_divergence is None or in_float32.first_local_divergence.local_rel_l2 < 1e-3


def test_generic_trace_in_float64_names_an_activation_variant():
    """The checks re-run HF modules on the Keras side's float64 activations: a tanh-approximated GELU in the port
    is named, as in float32."""
    x = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
    keras = tf_keras.Sequential([tf_keras.layers.Input((6,)), tf_keras.layers.Dense(8, activation="gelu", name="d1"),
                                 tf_keras.layers.Dense(3, name="d2")])
    port = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(approximate="tanh"), torch.nn.Linear(8, 3))
    result = tracer.trace(keras, port, x, float64=True)
    first = result.first_local_divergence
    assert first is not None and "activation" in first.hint_classes, first
    assert "HF computes gelu_new (tanh approximation)" in first.hint and "Keras computes gelu (erf)" in first.hint


def test_a_subclassed_keras_model_in_float32_is_refused():
    class Net(tf_keras.Model):
        def __init__(self):
            super().__init__()
            self.d = tf_keras.layers.Dense(2, name="d")

        def call(self, x):
            return self.d(x)

    net = Net()
    net(np.zeros((1, 3), np.float32))
    with pytest.raises(tracer.errors.BadInputError, match="float64"):
        tracer.trace(net, torch.nn.Linear(3, 2), np.zeros((1, 3), np.float32), float64=True)


# ------------------------------------------------------------------------------------------------ ALIGN (tiny)


def test_tiny_align_in_float64_agrees_at_every_layer_and_saves_float32(tiny_bundle, tmp_path):
    from safetensors import safe_open

    report, saved = tmp_path / "report", tmp_path / "model"
    code = run("--checkpoint_path", tiny_bundle / "model-weights", "--inputs", tiny_bundle / "reference.npz",
               "--trace", "--float64", "--report_dir", report, "--save_model", "--pytorch_dump_folder_path", saved)
    assert code == 0
    rows = pd.read_csv(report / "layers.csv")
    assert len(rows) > 100 and set(rows["tower"]) == {"vision", "text"}
    accumulated, local = worst(rows.to_dict("records"))
    assert accumulated <= ROUND_OFF and local <= ROUND_OFF, (accumulated, local)
    summary = json.loads((report / "summary.json").read_text())
    assert summary["verdict"] == "match"
    assert summary["tolerances"]["local_rel_l2"] == FLOAT64.local_rel_l2
    with safe_open(str(saved / "model.safetensors"), "np") as f:  # a float64 trace is a check: float32 is saved
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    assert np.dtype(np.float64) not in dtypes and np.dtype(np.float32) in dtypes
    config = json.loads((saved / "config.json").read_text())
    assert config.get("dtype", "float32") == "float32"
    assert "tracer" not in json.dumps(config.get("text_config", {}).get("_attn_implementation", ""))


@pytest.mark.parametrize("override, hf_class", [
    ("text_config.layer_norm_eps=1e-11", "LayerNorm"),  # coyo's BERT: 1e-12
    ("vision_config.batch_norm_eps=0.01", "BatchNorm2d"),  # coyo's EfficientNet: 1e-3
])
def test_an_epsilon_off_by_ten_is_localised_in_float64(tiny_bundle, tmp_path, override, hf_class):
    report = tmp_path / "report"
    code = run("--checkpoint_path", tiny_bundle / "model-weights", "--inputs", tiny_bundle / "reference.npz",
               "--trace", "--float64", "--report_dir", report, "--hf_config", override)
    assert code == 1
    first = json.loads((report / "summary.json").read_text())["first_local_divergence"]
    rows = pd.read_csv(report / "layers.csv")
    row = rows[(rows["tower"] == first["tower"]) & (rows["order"] == first["order"])].iloc[0]
    assert row["hf_class"] == hf_class, first
    assert first["hint"].startswith("[epsilon] "), first["hint"]  # summary.json holds the hints as text


# ------------------------------------------------------------------------------------------------ BERT family


def test_bert_family_in_float64_agrees_at_every_layer(tmp_path):
    from tracer.families.bert import BertSpec, writers

    spec = BertSpec(vocab_size=120, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                    max_position_embeddings=48, type_vocab_size=2, parts=("base", "pooler"), model_class="BertModel")
    path = writers.write_tf1(tmp_path / "bert", spec, writers.random_weights(spec, seed=1))
    report, saved = tmp_path / "report", tmp_path / "model"
    assert run("--checkpoint_path", path, "--trace", "--float64", "--report_dir", report, "--save_model",
               "--pytorch_dump_folder_path", saved) == 0
    rows = pd.read_csv(report / "layers.csv")
    accumulated, local = worst(rows.to_dict("records"))
    assert accumulated <= ROUND_OFF and local <= ROUND_OFF, (accumulated, local)
    assert json.loads((report / "summary.json").read_text())["tolerances"]["local_rel_l2"] == FLOAT64.local_rel_l2
    from safetensors import safe_open

    with safe_open(str(saved / "model.safetensors"), "np") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    assert np.dtype(np.float64) not in dtypes
