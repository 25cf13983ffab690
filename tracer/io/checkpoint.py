"""Read TF/Keras checkpoints (TF2 object-based, TF1 name-based, Keras 2 and transformers HDF5) without model code.

`open_checkpoint(path)` lists every serialized tensor as a `Variable` (its own variable name, where it is stored,
shape, dtype, role) and reads one weight at a time from disk on demand; nothing loads the whole file.

Formats
-------
* TF object-based checkpoint (``prefix.index`` + ``prefix.data-0000i-of-0000N``, written by
  ``model.save_weights(prefix)``, ``ModelCheckpoint(save_weights_only=True)`` or ``tf.train.Checkpoint``).
  Names come from the checkpoint's own object graph (the ``_CHECKPOINTABLE_OBJECT_GRAPH`` tensor): each variable
  node's ``full_name`` attribute is the variable's name without ``:0``; its ``checkpoint_key`` is where it is stored.
  This module reads these files itself (the index table, the few protobuf messages involved, each tensor's bytes
  checked against its CRC32C), so listing and reading never import TensorFlow.
* TF1 name-based checkpoint (``tf.compat.v1.train.Saver``: google-research BERT's ``bert_model.ckpt``): a bundle
  without an object graph, whose keys are the variables' own names. ``format`` is ``"tf1"`` (object-based bundles keep ``"tf"``).
* Keras 2 HDF5 weights (``model.save_weights("x.h5")``): one group per layer of ``model.layers`` whose
  ``weight_names`` attribute names its datasets, plus a ``top_level_model_weights`` group holding the variables the
  model owns directly (ALIGN's bare ``tf.Variable`` temperature lands there as ``Variable:0``). A whole-model
  ``model.save("x.h5")`` file nests that under ``model_weights`` and may add ``optimizer_weights``.
  transformers 4's ``tf_model.h5`` is such a file (``TFPreTrainedModel.save_pretrained`` calls ``save_weights``):
  one group per top-level layer (``bert``, ``mlm___cls``, ``classifier``), names with the model's scope
  (``tf_bert_model/bert/encoder/layer_._0/attention/self/query/kernel``). A layer that holds another layer's
  variable (``mlm___cls`` keeps the word embeddings for its tied decoder) lists it again in its own group: a
  name listed in several groups, exactly one of which it names as a path component (``.../bert/...`` in group
  ``bert``), is that group's weight and the other copies are set aside (role ``"other"``). One shard of a sharded
  ``tf_model-0000i-of-0000N.h5`` lists datasets, not groups, in ``layer_names``: each is one weight.

Roles (how a variable is decided to be a model weight or set aside)
-------------------------------------------------------------------
TF checkpoints are classified from the object graph's structure, not from names:

* optimizer objects are (a) the root's ``optimizer`` child (Keras ``Model.optimizer``, ``tf.train.Checkpoint(
  optimizer=...)``), (b) any node that owns ``slot_variables`` (legacy optimizers such as
  ``tf_keras.optimizers.legacy.Adam``, whose slots are stored under ``<variable>/.OPTIMIZER_SLOT/optimizer/m``),
  (c) any node with an iteration counter child (``iter`` / ``_iterations`` holding a variable named ``*iter`` or
  ``iteration``). Slot variable nodes themselves are optimizer state.
* metric objects are non-root nodes with at least one variable leaf child, whose variable children all have a
  local name and an unscoped full name (Keras metrics create their state outside any layer's name scope) drawn from
  the Keras metric state names (``total``, ``count``, ``true_positives``, ...; MeanIoU's ``total_cm`` is an alias of
  its ``total_confusion_matrix``), and whose other children are empty nodes (the Python lists and dicts a metric
  keeps: Precision's ``thresholds``, MeanMetricWrapper's ``_fn_kwargs``). A ``tf.keras.metrics.Mean`` tracker is
  the node with exactly the children ``total`` and ``count``.
* a variable is a ``"weight"`` when it can be reached from the root without passing through an optimizer or a
  metric object; otherwise ``"optimizer"`` (iteration counter, learning rate, hyper-parameters, ``Adam/m/...``
  variables of Keras >= 2.11 under ``optimizer/_variables/N``, legacy slots) or ``"metric"``.
* attributes that are not variables (``VARIABLE_VALUE``), e.g. Python state or lookup tables, get role
  ``"other"`` and are set aside as well.

TF1 name-based checkpoints have no structure to go by, so their bookkeeping is told by name: optimizer slots
(``<variable>/adam_m``, ``/adam_v``, ``/Adam``, ``/Adam_1``, ``/Momentum``, ``/RMSProp*``, any name with
``AdamWeightDecayOptimizer`` or ``LAMB``; ``beta1_power``...) are ``"optimizer"``; step counters, learning rates
and loss scales (``global_step``, ``learning_rate``, ...) and non-numeric tensors are ``"other"``. Neither is read.

HDF5 weights files written by tf_keras ``save_weights`` hold neither optimizer nor metric state (``model.layers``
excludes metrics; ``top_level_model_weights`` holds only the model's own trainable/non-trainable variables); only
a whole-model file's ``optimizer_weights`` group is optimizer state.

Two weights with the same name are a `ConversionError`: the mapping onto the target model goes by name.
"""

from __future__ import annotations

import os
import re
import struct
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import numpy as np

from tracer.errors import BadInputError, ConversionError

__all__ = ["Variable", "Checkpoint", "open_checkpoint", "resolve_path", "ROLES", "METRIC_STATE_NAMES"]

ROLES = ("weight", "optimizer", "metric", "other")

