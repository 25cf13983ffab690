"""The tracer: recording, pairing, inference, confirmation against a table, and the mapping file."""

from collections import Counter

import numpy as np
import pytest

from conftest import shared_fixture
from tracer.errors import ConversionError
from tracer.engine.mapping import read_mapping, write_mapping
from tracer.pipeline import ConvertOptions, convert


def _convert(bundle, tmp_path, **kw):
    options = ConvertOptions(checkpoint_path=str(bundle / "model-weights"),
                             inputs_file=str(bundle / "reference.npz"), trace=True,
                             report_dir=str(tmp_path / "report"), **kw)
    return convert(options)


@pytest.fixture(scope="module")
def table_run(tiny_bundle, tmp_path_factory):
    """The tiny demo converted with the rename table and tracing; its mapping written to a file."""
    tmp = tmp_path_factory.mktemp("table_run")
    result = _convert(tiny_bundle, tmp, mapping_out=str(tmp / "mapping.csv"))
    return result, tmp / "mapping.csv"


def test_table_is_confirmed_by_the_tracer(table_run):
    result, _ = table_run
    assert Counter(e.status for e in result.entries) == {"confirmed": len(result.entries)}
    assert result.coverage.checkpoint_weights_used == result.coverage.checkpoint_weights_total
    assert result.coverage.hf_tensors_written == result.coverage.hf_tensors_total
    assert result.parity.ok
    assert {r.status for r in result.rows} == {"ok"}


def test_each_mapping_entry_is_filed_under_its_tower(table_run):
    """The report's per-tower mapping tables read `Entry.part`: every tower weight carries its tower."""
    from tracer.families.align.towers import tower_of

    result, _ = table_run
    assert all(e.part == (tower_of(e.parameter) or "") for e in result.entries)
    page = (result.report / "report.html").read_text(encoding="utf-8")
    assert "<h2>Other weights</h2>" in page  # the temperature belongs to no tower
    assert page.count("<summary>Mapping: ") == 3


def test_pairs_containers_and_fused_activations(table_run):
    result, _ = table_run
    pairs = {(r.keras_layer.rsplit("/", 1)[-1], r.hf_module) for r in result.rows}
    assert ("block1a", "vision_model.encoder.blocks.0") in pairs
    assert ("layer_._1", "text_model.encoder.layer.1") in pairs
    assert ("embeddings", "text_model.embeddings") in pairs
    assert ("dense", "text_projection") in pairs
    # Conv2D(activation="swish") pairs with torch's conv + SiLU: the compared output is the activation's.
    assert ("block2a_se_reduce", "vision_model.encoder.blocks.1.squeeze_excite.act_reduce") in pairs
    qkv = [r.hf_module for r in result.rows if "/layer_._0/attention/self/" in r.keras_layer
           and r.keras_class == "Dense"]
    assert qkv == [f"text_model.encoder.layer.0.attention.self.{n}" for n in ("query", "key", "value")]


def test_no_table_at_all(tiny_bundle, tmp_path):
    result = _convert(tiny_bundle, tmp_path, mapping="infer")
    assert {e.source for e in result.entries} == {"inferred"}
    assert {e.status for e in result.entries} == {"inferred-only"}
    assert result.coverage.checkpoint_weights_used == result.coverage.checkpoint_weights_total
    assert result.coverage.hf_tensors_written == result.coverage.hf_tensors_total
    assert result.parity.ok and result.parity.temperature_hf == pytest.approx(0.07)


def test_no_table_on_the_original_codes_checkpoint(tmp_path):
    fixture = shared_fixture("coyo_mini")
    result = _convert(fixture, tmp_path, mapping="infer")
    assert result.coverage.checkpoint_weights_used == result.coverage.checkpoint_weights_total == 264
    assert result.parity.ok
    assert max(result.reference_max_abs[k] for k in ("image_embeds", "text_embeds")) < 1e-4
    assert float(result.model.temperature.detach()) == pytest.approx(0.07)


