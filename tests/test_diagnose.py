"""Cause hints (tracer.engine.diagnose): inject one classic TF->PyTorch port fault at a time into the tiny demo, and check
that the first row whose local error exceeds tolerance lies in the block the fault was put in, and that its hint
names the fault's class; a correct conversion gets no hint at all.

One traced conversion (the correct one, through `pipeline.trace`, as `convert` runs it) is shared. Each fault then
builds only what it changes, through the seam a user has where there is one:
  * `--hf_config`: `hf.override_config` on a copy of the derived config, the converted weights loaded into it;
  * `--mapping_file`: the mapping written, edited, read back (`read_mapping`, `map_by_file`) and transferred
    into a fresh model (`transfer`), as `convert --mapping_file m.csv --mapping table` does;
  * no seam (the strict writer refuses an unwritten tensor; the kernel transforms cannot flip; the inputs are
    built by our own processor; the temperature is mapped like any weight): a copy of the converted model or its
    inputs is tampered with, as a lax converter would have left them;
and only the recording, pairing, compare and diagnose stages run again, for the tower the fault touches (the
other tower's rows are the correct run's: its modules are untouched).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("tf_keras")

from tracer.families.align import hf as hf_side  # noqa: E402
from tracer.engine.compare import ACCUMULATED_REL_L2, LOCAL_REL_L2, layer_rows  # noqa: E402
from tracer.families.align.blocks import align_blocks  # noqa: E402
from tracer.families.align.parity import compare_embeddings  # noqa: E402
from tracer.families.align.towers import tower_of  # noqa: E402
from tracer.engine.diagnose import CHECKERS, CLASSES, RUN_CHECKERS, diagnose  # noqa: E402
from tracer.engine.hint import Hint  # noqa: E402
from tracer.engine.row import LayerRow  # noqa: E402
from tracer.engine.mapping import map_by_file, read_mapping, write_mapping  # noqa: E402
from tracer.engine.pairing import pair_records  # noqa: E402
from tracer.engine.record.torch import recording  # noqa: E402

LAYER1 = "tf_bert_model/bert/encoder/layer_._1/attention/"


# ------------------------------------------------------------------------------------------------ the shared run


@pytest.fixture(scope="module")
def good(tiny_bundle):
    """The tiny demo converted correctly with tracing: the stages of `pipeline.convert` up to `trace`."""
    from tracer.io.checkpoint import open_checkpoint
    from tracer.families.align.inputs import IMAGE_SIZE, build_processor, default_vocab_file
    from tracer.engine.mapping import map_by_rules
    from tracer.pipeline import ConvertOptions, load_inputs
    from tracer.families.align.trace import AlignRun, trace
    from tracer.families.align.rules import ALIGN_RULES
    from tracer.families.align.spec import derive_spec

    options = ConvertOptions(checkpoint_path=str(tiny_bundle / "model-weights"),
                             inputs_file=str(tiny_bundle / "reference.npz"), trace=True)
    checkpoint = open_checkpoint(options.checkpoint_path)
    shapes = checkpoint.shapes()
    spec = derive_spec(shapes, image_size=IMAGE_SIZE, seq_length=options.seq_length)
    table = map_by_rules(shapes, ALIGN_RULES, spec.vision.block_index())
    inputs = load_inputs(options, build_processor(default_vocab_file(), IMAGE_SIZE, options.seq_length), spec)
    config = hf_side.align_config(spec)
    model = hf_side.build_empty(config)
    traced = trace(AlignRun(checkpoint, shapes, spec, table, "auto", model, inputs, options, {}, keep_activations=True))
    temperature = float(checkpoint.read(spec.temperature_name))
    values = {n: checkpoint.read(n) for n in shapes}
    checkpoint.close()
    assert traced.coverage is not None and not traced.conflicts
    parity = compare_embeddings(traced.keras_out, traced.hf_out, temperature, float(model.temperature.detach()))
    return SimpleNamespace(
        spec=spec, shapes=shapes, config=config, model=model, inputs=inputs, traced=traced, parity=parity,
        temperature=temperature, keras_values=values,
        keras_records=[p.keras for p in traced.pairs if p.keras is not None],
    )


@dataclass
class Run:
    pairs: list
    rows: list[dict]
    entries: list
    parity: object
    hints: list[str]

    def first_local(self) -> dict:
        """The first row whose local error exceeds tolerance (NaN: not measured, never exceeds)."""
        return next(r for r in self.rows if r.local_rel_l2 > LOCAL_REL_L2)

    def first_accumulated(self) -> dict:
        return next(r for r in self.rows if r.rel_l2 > ACCUMULATED_REL_L2)

    def diverged(self) -> list[dict]:
        return [r for r in self.rows if r.status == "diverged"]


def retrace(good, model, towers, entries=None, pixel_values=None) -> Run:
    """Record `towers` of `model`, pair them with the correct run's Keras records, compare, diagnose."""
    model.eval()
    entries = entries if entries is not None else good.traced.weight_map.entries
    hf_out = dict(good.traced.hf_out)
    with recording(model, part_of=tower_of) as records, torch.inference_mode():
        if "vision" in towers:
            pixels = good.inputs.torch_pixel_values() if pixel_values is None else pixel_values
            hf_out["image_embeds"] = _normalised(model.get_image_features(pixel_values=pixels).pooler_output)
        if "text" in towers:
            hf_out["text_embeds"] = _normalised(model.get_text_features(**good.inputs.torch_text()).pooler_output)
    pairs, rows = [], []
    for tower in ("vision", "text"):
        if tower in towers:
            tower_pairs = pair_records([r for r in good.keras_records if r.tower == tower], records)
            pairs += tower_pairs
            rows += layer_rows(tower_pairs, entries, align_blocks(good.spec.vision.block_names()))
        else:
            pairs += [p for p in good.traced.pairs if p.tower == tower]
            rows += [replace(r) for r in good.traced.rows if r.tower == tower]
    parity = compare_embeddings(good.traced.keras_out, hf_out, good.temperature, float(model.temperature.detach()))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hints = diagnose(pairs, rows, entries, parity, align_blocks(good.spec.vision.block_names()))
    # The checkers re-run modules with patched weights, eps, padding: the model is left as it was found.
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    return Run(pairs, rows, entries, parity, hints)


