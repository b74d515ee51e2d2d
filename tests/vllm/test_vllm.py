"""vLLM loads through tensorlift unchanged: installing the package registers
``load_format="tensorlift"`` (the ``vllm.general_plugins`` entry point), and a tiny Llama
written by transformers generates the same greedy tokens, with the same parameters on every
rank, as with vLLM's default loader, on one rank and on two (gloo), where the ranks split
the files and broadcast. ``vllm serve --load-format tensorlift`` answers the same text.

Runs in vLLM's CPU build (tests/vllm/requirements*.txt, set up by scripts/test); each
engine runs in a process of its own (engine.py)."""
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import safetensors  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
VOCAB = 256


def write_model(path, max_shard_size="200KB"):
    """A Llama-shaped model, written by transformers' save_pretrained (sharded, bf16), with a
    word-level tokenizer ("w0" .. "w255"), so that vLLM reads it as it would a hub model."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=64, max_position_embeddings=128, bos_token_id=1, eos_token_id=0,
    )
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    words = {f"w{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(words, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", eos_token="w0", bos_token="w1")
    fast.save_pretrained(path)
    return path


def checkpoint_tensors(path):
    """name -> (file, nbytes) of every tensor in the folder's shards, read by the reference."""
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            with safetensors.safe_open(os.path.join(path, f), framework="pt") as st:
                for k in st.keys():
                    out[k] = (os.path.join(path, f), st.get_tensor(k).nbytes)
    return out


def engine(model, load_format, tp=1, extra=None, expect_ok=True):
    cmd = [sys.executable, os.path.join(HERE, "engine.py"), str(model), load_format, str(tp), json.dumps(extra or {})]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    if not expect_ok:
        assert p.returncode != 0 and not lines, p.stdout[-3000:]
        return p.stdout + p.stderr
    assert p.returncode == 0 and lines, (p.stdout + p.stderr)[-6000:]
    return json.loads(lines[0][len("RESULT ") :])


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = write_model(tmp_path_factory.mktemp("llama"))
    assert os.path.exists(path / "model.safetensors.index.json")
    assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) >= 3
    return path


@pytest.fixture(scope="module")
def runs(model):
    """Engines run once per module and shared by the tests."""
    cache = {}

    def run(load_format, tp=1, extra=None):
        key = (load_format, tp, json.dumps(extra))
        if key not in cache:
            cache[key] = engine(model, load_format, tp, extra)
        return cache[key]

    return run


def test_entry_point_registers_the_load_format():
    from importlib.metadata import entry_points

    eps = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "tensorlift"]
    assert [ep.value for ep in eps] == ["tensorlift.vllm:register"]
    from vllm.config import LoadConfig
    from vllm.model_executor.model_loader import get_model_loader
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    import tensorlift.vllm
    from vllm.model_executor.model_loader import _LOAD_FORMAT_TO_MODEL_LOADER

    # vLLM calls it in every process: once more changes nothing.
    formats = dict(_LOAD_FORMAT_TO_MODEL_LOADER)
    tensorlift.vllm.register()
    assert _LOAD_FORMAT_TO_MODEL_LOADER == formats
    assert formats["tensorlift"] is tensorlift.vllm.TensorliftModelLoader

    loader = get_model_loader(LoadConfig(load_format="TensorLift"))
    assert type(loader) is tensorlift.vllm.TensorliftModelLoader
    assert loader.distributed is True
    assert get_model_loader(LoadConfig(load_format="tensorlift", model_loader_extra_config={"distributed": False})).distributed is False


def test_options_are_checked():
    from vllm.config import LoadConfig

    import tensorlift.vllm

    with pytest.raises(ValueError, match=r"Unexpected extra config keys for load format tensorlift: \['threads'\]"):
        tensorlift.vllm.TensorliftModelLoader(LoadConfig(load_format="tensorlift", model_loader_extra_config={"threads": 4}))
    # vLLM's default loader's own options are taken (tensorlift has threads of its own).
    extra = {"enable_multithread_load": True, "num_threads": 4}
    tensorlift.vllm.TensorliftModelLoader(LoadConfig(load_format="tensorlift", model_loader_extra_config=extra))
    with pytest.raises(ValueError, match="distributed must be a bool, got 'yes'"):
        tensorlift.vllm.TensorliftModelLoader(LoadConfig(load_format="tensorlift", model_loader_extra_config={"distributed": "yes"}))


