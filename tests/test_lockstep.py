"""`tracer.engine.lockstep.Lockstep` on fake records: two plain functions stand in for the Keras and torch runs.

Each fake side emits its records in order through its sink (optionally sleeping first, to make one side the slower
one). Every `run()` goes through `_run`, which runs it in a daemon thread and fails the test if it does not end within
a timeout: a hang is a failure, not a stuck test session.
"""

from __future__ import annotations

import threading
import time
import weakref

import numpy as np
import pytest

from tracer.errors import ConversionError
from tracer.engine.lockstep import Lockstep
from tracer.engine.record import Record

TIMEOUT = 20.0  # seconds: far beyond any of these runs (they take well under one)

# Keras emits 6 calls, torch 7; 3 of them pair, increasing in both orders. The others pair with nothing.
KERAS_PATHS = ["k/input", "k/conv", "k/bn", "k/act", "k/pool", "k/dense"]
TORCH_PATHS = ["t.conv", "t.bn", "t.act", "t.drop", "t.pool", "t.flat", "t.dense"]
PAIRS = [(1, 0), (3, 2), (5, 6)]
EXPECTED = {"keras": KERAS_PATHS, "torch": TORCH_PATHS}
PAIRED = {"keras": {k for k, _ in PAIRS}, "torch": {t for _, t in PAIRS}}


def value(side: str, order: int) -> float:
    return (1000.0 if side == "keras" else 2000.0) + order


def make_record(side: str, order: int, path: str | None = None, expected: dict = EXPECTED) -> Record:
    path = path if path is not None else expected[side][order]
    return Record(framework=side, tower="vision", order=order, path=path, cls="Fake", kind="conv", shape=(1, 4),
                  dtype="float32", output=np.full((1, 4), value(side, order), np.float32),
                  input=np.zeros((1, 4), np.float32), inputs=(np.zeros((1, 4), np.float32),),
                  input_kwargs={"attention_mask": np.ones((1, 4), np.float32)})


class Side:
    """A fake model run: emits records `0..stop-1` of `side` through `sink`, sleeping `delay` before each one (or
    before those in `delays`); `paths` overrides some record paths; `fail_at` raises before emitting that order."""

    def __init__(self, side: str, delay: float = 0.0, stop: int | None = None, paths: dict[int, str] | None = None,
                 fail_at: int | None = None, delays: dict[int, float] | None = None, tracker=None,
                 expected: dict = EXPECTED):
        self.side, self.delay, self.paths, self.fail_at = side, delay, paths or {}, fail_at
        self.expected = expected
        self.stop = len(expected[side]) if stop is None else stop
        self.delays = delays or {}
        self.tracker = tracker
        self.sink = None
        self.emitted: list[int] = []
        self.completed = False

    def __call__(self):
        for order in range(self.stop):
            time.sleep(self.delays.get(order, self.delay))
            if order == self.fail_at:
                raise RuntimeError(f"{self.side} model blew up at call {order}")
            record = make_record(self.side, order, self.paths.get(order), self.expected)
            if self.tracker is not None:
                self.tracker.track(self.side, record)
            self.emitted.append(order)
            self.sink(record)
            del record
        self.completed = True
        return f"{self.side} result"


def _run(step: Lockstep, keras: Side, torch: Side):
    """`step.run(keras, torch)` in a daemon thread; returns ("ok", results) or ("error", exception)."""
    keras.sink, torch.sink = step.sink("keras"), step.sink("torch")
    outcome: dict = {}

    def target():
        try:
            outcome["ok"] = step.run(keras, torch)
        except BaseException as exc:  # noqa: BLE001
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="torch-side", daemon=True)
    thread.start()
    thread.join(TIMEOUT)
    assert not thread.is_alive(), f"Lockstep.run hung (still running after {TIMEOUT}s)"
    assert len(outcome) == 1
    return next(iter(outcome.items()))


