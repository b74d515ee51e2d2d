"""JAX, TensorFlow, Paddle and MLX tensors from tensorlift against the reference's reading of
the same file (``safetensors.safe_open(..., framework=...)`` and ``safetensors.<module>``).

Run once a framework, in its own process (``--framework NAME``; TensorFlow and Paddle do
not share a process well): scripts/test does. Every dtype the reference writes, a 0-d, an
empty and a sharded checkpoint; each tensor must have the reference's type, dtype, shape
and values, bit for bit. Where the reference refuses a dtype (float8 for JAX and
TensorFlow: it goes through numpy, which has no float8) tensorlift's answer is checked
against the bytes in the file instead.
"""

import importlib
import json

import ml_dtypes
import numpy as np
import pytest
import safetensors
from safetensors.numpy import save_file

import tensorlift

# How each framework is named to safe_open, its reference module, and how its tensors come
# back to numpy (values and dtype) to compare.
FRAMEWORKS = {
    "jax": ("flax", "flax"),
    "tensorflow": ("tf", "tensorflow"),
    "paddle": ("paddle", "paddle"),
    "mlx": ("mlx", "mlx"),
}


@pytest.fixture(scope="module")
def framework(request):
    name = request.config.getoption("--framework")
    if name not in FRAMEWORKS:
        pytest.skip(f"--framework {name!r}: one of {sorted(FRAMEWORKS)}")
    # The reference finds the framework's module only once something has imported it (and
    # for MLX, reaches mx.array through `mlx`, whose `core` it does not import).
    importlib.import_module({"jax": "jax.numpy", "mlx": "mlx.core"}.get(name, name))
    return name


def to_numpy(x, name):
    """Values and dtype of a framework tensor, as numpy (ml_dtypes for bfloat16, float8)."""
    if name == "paddle":
        import paddle

        kind = str(x.dtype).split(".")[-1]
        if kind in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
            width = 2 if kind == "bfloat16" else 1
            raw = x.view(paddle.uint16 if width == 2 else paddle.uint8).numpy()
            return raw.view(getattr(ml_dtypes, kind))
        return x.numpy()
    if name == "mlx":
        import mlx.core as mx

        if x.dtype == mx.bfloat16:
            return np.array(x.view(mx.uint16)).view(ml_dtypes.bfloat16)
        return np.array(x)
    return np.asarray(x)


def device_of(x, name):
    """Where a framework tensor lives, as the framework says it."""
    if name == "jax":
        return sorted(str(d) for d in x.devices())
    if name == "tensorflow":
        return x.device
    if name == "paddle":
        return str(x.place)
    return "mlx"  # unified memory: no device to compare


def same(got, want, name, what):
    assert type(got) is type(want), f"{what}: {type(got)} vs {type(want)}"
    assert device_of(got, name) == device_of(want, name), f"{what}: {device_of(got, name)} vs {device_of(want, name)}"
    a, b = to_numpy(got, name), to_numpy(want, name)
    assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}"
    assert a.tobytes() == b.tobytes(), f"{what}: values differ"


TENSORS = {
    "f32": np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
    "f64": np.linspace(-1, 1, 5),
    "f16": np.arange(6, dtype=np.float16).reshape(2, 3),
    "bf16": (np.arange(8, dtype=np.float32) / 3).astype(ml_dtypes.bfloat16).reshape(2, 4),
    "i8": np.arange(-4, 4, dtype=np.int8),
    "u8": np.arange(7, dtype=np.uint8),
    "i16": np.arange(5, dtype=np.int16),
    "i32": np.arange(-3, 3, dtype=np.int32).reshape(2, 3),
    "i64": np.array([2**40, -7, 3], dtype=np.int64),
    "u16": np.arange(3, dtype=np.uint16),
    "u32": np.arange(3, dtype=np.uint32),
    "u64": np.array([2**40, 5], dtype=np.uint64),
    "bool": np.array([True, False, True]),
    "c64": np.array([1 + 2j, -3j], dtype=np.complex64),
    "scalar": np.array(3.5, dtype=np.float32),
    "empty": np.zeros((0, 3), dtype=np.float32),
    "f8e4": (np.arange(6, dtype=np.float32) / 2).astype(ml_dtypes.float8_e4m3fn),
    "f8e5": (np.arange(6, dtype=np.float32) / 2).astype(ml_dtypes.float8_e5m2),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, framework):
    # Paddle: no empty tensor where the reference reads the file too. Its tensors are views
    # of its mapping by DLPack, and an empty one shares its data pointer with the next:
    # Paddle aborts the process when the second is freed (test_paddle_empty_tensors).
    tensors = {k: v for k, v in TENSORS.items() if not (framework == "paddle" and k == "empty")}
    path = tmp_path_factory.mktemp("frameworks") / "model.safetensors"
    save_file(tensors, str(path))
    return path


