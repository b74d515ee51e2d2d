"""tensorlift: load safetensors checkpoints into GPU or host memory at the speed of the hardware.

A drop-in for ``safetensors``' ``safe_open`` and ``load_file`` that also reads folders and
indexes, yields tensors as they land (``iter_tensors``), reads slices without the rest of
the tensor, and hands tensors over without a copy: numpy and torch take them through
DLPack, on the host and on CUDA devices. Loading runs with the GIL released; Ctrl-C
interrupts it and frees everything.
"""

import operator
import os
import sys
import threading

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
from ._tensorlift import _set_error_classes
from ._tensorlift import is_remote as _is_remote
from ._tensorlift import iter_tensors as _iter_tensors
from ._tensorlift import load_devices as _load_devices
from . import _frameworks

__all__ = [
    "DeviceMemoryError",
    "SafetensorError",
    "Tensor",
    "TensorIterator",
    "__version__",
    "inspect",
    "is_remote",
    "iter_tensors",
    "load",
    "load_devices",
    "load_file",
    "load_group",
    "patch",
    "release_host_memory",
    "resolve_device",
    "retained_host_memory",
    "reuse_host_memory",
    "safe_open",
    "unpatch",
]

try:
    from safetensors import SafetensorError as _ReferenceError
except ImportError:  # the reference is not installed: an error class of the same name
    _ReferenceError = Exception


class SafetensorError(_ReferenceError):
    """What the reference raises as ``safetensors.SafetensorError`` (a subclass of it when
    ``safetensors`` is installed, so that code catching the reference's error catches
    tensorlift's)."""


class _InvalidFile(SafetensorError, ValueError):
    """A file that is not a valid checkpoint (its header, index or layout):
    ``SafetensorError`` as the reference raises (so that code falling back on it, as
    diffusers does, still does), and ``ValueError`` as tensorlift raised before."""


class DeviceMemoryError(RuntimeError):
    """The device has too little free memory for a load (``RuntimeError``, as before): a
    caller may read to the host instead."""


class _InvalidArgument(SafetensorError, ValueError):
    """An argument the reference refuses too (a device, a framework): ``SafetensorError`` as
    the reference raises, and ``ValueError`` as tensorlift raised before."""


class _ReadFailed(SafetensorError, OSError):
    """A file that cannot be read, or that changed during the load: ``OSError`` as tensorlift
    raised, and ``SafetensorError`` as the reference raises for a read that fails."""


_set_error_classes(_InvalidFile, DeviceMemoryError, _InvalidArgument, _ReadFailed)


class _NoTensor(SafetensorError, KeyError):
    """A tensor the file lacks: ``SafetensorError`` as the reference raises, and
    ``KeyError`` as a mapping would."""

    def __str__(self):
        return Exception.__str__(self)


class _Closed(SafetensorError, ValueError):
    """A ``safe_open`` used after it was closed."""


class _BadIndex(SafetensorError, IndexError):
    """A key a slice refuses (``framework="np"``): ``SafetensorError`` as the reference
    raises, and ``IndexError`` as numpy's indexing raises."""


class _BadIndexValue(SafetensorError, ValueError):
    """A key a slice refuses for a value numpy refuses (a step of 0): ``SafetensorError`` as
    the reference raises, and ``ValueError`` as numpy raises."""


class _IndexOverflow(SafetensorError, OverflowError):
    """An index past what an index can hold: ``SafetensorError`` as the reference raises,
    and ``OverflowError`` as numpy raises."""


def _as_reference_error(e):
    """``e``, a key's error from numpy's indexing, as an error that is also the reference's
    ``SafetensorError`` (the reference's slices raise only that with ``framework="np"``)."""
    for base, cls in ((IndexError, _BadIndex), (OverflowError, _IndexOverflow), (ValueError, _BadIndexValue)):
        if isinstance(e, base) and not isinstance(e, SafetensorError):
            return cls(*e.args)
    return None


# What ``backend=`` takes, as in the reference (safetensors 0.8): on the host, "mmap" serves
# torch tensors (and tensorlift's own) as views of the memory-mapped file (the reference's
# contract: the file must not shrink or change while they live), "pread" reads them into
# memory of their own; numpy and the other frameworks' arrays are memory of their own with
# either (with "mmap", copies out of the mapping made by the kernel), as the reference's are
# copies (a view would die of SIGBUS where the reference's copy lives on); on a GPU both read, and so do both for a remote checkpoint (s3://,
# gs://, az://, http(s)://), which has no file to map (see docs/PYTHON.md).
_BACKENDS = ("mmap", "pread")


def _check_backend(backend):
    if not isinstance(backend, str):
        raise TypeError(f"argument 'backend': '{type(backend).__name__}' object is not an instance of 'str'")
    if backend not in _BACKENDS:
        raise SafetensorError(f'backend "{backend}" is invalid (expected one of: "mmap", "pread")')

# Dtypes numpy has no type for, and the ml_dtypes type (and numpy storage) that holds them.
_ML_DTYPES = {
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
}
# Dtypes of six-bit values, packed four to three bytes (torch has no type for them; "F64" is
# not one).
_SIX_BIT = ("F6_E2M3", "F6_E3M2")
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