def test_auto_fills_the_original_converters_truncated_table(table_run, tiny_bundle, tmp_path):
    """The old converter's table: no BERT encoder-layer rules, and `temperature:0` for coyo's `Variable`."""
    _, full = table_run
    entries = [e for e in read_mapping(full) if "/encoder/layer_._" not in e.variable]
    for e in entries:
        if e.variable == "Variable":
            e.variable = "temperature"
    truncated = write_mapping(entries, tmp_path / "truncated.csv")
    out = tmp_path / "used.csv"
    result = _convert(tiny_bundle, tmp_path, mapping_file=str(truncated), mapping_out=str(out))
    used = {e.variable: e for e in read_mapping(out)}
    status = {e.variable: e.status for e in result.entries}
    gaps = [n for n in status if "/encoder/layer_._" in n] + ["Variable"]
    assert len(gaps) > 30 and all(status[n] == "inferred-only" for n in gaps)
    assert {status[n] for n in status if n not in gaps} == {"confirmed"}
    assert used["Variable"].parameter == "temperature"
    assert float(result.model.temperature.detach()) == pytest.approx(0.07) and result.parity.ok
    assert "status" in open(out).readline()


def test_a_wrong_table_entry_is_a_conflict_naming_the_layer(table_run, tiny_bundle, tmp_path):
    _, full = table_run
    entries = read_mapping(full)
    by_var = {e.variable: e for e in entries}
    q = by_var["tf_bert_model/bert/encoder/layer_._1/attention/self/query/kernel"]
    k = by_var["tf_bert_model/bert/encoder/layer_._1/attention/self/key/kernel"]
    q.parameter, k.parameter = k.parameter, q.parameter
    wrong = write_mapping(entries, tmp_path / "wrong.csv")
    out = tmp_path / "used.csv"
    # As given (`--mapping table`): traced and reported, then refused, naming the entries.
    with pytest.raises(ConversionError, match=r"conflict.*layer_\._1/attention/self/(query|key)/kernel"):
        _convert(tiny_bundle, tmp_path, mapping="table", mapping_file=str(wrong), mapping_out=str(out))
    assert (tmp_path / "report" / "layers.csv").is_file()
    # The mapping file records the conflict where it happened, with both candidates' local errors.
    with open(out) as f:
        text = f.read()
    assert text.count(",conflict,") == 2 and text.count(",tracer\n") == 2, text
    # `auto`: the numbers pick the tracer's candidates.
    result = _convert(tiny_bundle, tmp_path, mapping="auto", mapping_file=str(wrong), overwrite=True)
    used = {e.variable: e for e in result.entries}
    assert used[q.variable].parameter.endswith("query.weight") and used[q.variable].source == "numeric"


def test_mapping_file_round_trips(table_run, tiny_bundle, tmp_path):
    result, full = table_run
    again = convert(ConvertOptions(checkpoint_path=str(tiny_bundle / "model-weights"),
                                   inputs_file=str(tiny_bundle / "reference.npz"), mapping_file=str(full)))
    assert [(e.variable, e.parameter, e.transform) for e in again.entries] == \
        [(e.variable, e.parameter, e.transform) for e in result.entries]
    a, b = result.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def test_exploding_activations_are_no_false_fault(tiny_bundle, tmp_path):
    """Uncalibrated BatchNorm statistics blow activations up block after block: absolute differences grow far
    past any fixed threshold, yet every layer's own error stays at round-off: amplified, never diverged."""
    from tracer.families.align.demo import demo_spec, write_demo_checkpoint

    prefix = write_demo_checkpoint(tmp_path / "model-weights", demo_spec("tiny"), calibrate=False)
    with np.load(tiny_bundle / "reference.npz") as ref:  # the inputs only: its outputs are the calibrated model's
        np.savez(tmp_path / "inputs.npz", **{k: ref[k] for k in ("pixel_values", "input_ids", "attention_mask",
                                                                  "token_type_ids")})
    result = convert(ConvertOptions(checkpoint_path=prefix, inputs_file=str(tmp_path / "inputs.npz"),
                                    trace=True, report_dir=str(tmp_path / "report")))
    statuses = Counter(r.status for r in result.rows)
    assert statuses["diverged"] == 0 and result.parity.ok
    vision = [r for r in result.rows if r.tower == "vision"]
    assert max(r.max_abs for r in vision) > 1.0  # the magnitudes exploded
    assert statuses["amplified"] > 0 and all(r.status == "amplified" for r in vision if r.max_abs > 1e-3)
    assert all(r.local_rel_l2 < 1e-4 for r in vision if r.local_rel_l2 == r.local_rel_l2)
