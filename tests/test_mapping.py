"""Transforms, the ALIGN rename table, the mapping file and strict HF writing."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import shared_fixture, variable_shapes
from tracer.errors import BadInputError, ConversionError
from tracer.families.align.hf import align_config, build_empty, expected_state, write_state
from tracer.engine.mapping import map_by_file, map_by_rules, read_mapping, write_mapping
from tracer.families.align.rules import ALIGN_RULES
from tracer.families.align.spec import derive_spec
from tracer.engine.transforms import TRANSFORMS, get_transform

KERAS_SHAPES = {
    "identity": st.lists(st.integers(1, 5), min_size=1, max_size=2),
    "scalar": st.just([]),
    "conv": st.lists(st.integers(1, 4), min_size=4, max_size=4),
    "depthwise": st.tuples(st.integers(1, 5), st.integers(1, 5), st.integers(1, 6), st.just(1)).map(list),
    "dense": st.lists(st.integers(1, 6), min_size=2, max_size=2),
    "bn_squeeze": st.integers(1, 9).map(lambda c: [1, 1, 1, 1, c]),
}


@settings(max_examples=60, deadline=None)
@given(data=st.data(), name=st.sampled_from(sorted(TRANSFORMS)))
def test_transforms_invert_exactly(data, name):
    shape = data.draw(KERAS_SHAPES[name])
    array = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    t = get_transform(name)
    out = t(array)
    assert out.shape == t.shape(tuple(shape))
    np.testing.assert_array_equal(t.inverse(out), array)


def test_layouts_match_torch_conventions():
    hwio = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    assert get_transform("conv")(hwio).shape == (5, 4, 2, 3)
    assert get_transform("conv")(hwio)[1, 2, 0, 1] == hwio[0, 1, 2, 1]
    assert get_transform("depthwise")(np.zeros((3, 3, 8, 1))).shape == (8, 1, 3, 3)
    assert get_transform("dense")(np.zeros((4, 7))).shape == (7, 4)
    assert get_transform("bn_squeeze")(np.zeros((1, 1, 1, 1, 6))).shape == (6,)
    with pytest.raises(ConversionError):
        get_transform("conv")(np.zeros((3, 3)))


def _base_table():
    shapes = variable_shapes(shared_fixture("coyo_b7_bert_base_variables.json"))
    spec = derive_spec(shapes)
    return shapes, spec, map_by_rules(shapes, ALIGN_RULES, spec.vision.block_index())


def test_derive_spec_for_align_base():
    _, spec, _ = _base_table()
    assert (spec.vision.width_coefficient, spec.vision.depth_coefficient) == (2.0, 3.1)
    assert spec.vision.num_blocks == 55 and spec.vision.hidden_dim == 640
    t = spec.text
    assert (t.num_layers, t.hidden_size, t.num_heads, t.intermediate_size, t.vocab_size) == (12, 768, 12, 3072, 30522)
    assert spec.embed_dim == 640 and spec.temperature_name == "Variable"
    cfg = align_config(spec)
    assert cfg.vision_config.hidden_dim == 640 and cfg.vision_config.depthwise_padding == []
    assert cfg.vision_config.image_size == 289 and cfg.projection_dim == 640


def test_table_covers_align_base_both_ways():
    shapes, spec, table = _base_table()
    assert table.unmatched == []
    assert len(table.entries) == len(shapes) == 1232
    model = build_empty(align_config(spec))
    expected = expected_state(model)
    targets = {e.parameter for e in table.entries}
    assert targets <= set(expected)
    assert set(expected) - targets == {k for k in expected if k.endswith("num_batches_tracked")}
    for e in table.entries:  # every transform yields the HF shape
        assert get_transform(e.transform).shape(e.keras_shape) == expected[e.parameter][0], e


def test_table_fixes_the_original_converters_gaps():
    _, _, table = _base_table()
    by_var = table.by_variable()
    assert by_var["Variable"].parameter == "temperature" and by_var["Variable"].transform == "scalar"
    assert by_var["dense/bias"].parameter == "text_projection.bias"
    assert sum(e.variable == "dense/bias" for e in table.entries) == 1
    layer11 = [e for e in table.entries if "/layer_._11/" in e.variable]
    assert len(layer11) == 16
    assert by_var["tf_bert_model/bert/encoder/layer_._11/attention/self/key/kernel"].parameter == \
        "text_model.encoder.layer.11.attention.self.key.weight"
    bn = [e for e in table.entries if "_bn/" in e.variable]
    assert bn and all(e.transform == "bn_squeeze" for e in bn)
    assert {e.parameter.rsplit(".", 1)[1] for e in bn} == {"weight", "bias", "running_mean", "running_var"}
    # coyo's `block{stage}{letter}` becomes HF's running index: B7 stage 2 starts after stage 1's 4 blocks.
    assert by_var["block2a_dwconv/depthwise_kernel"].parameter.startswith("vision_model.encoder.blocks.4.")
    assert by_var["block7d_project_conv/kernel"].parameter.startswith("vision_model.encoder.blocks.54.")


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_mapping_file_round_trips(tmp_path, suffix):
    shapes, _, table = _base_table()
    path = write_mapping(table.entries, tmp_path / f"mapping{suffix}")
    again = map_by_file(shapes, read_mapping(path))
    assert [(e.variable, e.parameter, e.transform) for e in again.entries] == \
        [(e.variable, e.parameter, e.transform) for e in table.entries]
    assert again.unmatched == [] and {e.source for e in again.entries} == {"file"}


def test_mapping_file_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("variable,parameter\nx,y\n")
    with pytest.raises(BadInputError, match="missing column"):
        read_mapping(bad)
    bad.write_text("variable,parameter,transform\nx,y,rotate\n")
    with pytest.raises(BadInputError, match="unknown transform"):
        read_mapping(bad)
    with pytest.raises(BadInputError, match="does not exist"):
        read_mapping(tmp_path / "missing.csv")


def test_strict_writing_names_what_is_missing_or_extra():
    shapes, spec, table = _base_table()
    model = build_empty(align_config(spec))
    expected = expected_state(model)
    tensors = {k: torch.zeros(s, dtype=d) for k, (s, d) in expected.items() if not k.endswith("num_batches_tracked")}
    missing = dict(tensors)
    del missing["text_model.encoder.layer.3.attention.self.query.weight"]
    with pytest.raises(ConversionError, match=r"never written.*layer\.3\.attention\.self\.query\.weight"):
        write_state(build_empty(align_config(spec)), missing)
    with pytest.raises(ConversionError, match="no place in AlignModel.*image_projection"):
        write_state(build_empty(align_config(spec)), {**tensors, "image_projection.weight": torch.zeros(2)})
    wrong = {**tensors, "temperature": torch.zeros(2)}
    with pytest.raises(ConversionError, match="shape mismatch"):
        write_state(build_empty(align_config(spec)), wrong)
    derived = write_state(model, tensors)
    assert len(derived) == sum(k.endswith("num_batches_tracked") for k in expected)
    assert not any(t.is_meta for t in model.state_dict().values())
    assert torch.equal(model.text_model.embeddings.position_ids[0, :5], torch.arange(5))