def _normalised(features) -> np.ndarray:
    f = features.numpy()
    return f / np.linalg.norm(f, axis=-1, keepdims=True)


def with_config(good, *overrides: str):
    """The converted weights in a model built from the derived config with `--hf_config` overrides."""
    from transformers import AlignModel

    config = copy.deepcopy(good.config)
    hf_side.override_config(config, list(overrides))
    model = AlignModel(config)
    model.load_state_dict(good.model.state_dict())
    return model


def with_mapping_file(good, tmp_path, edit):
    """A fresh model written through an edited mapping file, as `--mapping_file m.csv --mapping table` does."""
    from tracer.engine.transfer import transfer

    path = write_mapping(good.traced.weight_map.entries, tmp_path / "mapping.csv")
    entries = read_mapping(path)
    edit({e.variable: e for e in entries})
    write_mapping(entries, path)
    weight_map = map_by_file(good.shapes, read_mapping(path))
    model = hf_side.build_empty(good.config)
    transfer(good.keras_values.__getitem__, list(good.shapes), weight_map, model, allow_nonfinite=True)
    return model, weight_map.entries


def tampered(good):
    return copy.deepcopy(good.model)


def assert_located(run: Run, block: str, cls: str) -> dict:
    """The first locally diverged row lies in `block` and its hint names `cls` (and no other class); every
    diverged row carries a hint that names `cls` or points to a row inside it that does."""
    first = run.first_local()
    assert first.block == block, (first.block, first.hf_module)
    assert first.status == "diverged"
    assert first.hint_classes == [cls], first.hint
    for row in run.diverged():
        assert set(row.hint_classes) <= {cls, "within"} and row.hint, (row.hf_module, row.hint)
        if "within" in row.hint_classes:
            assert f"({cls})" in row.hint, row.hint
    return first


def _swap(entries: dict, a: str, b: str) -> None:
    entries[a].parameter, entries[b].parameter = entries[b].parameter, entries[a].parameter


# ------------------------------------------------------------------------------------------------ the registry


def test_one_checker_per_class_in_a_registry():
    names = [c.name for c in CHECKERS] + [c.name for c in RUN_CHECKERS]
    assert set(names) == set(CLASSES)
    assert len([c.name for c in CHECKERS]) == len({c.name for c in CHECKERS})
    row = LayerRow("vision", 0, hints=[Hint("padding", "a"), Hint("within", "b")])
    assert row.hint_classes == ["padding", "within"] and row.hint == "[padding] a | [within] b"


def test_a_one_pixel_shift_is_measured_on_the_overlap():
    from tracer.engine.diagnose import _shift_fit

    rng = np.random.default_rng(0)
    keras = rng.normal(size=(2, 9, 9, 3)).astype(np.float32)
    hf = np.zeros_like(keras)
    hf[:, 1:, :-1] = keras[:, :-1, 1:]  # HF's content sits one pixel lower and one pixel to the left
    (shift, err) = _shift_fit(SimpleNamespace(keras=SimpleNamespace(output=keras)), hf)
    assert shift == (-1, 1) and err < 1e-7
    assert _shift_fit(SimpleNamespace(keras=SimpleNamespace(output=keras)), keras[:, ::-1].copy()) is None