# State variable names of the Keras metric classes (Mean/Sum/MeanMetricWrapper: total, count; confusion-matrix
# metrics: the four counts or an accumulator; MeanIoU: total_cm). Used together with the structural test above.
METRIC_STATE_NAMES = frozenset({
    "total", "count", "accumulator", "true_positives", "false_positives", "true_negatives", "false_negatives",
    "total_cm", "total_confusion_matrix", "sum", "squared_sum", "residual", "num_samples",
})

_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
_VALUE_ATTRIBUTE = "VARIABLE_VALUE"
_ATTRIBUTE_SUFFIX = "/.ATTRIBUTES/"
_SLOT_MARKER = "/.OPTIMIZER_SLOT/"
_ITERATION_CHILDREN = ("iter", "_iterations", "iterations")
_DATA_SHARD = re.compile(r"^(?P<prefix>.+)\.data-(?P<i>\d{5})-of-(?P<n>\d{5})$")
_H5_SUFFIXES = (".h5", ".hdf5")
_H5_TOP_LEVEL = "top_level_model_weights"

_SAVE_HINT = (
    "pass the prefix given to model.save_weights() (the files PREFIX.index and PREFIX.data-*), the .index file, "
    "a directory holding the 'checkpoint' file, or a Keras 2 .h5 weights file"
)


@dataclass(frozen=True)
class Variable:
    """One serialized tensor."""

    name: str  # the variable's own full name without ":0", e.g. "block1a_dwconv/depthwise_kernel"
    key: str  # TF checkpoint key or HDF5 dataset path
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name
    role: str  # "weight" | "optimizer" | "metric" | "other"


class Checkpoint:
    """An opened checkpoint: the variable listing plus on-demand reads of single tensors. `format`: "tf" (TF2
    object-based bundle), "tf1" (name-based bundle) or "h5" (Keras 2 / transformers HDF5)."""

    def __init__(self, path: str, format: str, variables: list[Variable], backend: Any) -> None:
        self.path = path
        self.format = format
        self.variables = variables
        self._backend = backend
        weights: dict[str, Variable] = {}
        duplicates: dict[str, list[str]] = {}
        for var in variables:
            if var.role != "weight":
                continue
            if var.name in weights:
                duplicates.setdefault(var.name, [weights[var.name].key]).append(var.key)
            else:
                weights[var.name] = var
        if duplicates:
            listing = "; ".join(f"{name!r} stored at {', '.join(keys)}" for name, keys in duplicates.items())
            backend.close()
            raise ConversionError(
                f"{path}: {len(duplicates)} weight name(s) occur more than once, so weights cannot be mapped by "
                f"name: {listing}"
            )
        self._weights = weights

    @property
    def weights(self) -> dict[str, Variable]:
        """Model weights by name, in the listing's order."""
        return dict(self._weights)

    @property
    def set_aside(self) -> list[Variable]:
        """Everything that is not a model weight (optimizer state, metrics, other saved state)."""
        return [var for var in self.variables if var.role != "weight"]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: var.shape for name, var in self._weights.items()}

    def read(self, name: str) -> np.ndarray:
        """Read one weight tensor from disk."""
        var = self._weights.get(name)
        if var is None:
            raise ConversionError(f"{self.path}: no weight named {name!r} in this checkpoint")
        return self.read_variable(var)

    def read_variable(self, var: Variable) -> np.ndarray:
        """Read any listed variable (also a set-aside one) from disk."""
        if self._backend is None:
            raise ValueError(f"checkpoint {self.path} is closed")
        value = np.asarray(self._backend.read(var))
        if tuple(value.shape) != var.shape:
            raise BadInputError(
                f"{self.path}: variable {var.name!r} ({var.key}) read with shape {tuple(value.shape)} but is listed "
                f"with shape {var.shape}; the checkpoint is inconsistent, re-export it"
            )
        return value

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Checkpoint({self.path!r}, format={self.format!r}, weights={len(self._weights)}, "
                f"set_aside={len(self.variables) - len(self._weights)})")


