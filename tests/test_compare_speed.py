"""The blocked comparison sums (`compare.Sums` over cache-sized blocks, `Sums.add_each` sharing the reference) give
what one float64 pass gives, whatever the strides, across block boundaries, with NaN; `Measured.add` measures both
errors against the one reference; `local_output`'s cached forward signatures."""

from __future__ import annotations

import inspect
import math
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tracer.engine import compare
from tracer.engine.compare import Measured, Sums, divergence, to_keras_layout

from test_streaming import _reference64  # the float64 truth the streamed sums are held to


def _assert_matches(got: compare.Divergence, r: np.ndarray, c: np.ndarray, rel: float = 1e-5):
    want = _reference64(r, c)
    # Exact: the largest |c - r| of the float32 arrays, whatever order the blocks took.
    assert got.max_abs == float(np.max(np.abs(np.asarray(c, np.float32) - np.asarray(r, np.float32)))), got
    assert math.isclose(got.mean_abs, want["mean_abs"], rel_tol=rel), (got, want)
    assert math.isclose(got.rel_l2, want["rel_l2"], rel_tol=rel), (got, want)
    assert math.isclose(1 - got.cosine, 1 - want["cosine"], rel_tol=1e-3, abs_tol=1e-12), (got, want)


def _nhwc_pair(shape=(2, 9, 11, 24), seed=0, noise=1e-3):
    """A Keras-like NHWC reference and an HF-like candidate: NCHW in memory, seen as NHWC."""
    rng = np.random.default_rng(seed)
    r = rng.standard_normal(shape, dtype=np.float32)
    nchw = np.ascontiguousarray((r + noise * rng.standard_normal(shape, dtype=np.float32)).transpose(0, 3, 1, 2))
    return r, nchw.transpose(0, 2, 3, 1)


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 100 elements: small arrays cross many block boundaries, and rows of 264 are cut along an axis."""
    monkeypatch.setattr(compare, "_BLOCK", 100)


@settings(max_examples=200, deadline=None)
@given(shape=st.lists(st.integers(0, 7), min_size=1, max_size=4), size=st.integers(1, 60))
def test_blocks_cover_the_array_in_order(shape, size):
    a = np.arange(int(np.prod(shape))).reshape(shape)
    parts = [a[index].reshape(-1) for index in compare._blocks(a.shape, size)]
    assert all(p.size <= size for p in parts)
    joined = np.concatenate(parts) if parts else np.zeros(0, int)
    assert np.array_equal(joined, a.reshape(-1))


@pytest.mark.parametrize("noise", [1e-3, 1.0])
def test_sums_across_blocks_match_float64(small_blocks, noise):
    r, c_t = _nhwc_pair(noise=noise)
    c = np.ascontiguousarray(c_t)
    r_t = np.ascontiguousarray(r.transpose(0, 3, 1, 2)).transpose(0, 2, 3, 1)
    for ref, cand in ((r, c), (r, c_t), (r_t, c), (r_t, c_t), (r[:, ::-1], c_t[:, ::-1]), (r[..., ::-2], c[..., ::-2]),
                      (r.astype(np.float64), c_t.astype(np.float64))):
        _assert_matches(divergence(ref, cand), ref, cand)
    chunked = Sums()
    for part in (slice(0, 1), slice(1, 2)):  # chunks of examples add up too
        chunked.add(r[part], c_t[part])
    _assert_matches(chunked.result(), r, c_t)


def test_blocks_do_not_change_the_sums(small_blocks):
    r, c = _nhwc_pair(seed=1)
    blocked = Sums().add(r, c)
    compare._BLOCK = r.size
    whole = Sums().add(r, c)
    assert blocked.n == whole.n and blocked.max_abs == whole.max_abs
    for name in ("d2", "r2", "rd", "abs_sum"):
        assert math.isclose(getattr(blocked, name), getattr(whole, name), rel_tol=1e-5), name


def test_a_long_vector_is_cut_along_its_only_axis(small_blocks):
    rng = np.random.default_rng(2)
    r = rng.standard_normal(1234).astype(np.float32)
    c = r + np.float32(1e-2) * rng.standard_normal(1234).astype(np.float32)
    _assert_matches(divergence(r, c), r, c)
    scalar = divergence(np.float32(2.0), np.float32(2.5))
    assert (scalar.max_abs, scalar.mean_abs, scalar.rel_l2) == (0.5, 0.5, 0.25)


def test_realistic_activation_with_the_default_block():
    r, c = _nhwc_pair(shape=(2, 37, 37, 120), seed=3)  # 328,560 values: three blocks, the HF side transposed
    assert r.size > 2 * compare._BLOCK
    _assert_matches(divergence(r, c), r, c, rel=1e-6)


@pytest.mark.parametrize("where", [(0, 0, 0, 0), (1, 8, 10, 23)])
def test_nan_in_any_block_makes_everything_nan(small_blocks, where):
    r, c = _nhwc_pair(seed=4)
    c = np.array(c)
    c[where] = np.nan
    d = divergence(r, c)
    assert all(math.isnan(v) for v in (d.max_abs, d.mean_abs, d.rel_l2, d.cosine)), d
    assert compare.layer_status(d.rel_l2, float("nan"), float("nan"), d.max_abs) == "diverged"
    later = Sums().add(r, c).add(r, r)  # a NaN chunk stays NaN after clean ones
    assert math.isnan(later.max_abs)


def test_infinities_make_nan_without_a_warning(small_blocks):
    r, c = _nhwc_pair(seed=8)
    r, c = np.array(r), np.array(c)
    r[1, 2, 3, 4] = c[1, 2, 3, 4] = np.inf  # inf - inf: no number, as in torch
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d = divergence(r, c)
    assert math.isnan(d.max_abs) and math.isnan(d.rel_l2), d


def test_opposite_vectors_across_blocks(small_blocks):
    r = np.random.default_rng(5).standard_normal(1000).astype(np.float32)
    d = divergence(r, -r)
    assert d.rel_l2 == pytest.approx(2.0, rel=1e-6) and d.cosine == pytest.approx(-1.0, abs=1e-9)


def test_add_each_is_the_separate_adds(small_blocks):
    r, acc = _nhwc_pair(seed=6)
    local = r + np.float32(1e-6)
    shared = (Sums(), Sums())
    Sums.add_each(r, [(shared[0], acc), (shared[1], local)])
    separate = (Sums().add(r, acc), Sums().add(r, local))
    assert shared == separate  # the same blocks and operations: equal to the bit


def test_mismatched_arrays_raise():
    with pytest.raises(ValueError, match="differ in shape"):
        Sums().add(np.zeros((2, 3), np.float32), np.zeros((2, 4), np.float32))
    same_size = divergence(np.ones((2, 1, 3), np.float32), np.ones((2, 3), np.float32))  # singleton axes reconciled
    assert same_size.max_abs == 0.0


def _silu_pair(seed=7):
    """A vision pair whose HF module (SiLU) is re-run for the local error; its recorded output is NCHW."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 6, 5, 8), dtype=np.float32)
    keras_out = (x / (1 + np.exp(-x))).astype(np.float32) + np.float32(1e-4)  # the Keras side, a little off
    hf_out = torch.nn.functional.silu(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()).numpy()
    k = SimpleNamespace(kind="activation", is_container=False, role="activation", input=x, inputs=(x,),
                        input_kwargs={"training": np.zeros(())}, shape=keras_out.shape, output=keras_out)
    t = SimpleNamespace(module=torch.nn.SiLU(), output=hf_out)
    return SimpleNamespace(tower="vision", keras=k, torch=t, torch_weights=t, fused=False, layout="nchw",
                           input_layout="nchw")


def test_measured_add_measures_both_errors_against_one_reference():
    pair = _silu_pair()
    m = Measured().add(pair)
    local = compare.local_output(pair)
    assert local is not None and local.shape == pair.keras.shape
    assert m.accumulated == Sums().add(pair.keras.output, to_keras_layout(pair.torch.output, pair.keras.shape))
    assert m.local == Sums().add(pair.keras.output, local)
    assert m.accumulated.result().max_abs == pytest.approx(1e-4, rel=0.1)
    m.add(pair)  # a second chunk adds to both
    assert m.accumulated.n == m.local.n == 2 * pair.keras.output.size


def test_forward_parameters_are_cached_per_function():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(3, 3)
    assert compare._parameters(a.forward) == set(inspect.signature(a.forward).parameters)
    assert compare._parameters(b.forward) is compare._parameters(a.forward)  # one entry per class's forward
    c = torch.nn.Linear(2, 2)
    c.forward = lambda x, mask=None: x  # an instance's own forward has its own names
    assert compare._parameters(c.forward) == {"x", "mask"}