class Calls:
    """An `on_pair` that records what it is given (and the arrays, copied, while they still exist)."""

    def __init__(self, fail_at: int | None = None):
        self.calls: list[tuple] = []
        self.fail_at = fail_at
        self.lock = threading.Lock()

    def __call__(self, index: int, k: Record, t: Record) -> None:
        with self.lock:
            self.calls.append((index, k, t, threading.current_thread().name,
                               None if k.output is None else float(k.output[0, 0]),
                               None if t.output is None else float(t.output[0, 0])))
        if index == self.fail_at:
            raise ValueError(f"comparison failed on pair {index}")


# ------------------------------------------------------------------------------------------------ pairing


@pytest.mark.parametrize("slow", ["keras", "torch", None])
def test_each_pair_is_compared_once_with_its_two_records(slow):
    calls = Calls()
    step = Lockstep(PAIRS, EXPECTED, calls)
    keras = Side("keras", delay=0.03 if slow == "keras" else 0.0)
    torch = Side("torch", delay=0.03 if slow == "torch" else 0.0)
    kind, got = _run(step, keras, torch)
    assert kind == "ok", got
    assert got == ("keras result", "torch result")
    assert sorted(c[0] for c in calls.calls) == [0, 1, 2]  # once each; the unpaired records never reach on_pair
    for index, k, t, thread, k_value, t_value in calls.calls:
        assert (k.framework, t.framework) == ("keras", "torch")
        assert (k.order, t.order) == PAIRS[index]
        assert (k.path, t.path) == (KERAS_PATHS[PAIRS[index][0]], TORCH_PATHS[PAIRS[index][1]])
        # The arrays are there while compared, and they are the ones each side produced for that call.
        assert (k_value, t_value) == (value("keras", k.order), value("torch", t.order))
        assert thread in ("tracer-keras", "torch-side")  # one of the two sides compares, no third thread
    # Every record was offered, in order, and each side ran to its end.
    assert [r.order for r in step.records["keras"]] == list(range(len(KERAS_PATHS)))
    assert [r.order for r in step.records["torch"]] == list(range(len(TORCH_PATHS)))
    assert keras.completed and torch.completed


@pytest.mark.parametrize("slow", ["keras", "torch"])
def test_arrays_are_dropped_once_compared(slow):
    step = Lockstep(PAIRS, EXPECTED, Calls())
    kind, got = _run(step, Side("keras", delay=0.02 if slow == "keras" else 0),
                     Side("torch", delay=0.02 if slow == "torch" else 0))
    assert kind == "ok", got
    for side in ("keras", "torch"):
        for r in step.records[side]:
            assert (r.output, r.input, r.inputs, r.input_kwargs) == (None, None, (), {}), (side, r.order)


def test_keep_true_keeps_every_array():
    step = Lockstep(PAIRS, EXPECTED, Calls(), keep=True)
    kind, got = _run(step, Side("keras", delay=0.01), Side("torch"))
    assert kind == "ok", got
    for side in ("keras", "torch"):
        for r in step.records[side]:
            assert r.output is not None and float(r.output[0, 0]) == value(side, r.order)
            assert r.input is not None and len(r.inputs) == 1 and "attention_mask" in r.input_kwargs


@pytest.mark.parametrize("slow", ["keras", "torch"])
def test_keep_predicate_keeps_only_what_it_names(slow):
    # A paired and an unpaired record on each side; the predicate is asked with the record's own side and order.
    wanted = {("keras", 1), ("keras", 2), ("torch", 2), ("torch", 3)}
    asked = set()

    def keep(side, order):
        asked.add((side, order))
        return (side, order) in wanted

    step = Lockstep(PAIRS, EXPECTED, Calls(), keep=keep)
    kind, got = _run(step, Side("keras", delay=0.02 if slow == "keras" else 0),
                     Side("torch", delay=0.02 if slow == "torch" else 0))
    assert kind == "ok", got
    for side in ("keras", "torch"):
        for r in step.records[side]:
            kept = (side, r.order) in wanted
            assert (r.output is not None) == kept, (side, r.order)
            assert (r.input is not None) == kept, (side, r.order)
            if kept:
                assert float(r.output[0, 0]) == value(side, r.order)
    assert asked >= {(s, o) for s in ("keras", "torch") for o in range(len(EXPECTED[s]))}