def resolve_path(path: str | os.PathLike) -> tuple[str, str]:
    """Where `path` leads, ("tf", prefix) or ("h5", file), without opening anything (cheap: no TensorFlow);
    `BadInputError` naming the cause when it leads nowhere."""
    return _resolve(Path(os.fspath(path)).expanduser())


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a TF checkpoint (object-based, or a TF1 name-based bundle read by its keys) or a Keras 2 / transformers
    HDF5 weights file; see the module docstring."""
    kind, resolved = _resolve(Path(os.fspath(path)).expanduser())
    if kind == "h5":
        return _open_h5(resolved)
    return _open_tf(resolved)


# ----------------------------------------------------------------------------------------------------------------
# Path resolution


def _resolve(p: Path) -> tuple[str, str]:
    """Return ("tf", prefix) or ("h5", file)."""
    if p.is_dir():
        return _resolve_dir(p)
    if p.is_file():
        if p.name == "checkpoint":
            return _resolve_state_file(p)
        if p.suffix == ".index":
            return "tf", str(p)[: -len(".index")]
        shard = _DATA_SHARD.match(str(p))
        if shard:
            return "tf", shard.group("prefix")
        if Path(str(p) + ".index").is_file():
            return "tf", str(p)
        if _is_hdf5(p):
            return "h5", str(p)
        kind = " (a .keras archive holds no variable names)" if p.suffix == ".keras" else ""
        raise BadInputError(f"{p} is neither a TensorFlow checkpoint nor a Keras HDF5 weights file{kind}; "
                            f"{_SAVE_HINT}")
    if Path(str(p) + ".index").exists():
        return "tf", str(p)
    if p.parent.is_dir() and any(p.parent.glob(_glob_escape(p.name) + ".data-*")):
        raise BadInputError(
            f"{p}: found data shard(s) {p}.data-* but no index file {p}.index; a TF checkpoint needs both, copy the "
            f".index file next to the data files"
        )
    also = "" if p.suffix == ".index" else f" (nor is there a checkpoint index {p.name}.index)"
    raise BadInputError(f"{p} does not exist{also}; {_SAVE_HINT}")


def _resolve_dir(d: Path) -> tuple[str, str]:
    if (d / "checkpoint").is_file():
        return _resolve_state_file(d / "checkpoint")
    indexes = sorted(d.glob("*.index"))
    if len(indexes) == 1:
        return "tf", str(indexes[0])[: -len(".index")]
    if len(indexes) > 1:
        names = ", ".join(i.name for i in indexes)
        raise BadInputError(f"{d} holds several checkpoints ({names}) and no 'checkpoint' file saying which is "
                            f"current; pass the prefix of the one to convert")
    h5s = sorted(f for f in d.iterdir() if f.suffix in _H5_SUFFIXES and f.is_file())
    if len(h5s) == 1 and _is_hdf5(h5s[0]):
        return "h5", str(h5s[0])
    hint = ""
    if (d / "saved_model.pb").is_file() and (d / "variables" / "variables.index").is_file():
        hint = f" (this looks like a SavedModel: pass {d / 'variables' / 'variables'})"
    raise BadInputError(f"{d} is a directory without a 'checkpoint' file or a single *.index or .h5 file{hint}; "
                        f"{_SAVE_HINT}")


def _resolve_state_file(state: Path) -> tuple[str, str]:
    """Follow a TF `checkpoint` state file (text CheckpointState) to its current checkpoint prefix."""
    try:
        text = state.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise BadInputError(f"{state}: cannot read the checkpoint state file ({err}); pass the checkpoint prefix "
                            f"directly (PREFIX for PREFIX.index)") from err
    match = re.search(r'^\s*model_checkpoint_path\s*:\s*"((?:[^"\\]|\\.)*)"', text, re.MULTILINE)
    if not match:
        raise BadInputError(f"{state} does not name a model_checkpoint_path; pass the checkpoint prefix directly "
                            f"(PREFIX for PREFIX.index)")
    raw = re.sub(r"\\(.)", r"\1", match.group(1))
    target = Path(raw)
    candidates = [target] if target.is_absolute() else [state.parent / target]
    candidates.append(state.parent / target.name)  # directory moved since it was written
    for prefix in candidates:
        if Path(str(prefix) + ".index").is_file():
            return "tf", str(prefix)
    raise BadInputError(f"{state} names checkpoint {raw!r}, but {candidates[0]}.index does not exist; the files "
                        f"were moved or deleted, pass an existing checkpoint prefix")


def _glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def _is_hdf5(p: Path) -> bool:
    try:
        import h5py
    except ImportError:  # pragma: no cover - h5py is a dependency
        with open(p, "rb") as f:
            return f.read(8) == b"\x89HDF\r\n\x1a\n"
    try:
        return bool(h5py.is_hdf5(str(p)))
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------------------------
# TF object-based checkpoints, read without TensorFlow
#
# A checkpoint is a tensor bundle. PREFIX.index is a LevelDB-style table (below) whose key "" holds a
# BundleHeaderProto (shard count, byte order) and every other key a BundleEntryProto: where the tensor's bytes lie
# (shard, offset, size), its dtype and shape, and the masked CRC32C of those bytes. The bytes of a numeric tensor are
# its elements, row-major, in the header's byte order; those of a string tensor are each element's length as a
# varint, a masked CRC32C of the lengths, then the elements' bytes. The object graph (a TrackableObjectGraph) is
# itself stored as a scalar string tensor under _CHECKPOINTABLE_OBJECT_GRAPH.

_DT_STRING = 7
_DTYPES = {  # TF DataType enum -> numpy dtype name (the checkpoint's layout: little-endian)
    1: "float32", 2: "float64", 3: "int32", 4: "uint8", 5: "int16", 6: "int8", 7: "object", 8: "complex64",
    9: "int64", 10: "bool", 14: "bfloat16", 17: "uint16", 18: "complex128", 19: "float16", 22: "uint32", 23: "uint64",
}
_CRC_CHUNK = 1 << 20


# ---- protobuf wire format: just enough to decode the three messages above


def _proto_fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of each field of a serialized protobuf message, in order. The value is an
    int for varint (wire type 0), fixed64 (1) and fixed32 (5) fields and the raw bytes of a length-delimited field
    (2: strings, nested messages). Groups (3, 4) are long deprecated and refused like any malformed input."""
    pos, end = 0, len(buf)
    while pos < end:
        tag, pos = _varint(buf, pos)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            if pos + width > end:
                raise ValueError("truncated fixed-width field")
            value = int.from_bytes(buf[pos:pos + width], "little")
            pos += width
        elif wire == 2:
            size, pos = _varint(buf, pos)
            if pos + size > end:
                raise ValueError("truncated length-delimited field")
            value = bytes(buf[pos:pos + size])
            pos += size
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if field == 0:
            raise ValueError("field number 0")
        yield field, wire, value