def _to_numpy(t, writable=False):
    """``t`` as a numpy array viewing its memory; ``writable`` for the arrays the reference's
    numpy reader hands out (copies of their own there), read-only otherwise."""
    import numpy

    if t.device != "cpu":
        raise ValueError(f"tensor '{t.name}' is on {t.device}: numpy arrays live in host memory (use framework='pt')")
    if t.dtype in _NUMPY:
        arr = numpy.from_dlpack(t._writable(False) if writable else t)
    else:
        dtype = _numpy_dtype(t.dtype)
        raw = t._writable(True) if writable else t.raw_bytes()
        arr = numpy.from_dlpack(raw).view(dtype).reshape(t.shape)
    if writable and not arr.flags.writeable and _numpy_takes_dlpack_read_only(numpy):
        # A copy of its own, writeable, as the reference's arrays are (also of tied weights,
        # which are read-only views of one memory where numpy takes DLPack as exported).
        arr = arr.copy()
    return arr


def _numpy_takes_dlpack_read_only(numpy):
    """Whether this numpy makes every array it takes by DLPack read-only (before 2.2.5)."""
    return numpy.lib.NumpyVersion(numpy.__version__) < "2.2.5"


def _to_torch(t):
    import torch

    if t.dtype == "F4":
        # As the reference: torch holds F4 values in pairs (float4_e2m1fn_x2), two a byte,
        # so the last dimension is halved.
        shape = list(t.shape)
        if not hasattr(torch, "float4_e2m1fn_x2"):
            raise TypeError(f"tensor '{t.name}' is F4: this torch has no float4_e2m1fn_x2 (torch 2.8 or later has)")
        if not shape or shape[-1] % 2:
            raise SafetensorError(
                f"f4_x2 dtype requires that the last dim be divisible by 2 in torch: got {shape} (tensor '{t.name}')"
            )
        shape[-1] //= 2
        return torch.from_dlpack(t.raw_bytes()).view(torch.float4_e2m1fn_x2).reshape(shape)
    if t.dtype in _TORCH_RAW:
        if not hasattr(torch, _TORCH_RAW[t.dtype]):
            raise SafetensorError(f"tensor '{t.name}' is {t.dtype}: this torch has no {_TORCH_RAW[t.dtype]}")
        raw = torch.from_dlpack(t.raw_bytes())
        return raw.view(getattr(torch, _TORCH_RAW[t.dtype])).reshape(t.shape)
    if t.dtype not in _NUMPY and t.dtype != "BF16":
        # As the reference (F6_E2M3, F6_E3M2: torch has no such type).
        raise SafetensorError(f"Dtype not understood: {t.dtype} (tensor '{t.name}'; framework=None gives it raw)")
    return torch.from_dlpack(t)


_TORCH_NAMES = ("pt", "torch", "pytorch")
_NUMPY_NAMES = ("np", "numpy")


# What ``framework=`` takes: the reference's names, and None for tensorlift's own tensors.
_FRAMEWORK_NAMES = _TORCH_NAMES + _NUMPY_NAMES + tuple(_frameworks.FRAMEWORKS)


def _copied_numpy(t):
    """``t`` as a numpy array of its own (writable), its bytes copied by the kernel: what the
    reference's numpy reader hands out of a mapped file (copies), which neither dies of
    SIGBUS when the file is cut short nor changes when it is rewritten."""
    import numpy

    if t.device != "cpu":
        raise ValueError(f"tensor '{t.name}' is on {t.device}: numpy arrays live in host memory (use framework='pt')")
    dtype = _numpy_dtype(t.dtype)
    return numpy.frombuffer(t._copy(), dtype=numpy.uint8).view(dtype).reshape(t.shape)


def _convert(t, framework, copy=False):
    """``t`` as ``framework`` has it; with ``copy`` (a tensor of a mapped file), numpy's and
    the other frameworks' arrays are copies of their own, as the reference's are (torch's
    tensors are views of the file there, as the reference's are)."""
    if framework is None:
        return t
    if copy and (framework in _NUMPY_NAMES or framework in _frameworks.FRAMEWORKS):
        arr = _copied_numpy(t)
        return arr if framework in _NUMPY_NAMES else _frameworks.from_numpy(arr, t.dtype, framework)
    if framework in _NUMPY_NAMES:
        return _to_numpy(t, writable=True)
    if framework in _TORCH_NAMES:
        return _to_torch(t)
    if framework in _frameworks.FRAMEWORKS:
        return _frameworks.convert(t, framework, _to_numpy)
    _check_framework(framework)


def _check_framework(framework, device="cpu"):
    if framework is not None and framework not in _FRAMEWORK_NAMES:
        names = ", ".join(repr(n) for n in _FRAMEWORK_NAMES)
        raise _InvalidArgument(f"unknown framework {framework!r} (expected one of {names}, or None)")
    if framework in _frameworks.FRAMEWORKS:
        _frameworks.check(framework, device, _InvalidArgument)
    if framework in _NUMPY_NAMES and str(device).split(":")[0] not in ("cpu", "auto"):
        # Before anything is loaded, with the reference's error (numpy arrays live in host
        # memory; "auto" is checked where its tensors land).
        shown = "cuda:0" if device == "cuda" else device
        raise _InvalidArgument(f"Device {shown} is not supported for framework numpy")


