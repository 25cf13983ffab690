"""The report: CSV columns, block aggregation, the summary.json contract, the HTML page, the atomic write.

Everything here is built from synthetic rows (no model is run), except the optional screenshot test, which needs
a Chromium on PATH (or $CHROMIUM).
"""

import json
import math
import re
import struct
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from tracer.engine.transfer import tensor_checksum

from tracer.engine import compare, report
from tracer.families.align.parity import Parity
from tracer.engine.hint import Hint
from tracer.engine.mapping import Entry
from tracer.engine.row import LayerRow, Status

NAN = float("nan")
ROOT = Path(__file__).resolve().parents[1]


def row(tower, order, block, status, rel=NAN, local=NAN, hint="", keras=None, hf=None, max_abs=None):
    """A layer row; `hint`: the evidence of one hint of class `fault` (its text is `[fault] <hint>`)."""
    keras = keras if keras is not None else f"{tower}/{block}/layer{order}"
    return LayerRow(
        tower, order, block, keras_layer=keras, keras_class="Conv2D",
        hf_module=hf if hf is not None else f"{tower}_model.{block}.m{order}", hf_class="Conv2d",
        keras_shape="2x8x8x4", hf_shape="2x4x8x8",
        max_abs=rel * 10 if max_abs is None else max_abs, mean_abs=rel, rel_l2=rel,
        cosine=1.0 - rel if rel == rel else NAN, local_max_abs=local * 10, local_rel_l2=local,
        status=Status(status), weights=f"{block}/kernel -> {tower}_model.{block}.weight",
        mapping_source="table", hints=[Hint("fault", hint)] if hint else [],
    )


def synthetic_rows():
    """Vision: stem (a local fault at order 1), block1a (amplified, unpaired, two diverged); text: ok embeddings,
    an amplified-only layer, a block of ok + unpaired."""
    return [
        row("vision", 0, "stem", "ok", 1e-7, 1e-8),
        row("vision", 1, "stem", "diverged", 1e-2, 1e-2, hint="BatchNorm eps differs"),
        row("vision", 2, "stem", "amplified", 2e-2, 1e-8),
        row("vision", 3, "block1a", "amplified", 3e-2, NAN),
        row("vision", 4, "block1a", "unpaired"),
        row("vision", 5, "block1a", "diverged", 5e-2, 2e-3, hint="padding"),
        row("vision", 6, "block1a", "diverged", 4e-2, 3e-3, hint="later"),
        row("vision", 7, "pooling", "amplified", 4e-2, 1e-7),
        row("text", 0, "embeddings", "ok", 1e-7, 1e-7),
        row("text", 1, "layer_._0", "amplified", 3e-4, 1e-7),
        row("text", 2, "layer_._0", "amplified", 5e-4, 2e-7),
        row("text", 3, "pooler", "ok", 2e-7, 1e-7),
        row("text", 4, "pooler", "unpaired"),
        row("text", 5, "projection", "ok", 2e-7, 1e-7),
    ]


def entries():
    return [
        Entry("Variable", "temperature", "scalar", "table", (), (), "confirmed"),
        Entry("stem_conv/kernel", "vision_model.embeddings.convolution.weight", "conv2d", "table",
              (3, 3, 3, 8), (8, 3, 3, 3), "confirmed"),
        Entry("stem_bn/gamma", "vision_model.embeddings.batchnorm.weight", "identity", "inferred", (8,), (8,),
              "mismatch"),
        Entry("dense/kernel", "text_projection.weight", "linear", "numeric", (64, 32), (32, 64), "inferred-only"),
    ]


def parity(image=1e-7, text=1e-7, t_ckpt=0.07, t_hf=0.07, atol=1e-3):
    return Parity(image, text, 1.0 - image, 1.0 - text, t_ckpt, t_hf, atol)


def result(rows=None, par=None, ents=None, hints=None):
    coverage = SimpleNamespace(as_dict=lambda: {"hf_tensors_written": 4, "hf_tensors_total": 4,
                                                "checkpoint_weights_used": 4, "checkpoint_weights_total": 4})
    return SimpleNamespace(rows=synthetic_rows() if rows is None else rows, entries=entries() if ents is None else ents,
                           parity=par or parity(), coverage=coverage, hints=hints or [], spec=None,
                           timings={"trace": 1.25}, reference_max_abs={}, set_aside=3, report=None)


@pytest.fixture
def written(tmp_path):
    res = result(hints=["temperature looks fine"])
    res.report = report.write_report(res, tmp_path / "run", "weights/model-weights")
    return res, res.report