def reference(path, fw, name, backend="mmap"):
    """The reference's tensors, by name: the exception for those it refuses."""
    if name == "paddle":
        # The reference's pread backend fails on Paddle ("Could not find module").
        backend = "mmap"
    out = {}
    with safetensors.safe_open(str(path), framework=fw, backend=backend) as f:
        for k in f.keys():
            try:
                out[k] = f.get_tensor(k)
            except Exception as e:  # noqa: BLE001: what the reference raises is the answer
                out[k] = e
    return out


@pytest.mark.parametrize("backend", ["mmap", "pread"])
def test_every_dtype_as_the_reference_reads_it(framework, checkpoint, backend):
    fw, _ = FRAMEWORKS[framework]
    want = reference(checkpoint, fw, framework, backend)
    with tensorlift.safe_open(str(checkpoint), framework=fw, backend=backend) as f:
        assert sorted(f.keys()) == sorted(want)
        got = {}
        for k in f.keys():
            try:
                got[k] = f.get_tensor(k)
            except Exception as e:  # noqa: BLE001: checked below against the reference's answer
                got[k] = e
    refused = []
    for k, w in want.items():
        if isinstance(w, Exception):
            refused.append(k)
            if k.startswith("f8") and framework in ("jax", "tensorflow", "mlx"):
                # The reference goes through numpy, which has no float8: JAX and TensorFlow
                # have the type, and get it; MLX has none, and is refused by name.
                if framework == "mlx":
                    assert isinstance(got[k], TypeError) and "MLX has no" in str(got[k]), got[k]
                    continue
                a = to_numpy(got[k], framework)
                assert a.dtype == TENSORS[k].dtype and a.tobytes() == TENSORS[k].tobytes(), k
                continue
            pytest.fail(f"{k}: the reference refused it: {w!r}")
        assert not isinstance(got[k], Exception), f"{k}: the reference reads it, tensorlift raised {got[k]!r}"
        same(got[k], w, framework, f"{k} ({backend})")
    assert len(refused) < len(want) // 2, refused


def test_the_module_mirrors_the_references(framework, tmp_path):
    fw, module = FRAMEWORKS[framework]
    ours = importlib.import_module(f"tensorlift.{module}")
    ref = importlib.import_module(f"safetensors.{module}")
    # What the reference's load_file reads whole (no float8; for Paddle, no empty tensor).
    keep = {k: v for k, v in TENSORS.items() if not k.startswith("f8") and not (k == "empty" and framework == "paddle")}
    path = str(tmp_path / "m.safetensors")
    save_file(keep, path)
    want = ref.load_file(path)
    for backend in ("mmap", "pread"):
        got = ours.load_file(path, backend=backend)
        assert sorted(got) == sorted(want)
        for k in keep:
            same(got[k], want[k], framework, f"{k} ({backend})")
    # save and load are the reference's own.
    assert ours.save_file is ref.save_file and ours.load is ref.load and ours.save is ref.save