def _proto_decode(buf: bytes, schema: dict[int, tuple[str, Any]]) -> SimpleNamespace:
    """Decode a message by `schema`: {field number: (attribute, kind)}, kind being "int" (any varint: int32, int64,
    enum, bool; read as signed 64-bit), "fixed32", "str", "bytes", a nested schema, or a one-element list of one of
    these for a repeated field. Fields not in the schema are skipped; absent ones get protobuf's defaults."""
    out: dict[str, Any] = {}
    for field, wire, value in _proto_fields(buf):
        if field not in schema:
            continue
        name, kind = schema[field]
        if isinstance(kind, list):
            out.setdefault(name, []).append(_proto_value(kind[0], wire, value, field))
        else:
            out[name] = _proto_value(kind, wire, value, field)  # the last one wins, as in protobuf
    for name, kind in schema.values():
        if name not in out:
            out[name] = [] if isinstance(kind, list) else _proto_default(kind)
    return SimpleNamespace(**out)


def _proto_default(kind: Any) -> Any:
    if isinstance(kind, dict):
        return _proto_decode(b"", kind)
    return {"int": 0, "fixed32": 0, "str": "", "bytes": b""}[kind]


def _proto_value(kind: Any, wire: int, value: int | bytes, field: int) -> Any:
    expected = {"int": 0, "fixed32": 5}.get(kind, 2) if not isinstance(kind, dict) else 2
    if wire != expected:
        raise ValueError(f"field {field} has wire type {wire}, expected {expected}")
    if kind == "int":
        return value - (1 << 64) if value >= 1 << 63 else value
    if kind == "str":
        return value.decode("utf-8")
    if isinstance(kind, dict):
        return _proto_decode(value, kind)
    return value  # fixed32, bytes


_HEADER_PROTO = {  # tensorflow/core/protobuf/tensor_bundle.proto: BundleHeaderProto
    1: ("num_shards", "int"), 2: ("endianness", "int"), 3: ("version", {1: ("producer", "int"),
                                                                       2: ("min_consumer", "int")}),
}
_ENTRY_PROTO = {  # BundleEntryProto; shape is a TensorShapeProto
    1: ("dtype", "int"), 2: ("shape", {2: ("dim", [{1: ("size", "int")}]), 3: ("unknown_rank", "int")}),
    3: ("shard_id", "int"), 4: ("offset", "int"), 5: ("size", "int"), 6: ("crc32c", "fixed32"),
    7: ("slices", ["bytes"]),
}
_GRAPH_PROTO = {  # tensorflow/core/protobuf/trackable_object_graph.proto: TrackableObjectGraph
    1: ("nodes", [{
        1: ("children", [{1: ("node_id", "int"), 2: ("local_name", "str")}]),
        2: ("attributes", [{1: ("name", "str"), 2: ("full_name", "str"), 3: ("checkpoint_key", "str")}]),
        3: ("slot_variables", [{1: ("original_variable_node_id", "int"), 2: ("slot_name", "str"),
                                3: ("slot_variable_node_id", "int")}]),
    }]),
}


# ---- the .index file and the data shards


@dataclass
class _Entry:
    key: str
    dtype: int
    shape: tuple[int, ...]
    shard: int
    offset: int
    size: int
    crc32c: int  # masked, as stored

    @property
    def dtype_name(self) -> str:
        return _DTYPES.get(self.dtype, f"tf_dtype_{self.dtype}")


@dataclass
class _Bundle:
    num_shards: int
    entries: dict[str, _Entry]  # in the index's (sorted) order, the header excluded


def _read_bundle_index(index: Path) -> _Bundle:
    """Header and entries of a bundle's index file; `BadInputError` if it is not one, `ConversionError` for a
    valid bundle this reader does not take (big-endian, partitioned variables, a newer bundle format)."""
    try:
        data = index.read_bytes()
    except OSError as err:
        raise BadInputError(f"{index}: cannot read the index file ({err}); check its permissions, or copy the "
                            f"checkpoint again") from err
    header = None
    entries: dict[str, _Entry] = {}
    partitioned: list[str] = []
    try:
        for raw_key, value in _table_entries(data):
            if raw_key == b"":
                header = _proto_decode(value, _HEADER_PROTO)
                continue
            key = raw_key.decode("utf-8", "replace")
            proto = _proto_decode(value, _ENTRY_PROTO)
            if proto.slices:  # a partitioned variable's table of slices; the slices have entries of their own
                partitioned.append(key)
                continue
            if proto.shape.unknown_rank or any(d.size < 0 for d in proto.shape.dim):
                raise ValueError(f"entry {key!r} has no complete shape")
            entries[key] = _Entry(key=key, dtype=proto.dtype, shape=tuple(d.size for d in proto.shape.dim),
                                  shard=proto.shard_id, offset=proto.offset, size=proto.size, crc32c=proto.crc32c)
    except (ValueError, struct.error) as err:  # UnicodeDecodeError is a ValueError
        raise BadInputError(f"{index} is not a readable TF checkpoint index ({err}); {_SAVE_HINT}") from err
    if header is None or header.num_shards < 1:
        raise BadInputError(f"{index} is not a readable TF checkpoint index (no bundle header); {_SAVE_HINT}")
    if header.endianness != 0:
        raise ConversionError(f"{index}: the checkpoint was written in big-endian byte order, which this reader "
                              f"does not take; load and re-save it with model.save_weights() on a little-endian "
                              f"machine (x86, ARM)")
    if header.version.min_consumer > 1:
        raise ConversionError(f"{index}: the checkpoint needs a tensor-bundle reader of version >= "
                              f"{header.version.min_consumer} (this one reads version 1); re-save it with an older "
                              f"TensorFlow")
    if partitioned:
        shown = ", ".join(repr(_name_from_key(k)) for k in partitioned[:3]) + (", ..." if len(partitioned) > 3 else "")
        raise ConversionError(f"{index}: {len(partitioned)} partitioned variable(s) ({shown}), saved in slices, which "
                              f"this converter does not assemble; re-save the model without a variable partitioner "
                              f"(e.g. restore it on one device and call model.save_weights())")
    return _Bundle(num_shards=header.num_shards, entries=entries)


