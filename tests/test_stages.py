"""Both conversions stopped after a stage (`stop_after=`, `tracer.stages.STAGES`): the state they return holds what
the stages so far made, and nothing of the later ones was done. ALIGN on the tiny demo (`tiny_bundle`), BERT on a
small random google-research checkpoint written by the family's own writer (as tests/test_families_cli.py does)."""

from __future__ import annotations

import numpy as np
import pytest

import tracer  # noqa: F401  (TensorFlow's environment first)
from tracer.engine.transforms import get_transform
from tracer.pipeline import AlignConversion, ConvertOptions, convert
from tracer.stages import STAGES

SMALL = dict(vocab_size=120, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
             max_position_embeddings=48, type_vocab_size=2)


def _copied_as_read(state, read) -> int:
    """Every entry in use: the HF tensor equals the checkpoint's value under the entry's transform. Returns how
    many were checked."""
    tensors = state.hf_model.state_dict()
    for e in state.entries:
        expected = get_transform(e.transform)(read(e.variable))
        np.testing.assert_array_equal(tensors[e.parameter].detach().numpy(), expected, err_msg=e.variable)
    return len(state.entries)


def _align(tiny_bundle, tmp_path, **kw) -> ConvertOptions:
    return ConvertOptions(**{"checkpoint_path": str(tiny_bundle / "model-weights"),
                             "inputs_file": str(tiny_bundle / "reference.npz"), "save_model": True,
                             "pytorch_dump_folder_path": str(tmp_path / "hf"), "report_dir": str(tmp_path / "report"),
                             **kw})


# ------------------------------------------------------------------------------------------------------- ALIGN


def test_align_stopped_after_read_has_the_checkpoint_and_table_and_no_model(tiny_bundle, tmp_path):
    state = convert(_align(tiny_bundle, tmp_path), stop_after="read")
    try:
        assert isinstance(state, AlignConversion) and state.stopped_after == "read"
        assert state.shapes == state.checkpoint.shapes() and len(state.shapes) > 100
        assert state.spec.temperature_name in state.shapes
        # the rename rules map every weight; nothing is built or written yet
        assert {e.variable for e in state.table.entries} == set(state.shapes) and not state.table.unmatched
        assert state.hf_model is None and state.inputs is None and state.entries == [] and state.result is None
        assert list(state.timings) == ["read checkpoint"]
    finally:
        state.close()
    assert not (tmp_path / "hf").exists() and not (tmp_path / "report").exists()


def test_align_stopped_after_copy_holds_the_checkpoints_values_and_nothing_later(tiny_bundle, tmp_path):
    mapping = tmp_path / "mapping.csv"
    state = convert(_align(tiny_bundle, tmp_path, mapping_out=str(mapping)), stop_after="copy")
    try:
        assert state.stopped_after == "copy"
        c = state.coverage
        assert c.checkpoint_weights_used == c.checkpoint_weights_total == len(state.shapes)
        assert c.hf_tensors_written == c.hf_tensors_total
        assert _copied_as_read(state, state.checkpoint.read) == len(state.shapes)
        assert mapping.exists()  # --mapping_out is part of the copy
        # not compared, reported or saved
        assert state.parity is None and state.result is None and state.hf_out is None
        assert "run HF" not in state.timings and "save" not in state.timings
    finally:
        state.close()
    assert not (tmp_path / "hf").exists() and not (tmp_path / "report").exists()


def test_without_stop_after_the_result_and_after_the_last_stage_the_state_that_made_it(tiny_bundle, tmp_path):
    result = convert(_align(tiny_bundle, tmp_path, save_model=False))
    assert type(result).__name__ == "ConversionResult" and result.parity.ok and result.saved_to is None
    state = convert(_align(tiny_bundle, tmp_path), stop_after="save")
    assert state.stopped_after == "save" and state.result.parity.ok
    assert state.result.saved_to == tmp_path / "hf" and state.result.reload_checked == len(state.result.model.state_dict())


def test_an_unknown_stage_is_refused_before_any_work(tiny_bundle, tmp_path):
    with pytest.raises(ValueError, match="stop_after must be one of read, build, copy"):
        convert(_align(tiny_bundle, tmp_path), stop_after="trace")
    assert STAGES == ("read", "build", "copy", "compare", "report", "check", "save")


# -------------------------------------------------------------------------------------------------------- BERT


@pytest.fixture(scope="module")
def bert_tf1(tmp_path_factory):
    from tracer.families.bert import BertSpec, writers

    spec = BertSpec(**SMALL, parts=("base", "pooler", "mlm", "nsp"), model_class="BertForPreTraining")
    return str(writers.write_tf1(tmp_path_factory.mktemp("bert_tf1"), spec, writers.random_weights(spec, seed=1)))


def _bert(bert_tf1, tmp_path, **kw):
    from tracer.families.registry import get_family
    from tracer.family_pipeline import convert_family

    options = ConvertOptions(checkpoint_path=bert_tf1, save_model=True, pytorch_dump_folder_path=str(tmp_path / "hf"),
                             report_dir=str(tmp_path / "report"), **kw)
    return lambda stop_after: convert_family(options, get_family("bert"), stop_after=stop_after)


def test_bert_stopped_after_read_names_every_weight_and_builds_nothing(bert_tf1, tmp_path):
    from tracer.family_pipeline import FamilyConversion

    state = _bert(bert_tf1, tmp_path)("read")
    try:
        assert isinstance(state, FamilyConversion) and state.stopped_after == "read"
        assert state.spec.model_class == "BertForPreTraining"
        # every checkpoint weight has its reference name (none accounted for otherwise); Adam slots set aside
        assert len(state.keras_shapes) == len(state.shapes) and state.checkpoint.set_aside
        assert {e.variable for e in state.table.entries} == set(state.keras_shapes)
        assert state.hf_model is None and state.reference is None and state.result is None
    finally:
        state.close()
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("trace", [False, True])
def test_bert_stopped_after_copy_holds_the_checkpoints_values_and_no_report(bert_tf1, tmp_path, trace):
    state = _bert(bert_tf1, tmp_path, trace=trace)("copy")
    try:
        assert state.stopped_after == "copy"
        assert state.coverage.checkpoint_weights_used == state.coverage.checkpoint_weights_total
        assert _copied_as_read(state, state.read) == len(state.keras_shapes)
        assert (state.run is not None) == trace  # a trace compares as it copies; its report is not written yet
        if trace:
            assert state.run.report is None and state.run.verdict == "match"
        assert state.result is None
    finally:
        state.close()
    assert not (tmp_path / "report").exists() and not (tmp_path / "hf").exists()