# ------------------------------------------------------------------------------------------------ CSV files
def test_csv_files_have_exactly_the_documented_columns(written):
    _, folder = written
    assert sorted(p.name for p in folder.iterdir()) == sorted(report.FILES)
    layers = pd.read_csv(folder / "layers.csv")
    assert list(layers.columns) == report.LAYER_COLUMNS
    assert len(layers) == len(synthetic_rows())
    assert layers.loc[1, "hint"] == "[fault] BatchNorm eps differs"
    assert list(pd.read_csv(folder / "blocks.csv").columns) == report.BLOCK_COLUMNS
    mapping = pd.read_csv(folder / "mapping.csv", keep_default_na=False)
    assert list(mapping.columns) == report.MAPPING_COLUMNS
    assert list(mapping["variable"]) == [e.variable for e in entries()]
    assert set(mapping["source"]) == {"table", "inferred", "numeric"}
    assert (mapping["keras_checksum"] == "").all() and (mapping["hf_checksum"] == "").all()
    doc = report.__doc__
    for column in report.LAYER_COLUMNS + report.BLOCK_COLUMNS + report.MAPPING_COLUMNS + report.SUMMARY_KEYS:
        assert column in doc, f"{column} is not documented in the module docstring"


def test_rows_without_a_hint_still_get_the_column(tmp_path):
    rows = synthetic_rows()
    for r in rows:
        r.hints = []
    folder = report.write_report(result(rows=rows), tmp_path / "r", "ckpt")
    layers = pd.read_csv(folder / "layers.csv", keep_default_na=False)
    assert list(layers.columns) == report.LAYER_COLUMNS and (layers["hint"] == "").all()


def test_blocks_aggregate(written):
    _, folder = written
    blocks = pd.read_csv(folder / "blocks.csv", keep_default_na=False).set_index(["tower", "block"])
    assert list(blocks.index) == [("vision", "stem"), ("vision", "block1a"), ("vision", "pooling"),
                                  ("text", "embeddings"), ("text", "layer_._0"), ("text", "pooler"),
                                  ("text", "projection")]
    stem = blocks.loc[("vision", "stem")]
    assert stem["layers"] == 3 and stem["status"] == "diverged" and stem["block_order"] == 0
    assert stem["rel_l2"] == pytest.approx(2e-2) and stem["max_abs"] == pytest.approx(2e-1)
    assert stem["local_rel_l2"] == pytest.approx(1e-2) and stem["local_max_abs"] == pytest.approx(1e-1)
    assert stem["first_diverged_keras_layer"] == "vision/stem/layer1"
    assert stem["first_diverged_hf_module"] == "vision_model.stem.m1"
    assert stem["hint"] == "[fault] BatchNorm eps differs"
    b1 = blocks.loc[("vision", "block1a")]
    assert (b1["layers"], b1["diverged"], b1["amplified"], b1["unpaired"]) == (4, 2, 1, 1)
    assert (b1["first_order"], b1["last_order"]) == (3, 6)
    assert b1["rel_l2"] == pytest.approx(5e-2) and b1["local_rel_l2"] == pytest.approx(3e-3)
    assert b1["first_diverged_keras_layer"] == "vision/block1a/layer5" and b1["hint"] == "[fault] padding"
    assert blocks.loc[("vision", "pooling"), "status"] == "amplified"
    assert blocks.loc[("text", "embeddings"), "status"] == "ok"
    assert blocks.loc[("text", "embeddings"), "first_diverged_keras_layer"] == ""
    layer0 = blocks.loc[("text", "layer_._0")]
    assert layer0["status"] == "amplified" and layer0["rel_l2"] == pytest.approx(5e-4)
    assert blocks.loc[("text", "pooler"), "status"] == "unpaired"  # unpaired outranks ok
    assert blocks.loc[("text", "layer_._0"), "block_order"] == 1


def test_status_precedence():
    rows = [row("v", 0, "b", "ok", 1e-7, 1e-7), row("v", 1, "b", "unpaired"), row("v", 2, "b", "amplified", 1e-3, 1e-7)]
    assert report.block_rows(rows)[0]["status"] == "amplified"
    assert report.block_rows(rows[:2])[0]["status"] == "unpaired"
    assert report.block_rows(rows + [row("v", 3, "b", "diverged", 1e-2, 1e-2)])[0]["status"] == "diverged"
    only_unmeasured = report.block_rows([row("v", 0, "b", "unpaired")])[0]
    assert math.isnan(only_unmeasured["rel_l2"]) and math.isnan(only_unmeasured["local_rel_l2"])