def _crc32c_mask(crc: int) -> int:
    """TF stores CRC32C values masked (rotated right by 15 bits, plus a constant), as LevelDB does."""
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _crc32c_unmask(masked: int) -> int:
    rot = (masked - 0xA282EAD8) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


class _TFBackend:
    """Reads single tensors of a bundle, keeping one open handle per data shard until `close()`."""

    def __init__(self, prefix: str, bundle: _Bundle) -> None:
        import google_crc32c

        self.prefix = prefix
        self._crc = google_crc32c
        self._entries = bundle.entries
        self._files: dict[int, tuple[Path, Any]] = {}
        self._lock = threading.Lock()  # for the seek + read fallback where os.preadv is missing
        try:
            for shard in sorted({e.shard for e in bundle.entries.values()}):
                path = _shard_path(prefix, shard, bundle.num_shards)
                self._files[shard] = (path, open(path, "rb", buffering=0))
        except OSError as err:
            self.close()
            raise BadInputError(f"{path}: cannot open the data file ({err}); check its permissions, or copy the "
                                f"checkpoint again") from err

    def read(self, var: Variable) -> np.ndarray:
        return self._tensor(self._entries[var.key], f"variable {var.name!r} (key {var.key})")

    def read_key(self, key: str) -> np.ndarray:
        """Any tensor of the bundle by its checkpoint key (also the object graph)."""
        return self._tensor(self._entries[key], f"tensor {key!r}")

    def _tensor(self, entry: _Entry, what: str) -> np.ndarray:
        if self._files is None:
            raise ValueError(f"checkpoint {self.prefix} is closed")
        path, handle = self._files[entry.shard]

        def damaged(detail: str) -> BadInputError:
            return BadInputError(f"{path}: cannot read {what}: {detail}; the data file is corrupted or incomplete, "
                                 f"copy the checkpoint again")

        count = int(np.prod(entry.shape, dtype=np.int64))
        dtype = None if entry.dtype == _DT_STRING else self._numpy_dtype(entry, what)
        if dtype is not None and entry.size != count * dtype.itemsize:
            raise damaged(f"the index gives it {entry.size} bytes but shape {entry.shape} of {entry.dtype_name} needs "
                          f"{count * dtype.itemsize}")
        out = np.empty(entry.size, np.uint8)  # fresh and writable: the tensor's own memory
        view = memoryview(out)
        got = self._read_into(handle, view, entry.offset)
        if got < entry.size:
            raise damaged(f"the file ends {entry.size - got} bytes before its data does")
        if dtype is None:
            return self._strings(bytes(view), count, entry, damaged)
        crc = 0
        for start in range(0, entry.size, _CRC_CHUNK):  # the C extension takes bytes only: checksum cache-sized copies
            crc = self._crc.extend(crc, bytes(view[start:start + _CRC_CHUNK]))
        if _crc32c_mask(crc) != entry.crc32c:
            raise damaged(f"its bytes are damaged (CRC32C {crc:#010x}, the index says "
                          f"{_crc32c_unmask(entry.crc32c):#010x})")
        return out.view(dtype).reshape(entry.shape)

    def _strings(self, raw: bytes, count: int, entry: _Entry, damaged: Any) -> np.ndarray:
        """Decode a string tensor: varint lengths, masked CRC32C of the lengths (each as a little-endian uint32, or
        uint64 above 4 GiB), then the bytes; the entry's checksum covers lengths, length checksum and bytes."""
        lengths, pos, crc = [], 0, 0
        try:
            for _ in range(count):
                length, pos = _varint(raw, pos)
                lengths.append(length)
                crc = self._crc.extend(crc, length.to_bytes(4 if length <= 0xFFFFFFFF else 8, "little"))
        except ValueError:
            raise damaged("its string lengths are unreadable") from None
        stored = raw[pos:pos + 4]
        if len(stored) < 4 or _crc32c_mask(crc) != int.from_bytes(stored, "little"):
            raise damaged("its string lengths are damaged (checksum mismatch)")
        crc = self._crc.extend(crc, stored)
        pos += 4
        start, values = pos, []
        for length in lengths:
            values.append(raw[pos:pos + length])
            pos += length
        if pos != len(raw):
            raise damaged(f"its strings take {pos} bytes, the index says {len(raw)}")
        crc = self._crc.extend(crc, raw[start:])
        if _crc32c_mask(crc) != entry.crc32c:
            raise damaged("its bytes are damaged (checksum mismatch)")
        out = np.empty(count, dtype=object)
        out[:] = values
        return out.reshape(entry.shape)

    def _numpy_dtype(self, entry: _Entry, what: str) -> np.dtype:
        name = _DTYPES.get(entry.dtype)
        if name == "bfloat16":
            try:
                import ml_dtypes
            except ImportError:
                raise ConversionError(f"{self.prefix}: cannot read {what}: it is bfloat16, which needs the ml_dtypes "
                                      f"package; pip install ml_dtypes") from None
            return np.dtype(ml_dtypes.bfloat16)
        if name is None:
            raise ConversionError(f"{self.prefix}: cannot read {what}: TF dtype {entry.dtype} (enum value) is not a "
                                  f"plain numeric or string tensor; this converter reads only those")
        return np.dtype(name).newbyteorder("<")

    def _read_into(self, handle: Any, view: memoryview, offset: int) -> int:
        """Fill `view` from the file at `offset`; the count of bytes read (fewer only at the end of the file)."""
        done = 0
        while done < len(view):
            if hasattr(os, "preadv"):
                n = os.preadv(handle.fileno(), [view[done:]], offset + done)
            else:  # pragma: no cover - platforms without preadv
                with self._lock:
                    handle.seek(offset + done)
                    n = handle.readinto(view[done:])
            if not n:
                break
            done += n
        return done

    def close(self) -> None:
        files, self._files = self._files, None
        for _, handle in (files or {}).values():
            handle.close()


