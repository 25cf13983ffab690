"""Streaming: metrics that add up over chunks (`compare.Sums`), a traced run chunked by `activation_budget_mb`,
the plain (TensorFlow-free) conversion and what its parity is measured against, and the verified save (reload check,
tampering, shards)."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from tracer.engine import compare
from tracer.engine.compare import Sums, divergence, layer_status
from tracer.errors import ParityError
from tracer.pipeline import ConvertOptions, convert

ROOT = Path(__file__).resolve().parents[1]
INPUT_KEYS = ("pixel_values", "input_ids", "attention_mask", "token_type_ids")
OUTPUT_KEYS = ("image_features", "text_features", "image_embeds", "text_embeds")


def close(a: float, b: float, rel: float, abs_: float = 0.0) -> bool:
    return abs(a - b) <= max(rel * max(abs(a), abs(b)), abs_)


# ------------------------------------------------------------------------------------------------- Sums


def _reference64(r: np.ndarray, c: np.ndarray) -> dict:
    r, c = np.asarray(r, np.float64).ravel(), np.asarray(c, np.float64).ravel()
    d = c - r
    return {"max_abs": float(np.max(np.abs(d))), "mean_abs": float(np.mean(np.abs(d))),
            "rel_l2": float(np.linalg.norm(d) / np.linalg.norm(r)),
            "cosine": float(r @ c / (np.linalg.norm(r) * np.linalg.norm(c)))}


def _pair(seed: int, shape=(6, 40, 33), noise: float = 1e-3):
    rng = np.random.default_rng(seed)
    r = rng.standard_normal(shape).astype(np.float32)
    c = (r + noise * rng.standard_normal(shape)).astype(np.float32)
    return r, c


def _assert_matches(got: compare.Divergence, want: dict, rel: float = 1e-6):
    assert close(got.max_abs, want["max_abs"], rel), (got, want)
    # The 1-norm is one float32 reduction (~1e-6 relative on 10^4 terms already): 1e-5.
    assert close(got.mean_abs, want["mean_abs"], 10 * rel), (got, want)
    assert close(got.rel_l2, want["rel_l2"], rel), (got, want)
    # Near 1 a cosine says little at 1e-6: compare 1 - cosine, what the metric resolves.
    assert close(1 - got.cosine, 1 - want["cosine"], 1e-4, 1e-12), (got, want)


@pytest.mark.parametrize("noise", [1e-3, 1.0])
def test_sums_of_chunks_equal_one_pass(noise):
    r, c = _pair(0, noise=noise)
    whole = Sums().add(r, c)
    chunked = Sums()
    for part in (slice(0, 1), slice(1, 3), slice(3, 6)):  # uneven chunks of examples
        chunked.add(r[part], c[part])
    assert chunked.n == whole.n == r.size
    a, b = chunked.result(), whole.result()
    assert a.max_abs == b.max_abs  # a max of maxima is exact
    assert close(a.rel_l2, b.rel_l2, 1e-6) and close(a.mean_abs, b.mean_abs, 1e-5), (a, b)
    assert close(1 - a.cosine, 1 - b.cosine, 1e-4, 1e-12), (a, b)
    _assert_matches(a, _reference64(r, c))


@pytest.mark.parametrize("noise", [1e-3, 0.5])
def test_sums_match_float64_with_non_contiguous_arrays(noise):
    r, c = _pair(1, shape=(3, 57, 91), noise=noise)
    want = _reference64(r, c)
    c_t = np.ascontiguousarray(c.transpose(0, 2, 1)).transpose(0, 2, 1)  # same values, transposed strides
    r_t = np.ascontiguousarray(r.transpose(2, 1, 0)).transpose(2, 1, 0)
    assert not c_t.flags.c_contiguous and not r_t.flags.c_contiguous
    _assert_matches(divergence(r, c), want)
    _assert_matches(divergence(r, c_t), want)
    _assert_matches(divergence(r_t, c), want)
    _assert_matches(divergence(r_t, c_t), want)
    # Chunks of transposed views add up too.
    chunked = Sums()
    for part in (slice(0, 2), slice(2, 3)):
        chunked.add(r_t[part], c_t[part])
    _assert_matches(chunked.result(), want)


def test_sums_float64_inputs_and_an_independent_candidate():
    rng = np.random.default_rng(2)
    r, c = rng.standard_normal((50, 70)), rng.standard_normal((70, 50)).T  # float64, transposed; cosine ~ 0
    got, want = divergence(r, c), _reference64(r, c)
    for name, rel in (("max_abs", 1e-6), ("mean_abs", 1e-5), ("rel_l2", 1e-6)):
        assert close(getattr(got, name), want[name], rel), (name, got, want)
    assert abs(got.cosine - want["cosine"]) < 1e-6


def test_divergence_of_identical_arrays():
    r, _ = _pair(3)
    d = divergence(r, r.copy())
    assert (d.max_abs, d.mean_abs, d.rel_l2, d.cosine) == (0.0, 0.0, 0.0, 1.0)
    t = np.ascontiguousarray(r.T).T
    d = divergence(r, t)
    assert (d.max_abs, d.mean_abs, d.rel_l2, d.cosine) == (0.0, 0.0, 0.0, 1.0)
    zeros = divergence(np.zeros((2, 3), np.float32), np.zeros((2, 3), np.float32))
    assert (zeros.max_abs, zeros.rel_l2, zeros.cosine) == (0.0, 0.0, 1.0)
    empty = Sums().add(np.zeros((0, 4)), np.zeros((0, 4)))
    assert empty.n == 0 and empty.result() == compare.Divergence(0.0, 0.0, 0.0, 1.0)


def test_divergence_of_different_arrays_is_not_zero():
    r, c = _pair(4, noise=0.1)
    d = divergence(r, c)
    assert d.max_abs > 0.1 and 0.05 < d.rel_l2 < 0.2 and d.cosine < 1 - 1e-4
    rng = np.random.default_rng(40)  # not _pair's seed: its first draw is r itself
    flipped = divergence(r, -r + 0.01 * rng.standard_normal(r.shape).astype(np.float32))  # nearly a sign flip
    assert flipped.rel_l2 == pytest.approx(2.0, rel=1e-3) and flipped.cosine == pytest.approx(-1.0, abs=1e-3)


def test_cosine_of_opposite_vectors_is_minus_one():
    for r in (np.ones(5), np.array([1.0, 2.0])):
        d = divergence(r, -r)
        assert d.rel_l2 == 2.0  # passes today: the sign flip is seen there
        assert d.cosine == pytest.approx(-1.0, abs=1e-12), d


def test_sums_take_negative_strides():
    r, c = _pair(5)
    assert c[:, ::-1].strides[1] < 0
    _assert_matches(divergence(r[:, ::-1], c[:, ::-1]), _reference64(r, c))  # the same values, reversed


def test_a_nan_output_is_not_ok():
    r, c = _pair(6)
    c[1, 2, 3] = np.nan
    d = divergence(r, c)
    assert not d.max_abs == 0.0  # NaN (or inf) would tell the report's reader; 0.0 hides it
    assert layer_status(d.rel_l2, float("nan"), float("nan"), d.max_abs) != "ok"


# ------------------------------------------------------------------------------------- chunked traced run


class Capture:
    """Wraps what a traced run goes through: counts its chunks per tower, keeps the `Traced` it returns, and
    accumulates every compared pair in float64 numpy (an independent reference for the streamed `Sums`)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.chunks: list[tuple[str, int]] = []
        self.traced = None
        self.local: dict[int, np.ndarray | None] = {}
        self.acc: dict[int, tuple] = {}  # id(Measured) -> (Measured, {"accumulated": sums64, "local": sums64})

    @staticmethod
    def _add64(sums: dict | None, r: np.ndarray, c: np.ndarray) -> dict:
        s = sums or {"n": 0, "d2": 0.0, "r2": 0.0, "c2": 0.0, "rc": 0.0, "abs": 0.0, "max": 0.0, "adds": 0}
        r, c = np.asarray(r, np.float64).ravel(), np.asarray(c, np.float64).ravel()
        d = c - r
        s["n"] += d.size
        s["d2"] += float(d @ d)
        s["r2"] += float(r @ r)
        s["c2"] += float(c @ c)
        s["rc"] += float(r @ c)
        s["abs"] += float(np.abs(d).sum())
        s["max"] = max(s["max"], float(np.abs(d).max()))
        s["adds"] += 1
        return s

    @staticmethod
    def result64(s: dict) -> dict:
        rn, cn = math.sqrt(s["r2"]), math.sqrt(s["c2"])
        return {"max_abs": s["max"], "mean_abs": s["abs"] / s["n"], "rel_l2": math.sqrt(s["d2"]) / max(rn, 1e-30),
                "cosine": s["rc"] / (rn * cn) if rn and cn else float(rn == cn)}

    def install(self, mp: pytest.MonkeyPatch) -> None:
        import tracer.pipeline
        import tracer.families.align.trace

        lockstep, trace, local_output, add = (tracer.families.align.trace._lockstep, tracer.pipeline.trace, compare.local_output,
                                              compare.Measured.add)

        def counted_lockstep(run, probed, chunk, *args, **kwargs):
            if not callable(kwargs.get("keep")):  # the diagnosis' capture pass keeps by order; the chunks do not
                self.chunks.append((probed.tower, chunk.count(probed.tower)))
            return lockstep(run, probed, chunk, *args, **kwargs)

        def kept_trace(*args, **kwargs):
            self.traced = trace(*args, **kwargs)
            return self.traced

        def seen_local_output(pair):
            out = local_output(pair)
            with self.lock:
                self.local[id(pair)] = None if out is None else np.array(out)
            return out

        def measured_add(measured, pair):
            result = add(measured, pair)
            k, t = pair.keras, pair.torch
            with self.lock:
                _, sums = self.acc.setdefault(id(measured), (measured, {"accumulated": None, "local": None}))
                sums["accumulated"] = self._add64(sums["accumulated"], k.output,
                                                  compare.to_keras_layout(t.output, k.shape))
                local = self.local.pop(id(pair), None)
                if local is not None:
                    sums["local"] = self._add64(sums["local"], k.output, local)
            return result

        mp.setattr(tracer.families.align.trace, "_lockstep", counted_lockstep)
        mp.setattr(tracer.pipeline, "trace", kept_trace)
        mp.setattr(compare, "local_output", seen_local_output)
        mp.setattr(compare.Measured, "add", measured_add)


