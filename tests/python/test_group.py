"""``tensorlift.load_group``: processes that share one load over a torch.distributed group
(gloo, on the CPU), each byte read once on the group, each rank receiving only its slices.
Every rank's tensors are compared with the reference package's reading of the same files,
sliced here with torch indexing, and the reads and exchanges with what they must be."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import load_file as reference_load  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import tensorlift  # noqa: E402

RANK = textwrap.dedent(
    """
    import json, os, sys
    import torch, torch.distributed as dist
    import tensorlift

    path, out, tp, rendezvous = sys.argv[1:5]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    stats = {}
    got = tensorlift.load_group(path, tp=None if tp == "none" else int(tp), stats=stats)
    torch.save(got, os.path.join(out, f"rank{rank}.pt"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(stats, f)
    dist.destroy_process_group()
    """
)


def run_group(path, world, tp, tmp_path):
    """Runs ``load_group`` on ``world`` processes; returns each rank's tensors and stats."""
    out = tmp_path / f"out-{world}-{tp}"
    out.mkdir()
    rendezvous = tmp_path / f"rendezvous-{world}-{tp}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANK, str(path), str(out), str(tp), str(rendezvous)],
            env=dict(os.environ, RANK=str(r), WORLD_SIZE=str(world)),
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world)
    ]
    errors = []
    for r, p in enumerate(procs):
        try:
            _, err = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"rank {r} of {world} did not finish")
        if p.returncode != 0:
            errors.append(f"rank {r}: {err}")
    assert not errors, "\n".join(errors)
    tensors = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world)]
    stats = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    return tensors, stats


def llama(tmp_path):
    torch.manual_seed(3)
    a = {
        "model.embed_tokens.weight": torch.randn(1000, 64).to(torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(64, 64).to(torch.bfloat16),
        "model.layers.0.self_attn.k_proj.weight": torch.randn(32, 64),
        "model.layers.0.self_attn.o_proj.weight": torch.randn(64, 64),
        "model.layers.0.mlp.down_proj.weight": torch.randn(64, 176),
    }
    b = {
        "model.layers.0.mlp.up_proj.weight": torch.randn(176, 64).to(torch.float8_e4m3fn),
        "model.norm.weight": torch.randn(64),
        "model.mask": torch.rand(40) > 0.5,
        "model.step": torch.tensor(7, dtype=torch.int64),
        "lm_head.weight": torch.randn(1000, 64).to(torch.float16),
    }
    folder = tmp_path / "llama"
    folder.mkdir()
    save_file(a, str(folder / "model-00001-of-00002.safetensors"))
    save_file(b, str(folder / "model-00002-of-00002.safetensors"))
    weight_map = {k: "model-00001-of-00002.safetensors" for k in a}
    weight_map.update({k: "model-00002-of-00002.safetensors" for k in b})
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder, {**a, **b}


def rank_part(name, full, rank, world):
    """Rank ``rank`` of ``world``'s part, cut here by vLLM's rules for a Llama model."""
    def part(n):
        return slice(rank * n // world, (rank + 1) * n // world)

    if name.endswith(("q_proj.weight", "k_proj.weight", "up_proj.weight")):
        return full[part(full.shape[0])]
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        return full[:, part(full.shape[1])]
    if name.endswith(("embed_tokens.weight", "lm_head.weight")):
        per = full.shape[0] + (-full.shape[0]) % 64
        per //= world
        return full[rank * per : (rank + 1) * per]
    return full


def same(a, b):
    def raw(t):
        return t.contiguous().reshape(-1).view(torch.uint8)

    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(raw(a), raw(b))


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_get_exactly_their_slices_from_one_read(tmp_path, world):
    folder, written = llama(tmp_path)
    ref = {}
    for f in sorted(folder.glob("*.safetensors")):
        ref.update(reference_load(str(f)))
    assert sorted(ref) == sorted(written)
    tensors, stats = run_group(folder, world, 8, tmp_path)
    for rank, got in enumerate(tensors):
        assert sorted(got) == sorted(ref)
        for name, full in ref.items():
            want = rank_part(name, full, rank, world)
            assert same(got[name], want), f"{name}, rank {rank} of {world}"
    # The group read the checkpoint once (less a little for the header pages): no more than
    # one whole load reads, and less than the ranks read loading alone.
    whole, alone = {}, 0
    tensorlift.load_file(str(folder), stats=whole)
    for rank in range(world):
        s = {}
        tensorlift.load_file(str(folder), tp=(rank, world, 8), stats=s)
        alone += s["bytes_read"]
    read = sum(s["bytes_read"] for s in stats)
    assert whole["checkpoint_bytes"] <= read <= whole["bytes_read"] + world * 4096, (read, whole)
    assert read < alone
    # Each rank received its parts of the tensors others own, no more (a rank that owns no
    # whole tensor receives all of its part): what it sent and what the others received
    # from it agree.
    for rank, s in enumerate(stats):
        mine = sum(rank_part(n, f, rank, world).numel() * f.element_size() for n, f in ref.items())
        assert 0 < s["bytes_received"] <= mine
        for peer, n in s["sent_to"].items():
            assert stats[int(peer)]["received_from"][str(rank)] == n
    assert sum(s["bytes_sent"] for s in stats) == sum(s["bytes_received"] for s in stats)


def test_replicas_on_every_rank(tmp_path):
    folder, written = llama(tmp_path)
    tensors, stats = run_group(folder, 2, "none", tmp_path)
    for got in tensors:
        assert sorted(got) == sorted(written)
        for name, full in written.items():
            assert same(got[name], full), name
    read = sum(s["bytes_read"] for s in stats)
    assert read < sum(f.numel() * f.element_size() for f in written.values()) + 2 * 4096 * 2
