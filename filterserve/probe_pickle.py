"""A production stage-1 probe (``probe/embedding_probe_e5small.pkl``) read without running any code it holds.

Production writes the file with ``pickle.dump`` (veen-systems/llm-distillery ``scripts/train_probe.py``
@046fa0d) as::

    {"probe_type": "mlp", "scaler": StandardScaler, "state_dict": model.state_dict(),
     "model_config": {"input_dim": ..., "output_dim": ...}, "metrics": {"val_mae": ...}}

and loads it with a plain ``pickle.load`` (``filters/common/embedding_stage.py`` @3e1ccec,
``EmbeddingStage._load_probe``), patching ``torch.storage._load_from_bytes`` to map CUDA storages to
the CPU. A plain ``pickle.load`` calls whatever global the file names, so a probe file is a
program. This reader's ``find_class`` hands out only constructors of its own for what that format
needs, and refuses any other global in one line before anything of the file's choosing runs:

- the scaler's class (``sklearn.preprocessing._data.StandardScaler``): its pickled state is kept
  (``with_mean``, ``with_std``, ``mean_``, ``scale_``, ``n_features_in_``...), no sklearn code runs;
- numpy arrays, dtypes and scalars (``_reconstruct``, ``_frombuffer`` for protocol 5, ``scalar``,
  and ``_codecs.encode``, which protocol 2 uses for bytes): rebuilt from their raw bytes here;
- torch tensors: ``torch._utils._rebuild_tensor_v2`` over ``torch.storage._load_from_bytes``, whose
  bytes are a legacy ``torch.save`` of one storage (magic number, protocol 1001, sys_info, the
  storage's persistent id, its key, then its raw little-endian data); read here into numpy arrays,
  with every view checked against its storage's bounds, so torch is never imported;
- ``collections.OrderedDict`` (the state dict and a tensor's backward hooks), as a plain dict.

Production rebuilds the MLP as ``MLPProbe(input_dim, output_dim)`` (hidden sizes [256, 128],
Linear-ReLU-Dropout per hidden layer, then a Linear) and ``load_state_dict``; the layers here are
read from the state dict's ``network.<i>.weight``/``bias`` and checked to chain.
"""

from __future__ import annotations

import io
import math
import pickle
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from filterserve.errors import FilterServeError

