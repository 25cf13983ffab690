"""Run both models side by side and compare each paired layer as soon as both outputs exist.

The Keras tower runs in a worker thread, the HF tower in the calling one; each recorder hands its records to a
sink here. A record that pairs with nothing is dropped at once. The first side to reach a pair waits there; the
second hands its record over and goes on; the waiting side compares the two, then goes on. So
at most two records per side are alive at any time, whatever the depth of the model: activation memory is
bounded by the largest layers, not the sum of all layers. Pairs come from a probe run (small input, same call order), hence known before the run starts;
alignment is monotone, so the two sides can never wait for each other.
"""

from __future__ import annotations

import threading
from typing import Callable

from tracer.errors import ConversionError
from tracer.engine.record import Record
from tracer.engine.row import LayerRow


class _Aborted(Exception):
    """The other side failed: unwind this side's forward quietly; the first error is re-raised by `run`."""


def drop_arrays(record: Record) -> None:
    record.output, record.input, record.inputs, record.input_kwargs = None, None, (), {}
    release, record.release = record.release, None
    if release is not None:
        release()


def _crossing(pairs: list[tuple[int, int]]) -> set[int]:
    """Indices of pairs out of order with another: in Keras order, a torch order below an earlier pair's or above
    a later one's (prefix maxima and suffix minima: linear in the pairs)."""
    order = sorted(range(len(pairs)), key=lambda i: pairs[i][0])
    torch_orders = [pairs[i][1] for i in order]
    loose, high = set(), -1
    for i, t in zip(order, torch_orders):
        if t < high:
            loose.add(i)
        high = max(high, t)
    low = float("inf")
    for i, t in zip(reversed(order), reversed(torch_orders)):
        if t > low:
            loose.add(i)
        low = min(low, t)
    return loose