def load_file(
    filename, device="cpu", framework="pt", *, dtype=None, tp=None, stats=None, verify=None, cache_dir=None, backend="pread"
):
    """Loads every tensor of ``filename`` (a ``.safetensors`` file, an index, or a folder;
    named as the reference names it, so that callers passing it by keyword work).

    A drop-in for ``safetensors.torch.load_file`` (``framework="pt"``) and
    ``safetensors.numpy.load_file`` (``framework="np"``): returns a dict of name to tensor,
    viewing the loaded memory without a copy (numpy before 2.2.5 gets arrays of its own).
    ``framework=None`` returns tensorlift
    ``Tensor`` objects, which any DLPack consumer takes. ``device``: ``"cpu"``,
    ``"cuda"``, ``"cuda:N"`` or ``"auto"``.

    ``dtype``: convert floating-point tensors to ``"bfloat16"``, ``"float16"`` or
    ``"float32"`` (or the torch dtype) as they land, to the values torch's ``.to()`` gives
    (rounded to nearest, ties to even; a NaN stays a NaN of its sign, its payload's top bits
    kept, where torch's CPU conversion may give its own NaN). ``tp=(rank, world_size,
    num_key_value_heads)``: load only that tensor-parallel rank's part of each tensor, split
    as vLLM splits a Llama-family model (only the bytes it needs are read).

    ``stats``: a dict, filled with the load's statistics once it completes: ``seconds``,
    ``gbps``, ``bytes``, ``bytes_read``, ``first_read_seconds``, ``planned_seconds``,
    ``device``, ``io``, ``verified_bytes`` and the other keys of ``tensorlift load --json``.

    ``verify``: ``True`` (or ``"required"``) checks each shard's SHA-256 as it is read
    against the hub cache blob it is or its line in ``SHA256SUMS`` beside it (``tensorlift
    manifest`` writes one), and the index where ``SHA256SUMS`` lists it or a hub cache
    names its blob (by git's SHA-1), and fails (``ValueError``) on a mismatch or a shard with
    no expected digest; ``"if-known"`` checks the shards that have one. With ``filter``
    (``iter_tensors``), only the shards that hold a matching tensor (and any with no tensor
    at all) are read, whole, and need a digest. On the host or a CUDA device (each pinned
    chunk is hashed before its copy); not with ``tp`` (it reads parts of shards).

    ``cache_dir``: for a remote ``filename`` (``s3://``, ``gs://``, ``az://``, ``http(s)://``), a
    folder where it is copied as it is read; the next load reads that copy once the store
    says the objects are unchanged (default: ``TENSORLIFT_REMOTE_CACHE``, else no copy).

    ``backend``: as the reference's, ``"pread"`` (the default here) reads the tensors into
    memory of their own; ``"mmap"`` serves torch tensors (and ``framework=None``'s) as views
    of the memory-mapped files (on the host, of local files, with none of ``dtype``, ``tp``,
    ``stats``, ``verify``; elsewhere it reads), under the reference's contract for such
    views: the files must not be truncated or written while the tensors live. Arrays of the
    other frameworks are memory of their own with either, as the reference's are copies.

    A device tensorlift does not load to (an XPU, MPS, ...; ``"cuda"`` on a ROCm build of
    torch) is the reference's, with torch and none of tensorlift's own options, as under
    ``patch()``.
    """
    plain = dtype is None and tp is None and stats is None and verify is None
    route = _reference_route(filename, framework, device, backend=backend) if plain and cache_dir is None else None
    if route is not None:
        # What the reference's load_file does with its safe_open.
        with route() as f:
            return f.get_tensors()
    _check_framework(framework, _device(device))
    _check_backend(backend)
    if backend == "mmap" and plain and _device(device) == "cpu" and not _is_remote(_path(filename)):
        with safe_open(filename, framework=framework, device="cpu", backend="mmap") as f:
            return f.get_tensors()
    tensors = load(
        _path(filename),
        device=_device(device),
        dtype=_dtype(dtype),
        tp=tp,
        stats=stats,
        verify=_verify(verify),
        cache_dir=None if cache_dir is None else _path(cache_dir),
    )
    return {name: _convert(t, framework) for name, t in tensors.items()}


def load_devices(path, devices, framework="pt", *, dtype=None, tp=None, stats=None, cache_dir=None):
    """Loads every tensor of ``path`` onto each CUDA device of ``devices`` (``"cuda:N"``,
    ``torch.device`` or an ordinal, each once), reading each byte of the checkpoint once:
    one pinned chunk is copied to every device that needs part of it. Returns a list of
    dicts of name to tensor, one a device, in the order of ``devices``.

    ``tp=num_key_value_heads``: device ``i`` gets tensor-parallel rank ``i`` of
    ``len(devices)``'s part of each tensor, split as vLLM splits a Llama-family model (as
    ``load_file``'s ``tp`` does for one rank); without it each device gets every tensor
    whole. ``framework``, ``dtype``, ``stats`` and ``cache_dir`` as for ``load_file``
    (``stats["bytes"]`` and ``stats["tensors_loaded"]`` count every device's,
    ``stats["devices"]`` names them, ``stats["bytes_read"]`` is the bytes read once for all).
    An empty ``devices`` is a ``ValueError``.
    """
    devices = [_device(d) for d in devices]
    for d in devices:
        _check_framework(framework, d)
    models = _load_devices(
        _path(path),
        devices,
        dtype=_dtype(dtype),
        tp=tp,
        stats=stats,
        cache_dir=None if cache_dir is None else _path(cache_dir),
    )
    return [{name: _convert(t, framework) for name, t in m.items()} for m in models]


