"""`tracer.trace` on model pairs nobody here wrote for it: keras.applications EfficientNetB0 against transformers'
EfficientNet, the project's TFBertModel against `BertModel`, and small hand-written pairs; faults in hand-written
ports found and named; bad input refused by name."""

import numpy as np
import pytest
import torch

import tracer  # noqa: F401  (sets TensorFlow's environment first)
import tf_keras
from torch import nn

from tracer.errors import BadInputError
from tracer.families.efficientnet.demo import calibrate_batch_norm

RNG = np.random.default_rng(0)


def _smooth_images(n: int, size: int) -> np.ndarray:
    """Natural-looking 0..255 images: low-pass noise."""
    noise = RNG.standard_normal((n, size // 8, size // 8, 3)).astype(np.float32)
    up = np.kron(noise, np.ones((1, 8, 8, 1), np.float32))
    return np.clip(127.5 + 60 * up, 0, 255).astype(np.float32)


# ------------------------------------------------------------------------------------------------ EfficientNetB0
@pytest.fixture(scope="module")
def efficientnet_pair():
    from transformers import EfficientNetConfig, EfficientNetForImageClassification

    tf_keras.utils.set_random_seed(1)
    keras_model = tf_keras.applications.EfficientNetB0(weights=None, classifier_activation=None)
    calibrate_batch_norm(keras_model, _smooth_images(16, 224))
    config = EfficientNetConfig(width_coefficient=1.0, depth_coefficient=1.0, image_size=224, dropout_rate=0.2,
                                depthwise_padding=[], hidden_dim=1280, num_labels=1000)
    torch_model = EfficientNetForImageClassification(config).eval()
    images = _smooth_images(2, 224)
    # The Keras model normalises its input itself (Rescaling + Normalization); the HF model takes normalised pixels.
    norm = next(layer for layer in keras_model.layers if isinstance(layer, tf_keras.layers.Normalization))
    normalise = tf_keras.Model(keras_model.input, norm.output)
    pixels = np.transpose(normalise(images).numpy(), (0, 3, 1, 2))
    return keras_model, torch_model, images, pixels


def test_efficientnet_b0_against_transformers(efficientnet_pair):
    keras_model, torch_model, images, pixels = efficientnet_pair
    run = tracer.trace(keras_model, torch_model, images, torch_inputs={"pixel_values": pixels})
    assert run.unwritten_torch == []
    # Every Keras weight has its torch place, except the Normalization layer's statistics: preprocessing.
    assert run.unmapped_keras == []
    norm = next(layer for layer in keras_model.layers if isinstance(layer, tf_keras.layers.Normalization))
    assert set(run.preprocessing) == {f"{norm.name}/{leaf}" for leaf in ("mean", "variance", "count")}
    logits = next(p for p in run.outputs.pairs if p.torch_name == "logits")
    assert logits.max_abs < 1e-4, logits
    statuses = run.layers["status"]
    assert (statuses != "diverged").all(), run.layers[statuses == "diverged"]
    assert run.verdict == "match", run.summary["verdict_reasons"]
    weighted = [layer.name for layer in keras_model.layers if layer.weights and layer is not norm]
    paired = set(run.layers.loc[run.layers["hf_module"] != "", "keras_layer"])
    assert set(weighted) <= paired, sorted(set(weighted) - paired)  # every weighted layer compared
    # The torch model now holds the Keras weights: its own forward gives the Keras logits.
    with torch.inference_mode():
        got = torch_model(pixel_values=torch.from_numpy(pixels)).logits.numpy()
    assert np.abs(got - keras_model(images).numpy()).max() < 1e-4


# ------------------------------------------------------------------------------------------------ BERT
@pytest.fixture(scope="module")
def bert_pair():
    from transformers import BertConfig, BertModel

    from tracer.families.align.keras_ref.bert import TFBertModel
    from tracer.families.align.spec import TextSpec

    spec = TextSpec(vocab_size=120, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                    max_position_embeddings=40, type_vocab_size=2, seq_length=12)
    tf_keras.utils.set_random_seed(2)
    keras_model = TFBertModel(spec)
    ids = RNG.integers(1, 120, (3, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 8:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    keras_model(inputs)
    config = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=40, type_vocab_size=2, layer_norm_eps=1e-12,
                        hidden_act="gelu", attn_implementation="eager")
    return keras_model, BertModel(config).eval(), inputs


def test_bert_against_transformers(bert_pair):
    keras_model, torch_model, inputs = bert_pair
    run = tracer.trace(keras_model, torch_model, inputs, tolerances=1e-5)
    assert run.unmapped_keras == [] and run.unwritten_torch == []
    assert run.verdict == "match", run.summary["verdict_reasons"]
    hidden = run.outputs.pairs[0]
    assert hidden.keras_name == "last_hidden_state" and hidden.max_abs < 1e-5
    assert {p.keras_name for p in run.outputs.pairs} >= {"last_hidden_state", "pooler_output"}
    # Blocks come from the torch module tree: the embeddings, each encoder layer, the pooler.
    blocks = list(dict.fromkeys(run.blocks["block"]))
    assert {"embeddings", "encoder.layer.0", "encoder.layer.1", "pooler"} <= set(blocks), blocks


def _broken_copy(bert_pair, change):
    """A port converted by someone's own script (the right weights, copied by `tracer.trace`), then `change`d."""
    keras_model, torch_model, inputs = bert_pair
    tracer.trace(keras_model, torch_model, inputs)
    broken = type(torch_model)(torch_model.config).eval()
    broken.load_state_dict(torch_model.state_dict())
    change(broken)
    return tracer.trace(keras_model, broken, inputs, copy_weights=False)


def test_query_and_key_swapped_is_found_and_the_value_match_names_the_swap(bert_pair):
    def swap(model):
        attention = model.encoder.layer[1].attention.self
        with torch.no_grad():
            q = attention.query.weight.clone()
            attention.query.weight.copy_(attention.key.weight)
            attention.key.weight.copy_(q)

    run = _broken_copy(bert_pair, swap)
    first = run.first_local_divergence
    assert first is not None and first.hf_module.startswith("encoder.layer.1.attention"), first
    assert "qkv_swap" in first.hint_classes, first.hint
    mapping = run.mapping.set_index("parameter")
    query = mapping.loc["encoder.layer.1.attention.self.query.weight"]
    assert "layer_._1/attention/self/key/kernel (dense)" in query["equals"], query["equals"]
    assert "layer_._1/attention/self/query/kernel" in query["variable"]


def test_untransposed_square_kernel_is_found(bert_pair):
    def transpose(model):
        dense = model.encoder.layer[0].attention.output.dense
        with torch.no_grad():
            dense.weight.copy_(dense.weight.t().clone())

    run = _broken_copy(bert_pair, transpose)
    first = run.first_local_divergence
    assert first.hf_module == "encoder.layer.0.attention.output.dense", first
    assert "transposed" in first.hint_classes, first.hint
    entry = run.mapping.set_index("parameter").loc["encoder.layer.0.attention.output.dense.weight"]
    assert entry["equals"].endswith("(identity)"), entry["equals"]  # the kernel as Keras stores it, untransposed


def test_layer_norm_epsilon_is_found(bert_pair):
    def epsilon(model):
        model.encoder.layer[1].output.LayerNorm.eps = 1e-3

    run = _broken_copy(bert_pair, epsilon)
    first = run.first_local_divergence
    assert first.hf_module == "encoder.layer.1.output.LayerNorm", first
    assert "epsilon" in first.hint_classes, first.hint
    assert run.verdict == "diverged"


# ------------------------------------------------------------------------------------------------ small pairs
def _cnn_pair(stride=1, eps=1e-3):
    tf_keras.utils.set_random_seed(3)
    keras_model = tf_keras.Sequential([
        tf_keras.Input((16, 16, 3)),
        tf_keras.layers.Conv2D(8, 3, strides=stride, padding="same", activation="relu"),
        tf_keras.layers.BatchNormalization(epsilon=1e-3),
        tf_keras.layers.DepthwiseConv2D(3, padding="same"),
        tf_keras.layers.GlobalAveragePooling2D(),
        tf_keras.layers.Dense(10),
    ])
    calibrate_batch_norm(keras_model, RNG.standard_normal((8, 16, 16, 3)).astype(np.float32))
    torch_model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=stride, padding=1), nn.ReLU(), nn.BatchNorm2d(8, eps=eps),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    return keras_model, torch_model.eval()


def test_sequential_cnn_against_nn_sequential():
    keras_model, torch_model = _cnn_pair()
    x = RNG.standard_normal((5, 16, 16, 3)).astype(np.float32)
    run = tracer.trace(keras_model, torch_model, x)
    assert run.verdict == "match"
    assert len(run.mapping) == len(keras_model.weights) and run.unwritten_torch == []
    assert list(run.layers["keras_class"]) == ["Conv2D", "BatchNormalization", "DepthwiseConv2D",
                                               "GlobalAveragePooling2D", "Dense"]
    assert run.layers["hf_module"].iloc[0] == "1"  # Conv2D(activation="relu") is torch's conv + the ReLU after it
    with torch.inference_mode():
        got = torch_model(torch.from_numpy(np.transpose(x, (0, 3, 1, 2)).copy())).numpy()
    assert np.abs(got - keras_model(x).numpy()).max() < 1e-5


def test_batch_norm_epsilon_in_a_hand_written_port():
    keras_model, torch_model = _cnn_pair(eps=1e-5)
    x = RNG.standard_normal((2, 16, 16, 3)).astype(np.float32)
    tracer.trace(keras_model, torch_model, x)  # the weights, copied right
    run = tracer.trace(keras_model, torch_model, x, copy_weights=False)
    first = run.first_local_divergence
    assert first.keras_class == "BatchNormalization", first
    assert "epsilon" in first.hint_classes, first.hint
    for _, entry in run.mapping.iterrows():  # each tensor holds its Keras weight (zero vectors may equal several)
        assert f"{entry['variable']} ({entry['transform']})" in entry["equals"].split("; "), entry


def test_padding_in_a_hand_written_port():
    # Keras 'same' with stride 2 pads right/bottom only; torch's padding=1 pads all sides: the output is shifted.
    keras_model, torch_model = _cnn_pair(stride=2)
    x = RNG.standard_normal((2, 16, 16, 3)).astype(np.float32)
    run = tracer.trace(keras_model, torch_model, x)
    first = run.first_local_divergence
    assert first is not None and first.keras_class == "Conv2D", first
    assert "padding" in first.hint_classes, first.hint


class _Scale(tf_keras.layers.Layer):
    """A custom layer with its own weight."""

    def build(self, input_shape):
        self.gain = self.add_weight("gain", shape=(input_shape[-1],), initializer="random_normal")

    def call(self, x):
        return x * self.gain


class _Shared(tf_keras.Model):
    """A subclassed model calling one Dense twice, then a custom layer."""

    def __init__(self):
        super().__init__()
        self.dense = tf_keras.layers.Dense(6, activation="tanh")
        self.scale = _Scale()
        self.head = tf_keras.layers.Dense(3)

    def call(self, x):
        return self.head(self.scale(self.dense(self.dense(x))))


class _TorchScale(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n))

    def forward(self, x):
        return x * self.weight


class _TorchShared(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense, self.act, self.scale, self.head = nn.Linear(6, 6), nn.Tanh(), _TorchScale(6), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.scale(self.act(self.dense(self.act(self.dense(x))))))


def test_subclassed_model_with_a_shared_and_a_custom_layer():
    tf_keras.utils.set_random_seed(4)
    keras_model = _Shared()
    x = RNG.standard_normal((4, 6)).astype(np.float32)
    keras_model(x)
    run = tracer.trace(keras_model, _TorchShared(), x, tolerances=1e-6)
    assert run.verdict == "match", run.summary["verdict_reasons"]
    dense_rows = run.layers[run.layers["keras_class"] == "Dense"]
    first, _, head = dense_rows["keras_layer"]
    assert list(dense_rows["keras_layer"]) == [first, first, head] and head != first  # the shared layer, twice
    mapping = dict(zip(run.mapping["variable"], run.mapping["parameter"]))
    assert mapping[keras_model.scale.gain.name.removesuffix(":0")] == "scale.weight"


# ------------------------------------------------------------------------------------------------ bad input
def test_a_keras_3_model_is_refused_by_name():
    keras = pytest.importorskip("keras")
    if not keras.__version__.startswith("3"):
        pytest.skip("Keras 3 not installed")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(BadInputError, match="Keras 3.*Keras 2"):
        tracer.trace(model, nn.Linear(4, 2), np.zeros((1, 4), np.float32))


def test_inputs_the_keras_model_rejects():
    keras_model, torch_model = _cnn_pair()
    with pytest.raises(BadInputError, match="Keras model rejects the inputs"):
        tracer.trace(keras_model, torch_model, np.zeros((1, 16, 16, 5), np.float32))


def test_a_torch_forward_that_fails_names_torch_inputs():
    keras_model, _ = _cnn_pair()
    with pytest.raises(BadInputError, match="torch_inputs="):
        tracer.trace(keras_model, nn.Linear(7, 2), np.zeros((1, 16, 16, 3), np.float32))


def test_two_models_with_nothing_pairable():
    tf_keras.utils.set_random_seed(5)
    keras_model = tf_keras.Sequential([tf_keras.Input((4,)), tf_keras.layers.Dense(2)])
    with pytest.raises(BadInputError, match="nothing in the two models pairs"):
        tracer.trace(keras_model, nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)), np.zeros((1, 4), np.float32))