def _open_tf(prefix: str) -> Checkpoint:
    index = Path(prefix + ".index")
    if not index.is_file():
        raise BadInputError(f"{prefix}: no index file {index}; {_SAVE_HINT}")
    bundle = _read_bundle_index(index)
    _check_shards(prefix, index, bundle)
    if _GRAPH_KEY not in bundle.entries:  # a TF1 Saver bundle: the keys are the variables' names
        variables = [_make_variable(key, entry, _tf1_role(key, entry)) for key, entry in bundle.entries.items()]
        variables.sort(key=lambda v: (v.name, v.key))
        return Checkpoint(prefix, "tf1", variables, _TFBackend(prefix, bundle))
    backend = _TFBackend(prefix, bundle)
    try:
        graph_tensor = backend.read_key(_GRAPH_KEY)
        if graph_tensor.shape != () or not isinstance(graph_tensor.item(), bytes):
            raise BadInputError(f"{prefix}: the checkpoint's object graph is not a scalar string; the checkpoint is "
                                f"corrupted, copy it again")
        variables = _tf_variables(prefix, graph_tensor.item(), bundle.entries)
    except BaseException:
        backend.close()
        raise
    return Checkpoint(prefix, "tf", variables, backend)


def _tf_variables(prefix: str, raw_graph: bytes, entries: dict[str, _Entry]) -> list[Variable]:
    try:
        graph = _proto_decode(raw_graph, _GRAPH_PROTO)
    except ValueError as err:  # UnicodeDecodeError included
        raise BadInputError(f"{prefix}: the checkpoint's object graph cannot be parsed ({err}); the checkpoint is "
                            f"corrupted, copy it again") from err
    roles = _graph_roles(graph)
    variables: list[Variable] = []
    claimed = {_GRAPH_KEY}
    for node_id, node in enumerate(graph.nodes):
        for attr in node.attributes:
            key = attr.checkpoint_key
            if key in claimed:
                continue
            is_value = attr.name == _VALUE_ATTRIBUTE
            if key not in entries:
                if is_value:
                    raise BadInputError(f"{prefix}: the object graph lists {key} but the index holds no such "
                                        f"tensor; the checkpoint is corrupted or incomplete, copy it again")
                continue
            claimed.add(key)
            name = attr.full_name or _name_from_key(key)
            role = roles.get(node_id, _role_from_key(key)) if is_value else "other"
            variables.append(_make_variable(name, entries[key], role))
    for key, entry in entries.items():  # tensors the object graph does not describe (not expected from TF2 savers)
        if key not in claimed:
            variables.append(_make_variable(_name_from_key(key), entry, _role_from_key(key)))
    variables.sort(key=lambda v: (v.name, v.key))
    return variables


# TF1 optimizer slots and bookkeeping, by name (a name-based bundle has nothing else to go by).
_TF1_SLOT = re.compile(
    r"(?:^|/)(?:adam_[mv]|Adam(?:_\d+)?|Momentum|RMSProp(?:_\d+)?|Adagrad|Adadelta(?:_\d+)?|Ftrl(?:_\d+)?|"
    r"ExponentialMovingAverage)$|AdamWeightDecayOptimizer|LAMB|(?:^|/)(?:beta[12]_power)$"
)
_TF1_BOOKKEEPING = re.compile(
    r"(?:^|/)(?:global_step|learning_rate|lr|loss_scale|good_steps|current_loss_scale|iterations?|step)$"
)


def _tf1_role(key: str, entry: _Entry) -> str:
    if _TF1_SLOT.search(key):
        return "optimizer"
    if _TF1_BOOKKEEPING.search(key) or entry.dtype == _DT_STRING:
        return "other"
    return "weight"


def _make_variable(name: str, entry: _Entry, role: str) -> Variable:
    return Variable(name=name, key=entry.key, shape=entry.shape, dtype=entry.dtype_name, role=role)


def _name_from_key(key: str) -> str:
    cut = key.find(_ATTRIBUTE_SUFFIX)
    return key[:cut] if cut >= 0 else key


def _role_from_key(key: str) -> str:
    if _SLOT_MARKER in key or key.startswith("optimizer/"):
        return "optimizer"
    return "weight"