def _four_examples(bundle: Path, folder: Path) -> Path:
    """The bundle's 2 examples as 4 ([0, 0, 1, 1]), reference outputs rearranged alike: 4 chunks at 1 per chunk,
    and chunks joined reversed, rotated or repeated show against the reference outputs."""
    order = [0, 0, 1, 1]
    with np.load(bundle / "reference.npz") as ref:
        arrays = {k: (ref[k] if ref[k].ndim == 0 else ref[k][order]) for k in ref.files}
    assert set(arrays) == {*INPUT_KEYS, *OUTPUT_KEYS, "temperature"}
    path = folder / "four.npz"
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def chunked_runs(tiny_bundle, tmp_path_factory):
    """The tiny demo traced on 4 examples twice: the default activation budget (one chunk per tower) and a tiny one
    (one example per chunk)."""
    tmp = tmp_path_factory.mktemp("chunked")
    inputs = _four_examples(tiny_bundle, tmp)
    runs = {}
    for name, budget in (("default", None), ("tiny", 0.01)):
        capture = Capture()
        with pytest.MonkeyPatch.context() as mp:
            capture.install(mp)
            extra = {} if budget is None else {"activation_budget_mb": budget}
            result = convert(ConvertOptions(checkpoint_path=str(tiny_bundle / "model-weights"),
                                            inputs_file=str(inputs), trace=True,
                                            report_dir=str(tmp / f"report-{name}"), **extra))
        runs[name] = (result, capture)
    return runs


