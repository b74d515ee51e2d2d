"""Hugging Face transformers loads through tensorlift unchanged: models written by its own
``save_pretrained`` (Llama- and BERT-shaped; one file and sharded; float32 and bfloat16)
load with ``from_pretrained`` after ``tensorlift.patch()`` to the same parameters, bit for
bit, and the same outputs as stock, and tensorlift is seen serving the weights."""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only: nothing is downloaded

# The test command installs them (TENSORLIFT_REQUIRE_DEPS): there, a missing one fails.
if os.environ.get("CI") or os.environ.get("TENSORLIFT_REQUIRE_DEPS"):
    import torch
    import transformers
else:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

import tensorlift


def bits(t):
    """A tensor's bytes, to compare bit for bit (-0.0 is not 0.0; NaNs compare by payload)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def llama():
    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(config), transformers.AutoModelForCausalLM


def bert():
    config = transformers.BertConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return transformers.BertModel(config), transformers.AutoModel


def outputs(model):
    ids = torch.tensor([[1, 5, 9, 17, 33, 65, 3, 2]])
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("make", [llama, bert], ids=["llama", "bert"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shard", [None, "40KB"], ids=["one-file", "sharded"])
def test_from_pretrained_through_tensorlift_equals_stock(tmp_path, make, dtype, shard, served):
    dtype = getattr(torch, dtype)
    torch.manual_seed(0)
    model, auto = make()
    model = model.to(dtype)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(tmp_path, **kwargs)
    files = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
    assert (len(files) > 1) == (shard is not None), files
    import safetensors

    stored = 0
    for f in files:
        with safetensors.safe_open(str(tmp_path / f), framework="pt") as g:
            stored += len(g.keys())

    stock = auto.from_pretrained(tmp_path, dtype=dtype).eval()
    assert served["opened"] == 0
    with tensorlift.patch():
        ours = auto.from_pretrained(tmp_path, dtype=dtype).eval()
    assert served["opened"] == len(files), served
    want, got = stock.state_dict(), ours.state_dict()
    # Every stored tensor was handed over by tensorlift's slices.
    assert served["tensors"] >= stored, (served, stored)
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(bits(got[name]), bits(t)), name
    assert torch.equal(bits(outputs(ours)), bits(outputs(stock)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu-host runs it)")
@pytest.mark.parametrize("make", [llama, bert], ids=["llama", "bert"])
def test_from_pretrained_onto_a_gpu_through_tensorlift_equals_stock(tmp_path, make, served):
    torch.manual_seed(0)
    model, auto = make()
    model.to(torch.bfloat16).save_pretrained(tmp_path, max_shard_size="40KB")
    files = [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
    stock = auto.from_pretrained(tmp_path, dtype=torch.bfloat16, device_map="cuda:0").eval()
    with tensorlift.patch():
        ours = auto.from_pretrained(tmp_path, dtype=torch.bfloat16, device_map="cuda:0").eval()
    assert served["opened"] == len(files) > 1, served
    want, got = stock.state_dict(), ours.state_dict()
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert t.device.type == "cuda" and got[name].device == t.device, name
        assert got[name].dtype == t.dtype and torch.equal(bits(got[name]), bits(t)), name
    ids = torch.tensor([[1, 5, 9, 17, 33, 65, 3, 2]], device="cuda:0")
    with torch.no_grad():
        a, b = ours(input_ids=ids), stock(input_ids=ids)
    a = a.logits if hasattr(a, "logits") else a.last_hidden_state
    b = b.logits if hasattr(b, "logits") else b.last_hidden_state
    assert torch.equal(bits(a), bits(b))


def test_patch_is_undone_and_falls_back_for_what_tensorlift_does_not_load(tmp_path):
    import safetensors
    import safetensors.torch
    import transformers.modeling_utils as modeling_utils
    from safetensors.numpy import save_file

    import numpy as np

    original = safetensors.safe_open
    save_file({"x": np.arange(4, dtype=np.float32)}, str(tmp_path / "a.safetensors"))
    with tensorlift.patch():
        patched = len(tensorlift._PATCHED)
        tensorlift.patch()  # a second patch patches once
        assert len(tensorlift._PATCHED) == patched
        assert modeling_utils.safe_open is safetensors.safe_open is safetensors.torch.safe_open
        assert safetensors.safe_open is not original
        # A device tensorlift does not load to: the reference's safe_open serves it.
        with safetensors.safe_open(str(tmp_path / "a.safetensors"), framework="pt", device="xpu") as f:
            assert type(f) is type(original(str(tmp_path / "a.safetensors"), framework="np"))
        # On a ROCm build of torch, "cuda" is an AMD GPU: the reference serves it.
        real_hip = torch.version.hip
        try:
            torch.version.hip = "6.4.0"
            with safetensors.safe_open(str(tmp_path / "a.safetensors"), framework="pt", device="cuda:0") as f:
                assert type(f) is type(original(str(tmp_path / "a.safetensors"), framework="np"))
        finally:
            torch.version.hip = real_hip
        # Other frameworks on the host are tensorlift's where they are installed
        # (tests/frameworks tests them); here JAX is not, and the reference answers.
        with safetensors.safe_open(str(tmp_path / "a.safetensors"), framework="flax") as f:
            assert type(f) is type(original(str(tmp_path / "a.safetensors"), framework="np"))
        # The reference's errors, which libraries catch.
        with pytest.raises(safetensors.SafetensorError, match='backend "fast" is invalid'):
            safetensors.safe_open(str(tmp_path / "a.safetensors"), framework="pt", backend="fast")
        with safetensors.safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
            with pytest.raises(safetensors.SafetensorError, match="does not contain tensor y"):
                f.get_tensor("y")
        kept = safetensors.safe_open
    assert safetensors.safe_open is original
    # A reference to the patched function that outlives the patch still works (it falls
    # back to the reference for what tensorlift does not load).
    with kept(str(tmp_path / "a.safetensors"), framework="pt", device="xpu") as f:
        assert list(f.keys()) == ["x"]
    assert modeling_utils.safe_open is original and safetensors.torch.safe_open is original


def test_devices_tensorlift_does_not_load_to_are_the_references_without_patch(tmp_path):
    """``tensorlift.safe_open`` and ``load_file`` called directly hand a device tensorlift
    does not load to (an XPU here) to the reference, as ``patch()`` does, rather than refuse
    it: the reference's handle, and the reference's own error where this torch has no XPU."""
    import safetensors
    import safetensors.torch
    from safetensors.numpy import save_file

    import numpy as np

    path = tmp_path / "a.safetensors"
    save_file({"x": np.arange(4, dtype=np.float32)}, str(path))
    reference = type(safetensors.safe_open(str(path), framework="np"))
    with tensorlift.safe_open(path, framework="pt", device="xpu") as f:
        assert type(f) is reference and list(f.keys()) == ["x"]
    with pytest.raises(Exception) as want:
        safetensors.torch.load_file(str(path), device="xpu")
    with pytest.raises(type(want.value)) as got:
        tensorlift.load_file(path, device="xpu")
    assert str(got.value) == str(want.value)
    # tensorlift's own options are not the reference's: refused as before.
    with pytest.raises(ValueError, match="xpu"):
        tensorlift.load_file(path, device="xpu", dtype="float16")
    # Its own devices stay its own.
    with tensorlift.safe_open(path, framework="pt", device="cpu") as f:
        assert type(f) is tensorlift.safe_open


def test_a_patch_inside_another_leaves_the_outer_one(tmp_path):
    """The end of a ``with tensorlift.patch():`` inside another (a library that patches
    around its own load, called by an application that patched) does not undo the outer
    patch; the outer one's end does."""
    import safetensors

    original = safetensors.safe_open
    with tensorlift.patch():
        with tensorlift.patch():
            assert safetensors.safe_open is not original
        assert safetensors.safe_open is not original
        outer = tensorlift.patch()
        outer.close()  # not the one that patched
        assert safetensors.safe_open is not original
    assert safetensors.safe_open is original


