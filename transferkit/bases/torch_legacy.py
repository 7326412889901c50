"""Reads PyTorch's legacy (pre-1.6, non-zip) checkpoint format with numpy alone.

The file is a run of pickles: magic number, protocol version, system info, the object
(tensors refer to storages by persistent id), the storage keys, then each storage's raw
bytes. The unpickler resolves only the handful of globals such a state dict needs, so a
file can describe arrays but can never make this process run code.
"""

from __future__ import annotations

import math
import os
import pickle
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from transferkit.errors import WeightsError

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


@dataclass(frozen=True)
class _StorageType:
    dtype: type


@dataclass
class _Storage:
    key: str
    dtype: type
    numel: int
    data: np.ndarray | None = None


@dataclass(frozen=True)
class _TensorRef:
    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def materialize(self) -> np.ndarray:
        """The tensor as a new array, after checking that every element it names lies inside
        its storage: a crafted file cannot make it read outside the bytes it holds, or
        allocate more than its storage's worth of elements."""
        data = self.storage.data
        key = self.storage.key
        if data is None:
            raise WeightsError(f"Storage {key} has no data in the checkpoint.")
        size, stride, offset = self.size, self.stride, self.offset
        if len(size) != len(stride) or any(n < 0 for n in size) or any(s < 0 for s in stride):
            raise WeightsError(f"A tensor of storage {key} has an invalid shape {size} or "
                               f"strides {stride}.")
        if not 0 <= offset < max(data.size, 1):
            raise WeightsError(f"A tensor starts at {offset}, outside storage {key} "
                               f"({data.size} elements).")
        elements = math.prod(size)
        if elements == 0:
            return np.zeros(size, data.dtype)
        last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        if last >= data.size or elements > data.size:
            raise WeightsError(f"A tensor of shape {size} reaches past the end of storage "
                               f"{key} ({data.size} elements).")
        view = np.lib.stride_tricks.as_strided(
            data[offset:], shape=size, strides=[s * data.itemsize for s in stride],
            writeable=False)
        return np.array(view)


def _rebuild_tensor_v2(storage: _Storage, storage_offset: int, size: tuple[int, ...],
                       stride: tuple[int, ...], requires_grad: bool = False,
                       backward_hooks: Any = None, *args: Any) -> _TensorRef:
    if not isinstance(storage, _Storage):
        raise WeightsError(f"A tensor refers to {type(storage).__name__}, not a storage.")
    numbers = (storage_offset, *size, *stride)
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in numbers):
        raise WeightsError(f"A tensor has a non-integer offset, shape or stride: {numbers!r}.")
    return _TensorRef(storage, storage_offset, tuple(size), tuple(stride))


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves OrderedDict, the tensor rebuild function and storage types; nothing else."""

    def __init__(self, file: IO[bytes], storages: dict[str, _Storage] | None = None) -> None:
        super().__init__(file, encoding="utf-8")
        self.storages = storages if storages is not None else {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        raise WeightsError(
            f"Refusing to load '{module}.{name}' from a weights file: only tensors and "
            "dictionaries of tensors are read, nothing that could run code."
        )

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise WeightsError(f"Unexpected persistent id in weights file: {pid!r}")
        storage_type, key, _location, numel = pid[1], str(pid[2]), pid[3], pid[4]
        if not isinstance(numel, int) or numel < 0:
            raise WeightsError(f"A storage in the weights file has an invalid size {numel!r}.")
        if not isinstance(storage_type, _StorageType):
            raise WeightsError(f"Unexpected storage type in weights file: {storage_type!r}")
        if len(pid) > 5 and pid[5] is not None:
            raise WeightsError("Storage views (pre-2018 checkpoints) are not supported.")
        if key not in self.storages:
            self.storages[key] = _Storage(key, storage_type.dtype, numel)
        return self.storages[key]


def _load_plain(file: IO[bytes]) -> Any:
    return _RestrictedUnpickler(file).load()


def read_state_dict(path: Path) -> dict[str, np.ndarray]:
    """Reads a legacy torch `state_dict` file into numpy arrays, executing nothing from it.

    Raises:
        WeightsError: the file is not a legacy torch checkpoint, or asks for anything
            beyond tensors and dictionaries.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if _load_plain(f) != MAGIC_NUMBER:
                raise WeightsError(f"'{path}' is not a legacy PyTorch checkpoint "
                                   "(wrong magic number).")
            if _load_plain(f) != PROTOCOL_VERSION:
                raise WeightsError(f"'{path}' uses an unknown PyTorch checkpoint protocol.")
            sys_info = _load_plain(f)
            if not (isinstance(sys_info, dict) and sys_info.get("little_endian", False)):
                raise WeightsError(f"'{path}' was saved on a big-endian machine; not supported.")
            unpickler = _RestrictedUnpickler(f)
            state = unpickler.load()
            keys = _load_plain(f)
            for key in keys:
                storage = unpickler.storages.get(str(key))
                if storage is None:
                    raise WeightsError(f"'{path}' lists storage {key} that no tensor uses.")
                count = int.from_bytes(f.read(8), "little")
                dtype = np.dtype(storage.dtype).newbyteorder("<")
                if count != storage.numel or count * dtype.itemsize > size - f.tell():
                    raise WeightsError(f"'{path}' is truncated or damaged: storage {key} "
                                       f"claims {count} elements ({storage.numel} declared).")
                raw = f.read(count * dtype.itemsize)
                if len(raw) != count * dtype.itemsize:
                    raise WeightsError(f"'{path}' is truncated (storage {key}).")
                storage.data = np.frombuffer(raw, dtype=dtype)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise WeightsError(f"'{path}' could not be read as a PyTorch checkpoint: {exc}") from exc
    except OSError as exc:
        raise WeightsError(f"Could not read weights file '{path}': {exc.strerror}.") from exc
    if not isinstance(state, dict):
        raise WeightsError(f"'{path}' does not hold a state dict (found {type(state).__name__}).")
    return {str(name): value.materialize() for name, value in state.items()
            if isinstance(value, _TensorRef)}