def same_on_rank(ours, stock, tensors):
    """The rank's loader handed model.load_weights() every tensor of the checkpoint, as
    vLLM's default loader does, and the parameters that keep what was loaded are equal."""
    assert sorted(ours["weights"]) == sorted(stock["weights"]) == sorted(tensors)
    for name in ours["weights"]:
        assert ours["weights"][name] == stock["weights"][name], name
    assert sorted(ours["params"]) == sorted(stock["params"]) and ours["params"]
    for name in ours["params"]:
        assert ours["params"][name] == stock["params"][name], name


def test_one_rank_same_tokens_and_parameters(model, runs):
    stock, ours = runs("auto"), runs("tensorlift")
    assert ours["tokens"] == stock["tokens"] and ours["text"] == stock["text"]
    assert all(len(t) == 8 for t in ours["tokens"])
    (s,), (o,) = stock["ranks"], ours["ranks"]
    tensors = checkpoint_tensors(model)
    same_on_rank(o, s, tensors)
    # tensorlift read every tensor of every file itself.
    assert s["load"] == {}
    assert sorted(o["load"]["files"]) == sorted({f for f, _ in tensors.values()})
    assert o["load"]["tensors"] == len(tensors) and o["load"]["received"] == 0
    assert o["load"]["bytes"] == sum(n for _, n in tensors.values())
    assert o["load"]["device"] == "cpu"


def test_two_ranks_split_the_files_and_broadcast(model, runs):
    stock, ours = runs("auto", tp=2), runs("tensorlift", tp=2)
    # (Not compared with one rank: split matrix products round bfloat16 otherwise.)
    assert ours["tokens"] == stock["tokens"]
    assert len(ours["ranks"]) == 2
    tensors = checkpoint_tensors(model)
    for s, o in zip(stock["ranks"], ours["ranks"]):
        same_on_rank(o, s, tensors)
    # The ranks hold different halves of the sharded weights: the comparison is per rank.
    assert ours["ranks"][0]["params"] != ours["ranks"][1]["params"]
    # Each file was read by one rank, and every tensor reached both.
    files = [r["load"]["files"] for r in ours["ranks"]]
    assert files[0] and files[1] and not set(files[0]) & set(files[1])
    assert sorted(files[0] + files[1]) == sorted({f for f, _ in tensors.values()})
    for mine, other in ((0, 1), (1, 0)):
        load = ours["ranks"][mine]["load"]
        assert load["tensors"] == len(tensors)
        assert load["bytes"] == sum(n for f, n in tensors.values() if f in files[mine])
        assert load["received"] == sum(1 for f, _ in tensors.values() if f in files[other])


def test_two_ranks_each_reading_every_file(model, runs):
    ours = runs("tensorlift", tp=2, extra={"distributed": False})
    stock = runs("auto", tp=2)
    assert ours["tokens"] == stock["tokens"]
    tensors = checkpoint_tensors(model)
    assert len(stock["ranks"]) == len(ours["ranks"]) == 2
    for s, o in zip(stock["ranks"], ours["ranks"]):
        same_on_rank(o, s, tensors)
        assert o["load"]["received"] == 0 and o["load"]["tensors"] == len(tensors)