def test_a_correct_conversion_gets_no_hint(good):
    rows = [replace(r) for r in good.traced.rows]
    hints = diagnose(good.traced.pairs, rows, good.traced.weight_map.entries, good.parity,
                     align_blocks(good.spec.vision.block_names()))
    assert good.parity.ok and hints == []
    assert {r.status for r in rows} == {"ok"}
    assert all(r.hint == "" for r in rows)


def test_a_failing_check_warns_and_the_others_still_hint(good, tmp_path, monkeypatch, caplog):
    """A checker that raises costs only its own evidence: the run warns, and the fault is still named."""
    import logging

    from tracer.engine import diagnose as diagnose_module

    def broken(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(diagnose_module, "CHECKERS", [diagnose_module.Checker("broken", broken), *CHECKERS])
    monkeypatch.setattr(diagnose_module, "RUN_CHECKERS", [diagnose_module.Checker("broken_run", broken)])

    def edit(entries):
        entries[LAYER1 + "output/dense/kernel"].transform = "identity"

    model, entries = with_mapping_file(good, tmp_path, edit)
    with caplog.at_level(logging.WARNING, logger=diagnose_module.logger.name):
        run = retrace(good, model, ("text",), entries=entries)
    assert_located(run, "layer_._1", "transposed")
    warned = caplog.text
    assert "check broken_run (run) failed: boom" in warned
    assert "check broken on text_model.encoder.layer.1.attention.output.dense failed: boom" in warned


# ------------------------------------------------------------------------------------------------ 1. never written


def test_a_norm_left_at_its_initial_value(good):
    """A lax converter (load_state_dict(strict=False)) leaves a LayerNorm at ones/zeros: tampered after writing."""
    model = tampered(good)
    model.text_model.encoder.layer[1].attention.output.LayerNorm.reset_parameters()
    run = retrace(good, model, ("text",))
    first = assert_located(run, "layer_._1", "never_written")
    assert first.hf_module == "text_model.encoder.layer.1.attention.output.LayerNorm"
    assert "is all ones" in first.hint and "is all zeros" in first.hint and "fits" in first.hint


# ------------------------------------------------------------------------------------------------ 2. transposed


def test_a_dense_kernel_copied_without_its_transpose(good, tmp_path):
    """Mapping file: a square Dense kernel given transform `identity` instead of `dense`."""
    def edit(entries):
        entries[LAYER1 + "output/dense/kernel"].transform = "identity"

    model, entries = with_mapping_file(good, tmp_path, edit)
    run = retrace(good, model, ("text",), entries=entries)
    first = assert_located(run, "layer_._1", "transposed")
    assert first.hf_module == "text_model.encoder.layer.1.attention.output.dense"
    assert "transposed" in first.hint and "mapping transform `identity`" in first.hint


def test_a_spatially_flipped_depthwise_kernel(good):
    """No transform flips a kernel, so the converted model's block5a depthwise kernel is rotated 180°."""
    model = tampered(good)
    with torch.no_grad():
        weight = model.vision_model.encoder.blocks[4].depthwise_conv.depthwise_conv.weight
        weight.copy_(weight.flip(-1, -2))
    run = retrace(good, model, ("vision",))
    first = assert_located(run, "block5a", "transposed")
    assert "flipped in both spatial axes" in first.hint


# ------------------------------------------------------------------------------------------------ 3. q/k/v


def test_query_and_key_swapped(good, tmp_path):
    """Mapping file: layer 1's query and key kernels and biases exchange parameters."""
    def edit(entries):
        for leaf in ("kernel", "bias"):
            _swap(entries, f"{LAYER1}self/query/{leaf}", f"{LAYER1}self/key/{leaf}")

    model, entries = with_mapping_file(good, tmp_path, edit)
    run = retrace(good, model, ("text",), entries=entries)
    first = assert_located(run, "layer_._1", "qkv_swap")
    assert first.hf_module == "text_model.encoder.layer.1.attention.self.query"
    assert "HF key holds Keras query" in first.hint and "HF query holds Keras key" in first.hint


# ------------------------------------------------------------------------------------------------ 4. epsilon


def test_a_batchnorm_epsilon_mismatch(good):
    """--hf_config vision_config.batch_norm_eps=1e-5 (coyo's Keras BatchNormalization uses 1e-3): every BN, so
    the first to diverge is the stem's."""
    model = with_config(good, "vision_config.batch_norm_eps=1e-5")
    run = retrace(good, model, ("vision",))
    first = assert_located(run, "stem", "epsilon")
    assert model.vision_model.embeddings.batchnorm.eps == 1e-5  # re-run with Keras' eps, then put back
    assert "eps 1e-05" in first.hint and "epsilon 0.001" in first.hint and "fits" in first.hint


# ------------------------------------------------------------------------------------------------ 5. padding


def test_a_symmetric_pad_in_block3a(good):
    """--hf_config vision_config.depthwise_padding=[2]: block 2 (block3a) pads 2 on every side where Keras pads
    (1, 2): the pad outputs differ by one pixel (they stay unpaired) and the block's output shifts."""
    run = retrace(good, with_config(good, "vision_config.depthwise_padding=[2]"), ("vision",))
    first = assert_located(run, "block3a", "padding")
    assert first.hf_module == "vision_model.encoder.blocks.2"
    assert "re-running with Keras' padding fits" in first.hint
    # Where the error enters (the depthwise conv after the unpaired pads), the shapes off by one are named.
    entry = run.first_accumulated()
    assert entry.block == "block3a" and entry.hint_classes == ["padding"]
    assert "76x76" in entry.hint and "75x75" in entry.hint


def test_a_one_pixel_shift_in_the_stem(good):
    """The stem's pad moved to the top/left (same size, shifted content): tampered, no config key sets it."""
    model = tampered(good)
    model.vision_model.embeddings.padding.padding = (1, 0, 1, 0)
    run = retrace(good, model, ("vision",))
    first = assert_located(run, "stem", "padding")
    assert first.hf_module == "vision_model.embeddings.padding"
    assert model.vision_model.embeddings.padding.padding == (1, 0, 1, 0)  # re-run with Keras', then put back
    assert "(1, 0, 1, 0)" in first.hint and "(0, 1, 0, 1)" in first.hint


# ------------------------------------------------------------------------------------------------ 6. activation


@pytest.mark.parametrize("override, tower, block, hf_name, keras_name", [
    ('text_config.hidden_act="gelu_new"', "text", "layer_._0", "gelu_new", "gelu (erf)"),
    ('vision_config.hidden_act="relu"', "vision", "stem", "relu", "swish"),
])
def test_an_activation_variant(good, override, tower, block, hf_name, keras_name):
    run = retrace(good, with_config(good, override), (tower,))
    first = assert_located(run, block, "activation")
    assert f"HF computes {hf_name}" in first.hint and f"Keras computes {keras_name}" in first.hint


# ------------------------------------------------------------------------------------------------ 7. preprocessing


def test_pixels_rescaled_by_another_processor(good):
    """The HF side fed pixels as EfficientNetImageProcessor's default rescale makes them (p/255, no offset)
    where coyo's Keras model rescales to [-1, 1] itself. Teacher forcing feeds every HF layer Keras' input, so
    no layer diverges locally: the hint sits on the first row whose accumulated error exceeds tolerance."""
    from tracer.families.align.inputs import rescale_like_processor

    pixels = rescale_like_processor(good.inputs.pixel_values_nhwc, 1 / 255, offset=False)
    run = retrace(good, good.model, ("vision",), pixel_values=torch.from_numpy(
        np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))))
    assert not run.parity.ok and run.diverged() == []
    entry = run.first_accumulated()
    assert entry.block == "stem" and entry.order == 0
    assert entry.hint_classes == ["preprocessing"]
    assert "0.5·k + 0.5" in entry.hint and "HF 1/255·p" in entry.hint and "1/127.5·p − 1" in entry.hint
    assert [h.cls for h in run.hints] == ["preprocessing"]


# ------------------------------------------------------------------------------------------------ 8. temperature


def test_the_temperature_not_carried_over(good):
    """The temperature left at AlignConfig's default (1.0) instead of the checkpoint's 0.07: the towers match,
    the run-level hint names both values."""
    model = tampered(good)
    with torch.no_grad():
        model.temperature.fill_(1.0)
    rows = [replace(r) for r in good.traced.rows]
    parity = compare_embeddings(good.traced.keras_out, good.traced.hf_out, good.temperature,
                                float(model.temperature.detach()))
    hints = diagnose(good.traced.pairs, rows, good.traced.weight_map.entries, parity,
                     align_blocks(good.spec.vision.block_names()))
    assert not parity.ok
    assert [h.cls for h in hints] == ["temperature"]
    assert "0.07" in hints[0].evidence and "default temperature_init_value" in hints[0].evidence
    assert all(r.hint == "" for r in rows)
