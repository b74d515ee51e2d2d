"""DLPack from the consumer's side: numpy takes tensorlift's tensors without a copy, and the
memory lives exactly as long as some array from it does.

The reference fixture is written by the reference `safetensors` package, and read back
with `safetensors.numpy.load_file` as the truth."""

import ctypes
import gc
import os

import numpy as np
import pytest
from safetensors.numpy import load_file as reference_load

import tensorlift




def test_numpy_arrays_view_the_loaded_memory(fixture):
    path = str(fixture / "single.safetensors")
    want = reference_load(path)
    got = tensorlift.load_file(path, framework="np")
    assert sorted(got) == sorted(want)
    for name, arr in got.items():
        ref = want[name]
        assert arr.dtype == ref.dtype, name
        assert arr.shape == ref.shape, name
        assert arr.tobytes() == ref.tobytes(), name
        # Writable, as the reference's arrays are (copies of their own there).
        assert arr.flags.writeable == ref.flags.writeable, name


def test_numpy_arrays_are_writable_as_the_references_and_their_own(tmp_path):
    """The reference's numpy arrays are copies, so a caller may write into them; tensorlift's
    are writable too (views of a load's memory, or, of a mapped file, copies out of it), and
    a write reaches neither the file, nor another array, nor a later read. Its plain DLPack
    export of host memory stays read-only."""
    import ml_dtypes
    from safetensors import safe_open as reference_open
    from safetensors.numpy import save_file

    path = tmp_path / "w.safetensors"
    save_file(
        {
            "f32": np.arange(64, dtype=np.float32).reshape(8, 8),
            "bf16": np.arange(16, dtype=np.float32).astype(ml_dtypes.bfloat16),
            "i8": np.arange(-4, 4, dtype=np.int8),
        },
        str(path),
    )
    before = path.read_bytes()
    for backend in ("pread", "mmap"):
        loaded = tensorlift.load_file(path, framework="np", backend=backend)
        with tensorlift.safe_open(path, framework="np", backend=backend) as f:
            one, two = f.get_tensor("f32"), f.get_tensor("f32")
        with reference_open(str(path), framework="np") as f:
            want = {k: f.get_tensor(k) for k in f.keys()}
        for name, arr in [*loaded.items(), ("f32", one)]:
            assert arr.flags.writeable and want[name].flags.writeable, (backend, name)
            arr[...] = arr + arr.dtype.type(1)
            assert arr.tobytes() == (want[name] + want[name].dtype.type(1)).tobytes(), (backend, name)
        assert two.tobytes() == want["f32"].tobytes(), backend
        assert path.read_bytes() == before, backend
        again = tensorlift.load_file(path, framework="np", backend=backend)
        assert all(again[k].tobytes() == want[k].tobytes() for k in want), backend
    t = tensorlift.load(str(path))["f32"]
    assert not np.from_dlpack(t).flags.writeable
    assert not np.from_dlpack(t.raw_bytes()).flags.writeable


def test_numpy_arrays_are_writeable_where_numpy_takes_dlpack_read_only(tmp_path, monkeypatch):
    # numpy before 2.2.5 makes every array it takes by DLPack read-only: stood in for here by
    # a from_dlpack that does so, the arrays handed out are writeable copies all the same.
    from safetensors.numpy import save_file

    path = tmp_path / "w.safetensors"
    save_file({"f32": np.arange(12, dtype=np.float32).reshape(3, 4), "u8": np.arange(5, dtype=np.uint8)}, str(path))
    real = np.from_dlpack

    def read_only(x, *args, **kwargs):
        arr = real(x, *args, **kwargs)
        arr.flags.writeable = False
        return arr

    monkeypatch.setattr(np, "from_dlpack", read_only)
    monkeypatch.setattr(tensorlift, "_numpy_takes_dlpack_read_only", lambda numpy: True)
    want = reference_load(str(path))
    loaded = tensorlift.load_file(path, framework="np")
    with tensorlift.safe_open(path, framework="np") as f:
        opened = {k: f.get_tensor(k) for k in f.keys()}
    for got in (loaded, opened):
        assert sorted(got) == sorted(want)
        for name, arr in got.items():
            assert arr.flags.writeable, name
            arr += 1
            assert arr.tobytes() == (want[name] + 1).tobytes(), name


def test_sharded_folders_and_indexes(fixture, sharded_reference):
    folder = fixture / "sharded"
    want = sharded_reference
    for path in (folder, folder / "model.safetensors.index.json"):
        got = tensorlift.load_file(str(path), framework="np")
        assert sorted(got) == sorted(want)
        for name in want:
            assert got[name].tobytes() == want[name].tobytes(), name