def load_group(path, group=None, device="cpu", *, tp=None, stats=None):
    """Loads ``path`` across the ranks of a ``torch.distributed`` process group (default:
    the world), reading each byte of the checkpoint once on the whole group: each rank reads
    a disjoint part (about ``1/world`` of the bytes, cut at row boundaries) onto
    ``device`` (its own GPU with NCCL, ``"cpu"`` with gloo), and sends every other rank only
    that rank's slice of each tensor. Call it on every rank of the group; returns a dict of
    name to torch tensor, this rank's part.

    ``tp=num_key_value_heads``: rank ``r`` of the group gets tensor-parallel rank ``r``'s
    part of each tensor, split as ``load_file``'s ``tp`` splits a Llama-family model;
    without it every rank gets every tensor whole. ``device``: ``"cpu"`` or ``"cuda:N"``
    (``"cuda"``: torch's current device); a NCCL group needs a GPU. ``stats``: a dict, filled
    with what this rank read (``bytes_read``) and exchanged: ``bytes_sent``,
    ``bytes_received``, and ``sent_to`` / ``received_from`` (global rank to bytes).

    The load goes in rounds of about ``world`` x 256 MiB of the checkpoint, every rank
    reading about ``1/world`` of each (a large tensor in blocks of rows), so that a rank
    holds at most two rounds' pieces (about 512 MiB; more where one tensor is larger than
    ``world`` x 256 MiB: two of its ``1/world`` blocks) beside the tensors it keeps. A rank that fails (a read, memory)
    raises its error and the others raise too, naming it, rather than wait.
    """
    from ._group import load_group as _load_group

    return _load_group(_Checkpoint, _to_torch, path, group, _device(device), tp, stats)


def iter_tensors(
    path,
    device="cpu",
    framework="pt",
    filter=None,
    progress=None,
    *,
    dtype=None,
    tp=None,
    stats=None,
    verify=None,
    cache_dir=None,
):
    """Yields ``(name, tensor)`` as each tensor lands, the shape of a serving engine's
    weights iterator. ``filter``: names or globs; ``progress(done, total)``: bytes landed;
    ``dtype``, ``tp``, ``stats``, ``verify`` and ``cache_dir`` as for ``load_file`` (``stats`` is filled once the last
    tensor has come; a load stopped early or failed leaves it as it was).

    Stopping early (``break``) cancels the rest of the load.
    """
    _check_framework(framework, _device(device))
    it = _iter_tensors(
        _path(path),
        device=_device(device),
        filter=filter,
        progress=progress,
        dtype=_dtype(dtype),
        tp=tp,
        stats=stats,
        verify=_verify(verify),
        cache_dir=None if cache_dir is None else _path(cache_dir),
    )
    try:
        for name, t in it:
            yield name, _convert(t, framework)
    finally:
        it.close()


def is_remote(path):
    """Whether ``path`` (a ``str``, or a path-like object) names a remote checkpoint:
    ``s3://``, ``gs://``, ``az://``, ``http(s)://`` and the other schemes tensorlift reads by
    ranged GETs. (Give URLs as ``str``: ``pathlib.Path("s3://b/x")`` becomes ``s3:/b/x``,
    a local path.)"""
    return _is_remote(_path(path))


def _verify(verify):
    # True and False as switches; the policies by name.
    if verify is None or verify is False:
        return None
    if verify is True:
        return "required"
    return str(verify)


def _dtype(dtype):
    # torch dtypes print as "torch.bfloat16"; the native side takes the name.
    return None if dtype is None else str(dtype)


def _device(device):
    # An ordinal means a CUDA device, as in torch; torch.device objects print as "cuda:0";
    # None is the host, as the reference takes it.
    if device is None:
        return "cpu"
    if isinstance(device, int) and not isinstance(device, bool):
        return f"cuda:{device}"
    return str(device)


def _path(path):
    """A path (``str``, ``bytes`` or ``os.PathLike``) or URL as text: what ``os.fspath``
    gives, as the reference opens it, not what ``str()`` of the object says."""
    return os.fsdecode(os.fspath(path))


def _slice_bound(b):
    if b is None:
        return None
    try:
        return operator.index(b)
    except TypeError:
        raise TypeError("slice indices must be integers or None or have an __index__ method") from None


def _int_index(k, torch_mode):
    """``k`` as an int index, or None where it is none (or, with torch, where torch takes it
    as something else: a bool or a uint8 tensor is a mask there)."""
    import numpy

    if not torch_mode:
        # What the reference takes as an int (and numpy too): whatever has ``__index__``. A
        # ``True`` is 1 there, as in the reference (numpy would take it for a mask).
        try:
            return operator.index(k)
        except TypeError:
            return None
    if isinstance(k, bool):
        return None
    if isinstance(k, (int, numpy.integer)):
        return int(k)
    if getattr(k, "ndim", None) == 0 and str(getattr(k, "dtype", "")) in _INT_INDEX_DTYPES:
        return operator.index(k)
    return None


# 0-d arrays and tensors that torch indexing takes as an int.
_INT_INDEX_DTYPES = ("int32", "int64", "torch.int32", "torch.int64")


