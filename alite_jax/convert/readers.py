"""Torch-free readers of the checkpoint files people have: ``torch.save`` archives and safetensors.

Both return a flat ``{name: numpy array}`` state_dict (:func:`read_state_dict`), the names as PyTorch
wrote them, after :func:`unwrap_state_dict`: a state_dict saved under ``"model"`` or ``"state_dict"``
(training scripts' checkpoints) is taken out, and the ``"module."`` prefix of ``nn.DataParallel`` /
``DistributedDataParallel`` is stripped.

* ``.pth`` / ``.pt`` / ``.bin`` in PyTorch's zip format (``torch.save``'s default since PyTorch 1.6): a
  zip archive ``<prefix>/data.pkl`` whose tensors are persistent ids ``("storage", <torch.*Storage>,
  key, location, numel)`` naming the raw little-endian bytes in ``<prefix>/data/<key>``, rebuilt by
  ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)``. The pickle is read by a
  restricted unpickler that resolves only that function, ``collections.OrderedDict`` and the
  ``torch.*Storage`` types; any other global (a model class, an ``argparse.Namespace`` of training
  arguments, an optimizer) is refused with its name, since unpickling it would run arbitrary code.
  Plain containers (dict, list, tuple, numbers, strings) need no global and are read as they are.
* ``.safetensors`` (https://github.com/huggingface/safetensors, "Format"): an 8-byte little-endian
  header length N, N bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, ...,
  "__metadata__": {...}}``, then the raw little-endian bytes, offsets relative to the byte after the
  header. Parsed here (no ``safetensors`` package at run time; the tests write files with it).
* PyTorch's legacy format (before 1.6, not a zip) and TorchScript archives are refused with how to
  re-save the file.
"""

from __future__ import annotations

import collections
import json
import os
import pickle
import struct
import zipfile
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from alite_jax.errors import UserError

WRAPPER_KEYS = ("state_dict", "model")
DATA_PARALLEL_PREFIX = "module."

# torch.<Name>Storage -> numpy dtype (torch/storage.py's typed storages; UntypedStorage holds bytes).
TORCH_STORAGES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "UntypedStorage": np.uint8,
}
# The safetensors format's dtype names (its README, "Format").
SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32,
    "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_, "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
}
RESAVE = ("load it in PyTorch and save the weights alone: torch.save(model.state_dict(), 'weights.pth') "
          "(or safetensors.torch.save_file(model.state_dict(), 'weights.safetensors'))")


class CheckpointError(UserError, ValueError):
    """A checkpoint file that cannot be read, or whose contents do not fit the architecture."""


# --------------------------------------------------------------------------------------------------
# torch.save's zip format.
# --------------------------------------------------------------------------------------------------


def _decode(raw: bytes, dtype: np.dtype, count: int, little_endian: bool = True, offset: int = 0
            ) -> np.ndarray:
    """``count`` elements of ``dtype`` from ``raw`` (little- or big-endian) as a native-order array that
    owns its memory (bfloat16 and float8 included: the bytes are swapped as unsigned integers)."""
    words = np.frombuffer(raw, np.dtype(f"{'<' if little_endian else '>'}u{dtype.itemsize}"), count=count,
                          offset=offset)
    return words.astype(np.dtype(f"=u{dtype.itemsize}")).view(dtype)


class _StorageType:
    """What the unpickler gives for ``torch.<Name>Storage``: the storage's element dtype."""

    def __init__(self, name: str):
        self.name, self.dtype = name, np.dtype(TORCH_STORAGES[name])


def _rebuild_tensor_v2(storage: np.ndarray, storage_offset: int, size: tuple, stride: tuple,
                       requires_grad: bool = False, backward_hooks: Any = None, metadata: Any = None
                       ) -> np.ndarray:
    """torch._utils._rebuild_tensor_v2 without torch: a copy of the strided view of ``storage``."""
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(size) != len(stride) or storage_offset < 0 or any(s < 0 for s in size + stride):
        raise CheckpointError(f"a tensor of the checkpoint has an invalid layout (size {size}, stride "
                              f"{stride}, offset {storage_offset})")
    if 0 in size:
        return np.zeros(size, storage.dtype)
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.size:
        raise CheckpointError(f"a tensor of the checkpoint (size {size}, stride {stride}, offset "
                              f"{storage_offset}) reaches past its storage of {storage.size} elements: "
                              f"the file is truncated or damaged")
    view = np.lib.stride_tricks.as_strided(storage[storage_offset:], size,
                                           tuple(s * storage.itemsize for s in stride), writeable=False)
    return np.array(view)  # contiguous, owning its memory