def test_memory_lives_as_long_as_an_array_does(fixture):
    path = str(fixture / "single.safetensors")
    want = reference_load(path)["f32"].copy()
    tensors = tensorlift.load(path)
    arr = np.from_dlpack(tensors["f32"])
    del tensors
    gc.collect()
    # Other loads reuse freed memory; the array's memory must not have been freed.
    for _ in range(3):
        tensorlift.load(path)
    assert arr.tobytes() == want.tobytes()


def test_float8_is_refused_to_consumers_older_than_dlpack_1(tmp_path):
    # DLPack 1.1 gave float8 its codes, which a consumer of DLPack before 1.0 does not know:
    # refused there (BufferError, saying how to have it), versioned for the rest, raw bytes
    # for anyone.
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "f8.safetensors"
    save_file({"w": torch.arange(8, dtype=torch.float32).to(torch.float8_e4m3fn)}, str(path))
    t = tensorlift.load(str(path))["w"]
    with pytest.raises(BufferError, match=r"F8_E4M3, which DLPack names from version 1.1 on: .*max_version=\(1, 1\)"):
        t.__dlpack__()
    t.__dlpack__(max_version=(1, 1))
    assert np.from_dlpack(t.raw_bytes()).tobytes() == path.read_bytes()[-8:]


def test_legacy_and_versioned_capsules(fixture):
    t = tensorlift.load(str(fixture / "single.safetensors"))["f32"]
    assert t.__dlpack_device__() == (1, 0)
    is_valid = ctypes.pythonapi.PyCapsule_IsValid
    is_valid.restype = ctypes.c_int
    is_valid.argtypes = [ctypes.py_object, ctypes.c_char_p]
    versioned = t.__dlpack__(max_version=(1, 0))
    legacy = t.__dlpack__()
    assert is_valid(versioned, b"dltensor_versioned") == 1
    assert is_valid(legacy, b"dltensor") == 1
    # Never consumed: dropping them runs the deleters (and must not crash).
    del versioned, legacy
    gc.collect()

    class Legacy:
        """A producer that only speaks DLPack before 1.0."""

        def __dlpack__(self, **kwargs):
            return t.__dlpack__()

        def __dlpack_device__(self):
            return t.__dlpack_device__()

    want = reference_load(str(fixture / "single.safetensors"))["f32"]
    assert np.from_dlpack(Legacy()).tobytes() == want.tobytes()


def _capsule_version(capsule):
    """The `(major, minor)` a `dltensor_versioned` capsule's managed tensor says it follows
    (`DLPackVersion` is the struct's first member, two `uint32_t`s)."""
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype = ctypes.c_void_p
    get.argtypes = [ctypes.py_object, ctypes.c_char_p]
    version = (ctypes.c_uint32 * 2).from_address(get(capsule, b"dltensor_versioned"))
    return tuple(version)


def test_a_capsule_says_the_lowest_dlpack_version_that_describes_its_type(tmp_path):
    """torch and numpy ask for at most DLPack 1.0: every type 1.0 has is exported as 1.0; the
    float8 types, whose codes came with 1.1, say 1.1 (and torch still takes them)."""
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "v.safetensors"
    save_file({"f32": torch.arange(4.0), "f8": torch.arange(4.0).to(torch.float8_e4m3fn)}, str(path))
    tensors = tensorlift.load(str(path))
    assert _capsule_version(tensors["f32"].__dlpack__(max_version=(1, 0))) == (1, 0)
    assert _capsule_version(tensors["f32"].raw_bytes().__dlpack__(max_version=(1, 1))) == (1, 0)
    assert _capsule_version(tensors["f8"].__dlpack__(max_version=(1, 0))) == (1, 1)
    got = torch.from_dlpack(tensors["f8"])
    assert got.dtype == torch.float8_e4m3fn
    assert got.view(torch.uint8).tolist() == torch.arange(4.0).to(torch.float8_e4m3fn).view(torch.uint8).tolist()


def test_types_and_devices_numpy_cannot_take_are_refused(fixture, tmp_path):
    import json
    import struct

    # bfloat16, which the reference numpy writer cannot write: the file is made by hand.
    header = json.dumps({"x": {"dtype": "BF16", "shape": [8], "data_offsets": [0, 16]}}).encode()
    path = str(tmp_path / "bf.safetensors")
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + bytes(range(16)))
    t = tensorlift.load(path)["x"]
    assert t.dtype == "BF16"
    # numpy has no bfloat16: it reads DLPack's type code and refuses, rather than misreading
    # (numpy 2.5 raises BufferError, earlier ones RuntimeError).
    with pytest.raises((RuntimeError, BufferError), match="Unsupported dtype"):
        np.from_dlpack(t)
    with pytest.raises(BufferError):
        t.__dlpack__(max_version=(1, 0), dl_device=(2, 0))
    with pytest.raises(BufferError):
        t.__dlpack__(max_version=(1, 0), copy=True)