def test_mapping_checksums_when_the_transfer_provides_them(tmp_path):
    ents = entries()
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    ents[1].keras_checksum = tensor_checksum(array)
    ents[1].hf_checksum = tensor_checksum(array.T)
    folder = report.write_report(result(ents=ents), tmp_path / "r", "ckpt")
    mapping = pd.read_csv(folder / "mapping.csv", keep_default_na=False, dtype=str)
    assert mapping.loc[1, "keras_checksum"] == tensor_checksum(array.copy())
    assert mapping.loc[1, "hf_checksum"] != mapping.loc[1, "keras_checksum"]
    assert mapping.loc[0, "keras_checksum"] == ""
    assert tensor_checksum(array) != tensor_checksum(array.astype(np.float64))
    assert tensor_checksum(array) != tensor_checksum(array.reshape(3, 2))


# ------------------------------------------------------------------------------------------------ summary.json
def _no_nan(constant):
    raise AssertionError(f"summary.json holds {constant}")


def test_summary_contract(written):
    res, folder = written
    data = json.loads((folder / "summary.json").read_text(), parse_constant=_no_nan)
    assert list(data) == report.SUMMARY_KEYS
    assert data["verdict"] == "diverged" and data["checkpoint"] == "weights/model-weights"
    assert set(data["temperature"]) >= {"checkpoint", "hf"}
    assert set(data["coverage"]) == {"hf_tensors_written", "hf_tensors_total", "checkpoint_weights_used",
                                     "checkpoint_weights_total"}
    assert data["mapping_sources"] == {"table": 2, "inferred": 1, "numeric": 1, "file": 0}
    assert data["mapping_statuses"] == {"confirmed": 2, "mismatch": 1, "inferred-only": 1}
    assert data["layer_statuses"] == {"ok": 4, "amplified": 5, "diverged": 3, "unpaired": 2}
    assert data["tolerances"]["local_rel_l2"] == compare.TOLERANCES["local_rel_l2"]
    assert data["tolerances"]["accumulated_rel_l2"] == compare.TOLERANCES["accumulated_rel_l2"]
    assert data["tolerances"]["embeds_max_abs"] == res.parity.atol
    for key in ("first_local_divergence", "first_accumulated_divergence"):
        assert set(data[key]) >= {"tower", "keras_layer", "hf_module", "block", "local_max_abs", "hint"}
    assert data["diverged_blocks"] == ["vision/stem", "vision/block1a"]
    assert data["towers"]["text"]["first_local_divergence"] is None
    assert data["towers"]["text"]["first_accumulated_divergence"]["order"] == 1
    assert data["hints"] == ["temperature looks fine"]
    assert data["layers"] == 14 and data["towers"]["vision"]["layers"] == 8
    assert data["towers"]["vision"]["layer_statuses"]["diverged"] == 3
    assert data["towers"]["vision"]["first_local_divergence"]["order"] == 1


def test_verdict_logic():
    amplified_only = [row("vision", 0, "stem", "ok", 1e-7, 1e-8), row("vision", 1, "stem", "amplified", 1e-3, 1e-7)]
    assert report.summary(result(rows=amplified_only), "c")["verdict"] == "match"
    assert report.summary(result(rows=amplified_only), "c")["verdict_reasons"] == []
    one_diverged = amplified_only + [row("vision", 2, "block1a", "diverged", 1e-2, 1e-2)]
    assert report.summary(result(rows=one_diverged), "c")["verdict"] == "diverged"
    all_ok = amplified_only[:1]
    assert report.summary(result(rows=all_ok, par=parity(image=2e-3)), "c")["verdict"] == "diverged"
    assert report.summary(result(rows=all_ok, par=parity(text=2e-3)), "c")["verdict"] == "diverged"
    assert report.summary(result(rows=all_ok, par=parity(text=NAN)), "c")["verdict"] == "diverged"
    assert report.summary(result(rows=all_ok, par=parity(image=9e-4)), "c")["verdict"] == "match"
    assert report.summary(result(rows=all_ok, par=parity(image=2e-3, atol=1e-2)), "c")["verdict"] == "match"
    assert report.summary(result(rows=[], par=parity()), "c")["verdict"] == "match"