def test_the_tiny_budget_runs_one_example_per_chunk(chunked_runs):
    assert sorted(chunked_runs["tiny"][1].chunks) == [("text", 1)] * 4 + [("vision", 1)] * 4
    assert sorted(chunked_runs["default"][1].chunks) == [("text", 4), ("vision", 4)]


def test_chunked_layer_rows_match_one_pass(chunked_runs):
    """Same layers, statuses and shapes (the whole batch's, not the last chunk's). The metrics agree to float32
    round-off, not to the bit: kernels round differently on a batch of 1 and of 4 (the HF tower's features alone
    differ by ~4e-7 between the two), so the activations themselves differ at that level."""
    (one, _), (chunked, _) = chunked_runs["default"], chunked_runs["tiny"]
    assert len(one.rows) == len(chunked.rows) > 100
    assert Counter(r.status for r in one.rows) == {"ok": len(one.rows)}
    for a, b in zip([r.record() for r in one.rows], [r.record() for r in chunked.rows]):
        for key in ("tower", "keras_layer", "hf_module", "keras_shape", "hf_shape", "block", "weights", "status"):
            assert a[key] == b[key], (key, a, b)
        for key in ("keras_shape", "hf_shape"):
            assert a[key] == "" or a[key].startswith("4x"), (key, a)
        for key in ("rel_l2", "local_rel_l2"):
            x, y = a[key], b[key]
            assert (x != x) == (y != y), (key, a, b)  # measured in both or in neither
            if x == x:
                assert abs(x - y) <= 1e-6, (key, a["keras_layer"], x, y)  # both ≤ 1e-6; tolerance is 1e-4
        assert a["cosine"] == pytest.approx(b["cosine"], abs=1e-9)
    assert sum(r.local_rel_l2 == r.local_rel_l2 for r in chunked.rows) > 50  # local re-runs happened


