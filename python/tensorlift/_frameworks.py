"""Tensors for the frameworks the reference's ``framework=`` names besides torch and numpy:
JAX (``"flax"``, ``"jax"``), TensorFlow (``"tf"``, ``"tensorflow"``), Paddle (``"paddle"``)
and MLX (``"mlx"``).

Each gets what ``safetensors.safe_open(..., framework=...)`` gives it: the reference makes a
numpy array of the bytes and hands it to the framework's own constructor (``jnp.array``,
``tf.convert_to_tensor``, ``paddle.to_tensor``, ``mx.array``), so dtypes and devices are
what those constructors make (JAX without ``jax_enable_x64`` makes int64 int32; a GPU build
puts arrays on its default device). Where the result is the same, the tensor is handed over
by DLPack without a copy instead: JAX on a CPU-only JAX (and from a CUDA device), and
TensorFlow on a CPU-only TensorFlow for tensors at 64-byte aligned addresses (TensorFlow
takes DLPack memory as it is, and its kernels abort the process on memory Eigen did not
align). Elsewhere the tensor goes through a numpy view of the loaded memory, as the
reference's does (Paddle takes DLPack, but aborts the process when two of its DLPack tensors
share a data pointer). bfloat16 and float8, which numpy lacks, go through ml_dtypes or the
raw bytes.

Memory handed over without a copy is tensorlift's, shared by every array made from it
(never the mapped file: with ``backend="mmap"`` too, these frameworks get memory of their
own, as the reference's arrays are copies): do not donate such arrays (JAX's
``donate_argnums``), which lets the framework write into them.
"""

# Each name ``framework=`` takes, to the framework it means.
FRAMEWORKS = {
    "flax": "jax",
    "jax": "jax",
    "tf": "tensorflow",
    "tensorflow": "tensorflow",
    "paddle": "paddle",
    "mlx": "mlx",
}

# Dtypes that DLPack carries (bool, integers, floats, complex, bfloat16): the others (float8)
# go through their raw bytes.
_DLPACK = {"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64", "F16", "BF16", "F32", "F64", "C64"}


# The module each framework is imported as, to fail before a load rather than after it.
_MODULE = {"jax": "jax", "tensorflow": "tensorflow", "paddle": "paddle", "mlx": "mlx.core"}


def installed(framework):
    """Whether the framework's package can be imported (without importing it)."""
    import importlib.util

    top = _MODULE[FRAMEWORKS[framework]].split(".")[0]
    return importlib.util.find_spec(top) is not None


def check(framework, device, invalid=ValueError):
    """Before a load: TensorFlow, Paddle and MLX are asked for host tensors only (tensorlift
    hands them over from host memory; else ``invalid``, the package's error for an argument
    the reference refuses too, is raised), and the framework's package is importable."""
    import importlib

    kind = FRAMEWORKS[framework]
    # ("auto" may well be the host; a load that lands on a GPU is refused when it lands.)
    name = str(device).split(":")[0]
    if kind != "jax" and name not in ("cpu", "auto"):
        raise invalid(
            f"framework={framework!r}: tensorlift hands {kind} tensors over from host memory only "
            f"(device='cpu', not {device!r})"
        )
    importlib.import_module(_MODULE[kind])


def convert(t, framework, to_numpy):
    """Tensor ``t`` (a loaded tensorlift Tensor) as ``framework`` has it (one of
    ``FRAMEWORKS``' names); ``to_numpy`` makes a numpy view of a host tensor."""
    kind = FRAMEWORKS[framework]
    if kind == "jax":
        return _jax(t, to_numpy)
    if kind == "tensorflow":
        return _tensorflow(t, to_numpy)
    if kind == "paddle":
        return _paddle(t, to_numpy)
    return _mlx(t, to_numpy)


def from_numpy(arr, dtype, framework):
    """A numpy array of a tensor's values (``dtype``: the safetensors dtype; bfloat16 and
    float8 as ml_dtypes arrays) as ``framework`` has it: what a slice, and a tensor of a
    mapped file (a copy out of it), are handed over as."""
    kind = FRAMEWORKS[framework]
    if kind == "jax":
        import jax.numpy as jnp

        return jnp.asarray(arr)
    if kind == "tensorflow":
        import tensorflow as tf

        return tf.convert_to_tensor(arr)
    if kind == "paddle":
        return _paddle_from_numpy(arr, dtype)
    return _mlx_from_numpy(arr, dtype)


def _host_only(t, framework):
    if t.device != "cpu":
        raise ValueError(
            f"tensor '{t.name}' is on {t.device}: tensorlift hands {framework} tensors over from host "
            "memory only (load with device='cpu')"
        )


def _jax(t, to_numpy):
    import jax
    import jax.numpy as jnp

    if t.dtype in _DLPACK and (t.device != "cpu" or jax.default_backend() == "cpu"):
        arr_dtype = to_numpy(t).dtype if t.device == "cpu" else None
        # DLPack keeps the dtype, which jnp.array (the reference's way) would change where
        # JAX runs without 64-bit types: then the reference's way, for the same answer. (And
        # a host tensor by DLPack stays on the host, where jnp.array puts it on JAX's default
        # device: a GPU build takes the reference's way too.)
        if arr_dtype is None or jax.dtypes.canonicalize_dtype(arr_dtype) == arr_dtype:
            try:
                return jax.dlpack.from_dlpack(t)
            except (TypeError, ValueError, RuntimeError, BufferError):
                if t.device != "cpu":
                    raise
    _host_only(t, "JAX")
    return jnp.asarray(to_numpy(t))