def _basic_key(key, torch_mode):
    """The key as a tuple of ints, slices of ints, None and at most one Ellipsis. With torch,
    None for a key that only torch indexing takes (lists, arrays, masks, two ellipses);
    otherwise such a key is refused, with numpy's exception type (IndexError)."""
    if not torch_mode and type(key) is list and not key:
        return (slice(0, 0),)  # the reference takes ``[]`` for an empty slice of dimension 0, as numpy does
    entries = []
    ellipsis = False
    for k in key if isinstance(key, tuple) else (key,):
        if k is None:
            entries.append(None)
        elif k is Ellipsis:
            if ellipsis:
                if torch_mode:
                    return None
                raise IndexError("an index can only have a single ellipsis ('...')")
            ellipsis = True
            entries.append(Ellipsis)
        elif isinstance(k, slice):
            entries.append(slice(_slice_bound(k.start), _slice_bound(k.stop), _slice_bound(k.step)))
        else:
            i = _int_index(k, torch_mode)
            if i is None:
                if torch_mode:
                    return None
                raise IndexError(
                    f"only integers, slices (`:`), ellipsis (`...`) and None (`numpy.newaxis`) are valid "
                    f"indices of a slice (got {type(k).__name__})"
                )
            entries.append(i)
    return tuple(entries)


def _reference_takes(entries, shape):
    """Whether the reference (``framework="np"``) takes the key ``entries``: no None, ints of
    32 bits within their dimension, slices of non-negative bounds within their dimension
    (a start below the size) and a positive step."""
    if any(k is None for k in entries):
        return False
    taken = sum(1 for k in entries if k is not Ellipsis)
    if taken > len(shape):
        return False
    full = []
    for k in entries:
        full.extend([slice(None)] * (len(shape) - taken) if k is Ellipsis else [k])
    for k, n in zip(full, shape):
        if isinstance(k, slice):
            start = 0 if k.start is None else k.start
            stop = n if k.stop is None else k.stop
            if k.step is not None and k.step <= 0 or not 0 <= start < n or not start <= stop <= n:
                return False
        elif not (-n <= k < n and -(2**31) <= k < 2**31):
            return False
    return True