# ------------------------------------------------------------------------------------------ bounded memory


class Alive:
    """Counts each side's record arrays alive at once (weak references: an array counts until it is freed)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.alive = {"keras": 0, "torch": 0}
        self.peak = {"keras": 0, "torch": 0}

    def _freed(self, side):
        with self.lock:
            self.alive[side] -= 1

    def track(self, side: str, record: Record) -> None:
        with self.lock:
            self.alive[side] += 1
            self.peak[side] = max(self.peak[side], self.alive[side])
        weakref.finalize(record.output, self._freed, side)


class SlowCalls(Calls):
    def __call__(self, index, k, t):
        super().__call__(index, k, t)
        time.sleep(0.003)  # a comparison that takes a while: the other side may run on meanwhile


@pytest.mark.parametrize("slow", ["keras", "torch", "on_pair"])
@pytest.mark.parametrize("keep", [False, True])
def test_records_alive_at_once_are_bounded(slow, keep):
    """A deep model: 40 calls per side, every other one paired. With arrays dropped once compared, a side never
    holds more than two records' arrays (the lockstep's documented bound: the one being compared, the one it is
    handing over), whatever the depth; keeping them (the control) holds them all."""
    n = 40
    expected = {"keras": [f"k/{i}" for i in range(n)], "torch": [f"t.{i}" for i in range(n)]}
    pairs = [(i, i) for i in range(0, n, 2)]
    tracker = Alive()
    step = Lockstep(pairs, expected, SlowCalls() if slow == "on_pair" else Calls(), keep=keep)
    keras = Side("keras", delay=0.002 if slow == "keras" else 0, tracker=tracker, expected=expected)
    torch = Side("torch", delay=0.002 if slow == "torch" else 0, tracker=tracker, expected=expected)
    kind, got = _run(step, keras, torch)
    assert kind == "ok", got
    if keep:
        assert tracker.peak == {"keras": n, "torch": n}
    else:
        assert max(tracker.peak.values()) <= 2, tracker.peak
        assert tracker.alive == {"keras": 0, "torch": 0}  # nothing left behind once the run is over


# ------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("first", ["keras", "torch"])
def test_an_error_in_on_pair_propagates_and_nothing_hangs(first):
    calls = Calls(fail_at=1)
    step = Lockstep(PAIRS, EXPECTED, calls)
    keras = Side("keras", delay=0.02 if first == "torch" else 0)
    torch = Side("torch", delay=0.02 if first == "keras" else 0)
    kind, got = _run(step, keras, torch)
    assert kind == "error" and isinstance(got, ValueError) and "pair 1" in str(got)
    assert sorted(c[0] for c in calls.calls) == [0, 1]  # pair 2 is never compared
    assert not keras.completed and not torch.completed  # both stop at pair 2 (their last call) instead


@pytest.mark.parametrize("failing", ["keras", "torch"])
def test_an_error_on_either_side_propagates_and_the_other_side_stops(failing):
    """The failing side raises after pair 0, while the other is waiting for pair 1: it must not wait forever, and
    the error raised is the failing side's own (not the other's abort, not a ConversionError)."""
    calls = Calls()
    step = Lockstep(PAIRS, EXPECTED, calls)
    fail_at = 2 if failing == "keras" else 1  # right after each side's pair 0
    keras = Side("keras", fail_at=fail_at if failing == "keras" else None,
                 delays={fail_at: 0.2} if failing == "keras" else None)
    torch = Side("torch", fail_at=fail_at if failing == "torch" else None,
                 delays={fail_at: 0.2} if failing == "torch" else None)
    started = time.monotonic()
    kind, got = _run(step, keras, torch)
    assert kind == "error" and isinstance(got, RuntimeError) and f"{failing} model blew up" in str(got)
    assert time.monotonic() - started < 5  # the waiting side noticed, rather than timing out somewhere
    other = torch if failing == "keras" else keras
    assert not other.completed  # it stopped at pair 1 instead of running on
    assert [c[0] for c in calls.calls] == [0]


def test_a_keyboard_interrupt_on_the_main_side_stops_the_worker():
    """`run` catches BaseException too: an interrupt in the torch side (the caller's thread) must stop the Keras
    worker waiting at a pair, and be re-raised."""
    step = Lockstep(PAIRS, EXPECTED, Calls())
    keras = Side("keras")

    class Interrupted(Side):
        def __call__(self):
            for order in range(3):
                if order == 2:
                    time.sleep(0.1)
                    raise KeyboardInterrupt
                self.sink(make_record("torch", order))

    torch = Interrupted("torch")
    kind, got = _run(step, keras, torch)
    assert kind == "error" and isinstance(got, KeyboardInterrupt)
    assert not keras.completed


# ------------------------------------------------------------------------------------- call-order checks


@pytest.mark.parametrize("side", ["keras", "torch"])
def test_a_call_other_than_the_probes_is_named(side):
    order = 3
    wrong = {order: "somewhere/else"}
    keras = Side("keras", paths=wrong if side == "keras" else None)
    torch = Side("torch", paths=wrong if side == "torch" else None)
    kind, got = _run(Lockstep(PAIRS, EXPECTED, Calls()), keras, torch)
    assert kind == "error" and isinstance(got, ConversionError), got
    message = str(got)
    assert f"the {side} model" in message and f"call {order}" in message and "`somewhere/else`" in message
    assert EXPECTED[side][order] in message  # what the probe had there


def test_a_call_beyond_the_probes_last_is_named():
    class Longer(Side):
        def __call__(self):
            super().__call__()
            self.sink(make_record("torch", len(TORCH_PATHS), path="t.extra"))

    kind, got = _run(Lockstep(PAIRS, EXPECTED, Calls()), Side("keras"), Longer("torch"))
    assert kind == "error" and isinstance(got, ConversionError), got
    assert f"call {len(TORCH_PATHS)}" in str(got) and "`t.extra`" in str(got) and "nothing more" in str(got)


@pytest.mark.parametrize("short", ["keras", "torch"])
def test_a_side_that_ends_before_a_pair_is_an_error(short):
    """One side stops after its pair 0 (it returns normally); the other, waiting at pair 1, must raise."""
    stop = {"keras": 2, "torch": 1}[short]  # emits pair 0 (keras order 1, torch order 0), not pair 1
    keras = Side("keras", stop=stop if short == "keras" else None, delay=0.0 if short == "keras" else 0.01)
    torch = Side("torch", stop=stop if short == "torch" else None, delay=0.0 if short == "torch" else 0.01)
    kind, got = _run(Lockstep(PAIRS, EXPECTED, Calls()), keras, torch)
    assert kind == "error" and isinstance(got, ConversionError), got
    waiting = "torch" if short == "keras" else "keras"
    assert f"the {short} run ended before reaching the layer paired with" in str(got)
    assert f"`{EXPECTED[waiting][PAIRS[1][0 if waiting == 'keras' else 1]]}`" in str(got)


def test_pairs_neither_side_reaches_are_an_error():
    kind, got = _run(Lockstep(PAIRS, EXPECTED, Calls()), Side("keras", stop=2), Side("torch", stop=1))
    assert kind == "error" and isinstance(got, ConversionError), got
    assert "2 paired layer(s) were never reached" in str(got)
