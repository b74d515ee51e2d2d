"""tensorlift: load safetensors checkpoints into GPU or host memory at the speed of the hardware.

A drop-in for ``safetensors``' ``safe_open`` and ``load_file`` that also reads folders and
indexes, yields tensors as they land (``iter_tensors``), reads slices without the rest of
the tensor, and hands tensors over without a copy: numpy and torch take them through
DLPack, on the host and on CUDA devices. Loading runs with the GIL released; Ctrl-C
interrupts it and frees everything.
"""

from ._tensorlift import (
    Checkpoint as _Checkpoint,
    Tensor,
    TensorIterator,
    __version__,
    _live_host_arenas,
    inspect,
    load,
    release_host_memory,
    resolve_device,
    retained_host_memory,
    reuse_host_memory,
)
from ._tensorlift import iter_tensors as _iter_tensors

__all__ = [
    "Tensor",
    "TensorIterator",
    "__version__",
    "inspect",
    "iter_tensors",
    "load",
    "load_file",
    "release_host_memory",
    "resolve_device",
    "retained_host_memory",
    "reuse_host_memory",
    "safe_open",
]

# Dtypes numpy has no type for, and the ml_dtypes type (and numpy storage) that holds them.
_ML_DTYPES = {
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
}
# numpy types of the dtypes it has.
_NUMPY = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "U16": "uint16",
    "I16": "int16",
    "U32": "uint32",
    "I32": "int32",
    "U64": "uint64",
    "I64": "int64",
    "F16": "float16",
    "F32": "float32",
    "F64": "float64",
    "C64": "complex64",
}
# torch dtypes reached by reinterpreting raw bytes (DLPack consumers may not know float8).
_TORCH_RAW = {
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
}


def _numpy_dtype(dtype):
    import numpy

    if dtype in _NUMPY:
        return numpy.dtype(_NUMPY[dtype])
    if dtype in _ML_DTYPES:
        try:
            import ml_dtypes
        except ImportError:
            raise TypeError(
                f"numpy has no {dtype} type: install ml_dtypes (pip install ml-dtypes) to get {dtype} arrays, "
                "or use framework='pt'"
            ) from None
        return numpy.dtype(getattr(ml_dtypes, _ML_DTYPES[dtype]))
    raise TypeError(f"numpy has no type for {dtype} (a sub-byte type): use framework=None for raw tensors")


def _to_numpy(t):
    import numpy

    if t.device != "cpu":
        raise ValueError(f"tensor '{t.name}' is on {t.device}: numpy arrays live in host memory (use framework='pt')")
    if t.dtype in _NUMPY:
        return numpy.from_dlpack(t)
    dtype = _numpy_dtype(t.dtype)
    return numpy.from_dlpack(t.raw_bytes()).view(dtype).reshape(t.shape)


def _to_torch(t):
    import torch

    if t.dtype in _TORCH_RAW:
        raw = torch.from_dlpack(t.raw_bytes())
        return raw.view(getattr(torch, _TORCH_RAW[t.dtype])).reshape(t.shape)
    return torch.from_dlpack(t)


def _convert(t, framework):
    if framework is None:
        return t
    if framework in ("np", "numpy"):
        return _to_numpy(t)
    if framework in ("pt", "torch"):
        return _to_torch(t)
    raise ValueError(f"unknown framework {framework!r} (expected 'pt', 'np' or None)")


def _check_framework(framework):
    if framework not in (None, "np", "numpy", "pt", "torch"):
        raise ValueError(f"unknown framework {framework!r} (expected 'pt', 'np' or None)")


def load_file(path, device="cpu", framework="pt", *, dtype=None, tp=None, stats=None):
    """Loads every tensor of ``path`` (a ``.safetensors`` file, an index, or a folder).

    A drop-in for ``safetensors.torch.load_file`` (``framework="pt"``) and
    ``safetensors.numpy.load_file`` (``framework="np"``): returns a dict of name to tensor,
    viewing the loaded memory without a copy. ``framework=None`` returns tensorlift
    ``Tensor`` objects, which any DLPack consumer takes. ``device``: ``"cpu"``,
    ``"cuda"``, ``"cuda:N"`` or ``"auto"``.

    ``dtype``: convert floating-point tensors to ``"bfloat16"``, ``"float16"`` or
    ``"float32"`` (or the torch dtype) as they land. ``tp=(rank, world_size,
    num_key_value_heads)``: load only that tensor-parallel rank's part of each tensor, split
    as vLLM splits a Llama-family model (only the bytes it needs are read).

    ``stats``: a dict, filled with the load's statistics once it completes: ``seconds``,
    ``gbps``, ``bytes``, ``bytes_read``, ``first_read_seconds``, ``planned_seconds``,
    ``device``, ``io`` and the other keys of ``tensorlift load --json``.
    """
    _check_framework(framework)
    tensors = load(str(path), device=_device(device), dtype=_dtype(dtype), tp=tp, stats=stats)
    return {name: _convert(t, framework) for name, t in tensors.items()}


