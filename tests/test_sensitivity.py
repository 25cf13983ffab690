"""The reference's own sensitivity (tracer/engine/sensitivity.py): amplified round-off told from a fault.

The engine rule on hand-made rows; then a demo ALIGN whose vision tower is deep enough (width 0.4, depth 2.0:
32 blocks) that a uniform-noise image, far from the smooth images its BatchNorm was calibrated on, grows float32
round-off past the embeddings' tolerance (at 128 px: image_embeds max|Δ| 2.6e-2, the reference against itself
of the same size; 289 px gives 0.15, but takes four times as long). The tiny demo (7 blocks) stays well-conditioned on the same noise even
with uncalibrated BatchNorm (measured: image_embeds max|Δ| 1.1e-6), so it cannot show the effect.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from tracer.engine import sensitivity as conditioning
from tracer.engine.compare import ACCUMULATED_REL_L2
from tracer.engine.record import Record
from tracer.engine.row import LayerRow, Status

# ------------------------------------------------------------------------------------------------ the engine


def test_perturb_moves_every_float_by_one_ulp_and_leaves_integers():
    x = np.random.default_rng(1).uniform(0, 255, (2, 5, 5, 3)).astype(np.float32)
    moved = conditioning.perturb(x)
    assert moved.dtype == np.float32
    assert np.all(np.abs(moved - x) == np.spacing(x))  # exactly one ulp, never zero
    assert 0 < np.mean(moved > x) < 1  # both directions
    assert np.array_equal(moved, conditioning.perturb(x))  # a fixed seed
    ids = np.arange(6).reshape(2, 3)
    assert conditioning.perturb(ids) is ids or np.array_equal(conditioning.perturb(ids), ids)
    assert conditioning.doubled(x).shape == (4, 5, 5, 3)


def test_meter_compares_the_two_halves_of_each_wanted_record():
    plain = np.ones((2, 4), np.float32)
    record = Record("keras", "model", 3, "dense", "Dense", "linear", (4, 4), "float32",
                    output=np.concatenate([plain, plain * 1.01]))
    other = Record("keras", "model", 4, "relu", "ReLU", "activation", (4, 4), "float32",
                   output=np.concatenate([plain, plain]))
    meter = conditioning.Meter([3], 2)
    meter(record)
    meter(other)
    assert set(meter.sums) == {3}
    assert meter.sums[3].result().rel_l2 == pytest.approx(0.01, rel=1e-4)
    assert record.output is None  # dropped once measured
    assert meter.last is not None and meter.last[0].shape == (2, 4)


def _rows(errors, sensitivities, status="amplified"):
    return [LayerRow("vision", i, "b", keras_layer=f"k{i}", hf_module=f"h{i}", rel_l2=e, max_abs=e,
                     local_rel_l2=1e-7, status=Status(status if e > ACCUMULATED_REL_L2 else "ok"),
                     reference_sensitivity=s, reference_sensitivity_max_abs=s)
            for i, (e, s) in enumerate(zip(errors, sensitivities))]


def test_rule_same_size_is_conditioning_far_above_is_a_fault():
    rows = _rows([1e-6, 1e-3, 0.3], [1e-6, 5e-4, 0.2])
    same = conditioning.Sensitivity([conditioning.PartSensitivity("image_embeds", 0.12, 0.1, 1e-3, "vision")],
                                    conditioning.breakdown(rows))
    assert conditioning.rule(rows, same)
    assert same.breakdown["keras_layer"] == "k1"  # the first row the reference itself moves over tolerance
    far = conditioning.Sensitivity([conditioning.PartSensitivity("image_embeds", 0.12, 1e-5, 1e-3, "vision")])
    assert not conditioning.rule(rows, far)
    assert not conditioning.rule(rows, None)  # not measured: nothing excuses the miss
    within = conditioning.Sensitivity([conditioning.PartSensitivity("image_embeds", 1e-4, 1e-5, 1e-3, "vision")])
    assert not conditioning.rule(rows, within)  # no output missed: a plain match, not "ill-conditioned"
    diverged = _rows([1e-6, 1e-3, 0.3], [1e-6, 5e-4, 0.2], status="diverged")
    assert not conditioning.rule(diverged, same)  # a layer off on its own is a fault whatever the reference does


def test_a_float64_run_judges_rows_by_its_own_accumulated_tolerance():
    """A row at 1e-7 is round-off in float32 and far over float64's 1e-10: the run's tolerance decides whether
    the reference is run again, where the conditioning breaks down and what counts as over tolerance."""
    from tracer.engine.compare import FLOAT32, FLOAT64

    rows = _rows([1e-12, 1e-7, 1e-7], [1e-12, 1e-9, 5e-5], status="ok")
    assert not conditioning.wanted(rows, False, FLOAT32.accumulated_rel_l2)
    assert conditioning.wanted(rows, False, FLOAT64.accumulated_rel_l2)
    assert conditioning.breakdown(rows, FLOAT64.accumulated_rel_l2)["keras_layer"] == "k1"
    assert conditioning.breakdown(rows, FLOAT32.accumulated_rel_l2) is None
    part = conditioning.PartSensitivity("out", 1e-8, 1e-9, 1e-9)
    for tolerances, over in ((FLOAT32, 0), (FLOAT64, 2)):
        summary = conditioning.Sensitivity([part], accumulated=tolerances.accumulated_rel_l2).as_dict(rows)
        assert summary["rows_over_tolerance"] == over
    unexplained = conditioning.Sensitivity([part], accumulated=FLOAT64.accumulated_rel_l2).unexplained(rows)
    assert [r.keras_layer for r in unexplained] == ["k1"]  # k1: 100x its reference; k2 within 10x


def test_report_verdict_and_amplified_hint():
    from tracer.engine.report import verdict

    class Parity:
        temperature_match = True

        def reasons(self):
            return ["image_embeds max|Δ| 1.20e-01 > atol 0.001"]

    rows = _rows([1e-6, 1e-3, 0.3], [1e-6, 5e-4, 0.2])
    same = conditioning.Sensitivity([conditioning.PartSensitivity("image_embeds", 0.12, 0.1, 1e-3, "vision")],
                                    conditioning.breakdown(rows))
    word, reasons = verdict(rows, Parity(), same)
    assert word == "ill-conditioned" and "ill-conditioned" in reasons[-1]
    assert verdict(rows, Parity(), None)[0] == "diverged"
    hint = conditioning.amplified_hint(rows[2])
    assert hint.cls == "amplified" and str(hint).startswith("[amplified] amplified round-off: the original model itself moves by rel_l2 2.00e-01")
    assert conditioning.amplified_hint(replace(rows[2], reference_sensitivity=1e-4)) is None  # 3000x: not explained


# ------------------------------------------------------------------------------------------------ ALIGN, end to end
IMAGE_SIZE = 128


@pytest.fixture(scope="module")
def deep_noise(tmp_path_factory):
    """A calibrated demo ALIGN with a 32-block vision tower, and a uniform-noise image (with the demo's texts)."""
    from tracer.families.align.demo import demo_inputs, demo_spec, write_demo_checkpoint
    from tracer.families.align.spec import AlignSpec, VisionSpec

    folder = tmp_path_factory.mktemp("deep_noise")
    vision = VisionSpec(width_coefficient=0.4, depth_coefficient=2.0)
    spec = AlignSpec(vision=vision, text=demo_spec("tiny").text, embed_dim=vision.hidden_dim)
    prefix = write_demo_checkpoint(folder / "model-weights", spec)
    arrays = {k: v for k, v in demo_inputs(spec, n=1).items()
              if k in ("pixel_values", "input_ids", "attention_mask", "token_type_ids")}
    shape = (1, IMAGE_SIZE, IMAGE_SIZE, 3)
    arrays["pixel_values"] = np.random.default_rng(0).uniform(0, 255, shape).astype(np.float32)
    np.savez(folder / "noise.npz", **arrays)
    return prefix, folder / "noise.npz", folder


def _cli(*args):
    from test_cli import run

    return run(*args)


def test_noise_on_an_ill_conditioned_model_is_a_match_and_saves(deep_noise, tmp_path):
    prefix, noise, _ = deep_noise
    out, report = tmp_path / "hf", tmp_path / "report"
    code, errors, _ = _cli("--checkpoint_path", prefix, "--inputs", noise, "--image_size", IMAGE_SIZE, "--trace",
                           "--save_model", "--pytorch_dump_folder_path", out, "--report_dir", report)
    assert code == 0, errors
    assert (out / "config.json").is_file()
    data = json.loads((report / "summary.json").read_text())
    assert data["verdict"] == "ill-conditioned" and data["verdict_text"] == "match (ill-conditioned input)"
    assert data["layer_statuses"]["diverged"] == 0
    image = next(p for p in data["sensitivity"]["parts"] if p["part"] == "image_embeds")
    assert image["missed"] and image["explained"]  # over atol, and of the reference's own size
    assert image["error"] > 1e-3 and image["sensitivity"] > image["error"] / conditioning.SAME_SIZE
    assert data["sensitivity"]["breakdown"]["tower"] == "vision"
    layers = pd.read_csv(report / "layers.csv")
    vision = layers[layers["tower"] == "vision"]
    assert vision["reference_sensitivity"].notna().mean() > 0.9  # measured at (nearly) every paired layer
    assert layers[layers["tower"] == "text"]["reference_sensitivity"].isna().all()  # token ids: not perturbed
    hints = layers["hint"].fillna("")
    assert hints.str.startswith("[amplified] amplified round-off: the original model itself moves by").any()
    assert not hints.str.contains("unpaired before it").any()
    html = (report / "report.html").read_text()
    assert "MATCH (ILL-CONDITIONED INPUT)" in html and "Reference sensitivity" in html


def test_a_wrong_batch_norm_eps_on_the_same_noise_still_fails(deep_noise, tmp_path):
    prefix, noise, _ = deep_noise
    out, report = tmp_path / "hf", tmp_path / "report"
    code, errors, _ = _cli("--checkpoint_path", prefix, "--inputs", noise, "--image_size", IMAGE_SIZE, "--trace",
                           "--save_model", "--pytorch_dump_folder_path", out, "--report_dir", report,
                           "--hf_config", "vision_config.batch_norm_eps=1e-5")
    assert code == 1, errors
    assert not out.exists()
    data = json.loads((report / "summary.json").read_text())
    assert data["verdict"] == "diverged"
    first = data["first_local_divergence"]
    assert first["tower"] == "vision" and "[epsilon]" in first["hint"]
    layers = pd.read_csv(report / "layers.csv")
    row = layers[(layers["tower"] == "vision") & (layers["order"] == first["order"])].iloc[0]
    assert row["keras_class"] == "BatchNormalization"


# ------------------------------------------------------------------------------------------------ tracer.trace


def _dense_chain(scale_at: int | None = None):
    """Six 64-wide Dense layers with large weights (outputs ~1e8: float32 round-off alone moves them by ~10),
    and a torch port that accumulates in float64 and rounds once: correct, but rounding otherwise than Keras.
    `scale_at`: that layer's port multiplies by 1.001, a genuine fault."""
    import tf_keras
    import torch
    from torch import nn

    class Linear64(nn.Linear):
        def __init__(self, factor: float = 1.0):
            super().__init__(64, 64, bias=False)
            self.factor = factor

        def forward(self, x):
            return (x.double() @ self.weight.double().T * self.factor).to(torch.float32)

    init = tf_keras.initializers.RandomNormal
    keras_model = tf_keras.Sequential([tf_keras.Input((64,))] + [
        tf_keras.layers.Dense(64, use_bias=False, kernel_initializer=init(stddev=2.0, seed=i)) for i in range(6)])
    torch_model = nn.Sequential(*[Linear64(1.001 if i == scale_at else 1.0) for i in range(6)])
    return keras_model, torch_model


def test_trace_tells_amplified_round_off_from_a_fault():
    import tracer

    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    run = tracer.trace(*_dense_chain(), x)
    assert not run.outputs.ok  # max|Δ| ~10 against atol 1e-4
    assert run.verdict == "ill-conditioned"
    assert run.summary["verdict_text"] == "match (ill-conditioned input)"
    (output,) = run.sensitivity.parts
    assert output.missed and output.explained and output.sensitivity > 0
    assert run.layers["reference_sensitivity"].notna().all()
    assert run.layers["hint"].str.startswith("[amplified]").any()

    faulty = tracer.trace(*_dense_chain(scale_at=2), x)
    assert faulty.verdict == "diverged"
    assert faulty.sensitivity is None  # a layer off on its own: nothing for the sensitivity to excuse
    assert faulty.first_local_divergence.order == 2


def test_the_keras_worker_measures_the_sensitivity_as_this_process_does(tiny_bundle):
    """`KerasProcess.sensitivity` (the CLI's path: the perturbed run in the worker, only sums coming back) against
    `LocalKeras.sensitivity`, on the tiny demo's first image."""
    from tracer.families.align.inputs import IMAGE_SIZE as ALIGN_IMAGE_SIZE, SEQ_LENGTH, inputs_from_npz
    from tracer.families.align.keras_side import KerasProcess, LocalKeras
    from tracer.families.align.spec import derive_spec
    from tracer.io.checkpoint import open_checkpoint

    checkpoint = open_checkpoint(str(tiny_bundle / "model-weights"))
    spec = derive_spec(checkpoint.shapes(), image_size=ALIGN_IMAGE_SIZE, seq_length=SEQ_LENGTH)
    chunk = inputs_from_npz(str(tiny_bundle / "reference.npz"), SEQ_LENGTH, ALIGN_IMAGE_SIZE).select(slice(1), slice(1))
    local = LocalKeras(spec, checkpoint.read)
    records, _ = local.probe("vision")
    orders = range(len(records))
    here = local.sensitivity("vision", chunk, orders)
    keras = KerasProcess(str(tiny_bundle / "model-weights"), ALIGN_IMAGE_SIZE, SEQ_LENGTH)
    try:
        keras.probe("vision")
        there = keras.sensitivity("vision", chunk, orders)
        assert keras.sensitivity("text", chunk, ()) is None  # token ids: nothing to perturb
    finally:
        keras.close()
    assert here[0].keys() == there[0].keys() and len(here[0]) > 50
    for order, sums in here[0].items():
        assert there[0][order].result().rel_l2 == pytest.approx(sums.result().rel_l2, rel=1e-5, abs=1e-12)
    assert np.allclose(here[1], there[1], rtol=1e-6, atol=1e-7)
    assert max(s.result().rel_l2 for s in here[0].values()) > 0  # the perturbation moved something