def test_load_file_of_a_sharded_folder(framework, tmp_path):
    # tensorlift.load_file takes what the reference's does not: a sharded folder.
    fw, _ = FRAMEWORKS[framework]
    a = {"a": np.arange(4, dtype=np.float32)}
    b = {"b": np.arange(3, dtype=np.int32)}
    save_file(a, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file(b, str(tmp_path / "model-00002-of-00002.safetensors"))
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    got = tensorlift.load_file(str(tmp_path), framework=fw)
    for name, shard in (("a", "model-00001-of-00002.safetensors"), ("b", "model-00002-of-00002.safetensors")):
        with safetensors.safe_open(str(tmp_path / shard), framework=fw) as f:
            same(got[name], f.get_tensor(name), framework, name)


def test_slices_as_the_reference_cuts_them(framework, checkpoint):
    fw, _ = FRAMEWORKS[framework]
    keys = [(slice(1, 3),), (slice(None), slice(1, None, 2)), (0,), (slice(None, None),), (Ellipsis, 1)]
    compared = 0
    with safetensors.safe_open(str(checkpoint), framework=fw) as r, tensorlift.safe_open(str(checkpoint), framework=fw) as t:
        for name in ("f32", "i32", "bf16"):
            for key in keys:
                if framework == "paddle":
                    # The reference's Paddle slices share data pointers by DLPack, which aborts
                    # the process when they are freed: numpy's indexing is the answer instead.
                    a = to_numpy(t.get_slice(name)[key], framework)
                    want = np.ascontiguousarray(TENSORS[name][key])
                    assert (a.dtype, a.shape, a.tobytes()) == (want.dtype, want.shape, want.tobytes()), f"{name}{key}"
                    compared += 1
                    continue
                try:
                    want = r.get_slice(name)[key]
                except Exception:  # noqa: BLE001: where the reference refuses, nothing to hold us to
                    continue
                same(t.get_slice(name)[key], want, framework, f"{name}{key}")
                compared += 1
    assert compared >= 10, compared


def test_unknown_frameworks_are_refused_as_before():
    with pytest.raises(ValueError, match="unknown framework 'xx'"):
        tensorlift.load_file("nowhere", framework="xx")


def test_paddle_empty_tensors(framework, tmp_path):
    # Where the reference fails on its own (an empty tensor's stride) or aborts (see the
    # checkpoint fixture), tensorlift gives the tensor the file holds.
    if framework != "paddle":
        pytest.skip("Paddle only")
    path = str(tmp_path / "e.safetensors")
    save_file({"empty": TENSORS["empty"], "next": TENSORS["f32"]}, path)
    for backend in ("mmap", "pread"):
        with tensorlift.safe_open(path, framework="paddle", backend=backend) as f:
            e, n = f.get_tensor("empty"), f.get_tensor("next")
        assert (to_numpy(e, "paddle").shape, to_numpy(e, "paddle").dtype) == ((0, 3), np.float32)
        assert to_numpy(n, "paddle").tobytes() == TENSORS["f32"].tobytes()
        del e, n


def test_jax_takes_aligned_host_tensors_without_a_copy(framework, tmp_path):
    # XLA copies a buffer that is not 64-byte aligned; a host load lands tensors at their
    # file offsets (a page-aligned arena), so a file whose data section and tensors are
    # 64-byte aligned is handed over as it is.
    if framework != "jax":
        pytest.skip("JAX only")
    from tensorlift import _frameworks, _to_numpy

    tensors = {"f32": np.arange(64, dtype=np.float32), "bf16": np.arange(32, dtype=np.float32).astype(ml_dtypes.bfloat16)}
    path = tmp_path / "aligned.safetensors"
    for pad in range(64):
        save_file(tensors, str(path), metadata={"pad": "x" * pad})
        header = int.from_bytes(path.read_bytes()[:8], "little")
        if (8 + header) % 64 == 0:
            break
    loaded = tensorlift.load_file(str(path), framework=None)
    for name, t in loaded.items():
        host = _to_numpy(t).ctypes.data
        assert host % 64 == 0, name
        x = _frameworks.convert(t, "flax", _to_numpy)
        assert x.unsafe_buffer_pointer() == host, f"{name}: copied"
        assert np.asarray(x).tobytes() == tensors[name].tobytes()


def test_tensorflow_kernels_run_on_every_tensor(framework, checkpoint):
    # TensorFlow takes DLPack memory as it is, and its CPU kernels abort the process on
    # memory that is not 64-byte aligned: a kernel runs on every tensor handed over.
    if framework != "tensorflow":
        pytest.skip("TensorFlow only")
    import tensorflow as tf

    for backend in ("mmap", "pread"):
        with tensorlift.safe_open(str(checkpoint), framework="tf", backend=backend) as f:
            for k in f.keys():
                x = f.get_tensor(k)
                if (x.dtype.is_floating or x.dtype.is_integer or x.dtype.is_complex) and "float8" not in x.dtype.name:
                    tf.reduce_sum(x).numpy()
                tf.identity(x).numpy()


def test_host_only_frameworks_refuse_a_device_before_loading(framework, checkpoint):
    if framework == "jax":
        pytest.skip("JAX takes device tensors")
    fw, _ = FRAMEWORKS[framework]
    for call in (
        lambda: tensorlift.load_file(str(checkpoint), device="cuda:0", framework=fw),
        lambda: tensorlift.safe_open(str(checkpoint), framework=fw, device="cuda"),
    ):
        with pytest.raises(safetensors.SafetensorError, match="from host memory only") as e:
            call()
        assert isinstance(e.value, ValueError)


def test_patch_serves_the_framework_through_tensorlift(framework, checkpoint):
    fw, _ = FRAMEWORKS[framework]
    with tensorlift.patch():
        with safetensors.safe_open(str(checkpoint), framework=fw) as f:
            assert type(f) is tensorlift.safe_open
            same(f.get_tensor("f32"), reference(checkpoint, fw, framework)["f32"], framework, "patched")
    assert safetensors.safe_open is not tensorlift.safe_open


def test_jax_takes_cuda_tensors(framework, checkpoint):
    # On a GPU host (scripts/gpu-host runs this file with the host's JAX, a CUDA build):
    # tensors loaded onto cuda:0 are JAX arrays on the GPU, with the file's values.
    if framework != "jax":
        pytest.skip("JAX only")
    import jax

    if not any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("no GPU for JAX here")
    got = tensorlift.load_file(str(checkpoint), device="cuda:0", framework="flax")
    for k in ("f32", "f16", "bf16", "i32", "u8", "bool", "empty", "scalar"):
        x = got[k]
        assert {d.platform for d in x.devices()} == {"gpu"}, k
        a = np.asarray(x)
        assert (a.dtype, a.shape, a.tobytes()) == (TENSORS[k].dtype, TENSORS[k].shape, TENSORS[k].tobytes()), k