def _tensorflow(t, to_numpy):
    import tensorflow as tf

    _host_only(t, "TensorFlow")
    arr = to_numpy(t)
    # By DLPack only where TensorFlow's kernels can use the memory as it is (64-byte aligned,
    # as Eigen aligns; they abort the process otherwise) and it would land where
    # convert_to_tensor puts it (the CPU: no GPU visible).
    if t.dtype in _DLPACK and arr.ctypes.data % 64 == 0 and not tf.config.list_logical_devices("GPU"):
        try:
            return tf.experimental.dlpack.from_dlpack(t.__dlpack__())
        except (TypeError, ValueError, RuntimeError, BufferError, tf.errors.OpError):
            pass
    return tf.convert_to_tensor(arr)


def _paddle(t, to_numpy):
    # Not through DLPack: Paddle 3.3 keys the deleters of DLPack tensors by data pointer, and
    # aborts the process when two of them share one (an empty tensor and the tensor after
    # it, tied weights). A copy, as the reference makes.
    _host_only(t, "Paddle")
    return _paddle_from_numpy(to_numpy(t), t.dtype)


def _paddle_from_numpy(arr, dtype):
    import numpy
    import paddle

    # A tensor is made of its raw bytes and viewed as its type, as the reference makes it
    # (paddle.to_tensor takes fewer types than Paddle has). Paddle names its types as numpy
    # and ml_dtypes do.
    kind = getattr(paddle, arr.dtype.name, None)
    if kind is None:
        raise TypeError(f"Paddle has no {dtype} type")
    shape = list(arr.shape)
    # On the host, as the reference's tensors for device="cpu" (not Paddle's default place,
    # a GPU on a GPU build).
    place = paddle.CPUPlace()
    if arr.size == 0:
        return paddle.zeros(shape, dtype=kind).to(place)
    raw = paddle.to_tensor(numpy.ascontiguousarray(arr).reshape(-1).view(numpy.uint8), place=place)
    return raw.view(kind).reshape(shape)


def _mlx(t, to_numpy):
    _host_only(t, "MLX")
    return _mlx_from_numpy(to_numpy(t), t.dtype)


def _mlx_from_numpy(arr, dtype):
    import numpy
    import mlx.core as mx

    if dtype == "BF16":
        return mx.array(numpy.ascontiguousarray(arr).view(numpy.uint16)).view(mx.bfloat16)
    if dtype.startswith("F8"):
        raise TypeError(f"MLX has no {dtype} type")
    return mx.array(arr)


def load_file_for(framework):
    """The ``load_file`` of the reference's module for ``framework`` (``safetensors.flax``,
    ``safetensors.tensorflow``, ...), reading through tensorlift."""

    def load_file(filename, *, backend="mmap"):
        from . import safe_open

        with safe_open(filename, framework=framework, backend=backend) as f:
            return f.get_tensors()

    if framework == "paddle":
        # The reference's Paddle load_file also takes a device: the host through tensorlift,
        # others through the reference.
        def load_file(filename, device="cpu", *, backend="mmap"):  # noqa: F811
            from . import safe_open

            if str(device).split(":")[0] != "cpu":
                import safetensors.paddle

                return safetensors.paddle.load_file(filename, device, backend=backend)
            with safe_open(filename, framework=framework, backend=backend) as f:
                return f.get_tensors()

    load_file.__doc__ = (
        f"Loads every tensor of a ``.safetensors`` file as ``safetensors.{_MODULES[framework]}.load_file`` "
        "does, reading through tensorlift: a dict of name to tensor. ``backend``: ``\"mmap\"`` (the "
        "reference's default) or ``\"pread\"``, taken as the reference takes them; the tensors are memory of "
        "their own either way (never views of the mapped file, as the reference's are copies)."
    )
    return load_file


# The reference's module for each framework name.
_MODULES = {"flax": "flax", "tf": "tensorflow", "paddle": "paddle", "mlx": "mlx"}


def reference_attr(module, name, names=("load", "save", "save_file")):
    """``names`` of the reference's ``module``: ``load``, ``save`` and ``save_file`` (they
    turn bytes in memory into tensors, and tensors into bytes or files: nothing tensorlift
    reads), and torch's ``save_model`` and ``load_model``."""
    if name in names:
        import importlib

        try:
            return getattr(importlib.import_module(module), name)
        except ImportError as e:
            # (hasattr and getattr with a default expect AttributeError.)
            raise AttributeError(f"tensorlift.{module.split('.')[-1]}.{name} is {module}'s, which cannot be imported: {e}") from e
    raise AttributeError(f"module 'tensorlift.{module.split('.')[-1]}' has no attribute '{name}'")
