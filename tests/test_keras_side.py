"""The Keras reference in a process of its own (`keras_side.KerasProcess`): the same records and metrics as in this
process, its shared ring under pressure, its errors raised here as tracer's own, nothing left behind."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tracer.errors import BadInputError, ConversionError
from tracer.families.align.inputs import IMAGE_SIZE, SEQ_LENGTH
from tracer.families.align.keras_side import KerasProcess, _Ring, _RingWriter
from tracer.engine.lockstep import drop_arrays
from tracer.pipeline import ConvertOptions, convert
from tracer.engine.record import Record

ROOT = Path(__file__).resolve().parents[1]


def _rings() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("tracer-ring-*")} if Path("/dev/shm").is_dir() else set()


@pytest.fixture
def ring_pair():
    """A ring of 16 KiB and its writer over a pipe; both closed (and the file removed) whatever the test does."""
    made = []

    def make(size: int = 1 << 14):
        parent, child = multiprocessing.Pipe()
        ring = _Ring(size, parent.send)
        writer = _RingWriter(ring.name, ring.size, child)
        made.append((ring, writer))
        return ring, writer

    yield make
    for ring, writer in made:
        ring.close()
        writer.close()


def _record(order: int) -> Record:
    return Record("keras", "vision", order, f"layer_{order}", "Conv2D", "conv", (1,), "float32")


def test_the_ring_hands_over_every_array_intact_while_it_wraps_and_waits(ring_pair):
    """A writer thread fills a small ring with arrays of random sizes faster than they are freed, and they are
    freed in a shuffled order: each array arrives intact (no span is reused before it is free), the writer waits
    when the ring is full, and the ring wraps many times."""
    ring, writer = ring_pair()
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(int(n)).astype(np.float32) for n in rng.integers(1, 300, 400)]
    arrays[200] = np.arange(2000 - 16, dtype=np.float32)  # with its copy, nearly the whole ring: waits for all
    handed: list = []

    def write():
        for array in arrays:
            span, specs = writer.write([array, None, array[::-1].copy()])
            handed.append((span, {"output": specs[0], "inputs": specs[1:], "input_kwargs": {}}))
            writer.poll()

    def free(alive, keep):
        random.Random(len(alive)).shuffle(alive)
        while len(alive) > keep:
            record, i = alive.pop()
            np.testing.assert_array_equal(record.output, arrays[i])  # still intact when freed
            assert record.inputs[0] is None
            np.testing.assert_array_equal(record.inputs[1], arrays[i][::-1])
            drop_arrays(record)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    alive: list[tuple[Record, int]] = []
    waits = 0
    for i in range(len(arrays)):
        started = time.monotonic()
        while i == len(handed):  # the writer is behind, or waiting for room: after a while, free everything
            if alive and time.monotonic() - started > 0.02:
                free(alive, 0)
                waits += 1
            time.sleep(0.001)
        span, layout = handed[i]
        record = _record(i)
        ring.attach(record, span, layout, copy=False)
        alive.append((record, i))
        if len(alive) > 3:
            free(alive, 1)
    free(alive, 0)
    thread.join(timeout=30)
    assert not thread.is_alive() and len(handed) == len(arrays)
    assert waits >= 1  # the big array had to wait for room
    assert writer.head > 20 * ring.size  # wrapped many times
    ring.close()
    assert not os.path.exists(ring.name)


def test_an_array_larger_than_the_ring_is_refused_with_the_sizes(ring_pair):
    _, writer = ring_pair(1 << 20)
    with pytest.raises(ConversionError, match=r"do not fit the worker's ring of 1 MB"):
        writer.write([np.zeros(1 << 19, np.float32)])


@pytest.fixture(scope="module")
def both_ways(tiny_bundle, tmp_path_factory):
    """The tiny demo traced with the reference in this process and in a worker process, one example per chunk
    (so the ring is reused from chunk to chunk and tower to tower)."""
    tmp = tmp_path_factory.mktemp("keras_side")
    before = _rings()
    results = {}
    for where in ("here", "process"):
        options = ConvertOptions(checkpoint_path=str(tiny_bundle / "model-weights"),
                                 inputs_file=str(tiny_bundle / "reference.npz"), trace=True,
                                 report_dir=str(tmp / where), activation_budget_mb=0.01)
        keras = KerasProcess(options.checkpoint_path, IMAGE_SIZE, SEQ_LENGTH) if where == "process" else None
        try:
            results[where] = convert(options, keras=keras)
        finally:
            if keras is not None:
                keras.close()
                results["worker_alive"] = keras._process.is_alive()
                results["worker_peak_rss_mb"] = keras.peak_rss_mb
    results["rings_left"] = _rings() - before
    return tmp, results


def test_a_worker_process_gives_the_same_report_as_this_process(both_ways):
    tmp, results = both_ways
    here, there = results["here"], results["process"]
    assert there.parity.against == "keras" and there.parity.ok
    assert len(there.rows) == len(here.rows) > 100
    assert json.dumps([r.record() for r in there.rows]) == json.dumps([r.record() for r in here.rows])  # every layer's metrics, bit for bit (NaN too)
    assert (tmp / "process" / "layers.csv").read_bytes() == (tmp / "here" / "layers.csv").read_bytes()
    assert [(e.variable, e.parameter, e.status) for e in there.entries] == \
           [(e.variable, e.parameter, e.status) for e in here.entries]


def test_a_worker_process_leaves_nothing_behind(both_ways):
    _, results = both_ways
    assert results["worker_alive"] is False
    assert results["worker_peak_rss_mb"] > 100  # reported when stopped: TensorFlow alone takes more
    assert results["rings_left"] == set()


def test_a_worker_error_is_raised_here_as_the_same_error(tmp_path):
    keras = KerasProcess(str(tmp_path / "nowhere" / "model-weights"), IMAGE_SIZE, SEQ_LENGTH)
    try:
        with pytest.raises(BadInputError, match="nowhere"):
            keras.probe("vision")
        with pytest.raises(RuntimeError, match="not usable after an earlier failure"):
            keras.probe("text")
    finally:
        keras.close()
    assert not keras._process.is_alive()


def test_the_worker_goes_when_its_parent_is_killed(tiny_bundle):
    """SIGKILL leaves the parent no chance to stop it: the worker sees its pipe close and exits by itself."""
    script = (
        "import os, signal, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from tracer.families.align.keras_side import KerasProcess\n"
        f"keras = KerasProcess({str(tiny_bundle / 'model-weights')!r}, {IMAGE_SIZE}, {SEQ_LENGTH})\n"
        "keras.probe('vision')\n"
        "print(keras._process.pid, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    pid = int(proc.stdout.split()[-1])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.kill(pid, signal.SIGKILL)
        pytest.fail("the worker outlived its killed parent by 30 s")


def test_the_worker_imports_neither_torch_nor_transformers(tiny_bundle):
    """The worker's start is the traced run's critical path: TensorFlow's import and the vision build. torch's
    import there (1.7 s, on a core the parent needs for its own) would only slow it."""
    code = (
        "import sys\n"
        "from tracer.families.align.keras_side import _Worker\n"
        f"worker = _Worker(None, {str(tiny_bundle / 'model-weights')!r}, {IMAGE_SIZE}, {SEQ_LENGTH})\n"
        "worker.probe('vision'); worker.probe('text')\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers'}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout
