"""Where the Keras reference runs during a traced run: in this process (`LocalKeras`), or in a process of its own
(`KerasProcess`).

The CLI starts a `KerasProcess` before it imports torch: TensorFlow's import, the checkpoint reads and the Keras
build then run on the second core while this process imports torch and transformers and builds and probes the HF
model, and later the two forwards run side by side without sharing an interpreter lock. Both sides record the
reference with `record.keras.record_keras` on the same probe input and answer the same questions (`probe`, `run`,
`weights`, `release`), so `trace` does not care which it has. The worker ships each record's arrays through a
shared-memory ring (`_Ring`): it writes them once, this process reads them in place and frees them as the lockstep
drops them, so the ring's size bounds what the worker can run ahead.
"""

from __future__ import annotations

import logging
import mmap
import multiprocessing
import os
import signal
import tempfile
import threading
import traceback
from collections import deque
from typing import Callable, Iterable

import numpy as np

from tracer import errors
from tracer.families.align.inputs import Inputs
from tracer.engine.record import Record
from tracer.families.align.towers import PROBE_IMAGE_SIZE, largest_output

logger = logging.getLogger(__name__)

Sink = Callable[[Record], None]
RING_RECORDS = 4  # the ring holds this many of the run's largest activations: room to run ahead, within the budget
_ALIGN = 64  # bytes: every array starts on a cache line


def probe_inputs(seq_length: int, float64: bool = False) -> Inputs:
    """The input both towers are built and probed on: call order and kinds do not depend on the values."""
    ids = np.zeros((1, seq_length), np.int64)
    pixels = np.zeros((1, PROBE_IMAGE_SIZE, PROBE_IMAGE_SIZE, 3), np.float32)
    return Inputs(pixels, ids, np.ones_like(ids), np.zeros_like(ids), source="probe", float64=float64)


class LocalKeras:
    """The reference in this process: what tests and notebooks use, and the CLI when TensorFlow is already
    imported (nothing would overlap)."""

    def __init__(self, spec, read: Callable[[str], np.ndarray], float64: bool = False):
        from tracer.families.align.keras_ref.eager import EagerReference

        self.spec = spec
        self.reference = EagerReference(spec, values=read, float64=float64)

    def probe(self, tower: str) -> tuple[list[Record], list[str]]:
        """Build `tower` (weights straight from the checkpoint) and record its call order on the probe input;
        returns the records (no arrays) and the names of the tower's variables."""
        from tracer.families.align.record import record_keras

        records = record_keras(self.reference, probe_inputs(self.spec.text.seq_length), keep_outputs=False,
                               towers=(tower,))
        return records, list(self.reference.variables(tower))

    def weights(self, tower: str) -> Callable[[str], np.ndarray]:
        variables = self.reference.variables(tower)  # views of the variables' buffers (`.numpy()` copies)
        return lambda name: np.asarray(variables[name].value())

    def run(self, tower: str, chunk: Inputs, sink: Sink, wanted: Iterable[int] = (),
            keep: Callable[[int], bool] | None = None, then: str | None = None) -> list[Record]:
        """Run `tower` on `chunk`, each record handed to `sink` as it is made (its arrays are views: `wanted`,
        `keep` and `then` only matter across processes)."""
        from tracer.families.align.record import record_keras

        return record_keras(self.reference, chunk, sink=sink, towers=(tower,))

    def sensitivity(self, tower: str, chunk: Inputs, orders: Iterable[int]):
        """The reference's own sensitivity on `chunk` (`engine.sensitivity`): `tower` run once on the chunk and
        its round-off-perturbed copy as one batch, each of the `orders`' records compared half to half as it is
        made (nothing of a layer outlives it). Returns ({order: Sums}, the perturbed half of the tower's output),
        or None for the text tower (token ids have no round-off to perturb)."""
        from dataclasses import replace

        from tracer.engine.sensitivity import Meter, doubled
        from tracer.families.align.record import record_keras

        if tower != "vision":
            return None
        meter = Meter(orders, chunk.num_images)
        twice = replace(chunk, pixel_values_nhwc=doubled(chunk.pixel_values_nhwc), reference={})
        record_keras(self.reference, twice, sink=meter, towers=(tower,))
        return meter.sums, np.array(meter.last[1])

    def release(self, tower: str) -> None:
        self.reference.release(tower)  # the caller trims its process's heap

    def close(self) -> None:
        pass


class KerasProcess:
    """The reference in a worker process, started at once: it imports TensorFlow, reads the checkpoint, builds the
    vision tower and records its probe run before anyone asks. `close()` stops it (also on errors: a run cut short
    leaves it unusable)."""

    def __init__(self, checkpoint_path: str, image_size: int, seq_length: int, float64: bool = False):
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no torch, no inherited threads
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, str(checkpoint_path), image_size, seq_length,
                                                             float64),
                                        name="tracer-keras", daemon=True)
        self._process.start()
        child.close()
        logger.info("the Keras reference runs in its own process (pid %d)", self._process.pid)
        self._send_lock = threading.Lock()
        self._probes: dict[str, list[Record]] = {}
        self._ring: _Ring | None = None
        self._ring_dropped = False  # after a run that went on to the next tower: the worker closed its side
        self._broken = False
        self.peak_rss_mb: float | None = None  # the worker's, as it reports it when stopped

    # ---------------------------------------------------------------------------------------- messages

    def _send(self, message) -> None:
        with self._send_lock:
            self._conn.send(message)

    def _receive(self):
        try:
            kind, payload = self._conn.recv()
        except (EOFError, OSError) as exc:
            self._broken = True
            code = self._process.exitcode
            raise RuntimeError(f"the Keras worker process ended unexpectedly (exit code {code})") from exc
        if kind == "error":
            self._broken = True
            raise _rebuild(*payload)
        return kind, payload

    def _check_usable(self) -> None:
        if self._broken:
            raise RuntimeError("the Keras worker process is not usable after an earlier failure")

    def _request(self, message, reply: str):
        self._check_usable()
        self._send(message)
        kind, payload = self._receive()
        if kind != reply:
            self._broken = True
            raise RuntimeError(f"the Keras worker answered {kind!r} to {message[0]!r}")
        return payload

    # ---------------------------------------------------------------------------------------- the questions

    def probe(self, tower: str) -> tuple[list[Record], list[str]]:
        records, names = self._request(("probe", tower), "probe")
        self._probes[tower] = records
        return records, names

    def weights(self, tower: str) -> None:
        return None  # held in the other process: the caller reads them from the checkpoint

    def run(self, tower: str, chunk: Inputs, sink: Sink, wanted: Iterable[int] = (),
            keep: Callable[[int], bool] | None = None, then: str | None = None) -> list[Record]:
        """Run `tower` on `chunk` in the worker; each record reaches `sink` (in this thread) with the arrays of the
        `wanted` orders as views into the ring (freed when the lockstep drops them), those `keep` accepts as
        copies of their own. `then`: this is the tower's last run; once its forward is done the worker drops the
        tower and builds and probes `then`, while this process still compares (a later run of the dropped tower
        builds it again)."""
        self._check_usable()
        ring = self._ring_for(tower, chunk)
        self._send(("run", (tower, chunk, sorted(set(wanted)), ring.name, ring.size, then)))
        records: list[Record] = []
        try:
            while True:
                kind, payload = self._receive()
                if kind == "done":
                    if then is not None:  # the worker dropped its side of the ring with the tower
                        self._ring_dropped = True
                    return records
                if kind == "attached":
                    ring.unlink()  # both processes have it mapped: the name is no longer needed
                    continue
                record, span, layout = payload
                ring.attach(record, span, layout, copy=keep is not None and keep(record.order))
                records.append(record)
                sink(record)
        except BaseException:
            self._broken = True  # the worker is mid-run: its next message would answer nothing asked
            raise

    def sensitivity(self, tower: str, chunk: Inputs, orders: Iterable[int]):
        """`LocalKeras.sensitivity`, run in the worker (only the sums and the output come back)."""
        return self._request(("sensitivity", (tower, chunk, sorted(set(orders)))), "sensitivity")

    def release(self, tower: str) -> None:
        """Drop the tower in the worker, and the ring with it (the next tower's activations are of another size)."""
        if not self._broken:
            self._send(("release", tower))
        if self._ring is not None:
            self._ring.close()
            self._ring = None

    def close(self) -> None:
        """Stop the worker: ask, then terminate it if it does not go within a few seconds."""
        if self._process.is_alive():
            try:
                self._send(("stop", None))
                while self._conn.poll(5):  # what is still in the pipe, then its peak memory
                    kind, payload = self._conn.recv()
                    if kind == "stopped":
                        self.peak_rss_mb = payload
                        logger.debug("the Keras worker's peak RSS: %.0f MB", self.peak_rss_mb)
                        break
            except (OSError, EOFError):
                pass
            self._process.join(timeout=5)
            if self._process.is_alive():
                self._process.terminate()
                self._process.join(timeout=5)
        self._process.join(timeout=5)  # reap it whatever happened (an exited, never-waited child is a zombie)
        _stop_resource_tracker()
        self._conn.close()
        if self._ring is not None:
            self._ring.close()
            self._ring = None

    def _ring_for(self, tower: str, chunk: Inputs) -> "_Ring":
        """A ring for RING_RECORDS of the run's largest activation (its size from the probe's shapes)."""
        largest = largest_output(self._probes[tower], tower, chunk.image_size)
        size = max(RING_RECORDS * int(largest * chunk.count(tower) * 4), 1 << 20)
        if self._ring is None or not size <= self._ring.size <= 2 * size or self._ring_dropped:
            self._ring_dropped = False
            if self._ring is not None:
                self._ring.close()
            self._ring = _Ring(size, self._send)
        return self._ring