class _Slice:
    """A tensor's slice that reads only what it needs, as ``safe_open(...).get_slice``.

    A key answers as numpy's indexing of the whole tensor (negative steps included) and as the
    reference where the reference takes it; with ``framework="pt"``, a key that only torch
    indexing takes (lists, arrays, masks) is applied by torch to the whole tensor, as the
    reference does."""

    def __init__(self, ckpt, name, framework, device="cpu", owner=None):
        self._ckpt, self._name, self._framework, self._device = ckpt, name, framework, device
        self._owner = owner
        self._dtype, shape, self._nbytes = ckpt.info(name)
        self._shape = list(shape)

    def get_shape(self):
        return list(self._shape)

    def get_dtype(self):
        return self._dtype

    def __getitem__(self, key):
        # The whole tensor (``[...]``, ``[:]``, what transformers asks of every weight): one
        # load of its bytes into memory of its own, on the device, handed over without a copy.
        # (torch only: numpy's reference answer is an array of its own, writable.)
        whole = key if isinstance(key, tuple) else (key,)
        if self._framework in _TORCH_NAMES and all(k is Ellipsis or (isinstance(k, slice) and k == slice(None)) for k in whole) and (
            sum(k is Ellipsis for k in whole) <= 1 and len(whole) - (Ellipsis in whole) <= len(self._shape)
        ):
            t = self._owner._take_whole(self._name) if self._owner is not None else None
            if t is None:
                t = self._ckpt.load([self._name])[self._name]
            return _convert(t, self._framework)
        try:
            out = self._index(key)
        except (IndexError, OverflowError, ValueError) as e:
            as_reference = None if self._framework in _TORCH_NAMES else _as_reference_error(e)
            if as_reference is None:
                raise
            raise as_reference from None
        # As the reference: a slice is cut on the host and moved to the file's device (the
        # one the handle resolved "cuda" or "auto" to).
        if self._device != "cpu" and self._framework in _TORCH_NAMES:
            device = self._ckpt.device()[0]
            if device != "cpu":
                out = out.to(device)
        return out

    def _index(self, key):
        import numpy

        torch_mode = self._framework in _TORCH_NAMES
        entries = _basic_key(key, torch_mode)
        if entries is None:
            return self._whole_in_torch(key)
        # The key's errors (and, with torch, its shape) from stand-ins of the tensor's shape that
        # hold no memory: numpy's errors, or torch's with framework="pt" (as the reference's),
        # except for negative steps, which torch refuses and numpy takes.
        torch_shape = None
        if torch_mode and not any(isinstance(k, slice) and k.step is not None and k.step < 0 for k in entries):
            import torch

            torch_shape = tuple(torch.zeros((), dtype=torch.bool).expand(self._shape)[key].shape)
        try:
            numpy_shape = numpy.broadcast_to(numpy.zeros((), dtype=numpy.bool_), self._shape)[entries].shape
        except Exception:
            if torch_shape is None:
                raise
            return self._whole_in_torch(key)
        if torch_shape is not None and torch_shape != numpy_shape:
            return self._whole_in_torch(key)  # torch answers otherwise (an overflow): the reference's answer
        if not torch_mode and any(type(k) is bool for k in (key if isinstance(key, tuple) else (key,))):
            # The reference takes True and False for 1 and 0 (numpy for masks): as it does, where it
            # takes the key at all; elsewhere neither answer is right, and the key is refused.
            if not _reference_takes(entries, self._shape):
                raise IndexError("a bool is an index of a slice only where the reference takes it (for 1 or 0)")
        # The ellipsis stands for the dimensions the other entries leave (None takes none).
        taken = sum(1 for k in entries if k is not None and k is not Ellipsis)
        for i, k in enumerate(entries):
            if k is Ellipsis:
                entries = entries[:i] + (slice(None),) * (len(self._shape) - taken) + entries[i + 1 :]
                break
        if not self._shape:
            return self._finish(self._rows(0, 1), entries)
        # Only the rows of dimension 0 that the key touches are read; the entry for dimension 0
        # (the first that is not None) is rewritten relative to them.
        rows = self._shape[0]
        lo, hi = 0, rows
        for i, k in enumerate(entries):
            if k is None:
                continue
            if isinstance(k, slice):
                picked = range(*k.indices(rows))
                if not picked:
                    lo, hi, rel = 0, 0, slice(0, 0)
                elif picked.step > 0:
                    lo, hi = picked[0], picked[-1] + 1
                    rel = slice(0, hi - lo, picked.step)
                else:
                    lo, hi = picked[-1], picked[0] + 1
                    rel = slice(hi - lo - 1, None, picked.step)
            else:
                lo = k + rows if k < 0 else k
                hi, rel = lo + 1, 0
            entries = entries[:i] + (rel,) + entries[i + 1 :]
            break
        return self._finish(self._rows(lo, hi), entries)

    def _np_dtype(self):
        import numpy

        if self._framework in _TORCH_NAMES and self._dtype == "F4":
            raise SafetensorError(
                f"tensor '{self._name}' is F4, its values packed two a byte: it is read whole "
                "([:] or [...] of get_slice, or get_tensor), not sliced"
            )
        if self._framework in _TORCH_NAMES and self._dtype in _SIX_BIT:
            raise SafetensorError(f"Dtype not understood: {self._dtype} (tensor '{self._name}')")
        if self._framework in _TORCH_NAMES and self._dtype in _ML_DTYPES:
            return numpy.dtype("uint8") if self._dtype.startswith("F8") else numpy.dtype("uint16")
        return _numpy_dtype(self._dtype)

    def _read(self, start, length):
        return self._ckpt.read_bytes(self._name, start, length) if length else b""

    def _rows(self, lo, hi):
        """Rows ``lo..hi`` of dimension 0 (all of a 0-d tensor), read, as a read-only array."""
        import numpy

        if not self._shape:
            data, shape = self._read(0, self._nbytes), []
        else:
            rows = self._shape[0]
            row_bytes = self._nbytes // rows if rows else 0
            data, shape = self._read(lo * row_bytes, (hi - lo) * row_bytes), [hi - lo] + self._shape[1:]
        return numpy.frombuffer(data, dtype=self._np_dtype()).reshape(shape)

    def _whole_in_torch(self, key):
        # The reference indexes the whole tensor with torch: so does this (in the storage dtype,
        # which torch indexes for every dtype, then viewed as the tensor's).
        import numpy
        import torch

        whole = numpy.array(self._rows(0, self._shape[0] if self._shape else 1), copy=True)
        if self._dtype == "BF16":
            whole = whole.view(numpy.int16)
        return self._torch_view(torch.from_numpy(whole)[key].contiguous())

    def _torch_view(self, t):
        import torch

        if t.numel() == 0:
            # numpy gives an empty copy strides of 0, which torch keeps (and .contiguous()
            # too), and then cannot view as a dtype of another width: the reference's
            # has torch's C layout.
            t = torch.empty(t.shape, dtype=t.dtype)
        if self._dtype == "BF16":
            return t.view(torch.bfloat16)
        if self._dtype in _TORCH_RAW:
            return t.view(getattr(torch, _TORCH_RAW[self._dtype]))
        return t

    def _finish(self, arr, key):
        import numpy

        # A copy of its own: writable, C-ordered, and of the shape numpy gives (a scalar for
        # an index in every dimension), as the reference returns. Bools are indexed as their
        # bytes: a numpy bool scalar would make a stored 2 or 255 a 1 (the reference keeps
        # the byte).
        if arr.dtype == numpy.bool_:
            out = numpy.array(arr.view(numpy.uint8)[key], order="C", copy=True).view(numpy.bool_)
        else:
            out = numpy.array(arr[key], order="C", copy=True)
        if self._framework in _TORCH_NAMES:
            import torch

            if self._dtype == "BF16":
                out = out.view(numpy.int16)
            return self._torch_view(torch.from_numpy(out))
        if self._framework in _frameworks.FRAMEWORKS:
            return _frameworks.from_numpy(out, self._dtype, self._framework)
        return out