def test_errors_have_python_types(tmp_path):
    with pytest.raises(FileNotFoundError):
        tensorlift.load_file(str(tmp_path / "missing.safetensors"))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}x")
    with pytest.raises(ValueError, match="bad.safetensors"):
        tensorlift.load_file(str(bad))
    from safetensors.numpy import save_file as np_save

    np_save({"a": np.arange(3, dtype=np.float32)}, str(tmp_path / "ok.safetensors"))
    with pytest.raises(ValueError, match="invalid device 'gpu'"):
        tensorlift.load_file(str(tmp_path / "ok.safetensors"), device="gpu")


def test_a_gathered_twin_of_a_viewed_storage_has_the_storage_bytes(tmp_path):
    """One storage saved under two names, one of which tensor parallelism splits by columns
    (gathered into memory of its own, its stored bytes copied by the kernel, since the
    other name is handed out as a view of them) and one it leaves whole: each as torch.load
    reads it, the split one as vLLM splits it."""
    import torch

    w = torch.linspace(-3, 3, 64, dtype=torch.float32).reshape(8, 8)
    path = tmp_path / "pytorch_model.bin"
    torch.save({"model.layers.0.self_attn.o_proj.weight": w, "tied.weight": w}, str(path))
    want = torch.load(str(path), weights_only=True)
    for backend in ("pread", "mmap"):
        for rank in (0, 1):
            got = tensorlift.load_file(path, tp=(rank, 2, 2), backend=backend)
            part = got["model.layers.0.self_attn.o_proj.weight"]
            assert torch.equal(part, w[:, rank * 4 : (rank + 1) * 4]), (backend, rank)
            assert torch.equal(got["tied.weight"], want["tied.weight"]), (backend, rank)


def test_numpy_arrays_of_tied_pytorch_weights_read_into_memory_stay_read_only(tmp_path):
    """A PyTorch file's tied weights are one storage, as torch.load gives them: their arrays
    view the same memory, so they stay read-only (a write to one would change the other),
    while an array of a storage of its own is writable. (Of a mapped file, numpy's arrays
    are copies, each its own and writable, as the reference's arrays are.)"""
    import torch

    embed = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    path = tmp_path / "pytorch_model.bin"
    torch.save({"embed.weight": embed, "lm_head.weight": embed, "norm": torch.ones(6)}, str(path))
    want = torch.load(str(path), weights_only=True)
    assert want["embed.weight"].untyped_storage().data_ptr() == want["lm_head.weight"].untyped_storage().data_ptr()
    for backend in ("pread", "mmap"):
        got = tensorlift.load_file(path, framework="np", backend=backend)
        for name, t in want.items():
            assert got[name].tobytes() == t.numpy().tobytes(), (backend, name)
        tied = got["embed.weight"].flags.writeable or got["lm_head.weight"].flags.writeable
        assert tied == (backend == "mmap"), backend
        assert got["norm"].flags.writeable, backend
        got["norm"][...] = 2
        if backend == "mmap":
            got["embed.weight"][...] = 3
            assert (got["lm_head.weight"] == embed.numpy()).all(), "copies of their own"
        assert (got["norm"] == 2).all() and got["lm_head.weight"].tobytes() == embed.numpy().tobytes(), backend


@pytest.mark.parametrize("backend", ["pread", "mmap"])
def test_empty_tensors_have_the_strides_torch_gives_its_own(tmp_path, backend):
    # An empty tensor's strides count a dimension of 0 as 1, as torch's (and the reference's)
    # do: strides of 0 keep torch from viewing it as a dtype of another width.
    # (The test command installs torch, TENSORLIFT_REQUIRE_DEPS: there, its absence fails.)
    torch = __import__("torch") if os.environ.get("TENSORLIFT_REQUIRE_DEPS") else pytest.importorskip("torch")
    import safetensors
    from safetensors.torch import save_file

    path = str(tmp_path / "empty.safetensors")
    shapes = {"a": (0, 3), "b": (2, 0, 4), "c": (3, 4, 0), "d": (0,)}
    save_file({k: torch.zeros(s, dtype=torch.float32) for k, s in shapes.items()}, path)
    loaded = tensorlift.load_file(path)
    with safetensors.safe_open(path, "pt") as ref, tensorlift.safe_open(path, "pt", backend=backend) as f:
        for name, shape in shapes.items():
            want = ref.get_tensor(name)
            assert want.stride() == torch.empty(shape).stride(), name
            for got in (loaded[name], f.get_tensor(name), f.get_slice(name)[...], f.get_slice(name)[..., ...]):
                assert (got.shape, got.stride()) == (want.shape, want.stride()), name
                assert got.view(torch.uint8).shape == want.view(torch.uint8).shape, name
            # Partial slices that come out empty, cut on the host.
            assert f.get_slice(name)[1:1].stride() == ref.get_slice(name)[1:1].stride(), name