class Lockstep:
    """`pairs`: (keras order, torch order) of each paired layer of one tower, increasing in both.
    `expected`: per side, the probe's record paths by order (the run must make the same calls).
    `on_pair(index, keras_record, torch_record)`: compare; called once per pair, by whichever side comes second.
    `keep(side, order)`: keep that record's arrays (for the diagnosis, tests) instead of dropping them once
    compared; `True` keeps all. Pairs that cross (numbers re-assigned two siblings: Keras 5 <-> torch 6 and 6 <-> 5)
    are `loose`: their first record is held, not waited at, and the second side compares (waiting there would
    deadlock)."""

    def __init__(self, pairs: list[tuple[int, int]], expected: dict[str, list[str]],
                 on_pair: Callable[[int, Record, Record], None],
                 keep: bool | Callable[[str, int], bool] = False):
        self.loose = _crossing(pairs)
        self._held: dict[int, Record] = {}  # loose pair -> its first record
        self.index = {"keras": {k: i for i, (k, _) in enumerate(pairs)},
                      "torch": {t: i for i, (_, t) in enumerate(pairs)}}
        self.expected, self.on_pair = expected, on_pair
        self.keep = keep if callable(keep) else (lambda side, order: keep)
        self.records: dict[str, list[Record]] = {"keras": [], "torch": []}
        self._cond = threading.Condition()
        self._waiting: dict[int, Record] = {}  # pair -> the first side's record, its side waiting there
        self._arrived: dict[int, Record] = {}  # pair -> the second side's record, handed to the waiting side
        self._done: set[int] = set()
        self._finished: set[str] = set()
        self._error: BaseException | None = None

    def sink(self, side: str) -> Callable[[Record], None]:
        return lambda record: self._offer(side, record)

    def _offer(self, side: str, record: Record) -> None:
        expected = self.expected[side]
        if record.order >= len(expected) or expected[record.order] != record.path:
            want = expected[record.order] if record.order < len(expected) else "nothing more"
            raise ConversionError(f"the {side} model made another call than in its probe run: call {record.order} is "
                                  f"`{record.path}`, the probe had {want}; its call order depends on the input size "
                                  "or batch, which tracer does not support")
        self.records[side].append(record)
        index = self.index[side].get(record.order)
        if index is None:
            if not self.keep(side, record.order):
                drop_arrays(record)
            return
        partner = "torch" if side == "keras" else "keras"
        if index in self.loose:
            with self._cond:
                other = self._held.pop(index, None)
                if other is None:
                    self._held[index] = record
                    return
            self._compare(index, side, record, other)
            return
        with self._cond:
            if self._error is not None:
                raise _Aborted()
            if self._waiting.pop(index, None) is not None:  # the partner waits there: hand over and go on
                self._arrived[index] = record
                self._cond.notify_all()
                return
            self._waiting[index] = record
            while index not in self._arrived:
                if self._error is not None:
                    raise _Aborted()
                if partner in self._finished:
                    raise ConversionError(f"the {partner} run ended before reaching the layer paired with "
                                          f"`{record.path}` in the probe run")
                self._cond.wait(timeout=0.5)
            other = self._arrived.pop(index)
        # The side that waited compares, while the other side computes on: the comparison overlaps the slower
        # model's forward, and at most one more record per side is alive meanwhile.
        self._compare(index, side, record, other)

    def _compare(self, index: int, side: str, record: Record, other: Record) -> None:
        try:
            keras, torch = (record, other) if side == "keras" else (other, record)
            self.on_pair(index, keras, torch)
        finally:
            for r in (record, other):
                if not self.keep(r.framework, r.order):
                    drop_arrays(r)
            with self._cond:
                self._done.add(index)

    def run(self, keras_fn: Callable[[], object], torch_fn: Callable[[], object]) -> tuple[object, object]:
        """Run `keras_fn` in a worker thread and `torch_fn` here; returns their results or raises the first error."""
        results: dict[str, object] = {}

        def guarded(side: str, fn: Callable[[], object]) -> None:
            try:
                results[side] = fn()
            except _Aborted:
                pass
            except BaseException as exc:  # noqa: BLE001 (KeyboardInterrupt too: the other side must stop)
                with self._cond:
                    self._error = self._error or exc
                    self._cond.notify_all()
            finally:
                with self._cond:
                    self._finished.add(side)
                    self._cond.notify_all()

        worker = threading.Thread(target=guarded, args=("keras", keras_fn), name="tracer-keras", daemon=True)
        worker.start()
        try:
            guarded("torch", torch_fn)
        finally:
            worker.join()
        if self._error is not None:
            raise self._error
        missing = sorted(set(range(len(self.index["keras"]))) - self._done)
        if missing:
            raise ConversionError(f"{len(missing)} paired layer(s) were never reached in the run")
        return results["keras"], results["torch"]


def final_pairs(pairs, keras_records, torch_records, measured_by_probe_pair: dict):
    """The probe's pairs with a run's records (real shapes, and arrays where kept) and their metrics
    (`measured_by_probe_pair`: id(probe pair) -> `compare.Measured`)."""
    from tracer.engine.pairing import Pair

    out = []
    for p in pairs:
        k = keras_records[p.keras.order] if p.keras is not None else None
        t = torch_records[p.torch.order] if p.torch is not None else None
        w = torch_records[p.torch_weights.order] if p.torch_weights is not None else None
        out.append(Pair(p.tower, k, t, w, p.score, measured_by_probe_pair.get(id(p))))
    return out


def needed_for_diagnosis(rows: list[LayerRow], pairs, off: bool, window: int = 30) -> dict[str, set[int]]:
    """Record orders whose arrays the diagnosis needs, per side: around each row it explains (its block's members
    before it, the pads after it) and the first layers (the preprocessing check). `off`: the outputs miss their
    tolerance."""
    from tracer.engine.diagnose import suspect, target_rows

    needed: dict[str, set[int]] = {"keras": set(range(4)), "torch": set(range(4))}
    by_path = {(p.keras.path if p.keras else "", p.torch.path if p.torch else ""): p for p in pairs}
    targets, _ = target_rows(rows, lambda part: off or any(r.diverged for r in rows))
    for row in targets[:10] + [r for r in rows if suspect(r)][:10]:
        pair = by_path.get((row.keras_layer, row.hf_module))
        for side, record in (("keras", pair.keras if pair else None), ("torch", pair.torch if pair else None)):
            if record is not None:
                needed[side].update(range(max(0, record.order - window), record.order + 4))
    return needed