class safe_open:
    """Opens a checkpoint like ``safetensors.safe_open``: ``keys()``, ``get_tensor(name)``,
    ``get_slice(name)[...]``, ``metadata()``; also folders and indexes.

    ``with tensorlift.safe_open(path, framework="pt", device="cpu") as f: ...``

    A device tensorlift does not load to (an XPU, MPS, ...; ``"cuda"`` on a ROCm build of
    torch), with torch, gets the reference's handle, as under ``patch()``.
    """

    def __new__(cls, *args, **kwargs):
        # (A subclass, and copy's argument-less call, are made as any object is.)
        if cls is safe_open and args:
            route = _reference_route(*args, **kwargs)
            if route is not None:
                return route()
        return super().__new__(cls)

    def __init__(self, filename, framework="pt", device="cpu", *, backend="pread"):
        _check_framework(framework, _device(device))
        _check_backend(backend)
        self._framework = framework
        device = _device(device)
        filename = _path(filename)
        self._mapped = backend == "mmap" and device == "cpu" and not is_remote(filename)
        self._ckpt = _Checkpoint(filename, device=device, mapped=self._mapped)
        # (Resolved at the first load: a device that cannot be used fails there, as the
        # reference's handles do, while names, shapes and metadata are read.)
        self._device = device
        self._names = None
        # Whole tensors loaded together for get_slice(name)[...] (see _take_whole).
        self._whole = None
        self._whole_lock = threading.Lock()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        with self._whole_lock:
            self._ckpt = None
            self._whole = None
        return False

    def _take_whole(self, name):
        """Tensor ``name``, whole, for ``get_tensor(name)`` and ``get_slice(name)[...]`` of a
        mapped file: the first such call maps every tensor of the file in one load (views cost no memory; a reader that
        asks one whole tensor of a file, as transformers does, asks them all), and each is
        handed out once from it. ``None`` where the file is not mapped (each tensor is then
        loaded alone, so that one does not hold the others' memory), once the file is
        closed, or once the tensor was handed out."""
        if not self._mapped:
            return None
        with self._whole_lock:
            if self._ckpt is None:
                return None
            if self._whole is None:
                try:
                    self._whole = dict(self._ckpt.load(self._ckpt.keys()))
                except Exception:
                    self._whole = {}  # each tensor alone, which reports the error
            return self._whole.pop(name, None)

    def _open(self):
        if self._ckpt is None:
            raise _Closed("File is closed")
        return self._ckpt

    def _has(self, name):
        if not isinstance(name, str):
            # The reference's error for a name that is not a str (an int, None, bytes).
            what = "'None'" if name is None else f"'{type(name).__name__}' object"
            raise TypeError(f"argument 'name': {what} is not an instance of 'str'")
        if self._names is None:
            self._names = frozenset(self._open().keys())
        if name not in self._names:
            raise _NoTensor(f"File does not contain tensor {name}")

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
        """Loads one tensor (only its bytes are read; of a mapped file, a view, the first
        taken from one mapping of every tensor, see ``_take_whole``, which numpy and the
        other frameworks get a copy of, as the reference's)."""
        ckpt = self._open()
        self._has(name)
        t = self._take_whole(name)
        if t is None:
            t = ckpt.load([name])[name]
        return _convert(t, self._framework, copy=self._mapped)

    def get_tensors(self):
        """Every tensor, in one load, as a dict in the order of their data in the file (what
        the reference's ``load_file`` returns)."""
        ckpt = self._open()
        names = ckpt.keys()
        tensors = ckpt.load(names)
        return {n: _convert(tensors[n], self._framework, copy=self._mapped) for n in names}

    def get_slice(self, name):
        """A slice object: ``get_shape()``, ``get_dtype()``, and ``[...]`` indexing that reads
        only the rows of the first dimension it touches (host memory). Keys: ints, slices (negative
        steps too), one ``...`` and ``None``, answered as numpy indexes the whole tensor; with
        ``framework="pt"`` also what torch indexing takes (lists, arrays, masks), applied to the
        whole tensor as the reference does."""
        ckpt = self._open()
        self._has(name)
        return _Slice(ckpt, name, self._framework, self._device, self)


# Where ``patch()`` put tensorlift's ``safe_open``: (namespace, attribute, what was there).
_PATCHED = []
# Devices tensorlift loads to, by the name's type; the reference's others (mps, npu, xpu,
# hpu, ...) go to the reference when patched.
_OWN_DEVICES = ("cpu", "cuda", "auto")


def _torch_on_rocm():
    """Whether the torch this process has imported is a ROCm build, whose ``"cuda"``
    devices are AMD GPUs (HIP)."""
    torch = sys.modules.get("torch")
    return bool(getattr(getattr(torch, "version", None), "hip", None))


# The devices the reference loads to besides the host and CUDA (safetensors 0.8's
# `Device`): given to tensorlift's own `safe_open` or `load_file`, they go to the reference;
# a name that is none of these is tensorlift's error.
_REFERENCE_DEVICES = ("mps", "npu", "xpu", "xla", "mlu", "musa", "hpu")


def _foreign_device(device):
    """Whether ``device`` is one the reference loads to and tensorlift does not: an XPU,
    MPS, ... (a ROCm build of torch's ``"cuda"`` is an AMD GPU)."""
    if device is None:
        return False
    name = _device_type(device)
    return name in _REFERENCE_DEVICES or (name == "cuda" and _torch_on_rocm())


def _reference_safe_open():
    """The reference's ``safe_open`` (as it was before ``patch()``), or ``None`` where
    safetensors is not installed (or its ``safe_open`` is tensorlift's, put there by hand)."""
    if _REFERENCE:
        return _REFERENCE[0]
    try:
        import safetensors
    except ImportError:
        return None
    reference = safetensors.safe_open
    return None if reference in (safe_open, _patched_safe_open) else reference