@pytest.mark.parametrize("run", ["default", "tiny"])
def test_streamed_sums_equal_float64_over_all_chunks(chunked_runs, run):
    """Each pair's metrics, added chunk by chunk, equal float64 sums over every chunk's arrays as compared. The
    maxima are exact; the sums are float32 reductions over up to 4e6 terms per chunk (observed: 3e-4 relative at
    most on the 1-norm, 1e-4 on the 2-norm), so 1e-3 relative: a chunk counted twice or left out moves them by
    percents."""
    result, capture = chunked_runs[run]
    chunks = 4 if run == "tiny" else 1
    measured = [p.measured for p in capture.traced.pairs if p.measured is not None]
    assert len(measured) > 100 and len({id(m) for m in measured}) == len(measured)
    locals_ = 0
    for m in measured:
        _, sums = capture.acc[id(m)]
        parts = [("accumulated", m.accumulated)] + ([("local", m.local)] if m.local is not None else [])
        assert (m.local is None) == (sums["local"] is None)
        locals_ += m.local is not None
        for part, streamed in parts:
            assert sums[part]["adds"] == chunks
            assert streamed.n == sums[part]["n"]
            got, want = streamed.result(), Capture.result64(sums[part])
            assert got.max_abs == want["max_abs"], (part, got, want)
            assert got.mean_abs == pytest.approx(want["mean_abs"], rel=1e-3, abs=1e-30), (part, got, want)
            assert got.rel_l2 == pytest.approx(want["rel_l2"], rel=1e-3, abs=1e-12), (part, got, want)
            assert got.cosine == pytest.approx(want["cosine"], abs=1e-9), (part, got, want)
    assert locals_ > 50
    # The rows are those metrics.
    by_path = {(p.keras.path, p.torch.path): p.measured for p in capture.traced.pairs if p.measured is not None}
    for row in result.rows:
        m = by_path.get((row.keras_layer, row.hf_module))
        if m is not None:
            assert row.rel_l2 == m.accumulated.result().rel_l2