# The legacy torch.save header (torch/serialization.py: MAGIC_NUMBER, PROTOCOL_VERSION).
_TORCH_MAGIC = 0x1950A86A20F9469CFC6C
_TORCH_PROTOCOL = 1001
# A legacy storage's class name → its element type. Probes hold float32; the rest cost nothing.
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}
# The numpy element types a probe's arrays and scalars may have (no object, void or structured dtype).
_DTYPE_CODES = frozenset({"f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "b1"})
_LINEAR_KEY = re.compile(r"^network\.(\d+)\.(weight|bias)$")


class _Malformed(Exception):
    """The file is a pickle, but not a probe as production writes it (caught and named by the loader)."""


# ---- the constructors find_class hands out ----------------------------------------------------------


class _Dtype:
    """``numpy.dtype(code, align, copy)`` then BUILD with its byte order."""

    __slots__ = ("code", "byteorder")

    def __init__(self, code: object, align: object = False, copy: object = True) -> None:
        if not isinstance(code, str) or code not in _DTYPE_CODES:
            raise _Malformed(f"a numpy dtype {code!r} that a probe never holds")
        self.code, self.byteorder = code, "="

    def __setstate__(self, state: object) -> None:
        if not (isinstance(state, tuple) and len(state) >= 2 and state[1] in ("<", ">", "|", "=")):
            raise _Malformed(f"a numpy dtype state {state!r}")
        if any(part is not None for part in state[2:5]):
            raise _Malformed("a structured numpy dtype")
        self.byteorder = state[1]

    @property
    def dtype(self) -> np.dtype:
        made = np.dtype(self.code)
        if self.byteorder == "<":
            return made.newbyteorder("<")
        return made.newbyteorder(">") if self.byteorder == ">" else made


class _Array:
    """A numpy array rebuilt from raw bytes (``_reconstruct`` then BUILD, or ``_frombuffer``)."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray | None = None) -> None:
        self.array = array

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5) or self.array is not None:
            raise _Malformed("a numpy array state of an unknown shape")
        shape, dtype, fortran, raw = state[-4:]
        self.array = _from_bytes(raw, dtype, shape, "F" if fortran else "C")


class _NdarrayType:
    """What ``numpy.ndarray`` stands for: only ``_reconstruct``'s first argument."""


def _from_bytes(raw: object, dtype: object, shape: object, order: object) -> np.ndarray:
    if not isinstance(dtype, _Dtype):
        raise _Malformed("a numpy array without a numpy dtype")
    if not (isinstance(shape, tuple) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
        raise _Malformed(f"a numpy array shape {shape!r}")
    if not isinstance(raw, (bytes, bytearray, pickle.PickleBuffer)) or order not in ("C", "F"):
        raise _Malformed("a numpy array whose data is not raw bytes")
    data = bytes(raw)
    kind = dtype.dtype
    if len(data) != math.prod(shape) * kind.itemsize:
        raise _Malformed(f"a numpy array of shape {shape} with {len(data)} bytes of data")
    return np.frombuffer(data, dtype=kind).reshape(shape, order=order).copy()


def _reconstruct(subtype: object, shape: object, code: object) -> _Array:
    if not isinstance(subtype, type) or not issubclass(subtype, _NdarrayType):
        raise _Malformed("numpy's _reconstruct asked for something other than an ndarray")
    return _Array()


def _frombuffer(raw: object, dtype: object, shape: object, order: object) -> _Array:
    return _Array(_from_bytes(raw, dtype, shape, order))


def _scalar(dtype: object, raw: object) -> float | int | bool:
    if not isinstance(dtype, _Dtype) or not isinstance(raw, bytes) or len(raw) != dtype.dtype.itemsize:
        raise _Malformed("a numpy scalar that is not a number")
    return np.frombuffer(raw, dtype=dtype.dtype)[0].item()


def _codecs_encode(text: object, encoding: object = "utf-8") -> bytes:
    """Protocol 2 writes bytes as ``_codecs.encode(str, "latin1")``."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Malformed("an encoded string that is not protocol 2's latin-1 bytes")
    return text.encode("latin-1")


class _StateDict(dict):
    """``collections.OrderedDict``: a state dict (whose ``_metadata`` BUILD sets, ignored) or a tensor's hooks."""

    __slots__ = ()

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, dict) or set(state) - {"_metadata"}:
            raise _Malformed("an OrderedDict with attributes other than a state dict's _metadata")


class _ScalerState:
    """``sklearn.preprocessing._data.StandardScaler``: its pickled attributes, kept as data."""

    __slots__ = ("state",)  # set once, by BUILD: NEWOBJ makes the instance without calling __init__
    state: dict[str, Any]

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, dict) or hasattr(self, "state"):
            raise _Malformed("a StandardScaler state that is not one mapping")
        self.state = dict(state)


class _Storage:
    """A legacy storage's element type, named by its class (``torch.FloatStorage``) in the persistent id."""

    def __init__(self, dtype: np.dtype) -> None:
        self.dtype = dtype


class _StorageUnpickler(pickle.Unpickler):
    """The pickles inside a legacy ``torch.save`` of one storage: no globals but the storage classes."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGE_DTYPES:
            return _Storage(_STORAGE_DTYPES[name])
        raise _Refused(module, name)

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage" and isinstance(pid[1], _Storage)
                and isinstance(pid[2], str) and isinstance(pid[4], int) and pid[4] >= 0):
            raise _Malformed(f"a torch storage reference {pid!r}")
        if pid[5] is not None:
            raise _Malformed("a torch storage view (a probe's storages are whole)")
        return pid  # (tag, type, key, location, numel, view); the location (cpu or cuda:N) is irrelevant here


def _load_storage(blob: object) -> np.ndarray:
    """``torch.storage._load_from_bytes``: a legacy torch.save of one storage → a 1-D numpy array."""
    if not isinstance(blob, bytes):
        raise _Malformed("a torch storage that is not bytes")
    stream = io.BytesIO(blob)
    if _StorageUnpickler(stream).load() != _TORCH_MAGIC:
        raise _Malformed("a torch storage without torch's magic number")
    if _StorageUnpickler(stream).load() != _TORCH_PROTOCOL:
        raise _Malformed("a torch storage of an unknown torch.save protocol")
    info = _StorageUnpickler(stream).load()
    if not isinstance(info, dict) or info.get("little_endian") is not True:
        raise _Malformed("a torch storage saved big-endian or without its sys_info")
    pid = _StorageUnpickler(stream).load()
    keys = _StorageUnpickler(stream).load()
    if not isinstance(pid, tuple) or keys != [pid[2]]:
        raise _Malformed("a torch storage whose keys do not match its reference")
    dtype, numel = pid[1].dtype, pid[4]
    header = stream.read(8)
    if len(header) != 8 or struct.unpack("<q", header)[0] != numel:
        raise _Malformed("a torch storage whose size does not match its reference")
    data = stream.read(numel * dtype.itemsize)
    if len(data) != numel * dtype.itemsize or stream.read(1):
        raise _Malformed("a torch storage of the wrong length")
    return np.frombuffer(data, dtype=dtype).copy()


def _rebuild_tensor(storage: object, offset: object, size: object, stride: object, requires_grad: object = False,
                    hooks: object = None, metadata: object = None) -> _Array:
    """``torch._utils._rebuild_tensor_v2``: a view of a storage, every index checked to lie inside it."""
    if not isinstance(storage, np.ndarray):
        raise _Malformed("a torch tensor without a storage")
    view = f"a torch tensor view (offset {offset!r}, size {size!r}, stride {stride!r})"
    if not (isinstance(offset, int) and isinstance(size, tuple) and isinstance(stride, tuple)) or len(size) != len(stride):
        raise _Malformed(view)
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (offset, *size, *stride)):
        raise _Malformed(view)
    if hooks not in (None, {}) or metadata not in (None, {}):
        raise _Malformed("a torch tensor with backward hooks or metadata")
    if math.prod(size) == 0:
        return _Array(np.zeros(size, dtype=storage.dtype))
    last = offset + sum((n - 1) * step for n, step in zip(size, stride))  # Python ints: no overflow, no wrap-around
    if last >= storage.size:
        raise _Malformed(f"a torch tensor view that reaches element {last} of a storage of {storage.size}")
    index = np.array(offset, dtype=np.int64)
    for n, step in zip(size, stride):
        index = index[..., None] + np.arange(n, dtype=np.int64) * step
    return _Array(np.asarray(storage[index]).copy())


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): _StateDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("numpy", "ndarray"): _NdarrayType,
    ("numpy", "dtype"): _Dtype,
    ("_codecs", "encode"): _codecs_encode,
    ("sklearn.preprocessing._data", "StandardScaler"): _ScalerState,
}
for _numpy_core in ("numpy.core", "numpy._core"):  # numpy 1 and numpy 2 names
    _ALLOWED[(f"{_numpy_core}.multiarray", "_reconstruct")] = _reconstruct
    _ALLOWED[(f"{_numpy_core}.multiarray", "scalar")] = _scalar
    _ALLOWED[(f"{_numpy_core}.numeric", "_frombuffer")] = _frombuffer


class _Refused(Exception):
    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")


class _ProbeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise _Refused(module, name) from None

    def persistent_load(self, pid: Any) -> Any:
        raise _Malformed("a persistent reference (a torch.save zip file, not production's pickle.dump)")


# ---- the probe ---------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Scaler:
    """A StandardScaler's transform, ``(x - mean) / scale``; ``mean`` is None under with_mean=False, ``scale`` under with_std=False."""

    mean: np.ndarray | None
    scale: np.ndarray | None
    n_features: int


@dataclass(frozen=True, eq=False)
class Linear:
    """One ``nn.Linear``: ``x @ weight.T + bias``, weight [out, in] as torch stores it."""

    weight: np.ndarray
    bias: np.ndarray


@dataclass(frozen=True, eq=False)
class Probe:
    """A stage-1 probe: the scaler, then the Linear layers with a ReLU between each (Dropout is identity in eval)."""

    path: Path
    scaler: Scaler
    layers: tuple[Linear, ...]

    @property
    def input_dim(self) -> int:
        return int(self.layers[0].weight.shape[1])

    @property
    def output_dim(self) -> int:
        return int(self.layers[-1].weight.shape[0])

    @property
    def hidden_sizes(self) -> tuple[int, ...]:
        return tuple(int(layer.weight.shape[0]) for layer in self.layers[:-1])


def _plain(value: object) -> object:
    """The loaded structure with every rebuilt array unwrapped."""
    if isinstance(value, _Array):
        if value.array is None:
            raise _Malformed("a numpy array without its data")
        return value.array
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def _vector(state: dict[str, Any], key: str, n: int | None) -> np.ndarray:
    value = state.get(key)
    if not isinstance(value, np.ndarray) or value.ndim != 1 or value.dtype.kind != "f" or (n is not None and value.size != n):
        raise _Malformed(f"a StandardScaler whose {key} is not a vector of {n or 'its'} floats")
    if not np.all(np.isfinite(value)):
        raise _Malformed(f"a StandardScaler whose {key} is not finite")
    return value.astype(np.float64)


def _scaler(value: object) -> Scaler:
    if not isinstance(value, _ScalerState) or not hasattr(value, "state"):
        raise _Malformed(f"a 'scaler' that is not a fitted StandardScaler ({type(value).__name__})")
    state = _plain(value.state)
    if not isinstance(state, dict):
        raise _Malformed("a StandardScaler state that is not a mapping")
    n = state.get("n_features_in_")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise _Malformed("a StandardScaler that was never fitted (no n_features_in_)")
    mean = _vector(state, "mean_", n) if state.get("with_mean", True) else None
    scale = _vector(state, "scale_", n) if state.get("with_std", True) else None
    if scale is not None and np.any(scale == 0):
        raise _Malformed("a StandardScaler with a zero scale_ (sklearn stores 1.0 for a constant feature)")
    return Scaler(mean, scale, n)


def _layers(state_dict: object, config: object) -> tuple[Linear, ...]:
    if not isinstance(state_dict, dict):
        raise _Malformed("a 'state_dict' that is not a mapping")
    found: dict[int, dict[str, np.ndarray]] = {}
    for key, value in state_dict.items():
        match = _LINEAR_KEY.match(str(key))
        if not match or not isinstance(value, np.ndarray) or value.dtype.kind != "f":
            raise _Malformed(f"a state_dict entry {key!r} that MLPProbe does not have")
        found.setdefault(int(match.group(1)), {})[match.group(2)] = value
    positions = sorted(found)
    if not positions or positions != list(range(0, 3 * len(positions), 3)):
        raise _Malformed(f"a state_dict whose Linear layers sit at network.{positions}, not MLPProbe's 0, 3, 6, ...")
    layers: list[Linear] = []
    for position in positions:
        entry = found[position]
        weight, bias = entry.get("weight"), entry.get("bias")
        if weight is None or bias is None or weight.ndim != 2 or bias.shape != (weight.shape[0],):
            raise _Malformed(f"network.{position} is not a Linear layer's weight [out, in] and bias [out]")
        if layers and weight.shape[1] != layers[-1].weight.shape[0]:
            raise _Malformed(f"network.{position} takes {weight.shape[1]} inputs after a layer of {layers[-1].weight.shape[0]}")
        if not (np.all(np.isfinite(weight)) and np.all(np.isfinite(bias))):
            raise _Malformed(f"network.{position} holds weights that are not finite")
        layers.append(Linear(weight.astype(np.float32), bias.astype(np.float32)))
    if not isinstance(config, dict):
        raise _Malformed("a 'model_config' that is not a mapping")
    for key, got in (("input_dim", layers[0].weight.shape[1]), ("output_dim", layers[-1].weight.shape[0])):
        if config.get(key) != got:
            raise _Malformed(f"model_config {key} {config.get(key)!r}, while the state_dict's layers give {got}")
    return tuple(layers)


def load_probe(path: str | Path) -> Probe:
    """The probe a production probe pickle holds; no code the file names is imported or run.

    Any global outside the format's needs, a malformed pickle, or a structure other than
    production's is refused in one line naming the file.
    """
    path = Path(path)
    try:
        with path.open("rb") as stream:
            loaded = _ProbeUnpickler(stream).load()
            if stream.read(1):
                raise _Malformed("data after the pickle's end")
        data = _plain(loaded)
        if not isinstance(data, dict) or not {"scaler", "model_config", "state_dict"} <= set(data):
            keys = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
            raise _Malformed(f"not the mapping of scaler, model_config and state_dict (got {keys})")
        if data.get("probe_type", "mlp") != "mlp":
            raise _Malformed(f"probe_type {data['probe_type']!r} (production's EmbeddingStage loads only an MLP probe)")
        scaler = _scaler(data["scaler"])
        layers = _layers(data["state_dict"], data["model_config"])
    except _Refused as exc:
        raise FilterServeError(
            f"refused probe {path}: the pickle asks for the global {exc}, which a probe never needs (nothing in the file was run)"
        ) from None
    except _Malformed as exc:
        raise FilterServeError(f"probe {path} is not a probe as production writes it: {exc}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError,
            OverflowError, MemoryError, RecursionError, UnicodeDecodeError, struct.error) as exc:
        raise FilterServeError(f"probe {path} is not a readable pickle (truncated or damaged: {type(exc).__name__}: {exc})") from None
    except OSError as exc:
        raise FilterServeError(f"cannot read probe {path}: {exc.strerror or exc}") from None
    if layers[0].weight.shape[1] != scaler.n_features:
        raise FilterServeError(
            f"probe {path}: the scaler has {scaler.n_features} features, the first layer takes {layers[0].weight.shape[1]}"
        )
    return Probe(path, scaler, layers)
