"""`convert.py` across families: the family detected from the checkpoint, plain and traced conversions of
keras.applications EfficientNet and BERT checkpoints (google-research TF1, transformers' tf_model.h5), saved
folders that reload with the Auto classes and carry a model card, and the mistakes the old loaders let through
refused by exit code and message."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

import tracer  # noqa: F401  (TensorFlow's environment first)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import convert  # noqa: E402
from tracer.families.bert import BertSpec, writers  # noqa: E402

SMALL = dict(vocab_size=120, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
             max_position_embeddings=48, type_vocab_size=2)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from tracer.families.efficientnet.demo import write_demo_checkpoint

    root = tmp_path_factory.mktemp("families")
    eff = write_demo_checkpoint(root / "effnet", "b0", image_size=96, formats=("h5", "tf")).paths
    pre = BertSpec(**SMALL, parts=("base", "pooler", "mlm", "nsp"), model_class="BertForPreTraining")
    cls = BertSpec(**SMALL, parts=("base", "pooler", "classifier"), model_class="BertForSequenceClassification",
                   num_labels=3, id2label={0: "negative", 1: "neutral", 2: "positive"})
    return {
        "effnet_h5": eff["h5"], "effnet_tf": eff["tf"],
        "bert_tf1": str(writers.write_tf1(root / "bert_tf1", pre, writers.random_weights(pre, seed=1))),
        "bert_h5_cls": str(writers.write_h5(root / "bert_h5", cls, writers.random_weights(cls, seed=2))),
    }


def run(*argv) -> int:
    return convert.main([*map(str, argv), "--log_level", "warning"])


def test_efficientnet_h5_plain_saved_and_reloaded(checkpoints, tmp_path, capsys):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    out = tmp_path / "hf"
    assert run("--checkpoint_path", checkpoints["effnet_h5"], "--image_size", 96, "--save_model",
               "--pytorch_dump_folder_path", out) == 0
    printed = capsys.readouterr().out
    assert "checkpoint weights used" in printed and "-> OK" in printed
    model = AutoModelForImageClassification.from_pretrained(out)
    processor = AutoImageProcessor.from_pretrained(out)
    assert type(model).__name__ == "EfficientNetForImageClassification" and model.config.image_size == 96
    assert processor.size["height"] == 96
    card = (out / "README.md").read_text()
    assert checkpoints["effnet_h5"] in card and "max|Δ|" in card
    assert re.search(r"`normalization(_\d+)?/mean` \(image processor", card), card  # accounted for, by name


def test_efficientnet_tf_checkpoint_traced_and_inference_reaches_the_table(checkpoints, tmp_path):
    table, inferred = tmp_path / "table.csv", tmp_path / "inferred.csv"
    common = ("--checkpoint_path", checkpoints["effnet_tf"], "--image_size", 96, "--trace")
    assert run(*common, "--report_dir", tmp_path / "r1", "--mapping_out", table) == 0
    assert run(*common, "--mapping", "infer", "--report_dir", tmp_path / "r2", "--mapping_out", inferred) == 0

    def pairs(path):
        import pandas as pd

        frame = pd.read_csv(path)
        return set(zip(frame["variable"], frame["parameter"], frame["transform"]))

    assert pairs(table) == pairs(inferred) and len(pairs(table)) > 300
    summary = json.loads((tmp_path / "r1" / "summary.json").read_text())
    assert summary["verdict"] == "match" and summary["layer_statuses"]["diverged"] == 0


def test_bert_tf1_with_heads_traced_saved_and_reloaded(checkpoints, tmp_path):
    from transformers import AutoModelForPreTraining, AutoTokenizer

    out = tmp_path / "hf"
    assert run("--checkpoint_path", checkpoints["bert_tf1"], "--trace", "--report_dir", tmp_path / "report",
               "--save_model", "--pytorch_dump_folder_path", out) == 0
    model = AutoModelForPreTraining.from_pretrained(out)
    assert type(model).__name__ == "BertForPreTraining"
    assert model.cls.predictions.decoder.weight.data_ptr() == model.bert.embeddings.word_embeddings.weight.data_ptr()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("a cat")["input_ids"][0] == tokenizer.cls_token_id
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["verdict"] == "match"
    blocks = {b for b in __import__("pandas").read_csv(tmp_path / "report" / "blocks.csv")["block"]}
    assert {"bert.embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1", "bert.pooler", "cls.predictions",
            "cls.seq_relationship"} <= blocks, blocks


def test_bert_base_demo_is_wired_through_its_writer(tmp_path, monkeypatch, capsys):
    """`--demo bert-base` end to end at a reduced size (BASE_SIZES patched; the real vocabulary kept): the writer's
    google-research checkpoint with Adam slots and global_step, traced, saved and reloaded."""
    from transformers import AutoModelForPreTraining, AutoTokenizer

    monkeypatch.setattr(writers, "BASE_SIZES", {**writers.BASE_SIZES, **SMALL, "vocab_size": 30522})
    demo, out = tmp_path / "demo", tmp_path / "hf"
    assert run("--demo", "bert-base", "--demo_dir", demo, "--trace", "--report_dir", tmp_path / "report",
               "--save_model", "--pytorch_dump_folder_path", out) == 0
    printed = capsys.readouterr().out
    weights = len(writers.weight_shapes(writers.base_spec(**{**SMALL, "vocab_size": 30522})))
    # every weight used; its two Adam slots and global_step set aside
    assert f"{weights}/{weights} checkpoint weights used" in printed, printed
    assert f"{2 * weights + 1} optimizer/metric variables set aside" in printed, printed
    assert json.loads((demo / "bert_config.json").read_text())["num_hidden_layers"] == SMALL["num_layers"]
    model = AutoModelForPreTraining.from_pretrained(out)
    assert type(model).__name__ == "BertForPreTraining" and model.config.vocab_size == 30522
    assert AutoTokenizer.from_pretrained(out).tokenize("Hello world") == ["hello", "world"]  # MiniLM's uncased
    assert json.loads((tmp_path / "report" / "summary.json").read_text())["verdict"] == "match"


def test_bert_base_demo_h5_variant(tmp_path):
    """The benchmark's tf_model.h5 of the same model (transformers 4's TFBertForPreTraining layout) converts."""
    path = writers.write_base_demo(tmp_path / "h5", "h5", **SMALL)
    assert path.name == "tf_model.h5"
    assert json.loads((tmp_path / "h5" / "config.json").read_text())["architectures"] == ["BertForPreTraining"]
    assert run("--checkpoint_path", path) == 0


def test_bert_h5_task_head_keeps_its_labels(checkpoints, tmp_path):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "hf"
    assert run("--checkpoint_path", checkpoints["bert_h5_cls"], "--save_model", "--pytorch_dump_folder_path",
               out) == 0
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}


def test_a_head_the_class_has_no_place_for_is_refused_unless_dropped(checkpoints, tmp_path, caplog):
    assert run("--checkpoint_path", checkpoints["bert_tf1"], "--model_class", "BertModel") == 3
    assert "--drop_heads" in caplog.text
    out = tmp_path / "hf"
    assert run("--checkpoint_path", checkpoints["bert_tf1"], "--model_class", "BertModel", "--drop_heads",
               "--save_model", "--pytorch_dump_folder_path", out) == 0
    assert "cls/predictions" in (out / "README.md").read_text()  # the dropped heads are listed


def test_a_config_contradicting_the_shapes(checkpoints, tmp_path, caplog):
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(Path(checkpoints["bert_tf1"]).parent, folder)
    config = json.loads((folder / "bert_config.json").read_text())
    config["hidden_size"] = 64
    (folder / "bert_config.json").write_text(json.dumps(config))
    assert run("--checkpoint_path", folder / "bert_model.ckpt") == 3
    assert "hidden_size" in caplog.text and "64" in caplog.text and "32" in caplog.text


def test_the_family_is_detected_and_a_wrong_model_type_is_named(checkpoints, caplog):
    assert run("--checkpoint_path", checkpoints["effnet_h5"], "--model_type", "bert") == 3
    assert "no BERT weight" in caplog.text or "BERT" in caplog.text
    from tracer.families.registry import detect
    from tracer.io.checkpoint import open_checkpoint

    for name, family in (("effnet_h5", "efficientnet"), ("effnet_tf", "efficientnet"), ("bert_tf1", "bert"),
                         ("bert_h5_cls", "bert")):
        with open_checkpoint(checkpoints[name]) as ckpt:
            assert detect(ckpt) == family, name


def test_labels_file(checkpoints, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"class {i}" for i in range(10)) + "\n")
    out = tmp_path / "hf"
    assert run("--checkpoint_path", checkpoints["effnet_h5"], "--image_size", 96, "--labels", labels,
               "--save_model", "--pytorch_dump_folder_path", out) == 0
    assert json.loads((out / "config.json").read_text())["id2label"]["3"] == "class 3"
    np.testing.assert_equal(len(json.loads((out / "config.json").read_text())["id2label"]), 10)