def test_run_saves_its_report(tmp_path):
    keras_model, torch_model = _cnn_pair()
    run = tracer.trace(keras_model, torch_model, RNG.standard_normal((2, 16, 16, 3)).astype(np.float32))
    folder = run.save(tmp_path / "report")
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["layers.csv", "blocks.csv", "mapping.csv", "summary.json", "report.html"])
    import json

    data = json.loads((folder / "summary.json").read_text())
    assert data["verdict"] == "match" and data["outputs"][0]["ok"]
    assert "tracer report" in (folder / "report.html").read_text()


class _TwoBranches(tf_keras.Model):
    """Two same-shaped sibling Dense layers, `gate` called before `value`."""

    def __init__(self):
        super().__init__()
        self.gate = tf_keras.layers.Dense(6)
        self.value = tf_keras.layers.Dense(6)
        self.head = tf_keras.layers.Dense(2)

    def call(self, x):
        g = self.gate(x)
        v = self.value(x)
        return self.head(tf_keras.activations.sigmoid(g) * v)


class _TorchTwoBranches(nn.Module):
    """Its port, which registers and calls the siblings the other way round: order alone would swap them."""

    def __init__(self):
        super().__init__()
        self.value, self.gate, self.head = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x):
        v = self.value(x)
        g = self.gate(x)
        return self.head(torch.sigmoid(g) * v)


def test_siblings_in_the_other_order_are_paired_by_numbers():
    tf_keras.utils.set_random_seed(6)
    keras_model = _TwoBranches()
    x = RNG.standard_normal((5, 6)).astype(np.float32)
    keras_model(x)
    torch_model = _TorchTwoBranches()
    run = tracer.trace(keras_model, torch_model, x, tolerances=1e-6)
    assert run.verdict == "match", run.summary["verdict_reasons"]
    mapping = run.mapping.set_index("variable")
    gate = keras_model.gate.kernel.name.removesuffix(":0")
    assert mapping.loc[gate, "parameter"] == "gate.weight" and mapping.loc[gate, "source"] == "numeric"
    assert "call order" in mapping.loc[gate, "evidence"]
    with torch.inference_mode():
        got = torch_model(torch.from_numpy(x)).numpy()
    assert np.abs(got - keras_model(x).numpy()).max() < 1e-6
