"""A user's table that is wrong, through `convert.py --trace --mapping_file`: with `--mapping table` it is applied
as given, the run traces and writes its report (the faulty layer first, with the right hint; the conflicting
entries in mapping.csv with both candidates' local errors), then fails with exit 3; with `--mapping auto` the
numbers pick the right candidate (`numeric`) and the conversion succeeds. The tables are written by a correct
run's `--mapping_out`, then edited."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pandas as pd
import pytest

import tracer  # noqa: F401  (TensorFlow's environment first)
from tracer.engine.compare import LOCAL_REL_L2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import convert  # noqa: E402
from tracer.families.bert import BertSpec, writers  # noqa: E402

SMALL = dict(vocab_size=120, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
             max_position_embeddings=48, type_vocab_size=2)


def run(*argv) -> int:
    return convert.main([*map(str, argv), "--log_level", "warning"])


def edit(source: Path, target: Path, change) -> Path:
    """A copy of a mapping file with `change(rows_by_variable)` applied."""
    with source.open(newline="") as f:
        rows = list(csv.DictReader(f))
    change({r["variable"]: r for r in rows})
    with target.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return target


def swap(rows: dict, a: str, b: str) -> None:
    rows[a]["parameter"], rows[b]["parameter"] = rows[b]["parameter"], rows[a]["parameter"]


def first_local(report: Path) -> pd.Series:
    layers = pd.read_csv(report / "layers.csv")
    over = layers[layers["local_rel_l2"] > LOCAL_REL_L2]
    assert len(over), "no layer diverges locally"
    return over.iloc[0]


def check_table_mode(report: Path, variables: list[str], layer: str, hint: str) -> pd.DataFrame:
    """The report of a `--mapping table` run with a bad table: the first local divergence is `layer` (its Keras
    path ends so) with `hint` among its classes; the conflicting `variables` show both candidates, the table's
    off and the tracer's fitting."""
    first = first_local(report)
    assert first["keras_layer"].endswith(layer), first[["keras_layer", "hf_module", "local_rel_l2"]].to_dict()
    assert f"[{hint}] " in first["hint"], first["hint"]  # layers.csv holds the hints as text
    mapping = pd.read_csv(report / "mapping.csv").set_index("variable")
    conflicted = mapping[mapping["table_candidate"].notna()]
    assert set(conflicted.index) == set(variables), list(conflicted.index)
    for name in variables:
        row = mapping.loc[name]
        assert row["status"] == "conflict" and row["winner"] == "tracer", row.to_dict()
        assert row["table_local_rel_l2"] > 100 * LOCAL_REL_L2 and row["tracer_local_rel_l2"] <= LOCAL_REL_L2
        assert row["parameter"] == row["table_candidate"].split(" ")[0]  # the table, as given
    page = (report / "report.html").read_text()
    assert "table candidate" in page and "tracer local rel l2" in page
    assert json.loads((report / "summary.json").read_text())["verdict"] != "match"
    return mapping


def check_auto_mode(report: Path, good: Path, variables: list[str]) -> None:
    """The `--mapping auto` run's report: the conflicting entries take the tracer's (right) candidate, marked
    `numeric` with both errors as evidence, and every entry is the correct run's."""
    mapping = pd.read_csv(report / "mapping.csv").set_index("variable")
    right = pd.read_csv(good).set_index("variable")
    assert (mapping["parameter"] == right.loc[mapping.index, "parameter"]).all()
    assert (mapping["transform"] == right.loc[mapping.index, "transform"]).all()
    for name in variables:
        assert mapping.loc[name, "source"] == "numeric", mapping.loc[name].to_dict()
        assert "tracer's candidate fits" in mapping.loc[name, "evidence"]
    assert json.loads((report / "summary.json").read_text())["verdict"] == "match"


# ------------------------------------------------------------------------------------------------ BERT


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_tables_bert")
    spec = BertSpec(**SMALL, parts=("base", "pooler", "mlm", "nsp"), model_class="BertForPreTraining")
    checkpoint = writers.write_tf1(root / "bert_tf1", spec, writers.random_weights(spec, seed=1))
    good = root / "good.csv"
    assert run("--checkpoint_path", checkpoint, "--trace", "--report_dir", root / "good", "--mapping_out", good) == 0
    return checkpoint, good


