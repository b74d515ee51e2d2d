"""torch takes tensorlift's CUDA tensors through DLPack, without a copy: run on a GPU host
(`scripts/gpu-host run`); skipped, saying why, where torch or a GPU is missing."""


import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (it is on the GPU host)")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device visible to torch", allow_module_level=True)

import tensorlift  # noqa: E402
from safetensors.torch import load_file as reference_load  # noqa: E402


def raw(x):
    flat = x.reshape(-1)
    return flat.view(torch.uint8) if flat.numel() else flat


def test_cuda_tensors_reach_torch_without_a_copy(fixture):
    path = str(fixture / "single.safetensors")
    want = reference_load(path, device="cuda:0")
    tensors = tensorlift.load(path, device="cuda:0")
    for name, t in tensors.items():
        assert t.device == "cuda:0"
        assert t.__dlpack_device__() == (2, 0)
        x = torch.from_dlpack(t)
        assert x.device == torch.device("cuda:0"), name
        assert x.dtype == want[name].dtype, name
        assert x.shape == want[name].shape, name
        # Bytes, not values: NaNs compare unequal; flattened, since a scalar has no byte view.
        assert torch.equal(raw(x), raw(want[name])), name


def test_device_memory_lives_as_long_as_a_torch_tensor(fixture):
    path = str(fixture / "single.safetensors")
    want = reference_load(path, device="cuda:0")["f32"].clone()
    x = torch.from_dlpack(tensorlift.load(path, device="cuda:0")["f32"])
    for _ in range(3):
        tensorlift.load(path, device="cuda:0")
    torch.cuda.synchronize()
    assert torch.equal(x, want)


def test_load_file_for_torch(fixture):
    got = tensorlift.load_file(str(fixture / "sharded"), device="cuda:0", framework="pt")
    assert all(v.device == torch.device("cuda:0") for v in got.values())