def test_first_divergences_pick_the_right_rows():
    rows = [
        row("vision", 0, "stem", "ok", 1e-7, 1e-8),
        row("vision", 1, "stem", "amplified", 2e-4, 1e-7),  # first accumulated over 1e-4, own error fine
        row("vision", 2, "block1a", "unpaired"),
        row("vision", 3, "block1a", "diverged", 3e-3, 5e-3, hint="the cause"),  # first local
        row("vision", 4, "block1a", "diverged", 4e-3, 6e-3),
    ]
    data = report.summary(result(rows=rows), "c")
    local, acc = data["first_local_divergence"], data["first_accumulated_divergence"]
    assert (local["tower"], local["order"], local["block"], local["hint"]) == ("vision", 3, "block1a", "[fault] the cause")
    assert local["keras_layer"] == "vision/block1a/layer3" and local["hf_module"] == "vision_model.block1a.m3"
    assert local["local_max_abs"] == pytest.approx(5e-2)
    assert (acc["order"], acc["block"], acc["hint"]) == (1, "stem", "")
    # no local measurement: a diverged status (an accumulated jump) is the layer's own fault
    jump = [row("text", 0, "embeddings", "ok", 1e-7, 1e-7), row("text", 1, "layer_._0", "diverged", 1e-2, NAN)]
    assert report.summary(result(rows=jump), "c")["first_local_divergence"]["order"] == 1
    assert report.summary(result(rows=jump[:1]), "c")["first_local_divergence"] is None
    assert report.summary(result(rows=jump[:1]), "c")["first_accumulated_divergence"] is None


def test_format_summary(written):
    res, folder = written
    text = report.format_summary(res)
    assert "verdict: DIVERGED" in text
    assert "image max|Δ| 1.00e-07" in text
    assert "first divergence: vision vision/stem/layer1 -> vision_model.stem.m1 [stem]" in text
    assert "hint: [fault] BatchNorm eps differs" in text
    assert f"report: {folder / 'report.html'}" in text
    ok = report.format_summary(result(rows=[row("text", 0, "embeddings", "ok", 1e-7, 1e-7)]))
    assert ok.startswith("verdict: MATCH") and "first divergence" not in ok and "report:" not in ok


# ------------------------------------------------------------------------------------------------ HTML
def test_html_is_self_contained_and_escaped(tmp_path):
    rows = synthetic_rows()
    rows[1].keras_layer = "vision/stem_bn<script>alert(1)</script>"
    rows[1].hints = [Hint("epsilon", 'eps "1e-3" & <1e-5>')]
    ents = entries()
    ents[0].variable = "Variable<x>"
    folder = report.write_report(result(rows=rows, ents=ents), tmp_path / "r", "ckpt<&>")
    page = (folder / "report.html").read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "<script" not in page.lower() and "@import" not in page and "url(" not in page
    assert "DIVERGED" in page
    assert "stem_bn&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "eps &quot;1e-3&quot; &amp; &lt;1e-5&gt;" in page
    assert "Variable&lt;x&gt;" in page and "ckpt&lt;&amp;&gt;" in page
    # the block table, with the first fault highlighted
    assert "<th>block</th>" in page and "block1a" in page and "layer_._0" in page
    assert page.count('class=first-fault') >= 2  # its block row and its layer row
    assert page.count('<svg class="plot"') == 2
    match = (report.render_html(result(rows=rows[:1], par=parity())))
    assert "MATCH" in match and "DIVERGED" not in match


def test_plot_survives_edge_cases():
    tol = report._tolerances(parity())
    assert "<svg" in report.divergence_plot([], tol, None)
    zeros = [row("v", i, "b", "ok", 0.0, 0.0) for i in range(3)]
    assert "<svg" in report.divergence_plot(zeros, tol, None)
    many = [row("v", i, f"block{i // 13}", "ok", 1e-7 * (1 + i), 1e-8) for i in range(900)]
    svg = report.divergence_plot(many, tol, None)
    assert svg.count("<polyline") == 1 and "nan" not in svg.lower()


# ------------------------------------------------------------------------------------------------ atomic write
def test_a_failure_while_writing_leaves_no_destination(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report.page, "render_html", boom)  # where write_report looks it up
    with pytest.raises(RuntimeError, match="disk full"):
        report.write_report(result(), tmp_path / "run", "ckpt")
    assert list(tmp_path.iterdir()) == []  # no destination, no partial folder


def test_a_failure_keeps_the_previous_report(tmp_path, monkeypatch):
    folder = report.write_report(result(), tmp_path / "run", "ckpt")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    monkeypatch.setattr(report.page, "summary", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        report.write_report(result(rows=[]), tmp_path / "run", "ckpt")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    monkeypatch.undo()
    report.write_report(result(rows=[]), tmp_path / "run", "ckpt")  # a success replaces it
    assert pd.read_csv(folder / "layers.csv").empty
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


# ------------------------------------------------------------------------------------------------ screenshot
def test_render_report_screenshot(written, tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import render_report
    finally:
        sys.path.remove(str(ROOT / "tools"))
    if render_report.find_browser() is None:
        pytest.skip("no Chromium on PATH (apt-get install chromium, or set $CHROMIUM): screenshot not tested")
    _, folder = written
    out = render_report.render(folder, tmp_path / "shot.png", width=1000, timeout=120)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width == 1000 and height > 1000
    assert len(data) > 20_000  # a rendered page, not a blank one