def test_a_device_index_under_patch_is_the_device_torch_makes_of_it(tmp_path, monkeypatch):
    """The reference has torch read a device given as an index alone: torch's current
    accelerator, which is CUDA on a CUDA host and an XPU (say) on an XPU host, where the
    patched ``safe_open`` hands it to the reference rather than fail."""
    import safetensors
    from safetensors.numpy import save_file

    import numpy as np

    save_file({"x": np.arange(4, dtype=np.float32)}, str(tmp_path / "a.safetensors"))
    original = safetensors.safe_open
    with tensorlift.patch():
        real = torch.device
        monkeypatch.setattr(torch, "device", lambda d, *a: real("xpu", d) if isinstance(d, int) else real(d, *a))
        with safetensors.safe_open(str(tmp_path / "a.safetensors"), framework="pt", device=0) as f:
            assert type(f) is type(original(str(tmp_path / "a.safetensors"), framework="np"))
        monkeypatch.setattr(torch, "device", lambda d, *a: real("cuda", d) if isinstance(d, int) else real(d, *a))
        assert tensorlift._device_type(0) == "cuda"
    assert tensorlift._device_type("cuda:1") == "cuda" and tensorlift._device_type("cpu") == "cpu"


def test_a_model_loaded_through_tensorlift_trains(tmp_path):
    """transformers keeps the tensors of a mapped file as parameters: a training step writes
    them in place (in a child process: a read-only map would kill it)."""
    import subprocess
    import sys

    torch.manual_seed(0)
    llama()[0].save_pretrained(tmp_path)
    child = (
        "import os, sys, torch, transformers, safetensors, tensorlift\n"
        "def mapped(t):\n"
        "    a = t.data_ptr()\n"
        "    for line in open('/proc/self/maps'):\n"
        "        f = line.split()\n"
        "        lo, hi = (int(x, 16) for x in f[0].split('-'))\n"
        "        if lo <= a < hi:\n"
        "            return len(f) > 5 and f[5].endswith('model.safetensors')\n"
        "    return False\n"
        "with tensorlift.patch():\n"
        "    assert safetensors.safe_open is tensorlift._patched_safe_open\n"
        "    m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)\n"
        "views = [p for p in m.parameters() if mapped(p)]\n"
        "assert views, 'no parameter is a view of the mapped file'\n"
        "before = views[0].detach().clone()\n"
        "opt = torch.optim.SGD(m.parameters(), lr=0.1)\n"
        "ids = torch.tensor([[1, 2, 3]])\n"
        "m(input_ids=ids, labels=ids).loss.backward()\n"
        "opt.step()\n"
        "assert not torch.equal(views[0].detach(), before), 'the step left the mapped parameter as it was'\n"
        "print('trained', len(views))\n"
    )
    before = (tmp_path / "model.safetensors").read_bytes()
    out = subprocess.run([sys.executable, "-c", child, str(tmp_path)], capture_output=True, encoding="utf-8", errors="replace",
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0 and "trained" in out.stdout, out.stderr[-2000:]
    assert (tmp_path / "model.safetensors").read_bytes() == before