def test_a_missing_weight_fails_the_load(tmp_path):
    path = write_model(tmp_path / "m", max_shard_size="10GB")
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    # (A linear layer's weight is not checked on the CPU: vLLM repacks them after loading,
    # and its check exempts the layers that do.)
    del tensors["model.layers.1.post_attention_layernorm.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    for load_format in ("auto", "tensorlift"):
        out = engine(path, load_format, expect_ok=False)
        assert "Following weights were not initialized from checkpoint" in out, out[-4000:]
        assert "model.layers.1.post_attention_layernorm.weight" in out


def test_a_damaged_shard_fails_on_every_rank(model, tmp_path):
    import shutil

    path = tmp_path / "m"
    shutil.copytree(model, path)
    shard = sorted(p for p in os.listdir(path) if p.endswith(".safetensors"))[1]
    size = os.path.getsize(path / shard)
    os.truncate(path / shard, size - 100)
    out = engine(path, "tensorlift", tp=2, expect_ok=False)
    # The rank that reads the shard names it; the other rank is told, instead of waiting:
    # both workers raise it.
    for worker in ("Worker_TP0", "Worker_TP1"):
        lines = [line for line in out.splitlines() if worker in line and f"could not read {path / shard}" in line]
        assert lines and "tensorlift: rank 1" in lines[0], (worker, out[-4000:])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vllm_serve(model, runs):
    port = free_port()
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1")
    cmd = [
        sys.executable, os.path.join(HERE, "vllm_cli.py"), "serve", str(model), "--load-format", "tensorlift",
        "--model-loader-extra-config", '{"enable_weights_track": true}', "--port", str(port), "--host", "127.0.0.1",
        "--dtype", "bfloat16", "--max-model-len", "64", "--gpu-memory-utilization", "0.1", "--enforce-eager",
    ]
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while True:
            assert server.poll() is None, server.stdout.read()[-4000:]
            assert time.time() < deadline, "vllm serve did not come up in 300 s"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        stock = runs("auto")
        for prompt, text in zip(["w1 w2 w3 w4", "w42"], [stock["text"][0], stock["text"][2]]):
            body = json.dumps({"model": str(model), "prompt": prompt, "max_tokens": 8, "temperature": 0}).encode()
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"}
            )
            answer = json.load(urllib.request.urlopen(req, timeout=60))
            assert answer["choices"][0]["text"] == text
    finally:
        server.terminate()
        try:
            out, _ = server.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            out, _ = server.communicate()
    # The load's own summary (not a fallback's warning), and the loader registered.
    assert re.search(r"tensorlift: \d+ tensors \(", out) and "Registered model loader" in out, out[-4000:]


def test_weights_for_a_reload_without_load_weights(model):
    # vLLM's in-place weight reload asks a fresh loader for get_all_weights() directly.
    from vllm.config import LoadConfig

    import tensorlift.vllm

    class ModelConfig:
        revision = None

    ModelConfig.model = str(model)
    tensorlift.vllm.LAST_LOAD.clear()
    loader = tensorlift.vllm.TensorliftModelLoader(LoadConfig(load_format="tensorlift"))
    got = {name: t.clone() for name, t in loader.get_all_weights(ModelConfig(), torch.nn.Linear(1, 1))}
    want = {}
    for f in sorted(os.listdir(model)):
        if f.endswith(".safetensors"):
            with safetensors.safe_open(os.path.join(model, f), framework="pt") as st:
                want.update({k: st.get_tensor(k) for k in st.keys()})
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert torch.equal(got[k].reshape(-1).view(torch.uint8), want[k].reshape(-1).view(torch.uint8)), k
    assert tensorlift.vllm.LAST_LOAD["tensors"] == len(want) and tensorlift.vllm.LAST_LOAD["device"] == "cpu"


def test_a_pytorch_bin_model_loads_as_auto_loads_it(tmp_path):
    """A model with only a ``pytorch_model.bin`` (as older hub repositories have): vLLM's
    file choice (``auto``) finds it, and tensorlift reads it (its pickle interpreted, never
    run) to the same tensors and tokens as vLLM's ``torch.load``."""
    from safetensors.torch import load_file

    path = write_model(tmp_path / "m", max_shard_size="10GB")
    state = load_file(path / "model.safetensors")
    torch.save(state, path / "pytorch_model.bin")
    os.remove(path / "model.safetensors")
    stock, ours = engine(path, "auto"), engine(path, "tensorlift")
    assert ours["tokens"] == stock["tokens"] and all(len(t) == 8 for t in ours["tokens"])
    (s,), (o,) = stock["ranks"], ours["ranks"]
    assert sorted(o["weights"]) == sorted(s["weights"]) == sorted(state)
    for name in o["weights"]:
        assert o["weights"][name] == s["weights"][name], name
    assert o["load"]["files"] == [str(path / "pytorch_model.bin")]
    assert o["load"]["tensors"] == len(state)
    # tensorlift read it (not torch.load, the fallback for a file it refuses).
    assert "torch_loaded" not in o["load"], o["load"]