def test_chunked_embeddings_match_one_pass(chunked_runs):
    (one, a), (chunked, b) = chunked_runs["default"], chunked_runs["tiny"]
    for side in ("keras_out", "hf_out"):
        x, y = getattr(a.traced, side), getattr(b.traced, side)
        assert set(x) == set(y) == set(OUTPUT_KEYS)
        for key in OUTPUT_KEYS:
            assert x[key].shape == y[key].shape == (4, 128)
            np.testing.assert_allclose(y[key], x[key], rtol=0, atol=1e-6, err_msg=f"{side} {key}")
    for result in (one, chunked):
        assert result.parity.against == "keras" and result.parity.ok
        assert result.parity.image_embeds_max_abs < 1e-6 and result.parity.text_embeds_max_abs < 1e-6
        # Chunks joined in order: the rows match the rearranged reference outputs.
        assert set(result.reference_max_abs) == set(OUTPUT_KEYS)
        assert max(result.reference_max_abs.values()) < 1e-5, result.reference_max_abs
    sa, sb = one.model.state_dict(), chunked.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------------------- plain conversion


def test_plain_conversion_never_imports_tensorflow(tiny_bundle, tmp_path):
    code = f"""
import sys
from tracer.pipeline import ConvertOptions, convert
result = convert(ConvertOptions(checkpoint_path={str(tiny_bundle / 'model-weights')!r},
                                inputs_file={str(tiny_bundle / 'reference.npz')!r}, save_model=True,
                                pytorch_dump_folder_path={str(tmp_path / 'hf')!r}))
assert result.parity.ok and result.reload_checked > 0, result.parity
heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tf_keras'))
assert 'torch' in sys.modules and 'transformers' in sys.modules
print('HEAVY', heavy)
assert 'tensorflow' not in sys.modules and 'tf_keras' not in sys.modules, heavy
"""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "HEAVY []" in proc.stdout
    assert (tmp_path / "hf" / "config.json").is_file()


def _small_vocab(folder: Path) -> Path:
    """The tiny checkpoint's vocabulary has 1,024 tokens: the first 1,024 of the default uncased vocabulary."""
    from tracer.families.align.inputs import default_vocab_file

    vocab = folder / "vocab.txt"
    vocab.write_text("".join(Path(default_vocab_file()).read_text().splitlines(keepends=True)[:1024]))
    return vocab


WARNING = "outputs were not compared"


@pytest.mark.parametrize("inputs", ["npz without outputs", "defaults"])
def test_without_reference_outputs_parity_is_against_none(tiny_bundle, tmp_path, caplog, inputs):
    if inputs == "defaults":
        options = ConvertOptions(checkpoint_path=str(tiny_bundle / "model-weights"),
                                 vocab_file=str(_small_vocab(tmp_path)))
    else:
        with np.load(tiny_bundle / "reference.npz") as ref:
            np.savez(tmp_path / "inputs.npz", **{k: ref[k] for k in INPUT_KEYS})
        options = ConvertOptions(checkpoint_path=str(tiny_bundle / "model-weights"),
                                 inputs_file=str(tmp_path / "inputs.npz"))
    with caplog.at_level(logging.WARNING, logger="tracer"):
        result = convert(options)
    parity = result.parity
    assert parity.against == "none" and parity.ok
    assert math.isnan(parity.image_embeds_max_abs) and math.isnan(parity.text_embeds_max_abs)
    assert parity.temperature_hf == pytest.approx(parity.temperature_checkpoint)
    assert "not compared" in parity.describe()
    assert result.reference_max_abs == {}
    assert any(WARNING in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records), caplog.text