ATTENTION = "tf_bert_for_pre_training/bert/encoder/layer_._1/attention/"


def _bert_case(bert, tmp_path, change, variables, layer, hint):
    checkpoint, good = bert
    bad = edit(good, tmp_path / "bad.csv", change)
    common = ["--checkpoint_path", checkpoint, "--trace", "--mapping_file", bad]
    assert run(*common, "--mapping", "table", "--report_dir", tmp_path / "table") == 3
    check_table_mode(tmp_path / "table", variables, layer, hint)
    assert run(*common, "--mapping", "auto", "--report_dir", tmp_path / "auto", "--save_model",
               "--pytorch_dump_folder_path", tmp_path / "hf") == 0
    check_auto_mode(tmp_path / "auto", good, variables)
    assert (tmp_path / "hf" / "config.json").is_file()


def test_bert_query_and_key_swapped_in_one_layer(bert, tmp_path):
    q, k = ATTENTION + "self/query/kernel", ATTENTION + "self/key/kernel"
    _bert_case(bert, tmp_path, lambda rows: swap(rows, q, k), [q, k], "self/query", "qkv_swap")


def test_bert_square_kernel_left_untransposed(bert, tmp_path):
    dense = ATTENTION + "output/dense/kernel"

    def untranspose(rows):
        rows[dense]["transform"] = "identity"

    _bert_case(bert, tmp_path, untranspose, [dense], "output/dense", "transposed")


def test_the_message_names_the_entries_and_the_fix(bert, tmp_path, caplog):
    checkpoint, good = bert
    q, k = ATTENTION + "self/query/kernel", ATTENTION + "self/key/kernel"
    bad = edit(good, tmp_path / "bad.csv", lambda rows: swap(rows, q, k))
    assert run("--checkpoint_path", checkpoint, "--trace", "--mapping", "table", "--mapping_file", bad,
               "--report_dir", tmp_path / "r") == 3
    message = caplog.text
    assert q in message and k in message and "--mapping auto" in message and str(bad) in message, message


# ------------------------------------------------------------------------------------------------ ALIGN


@pytest.fixture(scope="module")
def align(tmp_path_factory):
    """A tiny ALIGN whose image tower's fourth stage has three blocks (4b and 4c of one shape)."""
    import numpy as np

    from tracer.families.align.demo import demo_inputs, demo_spec, write_demo_checkpoint
    from tracer.families.align.spec import AlignSpec, VisionSpec

    root = tmp_path_factory.mktemp("bad_tables_align")
    tiny = demo_spec("tiny")
    vision = VisionSpec(width_coefficient=tiny.vision.width_coefficient, depth_coefficient=0.7)
    spec = AlignSpec(vision=vision, text=tiny.text, embed_dim=vision.hidden_dim)
    prefix = write_demo_checkpoint(root / "model-weights", spec)
    np.savez(root / "inputs.npz", **demo_inputs(spec, n=1))
    good = root / "good.csv"
    common = ["--checkpoint_path", prefix, "--inputs", root / "inputs.npz", "--trace"]
    assert run(*common, "--report_dir", root / "good", "--mapping_out", good) == 0
    return common, good


def test_align_depthwise_kernels_swapped_between_two_blocks_of_one_stage(align, tmp_path):
    common, good = align
    a, b = "block4b_dwconv/depthwise_kernel", "block4c_dwconv/depthwise_kernel"
    bad = edit(good, tmp_path / "bad.csv", lambda rows: swap(rows, a, b))
    assert run(*common, "--mapping", "table", "--mapping_file", bad, "--report_dir", tmp_path / "table") == 3
    check_table_mode(tmp_path / "table", [a, b], "block4b_dwconv", "mapping")
    assert run(*common, "--mapping", "auto", "--mapping_file", bad, "--report_dir", tmp_path / "auto",
               "--save_model", "--pytorch_dump_folder_path", tmp_path / "hf") == 0
    check_auto_mode(tmp_path / "auto", good, [a, b])
    assert (tmp_path / "hf" / "config.json").is_file()