def test_other_ranks_experts_are_not_read_and_a_refused_pytorch_file_is_read_as_vllm_does(tmp_path, monkeypatch):
    """With expert parallelism (``keep``), only the kept tensors are asked of tensorlift (the
    others are not read); a ``.bin`` that tensorlift refuses is read by
    ``torch.load(weights_only=True)``, as vLLM's default loader reads it; a safetensors file
    it refuses stays an error."""
    from safetensors.torch import save_file

    import tensorlift
    import tensorlift.vllm as tv

    # Names with every character a glob gives a meaning to.
    tensors = {f"layers.0.experts.{e}.w[{e}]*?{{x}}": torch.full((4,), float(e)) for e in range(4)}
    tensors["norm.weight"] = torch.ones(3)
    path = str(tmp_path / "m.safetensors")
    save_file(tensors, path)
    asked = []
    real = tensorlift.iter_tensors

    def recording(p, **kw):
        asked.append(kw.get("filter"))
        return real(p, **kw)

    monkeypatch.setattr(tensorlift, "iter_tensors", recording)

    def keep(name):
        return "experts" not in name or ".1." in name or ".3." in name

    got = dict(tv._file_tensors(path, "cpu", keep))
    assert sorted(got) == sorted(n for n in tensors if keep(n))
    for n in got:
        assert got[n].dtype == tensors[n].dtype and got[n].shape == tensors[n].shape, n
        assert torch.equal(got[n].reshape(-1).view(torch.uint8), tensors[n].reshape(-1).view(torch.uint8)), n
    # The filter asked of tensorlift plans exactly the kept tensors (the others not read).
    assert len(asked) == 1
    assert sorted(n for n, _ in real(path, filter=asked[0])) == sorted(got)
    assert all(torch.equal(t, tensors[n]) for n, t in tv._file_tensors(path, "cpu", None))

    def refusing(p, **kw):
        raise tensorlift.SafetensorError(f"{p}: refused")

    monkeypatch.setattr(tensorlift, "iter_tensors", refusing)
    monkeypatch.setattr(tensorlift, "load_file", lambda p, **kw: refusing(p))
    bin_path = str(tmp_path / "pytorch_model.bin")
    torch.save(tensors, bin_path)
    torch_load = tv._TorchLoad("cpu")
    for got in (dict(tv._file_tensors(bin_path, "cpu", None, torch_load)), tv._load_whole(bin_path, "cpu", torch_load)[0]):
        assert sorted(got) == sorted(tensors) and all(torch.equal(got[n], tensors[n]) for n in got)
    # Where vLLM reads safetensors files (no torch_load), a refusal stays an error.
    with pytest.raises(tensorlift.SafetensorError, match="refused"):
        dict(tv._file_tensors(path, "cpu", None))
    with pytest.raises(tensorlift.SafetensorError, match="refused"):
        tv._load_whole(path, "cpu")


def test_a_file_that_cannot_be_read_is_not_read_again_by_torch_load(tmp_path, monkeypatch):
    """torch.load reads a PyTorch file tensorlift refuses; a file tensorlift could not read
    (an I/O error, a file changed during the load: a SafetensorError too, as the reference
    raises) is the load's error, not read again by torch.load."""
    import tensorlift
    import tensorlift.vllm as tv

    path = str(tmp_path / "m.safetensors")
    from safetensors.torch import save_file

    save_file({"a": torch.arange(4.0)}, path)
    asked = []

    def torch_load(p, error):
        asked.append(p)
        return {}

    def unreadable(*args, **kwargs):
        raise tensorlift._ReadFailed(f"{path}: shard changed since it was planned (simulated)")

    monkeypatch.setattr(tensorlift, "load_file", unreadable)
    monkeypatch.setattr(tensorlift, "iter_tensors", unreadable)
    with pytest.raises(OSError, match="simulated"):
        tv._load_whole(path, "cpu", torch_load)
    with pytest.raises(OSError, match="simulated"):
        list(tv._file_tensors(path, "cpu", None, torch_load))
    assert asked == []
    # A file tensorlift refuses is torch.load's.
    def refused(*args, **kwargs):
        raise tensorlift._InvalidFile(f"{path}: not a checkpoint (simulated)")

    monkeypatch.setattr(tensorlift, "load_file", refused)
    monkeypatch.setattr(tensorlift, "iter_tensors", refused)
    tv._load_whole(path, "cpu", torch_load)
    list(tv._file_tensors(path, "cpu", None, torch_load))
    assert asked == [path, path]