def _stop_resource_tracker() -> None:
    """The spawn start method also starts multiprocessing's resource tracker, a child that lives until this
    process exits and then outlives it unwaited-for (a zombie under an init that does not reap). Nothing of ours
    needs it once the worker is gone: stop and reap it (`_stop` is the standard library's own shutdown)."""
    from multiprocessing import resource_tracker

    tracker = resource_tracker._resource_tracker
    if getattr(tracker, "_pid", None) is not None:
        tracker._stop()


class _Ring:
    """This process's side of the ring: a file in shared memory the worker writes records' arrays to, in order.
    Spans are freed in any order; the worker may reuse bytes once every span before them is free."""

    def __init__(self, size: int, send: Callable[[tuple], None]):
        folder = "/dev/shm" if os.path.isdir("/dev/shm") else None
        fd, self.name = tempfile.mkstemp(prefix="tracer-ring-", dir=folder)  # the worker opens it by this name
        try:
            os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.size, self._send, self._linked = size, send, True
        self._buffer = np.frombuffer(self._map, np.uint8)
        self._lock = threading.Lock()
        self._spans: deque[list] = deque()  # [start, end, freed] in allocation order
        self._freed = 0  # bytes freed so far, in total (the worker's head counts the same way)

    def attach(self, record: Record, span: tuple[int, int], layout: dict, copy: bool) -> None:
        """Give `record` its arrays from the ring: views, freed by `record.release`; or copies (`copy`), whose span
        is freed at once."""
        entry = [*span, False]
        with self._lock:
            self._spans.append(entry)

        def view(spec):
            offset, dtype, shape = spec
            start = offset % self.size
            array = self._buffer[start:start + int(np.prod(shape)) * np.dtype(dtype).itemsize].view(dtype)
            array = array.reshape(shape)
            array.flags.writeable = False
            return array.copy() if copy else array

        if "output" in layout:
            record.output = view(layout["output"])
            record.inputs = tuple(view(s) if s is not None else None for s in layout["inputs"])
            record.input = record.inputs[0] if record.inputs else None
            record.input_kwargs = {k: view(s) for k, s in layout["input_kwargs"].items()}
        if copy or "output" not in layout:
            self._free(entry)
        else:
            record.release = lambda: self._free(entry)

    def _free(self, entry: list) -> None:
        with self._lock:
            entry[2] = True
            advanced = False
            while self._spans and self._spans[0][2]:
                self._freed = self._spans.popleft()[1]
                advanced = True
            freed = self._freed
        if advanced:  # named: a late message about an earlier ring must not free bytes of this one
            self._send(("freed", (self.name, freed)))

    def unlink(self) -> None:
        if self._linked:
            self._linked = False
            try:
                os.unlink(self.name)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        self.unlink()
        self._buffer = None
        try:
            self._map.close()
        except BufferError:  # a view is still alive somewhere: the mapping goes with it
            pass