def test_with_reference_outputs_parity_is_against_them(tiny_bundle, caplog):
    with caplog.at_level(logging.WARNING, logger="tracer"):
        result = convert(ConvertOptions(checkpoint_path=str(tiny_bundle / "model-weights"),
                                        inputs_file=str(tiny_bundle / "reference.npz")))
    assert result.parity.against == "reference" and result.parity.ok
    assert result.parity.image_embeds_max_abs < 1e-5 and result.parity.text_embeds_max_abs < 1e-5
    assert "reference outputs" in result.parity.describe()
    assert not any(WARNING in r.getMessage() for r in caplog.records)


def test_a_plain_run_whose_outputs_differ_from_the_references_fails(tiny_bundle, tmp_path):
    """The reference comparison is live: other reference outputs (rows swapped) fail the run."""
    with np.load(tiny_bundle / "reference.npz") as ref:
        arrays = {k: (ref[k][::-1].copy() if k in OUTPUT_KEYS else ref[k]) for k in ref.files}
    np.savez(tmp_path / "swapped.npz", **arrays)
    with pytest.raises(ParityError) as err:
        convert(ConvertOptions(checkpoint_path=str(tiny_bundle / "model-weights"),
                               inputs_file=str(tmp_path / "swapped.npz")))
    assert err.value.result.parity.against == "reference" and not err.value.result.parity.ok


def test_a_traced_run_is_against_keras(chunked_runs):
    assert chunked_runs["tiny"][0].parity.against == "keras"
    assert "Keras model" in chunked_runs["tiny"][0].parity.describe()


# --------------------------------------------------------------------------------------------- saving


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(
        a.detach().reshape(-1).contiguous().view(torch.uint8), b.detach().reshape(-1).contiguous().view(torch.uint8))


def _save(bundle: Path, out: Path, **kw):
    return convert(ConvertOptions(checkpoint_path=str(bundle / "model-weights"),
                                  inputs_file=str(bundle / "reference.npz"), save_model=True,
                                  pytorch_dump_folder_path=str(out), **kw))


def _leftovers(out: Path) -> list[str]:
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_the_returned_model_is_the_reloaded_one(tiny_bundle, tmp_path):
    from transformers import AlignModel

    out = tmp_path / "hf"
    result = _save(tiny_bundle, out)
    assert result.saved_to == out
    reloaded = AlignModel.from_pretrained(out).eval()
    got, want = result.model.state_dict(), reloaded.state_dict()
    assert got.keys() == want.keys()
    assert not any(v.is_meta for v in got.values())  # not the converted model, whose weights were freed
    assert all(_same_bits(got[k], want[k]) for k in want)
    assert result.reload_checked == len(want) > 100
    assert not result.model.training
    # And it is the model converted in memory, bit for bit.
    plain = convert(ConvertOptions(checkpoint_path=str(tiny_bundle / "model-weights"),
                                   inputs_file=str(tiny_bundle / "reference.npz"))).model.state_dict()
    assert plain.keys() == got.keys() and all(_same_bits(plain[k], got[k]) for k in got)
    assert not _leftovers(out)


def _tamper_tensor(folder: Path, name: str) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    for path in folder.glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            if name not in f.keys():
                continue
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        flat = tensors[name].reshape(-1)
        flat[0] = flat[0] + 1.0
        save_file(tensors, path, metadata=metadata)
        return
    raise AssertionError(f"{name} is in no shard of {folder}")


@pytest.mark.parametrize("shards", [None, "100KB"])
def test_a_saved_tensor_that_differs_is_caught(tiny_bundle, tmp_path, monkeypatch, shards):
    from transformers import AlignModel

    name = "text_projection.weight"
    original = AlignModel.save_pretrained

    def save_then_tamper(self, folder, *args, **kwargs):
        original(self, folder, *args, **kwargs)
        _tamper_tensor(Path(folder), name)

    monkeypatch.setattr(AlignModel, "save_pretrained", save_then_tamper)
    out = tmp_path / "hf"
    with pytest.raises(ParityError, match=r"reloads differently \(1 tensor\(s\) differ: \['text_projection\.weight'\]"):
        _save(tiny_bundle, out, **({"max_shard_size": shards} if shards else {}))
    assert not out.exists() and not _leftovers(out)


