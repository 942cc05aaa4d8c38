"""Read a PyTorch state dict file (`torch.save`, the zip format of torch >= 1.6) into numpy, without torch.

The released reward models keep their value head in `value_head.pt`. Such a file is a zip archive:
`<name>/data.pkl` pickles the dict, each tensor as a call to `torch._utils._rebuild_tensor_v2(storage,
offset, size, stride, ...)`, and each storage is a persistent id ('storage', dtype class, key, device,
numel) whose raw little-endian bytes are the member `<name>/data/<key>`. Only those names may appear in
the pickle (as `torch.load(weights_only=True)` allows): anything else is refused, so no code runs.
"""

from __future__ import annotations

import collections
import pathlib
import pickle
import zipfile

import ml_dtypes
import numpy as np

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


def load_state_dict(path) -> dict[str, np.ndarray]:
    """`{name: array}` of a `torch.save`d state dict."""
    path = pathlib.Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            pickles = [name for name in names if name.endswith("data.pkl")]
            if len(pickles) != 1:
                raise ValueError(f"expected one data.pkl member, found {len(pickles)}")
            [pickle_name] = pickles
            prefix = pickle_name[: -len("data.pkl")]
            if prefix + "byteorder" in names and archive.read(prefix + "byteorder") != b"little":
                raise ValueError("big-endian tensors are not supported")
            with archive.open(pickle_name) as file:
                state = _Unpickler(file, archive, prefix).load()
    except (zipfile.BadZipFile, pickle.UnpicklingError, ValueError, KeyError) as error:
        raise ValueError(f"{path}: not a readable torch.save state dict ({error})") from error
    if not isinstance(state, dict) or not all(isinstance(v, np.ndarray) for v in state.values()):
        raise ValueError(f"{path}: expected a dict of tensors")
    return dict(state)


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self._archive, self._prefix = archive, prefix

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return lambda tensor, requires_grad, backward_hooks: tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return np.dtype(_STORAGE_DTYPES[name])
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a state dict")

    def persistent_load(self, pid):
        kind, dtype, key, _device, numel = pid
        if kind != "storage" or not isinstance(dtype, np.dtype):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        return np.frombuffer(self._archive.read(f"{self._prefix}data/{key}"), dtype, count=numel)


def _rebuild_tensor(storage: np.ndarray, offset: int, size, stride, requires_grad=False, backward_hooks=None,
                    metadata=None) -> np.ndarray:
    """The tensor as a copy: a view of its storage with torch's strides (in elements)."""
    if len(size) and min(size) == 0:
        return np.zeros(size, storage.dtype)
    if offset + sum((n - 1) * s for n, s in zip(size, stride)) >= len(storage):
        raise pickle.UnpicklingError(f"tensor of size {tuple(size)} runs past its storage")
    view = np.lib.stride_tricks.as_strided(storage[offset:], tuple(size),
                                           tuple(s * storage.itemsize for s in stride), writeable=False)
    return view.copy()