def _graph_roles(graph: Any) -> dict[int, str]:
    """Role of every node that is reachable from the root or is a slot variable (see the module docstring)."""
    nodes = graph.nodes
    if not nodes:
        return {}

    def value_attribute(node: Any) -> Any:
        for attr in node.attributes:
            if attr.name == _VALUE_ATTRIBUTE:
                return attr
        return None

    def is_variable_leaf(node_id: int) -> bool:
        node = nodes[node_id]
        return not node.children and value_attribute(node) is not None

    optimizers: set[int] = set()
    slots: set[int] = set()
    for child in nodes[0].children:
        if child.local_name == "optimizer" and child.node_id != 0:
            optimizers.add(child.node_id)
    for node_id, node in enumerate(nodes):
        if node.slot_variables:
            optimizers.add(node_id)
            slots.update(s.slot_variable_node_id for s in node.slot_variables)
        for child in node.children:
            if child.local_name in _ITERATION_CHILDREN and child.node_id < len(nodes) and is_variable_leaf(
                    child.node_id):
                full = value_attribute(nodes[child.node_id]).full_name
                if full == "iteration" or full == "iter" or full.endswith("/iter"):
                    optimizers.add(node_id)
    optimizers.discard(0)

    def is_empty(node_id: int) -> bool:
        return node_id < len(nodes) and not nodes[node_id].children and not nodes[node_id].attributes

    metrics: set[int] = set()
    for node_id, node in enumerate(nodes):
        if node_id == 0 or not node.children:
            continue
        state = [c for c in node.children if c.node_id < len(nodes) and is_variable_leaf(c.node_id)]
        if state and all(
            c.local_name in METRIC_STATE_NAMES and value_attribute(nodes[c.node_id]).full_name in METRIC_STATE_NAMES
            for c in state
        ) and all(is_variable_leaf(c.node_id) or is_empty(c.node_id) for c in node.children if c not in state):
            metrics.add(node_id)
    metrics -= optimizers

    def reach(starts: set[int] | list[int], barrier: set[int]) -> set[int]:
        seen = set(starts)
        queue = deque(starts)
        while queue:
            node_id = queue.popleft()
            for child in nodes[node_id].children:
                nxt = child.node_id
                if nxt < len(nodes) and nxt not in seen and nxt not in barrier:
                    seen.add(nxt)
                    queue.append(nxt)
        return seen

    set_apart = optimizers | slots | metrics
    model = reach([0], set_apart)
    optimizer_state = reach(optimizers | slots, set())
    metric_state = reach(metrics, set())
    roles: dict[int, str] = {}
    for node_id in range(len(nodes)):
        if node_id in model:
            roles[node_id] = "weight"
        elif node_id in optimizer_state:
            roles[node_id] = "optimizer"
        elif node_id in metric_state:
            roles[node_id] = "metric"
    return roles


# ---- the .index file: a LevelDB-style table (uncompressed blocks, as TF writes them) of serialized protos