def test_a_saved_config_that_differs_is_caught(tiny_bundle, tmp_path, monkeypatch):
    from transformers import AlignModel

    original = AlignModel.save_pretrained

    def save_then_edit(self, folder, *args, **kwargs):
        original(self, folder, *args, **kwargs)
        path = Path(folder) / "config.json"
        config = json.loads(path.read_text())
        config["text_config"]["layer_norm_eps"] = 1e-5
        path.write_text(json.dumps(config))

    monkeypatch.setattr(AlignModel, "save_pretrained", save_then_edit)
    out = tmp_path / "hf"
    with pytest.raises(ParityError, match=r"0 tensor\(s\) differ.*text_config\.layer_norm_eps"):
        _save(tiny_bundle, out)
    assert not out.exists() and not _leftovers(out)


def test_a_checksum_that_differs_on_reload_is_caught(tiny_bundle, tmp_path, monkeypatch):
    """The check compares checksums taken before saving with those of the reloaded model: one that changes in
    between fails the save."""
    import tracer.engine.transfer
    from transformers import AlignModel

    checksum, load = tracer.engine.transfer.tensor_checksum, AlignModel.from_pretrained
    reloading = []

    def from_pretrained(cls, *args, **kwargs):
        reloading.append(True)
        return load(*args, **kwargs)

    def drifting(array):  # the first tensor checked after the reload gets another checksum
        value = checksum(array)
        if reloading and len(reloading) == 1:
            reloading.append(True)
            return value + "x"
        return value

    monkeypatch.setattr(AlignModel, "from_pretrained", classmethod(from_pretrained))
    monkeypatch.setattr(tracer.engine.transfer, "tensor_checksum", drifting)
    out = tmp_path / "hf"
    with pytest.raises(ParityError, match=r"reloads differently \(1 tensor\(s\) differ"):
        _save(tiny_bundle, out)
    assert len(reloading) == 2 and not out.exists() and not _leftovers(out)


def test_max_shard_size_writes_shards_and_reloads(tiny_bundle, tmp_path):
    from transformers import AlignModel

    out = tmp_path / "hf"
    result = _save(tiny_bundle, out, max_shard_size="100KB")
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and all(n.startswith("model-") for n in shards), shards
    assert not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    reloaded = AlignModel.from_pretrained(out).eval()
    state = reloaded.state_dict()
    assert set(index["weight_map"]) <= set(state)
    assert result.reload_checked == len(state)
    got = result.model.state_dict()
    assert all(_same_bits(got[k], state[k]) for k in state)
    # Each shard is about the limit: no shard holds everything.
    sizes = [(out / n).stat().st_size for n in shards]
    assert max(sizes) < sum(sizes) / 2



def test_a_streamed_run_keeps_the_arrays_its_diagnosis_needs(tiny_bundle, tmp_path):
    """Without `keep_activations` the traced run keeps no arrays, except those of a one-example capture pass around
    the rows the diagnosis explains: a BatchNorm epsilon fault is still located and named."""
    
    options = ConvertOptions(checkpoint_path=str(tiny_bundle / "model-weights"),
                             inputs_file=str(tiny_bundle / "reference.npz"), trace=True,
                             report_dir=str(tmp_path / "report"), hf_config=["vision_config.batch_norm_eps=1e-5"])
    with pytest.raises(ParityError) as failed:
        convert(options)
    rows = failed.value.result.rows
    first = next(r for r in rows if r.status == "diverged")
    assert first.block == "stem", first.hf_module
    assert first.hint_classes == ["epsilon"], first.hint