class _TorchUnpickler(pickle.Unpickler):
    """Resolves only what a state_dict needs; reads storages from the archive by their key."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, byteorder: str, path: str):
        super().__init__(file)
        self.archive, self.prefix, self.byteorder, self.path = archive, prefix, byteorder, path
        self.storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in TORCH_STORAGES:
            return _StorageType(name)
        raise CheckpointError(
            f"{self.path} holds a {module}.{name} object, which this torch-free reader does not load (it "
            f"reads tensors, OrderedDicts and plain containers only, as unpickling other objects could "
            f"run any code): {RESAVE}")

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise CheckpointError(f"{self.path}: unknown persistent id {str(pid)[:80]} in data.pkl "
                                  f"(not a torch storage): {RESAVE}")
        _, storage_type, key, _location, numel = pid
        if key not in self.storages:
            try:
                raw = self.archive.read(f"{self.prefix}data/{key}")
            except KeyError:
                raise CheckpointError(f"{self.path} lacks the storage data/{key} that data.pkl refers to: "
                                      f"the file is truncated or damaged") from None
            dtype = storage_type.dtype
            if len(raw) < numel * dtype.itemsize:
                raise CheckpointError(f"{self.path}: storage data/{key} has {len(raw)} bytes, not the "
                                      f"{numel * dtype.itemsize} its {numel} elements need: the file is "
                                      f"truncated or damaged")
            self.storages[key] = _decode(raw, dtype, numel, self.byteorder == "little")
        return self.storages[key]


def read_torch_zip(path: str) -> Any:
    """The object ``torch.save`` wrote to ``path`` (zip format), tensors as numpy arrays, without torch."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if not pickles:
            script = any(n.endswith("constants.pkl") for n in names)
            what = "a TorchScript archive (torch.jit.save)" if script else "a zip archive without data.pkl"
            raise CheckpointError(f"{path} is {what}, not a torch.save checkpoint: {RESAVE}")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = "little"
        if f"{prefix}byteorder" in names:
            byteorder = archive.read(f"{prefix}byteorder").decode().strip()
        with archive.open(pickles[0]) as f:
            try:
                return _TorchUnpickler(f, archive, prefix, byteorder, path).load()
            except CheckpointError:
                raise
            except (pickle.UnpicklingError, EOFError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{path}: its data.pkl cannot be read ({type(e).__name__}: {e}); "
                                      f"{RESAVE}") from e


# --------------------------------------------------------------------------------------------------
# safetensors.
# --------------------------------------------------------------------------------------------------