def test_a_file_the_device_cannot_hold_is_read_to_the_host(tmp_path, monkeypatch):
    """Where the device has too little free memory for a file (torch's cache is not free to
    another allocator), the file is read to the host instead, from where vLLM's weight
    loaders copy each tensor in, as with its default loader; no tensor is handed over twice."""
    from safetensors.torch import save_file

    import tensorlift
    import tensorlift.vllm as tv

    tensors = {"a": torch.arange(6.0), "b": torch.ones(2, 3)}
    path = str(tmp_path / "m.safetensors")
    save_file(tensors, path)
    real_iter, real_load = tensorlift.iter_tensors, tensorlift.load_file
    devices = []

    def short(device):
        devices.append(device)
        if device != "cpu":
            raise tensorlift.DeviceMemoryError(f"{path}: cuda:0 has 1 MiB free, the load needs 2 MiB")

    def iter_tensors(p, device="cpu", **kw):
        short(device)
        return real_iter(p, device=device, **kw)

    def load_file(p, device="cpu", **kw):
        short(device)
        return real_load(p, device=device, **kw)

    monkeypatch.setattr(tensorlift, "iter_tensors", iter_tensors)
    monkeypatch.setattr(tensorlift, "load_file", load_file)
    got = list(tv._file_tensors(path, "cuda:0", None))
    assert [n for n, _ in got] == list(tensors) and all(torch.equal(t, tensors[n]) for n, t in got)
    assert all(t.device.type == "cpu" for _, t in got) and devices == ["cuda:0", "cpu"]
    # For a broadcast, the file is mapped on the host (as vLLM's default loader reads it),
    # and each tensor moved to the device by torch as it is sent, never the whole file at once
    # (torch's "meta" device stands for the GPU this machine lacks).
    devices.clear()
    whole, to_move = tv._load_whole(path, "meta")
    assert to_move and devices == ["meta", "cpu"] and sorted(whole) == sorted(tensors)
    assert all(t.device.type == "cpu" and torch.equal(t, tensors[n]) for n, t in whole.items())
    devices.clear()
    sent = []

    class OneRank:  # a group of one: its broadcasts send nothing
        world_size, rank_in_group, cpu_group = 1, 0, None

        def broadcast(self, t, src):
            sent.append((t.device.type, t.nbytes))

    monkeypatch.setattr(torch.distributed, "all_gather_object", lambda out, obj, group=None: out.__setitem__(0, obj))
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, group=None: None)
    monkeypatch.setattr(tv, "LAST_LOAD", {"files": [], "tensors": 0, "bytes": 0, "received": 0})
    got = list(tv._split_and_broadcast([path], "meta", OneRank(), None))
    assert devices == ["meta", "cpu"] and [n for n, _ in got] == list(tensors)
    assert all(t.device.type == "meta" and t.shape == tensors[n].shape for n, t in got)
    assert sent == [("meta", t.nbytes) for t in tensors.values()]
    assert issubclass(tensorlift.DeviceMemoryError, RuntimeError)