_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_SIZE = 48
_BLOCK_TRAILER = 5


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("bad varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _table_block(data: bytes, handle: bytes) -> bytes:
    offset, pos = _varint(handle, 0)
    size, _ = _varint(handle, pos)
    if offset + size + _BLOCK_TRAILER > len(data):
        raise ValueError("block past end of file")
    if data[offset + size] != 0:
        raise ValueError("compressed table block")
    return data[offset:offset + size]


def _block_entries(block: bytes) -> Iterator[tuple[bytes, bytes]]:
    if len(block) < 4:
        raise ValueError("short block")
    (restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    end = len(block) - 4 - 4 * restarts
    if end < 0:
        raise ValueError("bad restart count")
    pos, key = 0, b""
    while pos < end:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        length, pos = _varint(block, pos)
        if shared > len(key) or pos + unshared + length > end:
            raise ValueError("bad block entry")
        key = key[:shared] + block[pos:pos + unshared]
        pos += unshared
        yield key, block[pos:pos + length]
        pos += length


def _table_entries(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    if len(data) < _FOOTER_SIZE:
        raise ValueError("file too short for a table")
    footer = data[-_FOOTER_SIZE:]
    (magic,) = struct.unpack_from("<Q", footer, _FOOTER_SIZE - 8)
    if magic != _TABLE_MAGIC:
        raise ValueError("bad table magic")
    _, pos = _varint(footer, 0)  # metaindex handle: offset, size
    _, pos = _varint(footer, pos)
    index_block = _table_block(data, footer[pos:])
    for _, handle in _block_entries(index_block):
        yield from _block_entries(_table_block(data, handle))


def _shard_path(prefix: str, i: int, n: int) -> Path:
    return Path(f"{prefix}.data-{i:05d}-of-{n:05d}")


def _check_shards(prefix: str, index: Path, bundle: _Bundle) -> None:
    """Every data shard is there and long enough for the tensors the index puts in it (checked before any read)."""
    missing = [str(_shard_path(prefix, i, bundle.num_shards)) for i in range(bundle.num_shards)
               if not _shard_path(prefix, i, bundle.num_shards).is_file()]
    if missing:
        raise BadInputError(f"{prefix}: {len(missing)} of {bundle.num_shards} data shard(s) missing: "
                            f"{', '.join(missing)}; copy every PREFIX.data-* file that belongs to {index.name}")
    extents: dict[int, list[tuple[int, str]]] = {}  # shard -> [(offset + size, key)]
    for entry in bundle.entries.values():
        extents.setdefault(entry.shard, []).append((entry.offset + entry.size, entry.key))
    for shard, ends in sorted(extents.items()):
        if not 0 <= shard < bundle.num_shards:
            raise BadInputError(f"{index} refers to data shard {shard} but says there are {bundle.num_shards}; "
                                f"the index is corrupted, copy the checkpoint again")
        path = _shard_path(prefix, shard, bundle.num_shards)
        size = path.stat().st_size
        needed = max(end for end, _ in ends)
        if size < needed:
            cut = sorted(_name_from_key(key) for end, key in ends if end > size)
            shown = ", ".join(repr(k) for k in cut[:3]) + (", ..." if len(cut) > 3 else "")
            raise BadInputError(
                f"{path} is truncated: {size} bytes, but the index needs {needed}; {len(cut)} of {len(ends)} "
                f"tensors lie past its end ({shown}); copy the checkpoint again"
            )


# ----------------------------------------------------------------------------------------------------------------
# Keras 2 HDF5


class _H5Backend:
    def __init__(self, path: str, handle: Any) -> None:
        self.path = path
        self._file = handle

    def read(self, var: Variable) -> np.ndarray:
        try:
            return self._file[var.key][()]
        except (OSError, KeyError, ValueError, RuntimeError) as err:
            raise BadInputError(f"{self.path}: cannot read variable {var.name!r} ({var.key}): {err}; the file is "
                                f"corrupted or incomplete, copy it again") from err

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            finally:
                self._file = None


def _h5_names(group: Any, attr: str) -> list[str] | None:
    """A Keras string-list attribute, possibly split into `attr0`, `attr1`, ... when larger than 64 KB."""
    if attr in group.attrs:
        values = list(np.atleast_1d(group.attrs[attr]))
    elif f"{attr}0" in group.attrs:
        values, chunk = [], 0
        while f"{attr}{chunk}" in group.attrs:
            values.extend(np.atleast_1d(group.attrs[f"{attr}{chunk}"]))
            chunk += 1
    else:
        return None
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def _strip_suffix(name: str) -> str:
    return re.sub(r":\d+$", "", name)


def _open_h5(path: str) -> Checkpoint:
    import h5py

    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        raise BadInputError(f"{path}: cannot open as HDF5 ({err}); the file is truncated or not a Keras weights "
                            f"file") from err
    try:
        variables = _h5_variables(path, handle)
    except BadInputError:
        handle.close()
        raise
    except (OSError, KeyError, ValueError, RuntimeError) as err:
        handle.close()
        raise BadInputError(f"{path}: cannot read the HDF5 structure ({err}); the file is corrupted") from err
    return Checkpoint(path, "h5", variables, _H5Backend(path, handle))


def _h5_variables(path: str, handle: Any) -> list[Variable]:
    import h5py

    sections: list[tuple[Any, str]] = []
    if "model_weights" in handle and isinstance(handle["model_weights"], h5py.Group):
        sections.append((handle["model_weights"], "weight"))  # whole-model file from model.save("x.h5")
    elif _h5_names(handle, "layer_names") is not None:
        sections.append((handle, "weight"))
    if not sections:
        raise BadInputError(
            f"{path} is an HDF5 file but not Keras 2 weights (no layer_names attribute; Keras 3 .weights.h5 files "
            f"carry no variable names); save the model with tf_keras model.save_weights() instead"
        )
    variables: list[Variable] = []
    for root, role in sections:
        layer_names = _h5_names(root, "layer_names") or []
        groups = [n for n in layer_names if n in root]
        groups += sorted(n for n in root if n not in layer_names and _h5_names(root[n], "weight_names") is not None)
        for group_name in groups:
            item = root[group_name]
            if isinstance(item, h5py.Dataset):  # a transformers shard: layer_names lists the weights themselves
                variables.append(Variable(name=_strip_suffix(group_name), key=item.name, shape=tuple(item.shape),
                                          dtype=item.dtype.name, role=role))
            else:
                variables.extend(_h5_group_variables(path, item, role))
    variables = _resolve_shared(variables)
    if "optimizer_weights" in handle:
        variables.extend(_h5_group_variables(path, handle["optimizer_weights"], "optimizer"))
    variables.sort(key=lambda v: (v.name, v.key))
    return variables


def _resolve_shared(variables: list[Variable]) -> list[Variable]:
    """A weight name listed by several layer groups is one variable that several layers track (transformers'
    `mlm___cls` keeps the word embeddings of its tied decoder). When exactly one of those groups is named by a path
    component of the weight's name, that copy is the weight and the others are set aside as "other"; otherwise the
    names stay duplicated (and `Checkpoint` refuses them)."""
    by_name: dict[str, list[Variable]] = {}
    for var in variables:
        if var.role == "weight":
            by_name.setdefault(var.name, []).append(var)
    demoted: set[str] = set()
    for name, copies in by_name.items():
        if len(copies) < 2:
            continue
        parts = set(name.split("/")[:-1])
        owners = [v for v in copies if _h5_group_of(v.key) in parts]
        if len(owners) == 1:
            demoted.update(v.key for v in copies if v is not owners[0])
    return [Variable(v.name, v.key, v.shape, v.dtype, "other") if v.key in demoted else v for v in variables]


def _h5_group_of(key: str) -> str:
    """The layer group a dataset path lies in: `/bert/tf_bert_model/...` -> `bert` (under `model_weights` too)."""
    parts = key.strip("/").split("/")
    if parts and parts[0] == "model_weights":
        parts = parts[1:]
    return parts[0] if parts else ""


def _h5_group_variables(path: str, group: Any, role: str) -> list[Variable]:
    out = []
    for weight_name in _h5_names(group, "weight_names") or []:
        if weight_name not in group:
            raise BadInputError(f"{path}: group {group.name} lists weight {weight_name!r} but holds no such "
                                f"dataset; the file is corrupted or incomplete")
        dataset = group[weight_name]
        out.append(Variable(name=_strip_suffix(weight_name), key=dataset.name, shape=tuple(dataset.shape),
                            dtype=dataset.dtype.name, role=role))
    return out