def iter_tensors(
    path, device="cpu", framework="pt", filter=None, progress=None, *, dtype=None, tp=None, stats=None
):
    """Yields ``(name, tensor)`` as each tensor lands, the shape of a serving engine's
    weights iterator. ``filter``: names or globs; ``progress(done, total)``: bytes landed;
    ``dtype``, ``tp`` and ``stats`` as for ``load_file`` (``stats`` is filled once the last
    tensor has come; a load stopped early or failed leaves it as it was).

    Stopping early (``break``) cancels the rest of the load.
    """
    _check_framework(framework)
    it = _iter_tensors(
        str(path), device=_device(device), filter=filter, progress=progress, dtype=_dtype(dtype), tp=tp, stats=stats
    )
    try:
        for name, t in it:
            yield name, _convert(t, framework)
    finally:
        it.close()


def _dtype(dtype):
    # torch dtypes print as "torch.bfloat16"; the native side takes the name.
    return None if dtype is None else str(dtype)


def _device(device):
    # An ordinal means a CUDA device, as in torch; torch.device objects print as "cuda:0".
    if isinstance(device, int) and not isinstance(device, bool):
        return f"cuda:{device}"
    return str(device)


class _Slice:
    """A tensor's slice that reads only what it needs, as ``safe_open(...).get_slice``."""

    def __init__(self, ckpt, name, framework):
        self._ckpt, self._name, self._framework = ckpt, name, framework
        self._dtype, shape, self._nbytes = ckpt.info(name)
        self._shape = list(shape)

    def get_shape(self):
        return list(self._shape)

    def get_dtype(self):
        return self._dtype

    def __getitem__(self, key):
        import numpy

        if not isinstance(key, tuple):
            key = (key,)
        if any(k is Ellipsis for k in key):
            i = key.index(Ellipsis)
            key = key[:i] + (slice(None),) * (len(self._shape) - len(key) + 1) + key[i + 1 :]
        if len(key) > len(self._shape):
            raise IndexError(f"too many indices for a tensor of {len(self._shape)} dimensions")
        if not self._shape:
            return self._finish(numpy.frombuffer(self._read(0, self._nbytes), dtype=self._np_dtype()).reshape(()), key)
        # Only the rows of the first dimension that the key touches are read.
        rows = self._shape[0]
        first = key[0] if key else slice(None)
        if isinstance(first, slice):
            start, stop, step = first.indices(rows)
            picked = range(start, stop, step)
            lo, hi = (min(picked), max(picked) + 1) if len(picked) else (0, 0)
            rel = slice(start - lo, (stop - lo) if stop - lo >= 0 else None, step) if len(picked) else slice(0, 0)
        else:
            i = int(first)
            if i < 0:
                i += rows
            if not 0 <= i < rows:
                raise IndexError(f"index {int(first)} is out of bounds for dimension 0 of size {rows}")
            lo, hi, rel = i, i + 1, 0
        row_bytes = self._nbytes // rows if rows else 0
        data = self._read(lo * row_bytes, (hi - lo) * row_bytes)
        arr = numpy.frombuffer(data, dtype=self._np_dtype()).reshape([hi - lo] + self._shape[1:])
        return self._finish(arr, (rel,) + tuple(key[1:]))

    def _np_dtype(self):
        import numpy

        if self._framework in ("pt", "torch") and self._dtype in _ML_DTYPES:
            return numpy.dtype("uint8") if self._dtype.startswith("F8") else numpy.dtype("uint16")
        return _numpy_dtype(self._dtype)

    def _read(self, start, length):
        return self._ckpt.read_bytes(self._name, start, length) if length else b""

    def _finish(self, arr, key):
        import numpy

        # A copy of its own: writable, C-ordered, and of the shape numpy gives (a scalar for
        # an index in every dimension), as the reference returns.
        out = numpy.array(arr[key], order="C", copy=True)
        if self._framework in ("pt", "torch"):
            import torch

            if self._dtype == "BF16":
                return torch.from_numpy(out.view(numpy.int16)).view(torch.bfloat16)
            if self._dtype in _TORCH_RAW:
                return torch.from_numpy(out).view(getattr(torch, _TORCH_RAW[self._dtype]))
            return torch.from_numpy(out)
        return out


class safe_open:
    """Opens a checkpoint like ``safetensors.safe_open``: ``keys()``, ``get_tensor(name)``,
    ``get_slice(name)[...]``, ``metadata()``; also folders and indexes.

    ``with tensorlift.safe_open(path, framework="pt", device="cpu") as f: ...``
    """

    def __init__(self, filename, framework="pt", device="cpu"):
        _check_framework(framework)
        self._framework = framework
        self._ckpt = _Checkpoint(str(filename), device=_device(device))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._ckpt = None
        return False

    def _open(self):
        if self._ckpt is None:
            raise ValueError("the file is closed")
        return self._ckpt

    def keys(self):
        """Tensor names, sorted as the reference returns them."""
        return sorted(self._open().keys())

    def offset_keys(self):
        """Tensor names in the order of their data in the file."""
        return self._open().keys()

    def metadata(self):
        """``__metadata__`` (merged across shards), or ``None`` when there is none."""
        ckpt = self._open()
        return ckpt.metadata() if ckpt.has_metadata() else None

    def get_tensor(self, name):
        """Loads one tensor (only its bytes are read)."""
        t = self._open().load([name])[name]
        return _convert(t, self._framework)

    def get_slice(self, name):
        """A slice object: ``get_shape()``, ``get_dtype()``, and ``[...]`` indexing that reads
        only the rows of the first dimension it touches (host memory)."""
        return _Slice(self._open(), name, self._framework)