SPLIT_RANK = """
import datetime, json, os, sys
import torch, torch.distributed as dist
import tensorlift.vllm as tv

folder, rendezvous, out, fail_rank, unmovable = sys.argv[1:6]
rank = int(os.environ["RANK"])
if rank == int(unmovable):
    # This rank's device had no room for its file (read to the host instead), and has none
    # for its first tensor either.
    class Unmovable:
        def __init__(self, t):
            self.dtype, self.shape, self.nbytes = t.dtype, t.shape, t.nbytes

        def to(self, device):
            raise RuntimeError("no room on the device for it (simulated)")

    load_whole = tv._load_whole

    def _load_whole(path, device, torch_load=None):
        tensors, _ = load_whole(path, device, torch_load)
        return {n: Unmovable(t) for n, t in tensors.items()}, True

    tv._load_whole = _load_whole
dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=60))

class Group:  # what _split_and_broadcast asks of vLLM's GroupCoordinator
    world_size, rank_in_group, ranks, cpu_group = 2, rank, [0, 1], dist.group.WORLD

    def broadcast(self, t, src):
        dist.broadcast(t, src=src)

# Each rank's own copy of the files, in a folder of its own (another node's snapshot).
mine = os.path.join(folder, f"copy{rank}")
files = sorted(os.path.join(mine, f) for f in os.listdir(mine))
if rank == int(fail_rank):
    files = FileNotFoundError(f"rank {rank}: no snapshot here")
tv.LAST_LOAD.update(files=[], tensors=0, bytes=0, received=0, seconds=0.0)  # as load_weights sets it
try:
    got = {n: t.tolist() for n, t in tv._split_and_broadcast(files, "cpu", Group(), None)}
    result = {"tensors": got}
except Exception as e:
    result = {"error": f"{type(e).__name__}: {e}"}
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump(result, f)
dist.destroy_process_group()
# The results are written. A gloo worker thread may still be dropping the last collective's
# tensors, and were the interpreter finalizing then, taking the GIL would abort the process
# ("terminate called without an active exception", pytorch/pytorch#179291): so the rank
# leaves without finalizing.
os._exit(0)
"""


def run_split(tmp_path, fail_rank, unmovable=-1):
    out = tmp_path / f"out{fail_rank}{unmovable}"
    out.mkdir()
    rendezvous = str(tmp_path / f"rv{fail_rank}{unmovable}")
    args = [sys.executable, "-c", SPLIT_RANK, str(tmp_path), rendezvous, str(out), str(fail_rank), str(unmovable)]
    procs = [subprocess.Popen(args, env=dict(os.environ, RANK=str(r))) for r in range(2)]
    for p in procs:
        assert p.wait(timeout=240) == 0
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_split_reading_agrees_on_files_by_name_and_a_rank_without_them_stops_every_rank(tmp_path):
    """Ranks that split the files name them by their place in the model folder, each reading
    its own copy (here in two folders), and every rank gets every tensor; a rank that could
    not find its files (a failed download on one node) says so in the first collective, so
    every rank raises instead of waiting."""
    from safetensors.torch import save_file

    # Rank 1's copy differs from rank 0's (by 100), so that the tensors rank 1 reads and
    # sends show whose copy it read: its own.
    files = {k: [f"t{i}" for i in range(6) if i % 3 == k] for k in range(3)}
    for r in range(2):
        (tmp_path / f"copy{r}").mkdir()
        for k, names in files.items():
            data = {n: torch.tensor([float(n[1:]) + 100 * r] * 3) for n in names}
            save_file(data, str(tmp_path / f"copy{r}" / f"m-{k}.safetensors"))
    # Two ranks, three files: rank 0 reads m-0 and m-2, rank 1 reads m-1.
    want = {n: [float(n[1:]) + (100 if k == 1 else 0)] * 3 for k, names in files.items() for n in names}
    ok = run_split(tmp_path, -1)
    assert ok[0] == ok[1] == {"tensors": want}, ok
    failed = run_split(tmp_path, 1)
    assert failed[1] == {"error": "FileNotFoundError: rank 1: no snapshot here"}, failed
    assert "rank 1 could not find the checkpoint's files" in failed[0]["error"], failed
    # A rank whose file went to the host (its device had no room) and that cannot move a
    # tensor of it to the device says so before the broadcast the other would wait in.
    stuck = run_split(tmp_path, -1, unmovable=0)
    for r in range(2):
        assert "rank 0 could not place 't0' of" in stuck[r]["error"], stuck
        assert "no room on the device for it (simulated)" in stuck[r]["error"], stuck