def _reference_route(filename, framework="pt", device="cpu", *, backend="pread"):
    """For ``safe_open(...)``'s arguments: a call that opens the reference's handle where
    the device is one the reference loads to and tensorlift does not, else ``None``."""
    if framework not in _TORCH_NAMES or not _foreign_device(device):
        return None
    reference = _reference_safe_open()
    if reference is None:
        return None
    _check_backend(backend)
    return lambda: reference(_path(filename), framework, device, backend=backend)


def _device_type(device):
    """The type of device ``device`` names, as the reference's ``safe_open`` has torch read
    it: an index alone is torch's current accelerator (CUDA where torch has it; an XPU or
    another on a host whose torch has that instead)."""
    if isinstance(device, int) and not isinstance(device, bool):
        torch = sys.modules.get("torch")
        try:
            return torch.device(device).type
        except Exception:  # no torch imported, or one that refuses an index
            return "cuda"
    return str(device).split(":")[0]


def _patched_safe_open(filename, framework, device="cpu", *, backend="mmap"):
    """``safe_open`` as the reference's signature has it, for ``patch()``: tensorlift's for
    what tensorlift reads (torch and numpy on the host or a CUDA device, JAX, TensorFlow,
    Paddle and MLX on the host), the reference's for the rest (other devices)."""
    _check_backend(backend)
    name = _device_type(device)
    if name == "cuda" and _torch_on_rocm():
        # torch's "cuda" is an AMD GPU here, which tensorlift does not load to.
        return _REFERENCE[0](filename, framework, device, backend=backend)
    if framework in _TORCH_NAMES + _NUMPY_NAMES and name in _OWN_DEVICES:
        framework = "pt" if framework in _TORCH_NAMES else "np"
        return safe_open(filename, framework=framework, device=device, backend=backend)
    if framework in _frameworks.FRAMEWORKS and name == "cpu" and _frameworks.installed(framework):
        return safe_open(filename, framework=framework, device=device, backend=backend)
    return _REFERENCE[0](filename, framework, device, backend=backend)


# The reference's safe_open, once patched (in a list: a module attribute holding it would be
# found, and patched, by the sweep). Kept after unpatch(): a reference to the patched function
# that outlives the patch (a functools.partial, a closure) still falls back to it.
_REFERENCE = []
# patch() and unpatch() one at a time.
_PATCH_LOCK = threading.Lock()


class _Patched:
    """What ``patch()`` returns: ``with tensorlift.patch():`` undoes it at the end, when this
    call is the one that patched (a ``with`` inside another leaves the outer one's patch)."""

    def __init__(self, patched):
        self._patched = patched

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self):
        if self._patched:
            self._patched = False
            unpatch()


def patch():
    """Makes the libraries that read safetensors through ``safetensors.safe_open`` and
    ``safetensors.torch.load_file`` (transformers, diffusers, accelerate, peft,
    sentence-transformers) read through tensorlift, in this process, unchanged: every place
    ``safetensors.safe_open`` is bound (the ``safetensors`` modules, and modules that
    imported it, such as ``transformers.modeling_utils``) gets tensorlift's, which falls back
    to the reference for frameworks and devices tensorlift does not load to.
    ``safetensors.torch.load_file`` and ``load_model`` go through it too. Call it before or
    after importing those libraries; ``unpatch()`` (or the end of ``with tensorlift.patch():``)
    puts the reference back. Calling it twice patches once, and the end of a ``with`` inside
    another leaves the patch to the outer one."""
    import safetensors

    try:
        import safetensors.torch  # noqa: F401 - its load_file looks safe_open up here
    except ImportError:
        pass  # no torch: the other frameworks' modules are patched as they are found

    with _PATCH_LOCK:
        if _PATCHED:
            return _Patched(False)
        original = safetensors.safe_open
        if original is _patched_safe_open:  # patched, and its record lost: nothing to do
            return _Patched(False)
        _REFERENCE[:] = [original]
        for module in _other_modules():
            for attr in _names_of(module, original):
                try:
                    setattr(module, attr, _patched_safe_open)
                except Exception:  # a module that refuses the change keeps the reference
                    continue
                _PATCHED.append((module, attr, original))
    return _Patched(True)


def unpatch():
    """Undoes ``patch()``: the reference's ``safe_open`` is back where it was (a place
    that was patched again by someone else since is left alone)."""
    with _PATCH_LOCK:
        while _PATCHED:
            module, attr, original = _PATCHED.pop()
            if getattr(module, attr, None) is _patched_safe_open:
                setattr(module, attr, original)
        # Modules imported while patched bound tensorlift's too (transformers imports lazily).
        if _REFERENCE:
            for module in _other_modules():
                for attr in _names_of(module, _patched_safe_open):
                    try:
                        setattr(module, attr, _REFERENCE[0])
                    except Exception:
                        continue


def _names_of(module, value):
    """The names under which ``module`` holds ``value`` (by identity). After torch and
    transformers are imported there are thousands of modules: this is the cost of
    ``patch()``, so no copy of each namespace is made unless another thread changes it
    meanwhile."""
    d = module.__dict__
    try:
        return [k for k, v in d.items() if v is value]
    except RuntimeError:  # changed while read (an import on another thread): read a copy
        return [k for k, v in list(d.items()) if v is value]


def _other_modules():
    """Every module loaded, but this one (whose names for its own functions stay)."""
    me = sys.modules.get(__name__)
    return [m for m in list(sys.modules.values()) if m is not me and isinstance(getattr(m, "__dict__", None), dict)]