# ============================================================================================== the worker side


class _RingWriter:
    """The worker's side of the ring: allocates spans in order, waiting for the parent's `freed` messages when
    the ring is full."""

    def __init__(self, name: str, size: int, conn):
        fd = os.open(name, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.name, self.size, self._conn = name, size, conn
        self._buffer = np.frombuffer(self._map, np.uint8)
        self.head = 0  # bytes allocated so far, in total
        self.freed = 0

    def poll(self) -> None:
        """Take the parent's `freed` messages that have arrived (and keep its pipe from filling)."""
        while self._conn.poll():
            self._take(self._conn.recv())

    def _take(self, message) -> None:
        kind, value = message
        if kind == "stop":
            raise _Stop()
        if kind != "freed":
            raise RuntimeError(f"the parent sent {kind!r} in the middle of a run")
        self.take_freed(*value)

    def take_freed(self, name: str, total: int) -> None:
        if name == self.name:
            self.freed = max(self.freed, total)

    def write(self, arrays: list[np.ndarray | None]) -> tuple[tuple[int, int], list]:
        """Copy `arrays` into one span; returns the span and each array's (offset, dtype, shape)."""
        sizes = [-(-a.nbytes // _ALIGN) * _ALIGN if a is not None else 0 for a in arrays]
        need = max(sum(sizes), _ALIGN)
        if need > self.size:
            raise errors.ConversionError(f"one layer's activations ({need / 2**20:.0f} MB) do not fit the worker's "
                                         f"ring of {self.size / 2**20:.0f} MB")
        begin = self.head
        position = begin % self.size
        start = begin + (self.size - position if position + need > self.size else 0)  # never split a span
        # Live bytes are [freed, begin): the span may not reach their next lap. An empty ring takes any span.
        while begin > self.freed and start + need - self.freed > self.size:
            self._take(self._conn.recv())
        self.head = start + need
        specs, offset = [], start
        for array, size in zip(arrays, sizes):
            if array is None:
                specs.append(None)
                continue
            at = offset % self.size
            np.copyto(self._buffer[at:at + array.nbytes].view(array.dtype).reshape(array.shape), array)
            specs.append((offset, array.dtype.str, array.shape))
            offset += size
        return (begin, self.head), specs

    def close(self) -> None:
        self._buffer = None
        self._map.close()


class _Worker:
    """The worker's state: the checkpoint, the eager reference, the ring."""

    def __init__(self, conn, checkpoint_path: str, image_size: int, seq_length: int, float64: bool = False):
        from tracer.io.checkpoint import open_checkpoint
        from tracer.families.align.spec import derive_spec

        self.conn = conn
        self.checkpoint = open_checkpoint(checkpoint_path)
        spec = derive_spec(self.checkpoint.shapes(), image_size=image_size, seq_length=seq_length)
        self.local = LocalKeras(spec, self.checkpoint.read, float64)
        self.ring: _RingWriter | None = None
        self.probes: dict[str, tuple] = {}

    def probe(self, tower: str):
        if tower not in self.probes:
            records, names = self.local.probe(tower)
            for record in records:
                record.layer = None  # a Keras object: stays here
            self.probes[tower] = (records, names)
        return self.probes[tower]

    def release(self, tower: str) -> None:
        if self.ring is not None:
            self.ring.close()
            self.ring = None
        if self.probes.pop(tower, None) is not None:  # built: drop it (collecting the heap takes a while)
            from tracer.memory import trim

            self.local.release(tower)
            trim()

    def run(self, tower: str, chunk: Inputs, wanted: list[int], name: str, size: int, then: str | None) -> None:
        from tracer.engine.lockstep import drop_arrays

        if self.ring is None or self.ring.name != name:
            if self.ring is not None:
                self.ring.close()
            self.ring = _RingWriter(name, size, self.conn)
            self.conn.send(("attached", None))
        ring, wanted = self.ring, set(wanted)

        def ship(record: Record) -> None:
            layout = {}
            if record.order in wanted:
                kwargs = list(record.input_kwargs.items())
                span, specs = ring.write([record.output, *record.inputs, *(v for _, v in kwargs)])
                n = len(record.inputs)
                layout = {"output": specs[0], "inputs": specs[1:1 + n],
                          "input_kwargs": {k: s for (k, _), s in zip(kwargs, specs[1 + n:])}}
            else:
                span = (ring.head, ring.head)
            drop_arrays(record)
            record.layer = None
            self.conn.send(("record", (record, span, layout)))
            ring.poll()

        self.local.run(tower, chunk, ship)
        self.conn.send(("done", None))
        if then is not None:
            self.release(tower)
            self.probe(then)


def _serve(conn, checkpoint_path: str, image_size: int, seq_length: int, float64: bool = False) -> None:
    """The worker's main loop: answer the parent's messages until `stop` or until the parent is gone. It builds
    the vision tower and records its probe at once, before the first question (which is about that)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent decides
    worker, early = None, None
    try:
        worker = _Worker(conn, checkpoint_path, image_size, seq_length, float64)
        worker.probe("vision")
    except BaseException as exc:  # noqa: BLE001 (reported when the parent asks)
        early = exc
    while True:
        try:
            kind, payload = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        if kind == "stop":
            from tracer.memory import peak_rss_mb

            conn.send(("stopped", peak_rss_mb()))
            return
        try:
            if early is not None:
                raise early
            if kind == "probe":
                conn.send(("probe", worker.probe(payload)))
            elif kind == "run":
                worker.run(*payload)
            elif kind == "sensitivity":
                conn.send(("sensitivity", worker.local.sensitivity(*payload)))
            elif kind == "release":
                worker.release(payload)
            elif kind == "freed":  # the parent freed the last run's last spans after it ended
                if worker.ring is not None:
                    worker.ring.take_freed(*payload)
            else:
                raise RuntimeError(f"unknown message {kind!r}")
        except _Stop:
            return
        except BaseException as exc:  # noqa: BLE001 (the parent re-raises it)
            try:
                conn.send(("error", _describe(exc)))
            except OSError:
                return


class _Stop(BaseException):
    """The parent said `stop` in the middle of a run."""


def _describe(exc: BaseException) -> tuple[str, str, str]:
    return type(exc).__name__, str(exc), "".join(traceback.format_exception(exc))


def _rebuild(name: str, message: str, trace: str) -> BaseException:
    """The worker's error as this process raises it: tracer's own errors keep their class (hence the exit code);
    anything else is a bug, reported with the worker's traceback."""
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, errors.TracerError) and cls is not errors.ParityError:
        return cls(message)
    return RuntimeError(f"the Keras worker process failed:\n{trace}")