def _data_begin(entry: tuple[str, Any]) -> int:
    try:
        return int(entry[1]["data_offsets"][0])
    except (KeyError, TypeError, ValueError, IndexError):
        return -1  # reported with its name below


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """The tensors of a ``.safetensors`` file, by name, as numpy arrays (copies)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is too short to be a safetensors file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise CheckpointError(f"{path} is not a safetensors file (its header length {header_len} "
                                  f"exceeds the file's {size} bytes)")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path} is not a safetensors file (its header is not JSON: {e})") from e
        data = f.read()
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file (its header is not a JSON object)")
    tensors = {}
    entries = [(name, info) for name, info in header.items() if name != "__metadata__"]
    # The header's key order is not the writer's (the format sorts it): read in the data's order.
    entries.sort(key=_data_begin)
    for name, info in entries:
        try:
            dtype = np.dtype(SAFETENSORS_DTYPES[info["dtype"]])
            shape = tuple(int(n) for n in info["shape"])
            begin, end = (int(n) for n in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has an unreadable or unsupported header entry "
                                  f"{str(info)[:120]} (dtypes: {sorted(SAFETENSORS_DTYPES)})") from None
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if not 0 <= begin <= end <= len(data) or end - begin != nbytes:
            raise CheckpointError(f"{path}: tensor {name!r} ({info['dtype']} {list(shape)}) has data_offsets "
                                  f"[{begin}, {end}], which do not hold its {nbytes} bytes within the "
                                  f"file's {len(data)} data bytes: the file is truncated or damaged")
        tensors[name] = _decode(data, dtype, nbytes // dtype.itemsize, offset=begin).reshape(shape)
    return tensors


# --------------------------------------------------------------------------------------------------
# Any checkpoint file -> a flat state_dict.
# --------------------------------------------------------------------------------------------------


def unwrap_state_dict(obj: Any, path: str = "the checkpoint") -> dict[str, np.ndarray]:
    """The flat ``{name: array}`` state_dict in what a checkpoint file held.

    A dict without arrays of its own that has a ``"state_dict"`` or ``"model"`` entry (a training script's
    checkpoint, ``{"epoch": ..., "model": ..., "optimizer": ...}``) is replaced by that entry, repeatedly;
    then a ``"module."`` prefix (``nn.DataParallel``) is stripped from every name that has it. Raises
    :class:`CheckpointError` when what remains is not a mapping of names to arrays.
    """
    while (isinstance(obj, Mapping) and not any(isinstance(v, np.ndarray) for v in obj.values())
           and any(isinstance(obj.get(k), Mapping) for k in WRAPPER_KEYS)):
        obj = next(obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping))
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state_dict (a mapping of names to "
                              f"tensors): {RESAVE}")
    state = {}
    for name, value in obj.items():
        if not isinstance(value, np.ndarray):
            keys = ", ".join(repr(k) for k in list(obj)[:8])
            raise CheckpointError(
                f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor, so this is not a flat "
                f"state_dict (its keys: {keys}{', ...' if len(obj) > 8 else ''}); a state_dict wrapped under "
                f"{' or '.join(repr(k) for k in WRAPPER_KEYS)} is found, others are not: {RESAVE}")
        name = str(name)
        state[name[len(DATA_PARALLEL_PREFIX):] if name.startswith(DATA_PARALLEL_PREFIX) else name] = value
    if len(state) != len(obj):
        raise CheckpointError(f"{path} has names that differ only by the {DATA_PARALLEL_PREFIX!r} prefix: "
                              f"{RESAVE}")
    return state


def file_format(path: str) -> str:
    """``"torch"`` (torch.save's zip format) or ``"safetensors"``, by the file's contents (not its name);
    raises :class:`CheckpointError` for a legacy torch file or anything else."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint file at {path!r}: give the path of a .pth/.pt file written by "
                              f"torch.save or of a .safetensors file")
    if zipfile.is_zipfile(path):
        return "torch"
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:2] == b"\x80\x02" or head[:1] == b"\x80" and path.endswith((".pth", ".pt", ".bin", ".tar")):
        raise CheckpointError(
            f"{path} is in PyTorch's legacy serialization format (before PyTorch 1.6, not a zip archive), "
            f"which this reader does not read: re-save it with torch.save in a recent PyTorch "
            f"(torch.save(torch.load(path, weights_only=True), 'weights.pth')), or as safetensors")
    if len(head) >= 9 and struct.unpack("<Q", head[:8])[0] < os.path.getsize(path) and head[8:9] == b"{":
        return "safetensors"
    raise CheckpointError(f"{path} is neither a torch.save checkpoint (zip format) nor a safetensors file")


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """The flat state_dict of a ``torch.save`` (zip format) or ``.safetensors`` file: names as PyTorch
    wrote them (unwrapped and without a ``"module."`` prefix, :func:`unwrap_state_dict`), numpy arrays in
    the file's dtypes. Raises :class:`CheckpointError` (a user error) for a file it cannot read."""
    if file_format(path) == "torch":
        return unwrap_state_dict(read_torch_zip(path), path)
    return unwrap_state_dict(read_safetensors(path), path)
