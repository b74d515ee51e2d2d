"""``tensorlift.load_group``: processes that share one load over a torch.distributed group
(gloo, on the CPU), each byte read once on the group, each rank receiving only its slices.
Every rank's tensors are compared with the reference package's reading of the same files,
sliced here with torch indexing, and the reads and exchanges with what they must be."""

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

# The test command installs torch (TENSORLIFT_REQUIRE_DEPS): there, its absence fails.
if os.environ.get("CI") or os.environ.get("TENSORLIFT_REQUIRE_DEPS"):
    import torch
else:
    torch = pytest.importorskip("torch")
from safetensors.torch import load_file as reference_load  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import tensorlift  # noqa: E402
import tensorlift._group  # noqa: E402

RANK = textwrap.dedent(
    """
    import datetime, json, os, sys
    import torch, torch.distributed as dist
    import tensorlift, tensorlift._group

    path, out, tp, rendezvous, round_bytes = sys.argv[1:6]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if rank == int(os.environ.get("BROKEN_RANK", "-1")):
        path += "-missing"
    if rank == int(os.environ.get("OTHER_PATH_RANK", "-1")):
        path += "-other"
    tensorlift._group._ROUND_BYTES = int(round_bytes)
    if rank == int(os.environ.get("OTHER_ROUND_RANK", "-1")):
        tensorlift._group._ROUND_BYTES *= 2  # as another version of the module might cut
    failing = rank == int(os.environ.get("FAILING_READ_RANK", "-1"))
    Real = tensorlift._Checkpoint
    reads = []

    # The real checkpoint, each load logged (its bytes read); with FAILING_READ_RANK, that
    # rank's second read fails: one made while the round before it is exchanged.
    class Logged:

        def __init__(self, *args):
            self.real = Real(*args)

        def __getattr__(self, name):
            return getattr(self.real, name)

        def load(self, names, stats=None, rows=None):
            if failing and len(reads) == 1:
                raise OSError("injected: a read of the next round failed")
            own = {}
            got = self.real.load(names, stats=own, rows=rows)
            # Bytes read, and the rows of each tensor asked for (None: all of it).
            reads.append((own["bytes_read"], {n: (rows or {}).get(n) for n in names}))
            if stats is not None:
                stats.update(own)
            return got

    tensorlift._Checkpoint = Logged
    dist.init_process_group(
        "gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    stats = {}
    if rank == int(os.environ.get("BAD_DEVICE_RANK", "-1")):
        # A rank that fails before anything is read and stays alive (a notebook, a caller
        # that catches the error): the others must not wait for it.
        try:
            tensorlift.load_group(path, device="cuda:0", tp=None if tp == "none" else int(tp))
        except Exception as e:
            print(f"caught: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            import time
            time.sleep(30)
            os._exit(3)
    got = tensorlift.load_group(path, tp=None if tp == "none" else int(tp), stats=stats)
    torch.save(got, os.path.join(out, f"rank{rank}.pt"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"stats": stats, "order": list(got), "reads": reads}, f)
    # tensorlift's memory is given back here, where a fault in that would still show.
    del got
    import gc
    gc.collect()
    dist.destroy_process_group()
    # The results are written. A gloo worker thread may still be dropping the last
    # collective's tensors, and were the interpreter finalizing then, taking the GIL would
    # abort the process ("terminate called without an active exception",
    # pytorch/pytorch#179291): so the rank leaves without finalizing.
    os._exit(0)
    """
)


def start_group(path, world, tp, tmp_path, round_bytes=256 << 20, env=None):
    """Starts ``load_group`` on ``world`` processes; returns them and their output folder."""
    out = tmp_path / f"out-{world}-{tp}-{round_bytes}"
    out.mkdir()
    rendezvous = tmp_path / f"rendezvous-{world}-{tp}-{round_bytes}"
    args = [sys.executable, "-c", RANK, str(path), str(out), str(tp), str(rendezvous), str(round_bytes)]
    procs = [
        subprocess.Popen(
            args,
            env=dict(os.environ, RANK=str(r), WORLD_SIZE=str(world), **(env or {})),
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world)
    ]
    return procs, out


def finish(procs, limit=240):
    """Waits for every rank, within one deadline; returns each one's (exit code, stderr).
    Every process is ended and waited for, whatever happens."""
    deadline = time.monotonic() + limit
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.1)
        late = [r for r, p in enumerate(procs) if p.poll() is None]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        results = [(p.wait(), p.stderr.read()) for p in procs]
    assert not late, f"ranks {late} did not finish: " + "\n".join(err for _, err in results)
    return results


def run_group(path, world, tp, tmp_path, round_bytes=256 << 20):
    """Runs ``load_group`` on ``world`` processes; returns each rank's tensors, stats, the
    order of its dict and, for each of its loads, the bytes read and the tensors asked for."""
    procs, out = start_group(path, world, tp, tmp_path, round_bytes)
    results = finish(procs)
    errors = [f"rank {r}: {err}" for r, (code, err) in enumerate(results) if code != 0]
    assert not errors, "\n".join(errors)
    tensors = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world)]
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    return tensors, [r["stats"] for r in reports], [r["order"] for r in reports], [r["reads"] for r in reports]


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
        # F64: its name begins as a six-bit type's does, and it is shared all the same.
        "model.rope.inv_freq": torch.rand(32, dtype=torch.float64),
        "lm_head.weight": torch.randn(1000, 64).to(torch.float16),
        # 40 rows padded to 64: at 4 ranks, rank 2 gets 8 and rank 3 none.
        "model.extra.embed_tokens.weight": torch.randn(40, 8),
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


@pytest.mark.parametrize("world, round_bytes", [(2, 256 << 20), (4, 256 << 20), (4, 1), (2, 20_000)])
def test_ranks_get_exactly_their_slices_from_one_read(tmp_path, world, round_bytes):
    folder, written = llama(tmp_path)
    ref = {}
    for f in sorted(folder.glob("*.safetensors")):
        ref.update(reference_load(str(f)))
    assert sorted(ref) == sorted(written)
    tensors, stats, orders, reads = run_group(folder, world, 8, tmp_path, round_bytes)
    in_file_order = [t["name"] for t in tensorlift.inspect(str(folder))["tensors"]]
    for rank, got in enumerate(tensors):
        assert orders[rank] == in_file_order
        for name, full in ref.items():
            want = rank_part(name, full, rank, world)
            assert same(got[name], want), f"{name}, rank {rank} of {world}"
    if world == 4:
        assert got["model.extra.embed_tokens.weight"].shape == (0, 8)
    # The group read the checkpoint once: each piece (a tensor, or a block of its rows) at
    # most from the page before it to the page after it, and less than the ranks read
    # loading alone. (Rounds of one tensor each split every tensor: the most pieces.)
    whole, alone = {}, 0
    tensorlift.load_file(str(folder), stats=whole)
    for rank in range(world):
        s = {}
        tensorlift.load_file(str(folder), tp=(rank, world, 8), stats=s)
        alone += s["bytes_read"]
    read = sum(s["bytes_read"] for s in stats)
    pieces = sum(len(asked) for r in reads for _, asked in r)
    assert len(ref) <= pieces <= world * len(ref)
    assert whole["checkpoint_bytes"] <= read <= whole["checkpoint_bytes"] + 2 * 4096 * pieces, (read, pieces, whole)
    assert read < alone
    # Every row of every tensor was read by exactly one rank, and each rank received exactly
    # the elements of its part that lie in rows it did not read (its part cut here from a
    # tensor of row numbers); what it sent and what the others received from it agree.
    readers = {}
    for rank, r in enumerate(reads):
        for _, asked in r:
            for name, rows in asked.items():
                a, b = rows if rows is not None else (0, max(ref[name].shape[:1], default=1))
                readers.setdefault(name, []).extend((row, rank) for row in range(a, b))
    for name, full in ref.items():
        rows = full.shape[0] if full.dim() else 1
        if full.numel():
            assert sorted(row for row, _ in readers[name]) == list(range(rows)), name
    for rank, s in enumerate(stats):
        want = 0
        for name, full in ref.items():
            mine = {row for row, r in readers.get(name, []) if r == rank}
            if full.dim() == 0:
                want += 0 if 0 in mine else full.element_size()
                continue
            row_of = torch.arange(full.shape[0]).reshape(-1, *[1] * (full.dim() - 1)).expand(full.shape)
            part = rank_part(name, row_of, rank, world)
            others = sum(1 for row in part.reshape(-1).tolist() if row not in mine)
            want += others * full.element_size()
        assert s["bytes_received"] == want, f"rank {rank}"
        for peer, n in s["sent_to"].items():
            assert stats[int(peer)]["received_from"][str(rank)] == n
    assert sum(s["bytes_sent"] for s in stats) == sum(s["bytes_received"] for s in stats)


def lopsided(tmp_path):
    """A checkpoint whose first tensor is most of it, then small ones, a scalar, rows that
    do not split evenly and an empty tensor; tensor-parallel names split either way."""
    torch.manual_seed(5)
    tensors = {
        "model.layers.0.mlp.down_proj.weight": torch.randn(512, 1024).to(torch.float16),
        "model.step": torch.tensor(3, dtype=torch.int64),
        "model.norm.weight": torch.randn(64),
        "model.layers.0.mlp.up_proj.weight": torch.randn(1024, 256),
        "model.odd": torch.randn(7, 5),
        "model.empty": torch.empty(0, 4),
    }
    folder = tmp_path / "lopsided"
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    return folder, tensors


@pytest.mark.parametrize("world, tp", [(2, 8), (4, "none")])
def test_every_rank_reads_its_share_of_every_round(tmp_path, world, tp):
    # Rounds of 256 KiB a rank: the 1 MiB tensor is a round of its own, read in blocks of
    # rows by every rank, then the rest; each rank reads in every round, about 1/world of it.
    folder, written = lopsided(tmp_path)
    tensors, stats, _, reads = run_group(folder, world, tp, tmp_path, round_bytes=256 << 10)
    for rank, got in enumerate(tensors):
        assert sorted(got) == sorted(written)
        for name, full in written.items():
            want = full if tp == "none" else rank_part(name, full, rank, world)
            assert same(got[name], want), f"{name}, rank {rank} of {world}"
    rounds = len(reads[0])
    assert rounds >= 2 and all(len(r) == rounds for r in reads), reads
    for k in range(rounds):
        each = [r[k][0] for r in reads]
        # Each cut moves at most half a row, and a read may start a page early.
        assert max(each) - min(each) <= 2 * (2048 + 4096) * 3, (k, each)
    total = sum(s["bytes_read"] for s in stats)
    assert total <= sum(t.numel() * t.element_size() for t in written.values()) + 4096 * 3 * world


def test_a_rank_that_fails_ends_the_load_on_every_rank(tmp_path):
    folder, _ = llama(tmp_path)
    procs, _ = start_group(folder, 2, 8, tmp_path, env={"BROKEN_RANK": "1"})
    (code0, err0), (code1, err1) = finish(procs, limit=120)
    assert code1 != 0 and "FileNotFoundError" in err1, err1
    # The others say which rank failed, and why.
    assert code0 != 0 and "load_group: rank 1 of the group failed (rank 1: FileNotFoundError: " in err0, err0


def test_a_rank_that_fails_before_reading_and_lives_on_does_not_hold_the_others(tmp_path):
    """A rank whose device is refused (gloo takes host memory only) fails before anything is
    read, and its process goes on (it sleeps 30 s): the other ranks fail at once, naming it
    and its reason, not after the group's timeout (60 s here)."""
    folder, _ = llama(tmp_path)
    procs, _ = start_group(folder, 2, "none", tmp_path, env={"BAD_DEVICE_RANK": "1"})
    start = time.monotonic()
    while procs[0].poll() is None and time.monotonic() - start < 20:
        time.sleep(0.1)
    # (Not a speed check: rank 0 left waiting would wait for its 60 s timeout, or for rank 1
    # to exit after its 30 s.)
    ended = procs[0].poll() is not None
    (code0, err0), (code1, err1) = finish(procs, limit=60)
    assert ended, f"rank 0 was still waiting for the failed rank after 20 s: {err0}"
    assert code1 == 3 and "caught: ValueError: a gloo group sends between host memory" in err1, err1
    assert code0 != 0 and "rank 1: ValueError: a gloo group sends between host memory" in err0, err0


def test_ranks_that_would_cut_other_rounds_stop_on_every_rank(tmp_path):
    """A rank that cuts the load into other rounds (another version of tensorlift, here a
    round size twice the others') would send and wait for other bytes: every rank stops,
    saying so, before anything is exchanged."""
    folder, _ = llama(tmp_path)
    procs, _ = start_group(folder, 2, 2, tmp_path, round_bytes=64 << 10, env={"OTHER_ROUND_RANK": "1"})
    for code, err in finish(procs, limit=120):
        assert code != 0 and "planned different checkpoints" in err, err


def test_a_read_ahead_that_fails_ends_the_load_on_every_rank(tmp_path):
    # Rounds of 64 KiB: each rank reads several, each one while the one before is exchanged.
    folder, _ = llama(tmp_path)
    procs, _ = start_group(folder, 2, 2, tmp_path, round_bytes=64 << 10, env={"FAILING_READ_RANK": "0"})
    (code0, err0), (code1, err1) = finish(procs, limit=120)
    assert code0 != 0 and "injected: a read of the next round failed" in err0, err0
    assert code1 != 0 and "load_group: rank 0 of the group failed" in err1, err1


def test_replicas_on_every_rank(tmp_path):
    folder, written = llama(tmp_path)
    tensors, stats, _, _ = run_group(folder, 2, "none", tmp_path)
    for got in tensors:
        assert sorted(got) == sorted(written)
        for name, full in written.items():
            assert same(got[name], full), name
    read = sum(s["bytes_read"] for s in stats)
    assert read < sum(f.numel() * f.element_size() for f in written.values()) + 2 * 4096 * 2


def test_checkpoint_reads_a_block_of_rows_alone(tmp_path):
    # What load_group's owners read: rows start..end of the first dimension, and only them.
    folder, written = lopsided(tmp_path)
    ckpt = tensorlift._Checkpoint(str(folder / "model.safetensors"), "cpu")
    name = "model.layers.0.mlp.down_proj.weight"
    stats = {}
    got = ckpt.load([name, "model.step"], stats=stats, rows={name: (100, 300)})
    assert same(torch.from_dlpack(got[name]), written[name][100:300])
    assert same(torch.from_dlpack(got["model.step"]), written["model.step"])
    # The block's 200 rows of 2 KiB and the scalar, each read from a page boundary at most.
    assert 200 * 2048 + 8 <= stats["bytes_read"] <= 200 * 2048 + 8 + 2 * 2 * 4096, stats
    empty = ckpt.load([name], rows={name: (7, 7)})[name]
    assert tuple(empty.shape) == (0, 1024)
    with pytest.raises(ValueError, match="rows of tensor 'model.norm.weight', which is not among the names loaded"):
        ckpt.load([name], rows={"model.norm.weight": (0, 1)})
    with pytest.raises(ValueError, match=r"rows of tensor 'model.odd': range 2\.\.9 of dimension 0 is outside 0\.\.7"):
        ckpt.load(["model.odd"], rows={"model.odd": (2, 9)})
    with pytest.raises(ValueError, match="rows of tensor 'model.step': 1 ranges for a tensor of 0 dimensions"):
        ckpt.load(["model.step"], rows={"model.step": (0, 1)})


def test_ranks_that_planned_different_checkpoints_stop_on_every_rank(tmp_path):
    """Ranks whose checkpoints differ in layout (a copy of another version, here one tensor
    of another shape) would cut other rounds and wait for other bytes: every rank stops,
    saying so, before anything is exchanged."""
    import shutil

    folder, _ = llama(tmp_path)
    other = tmp_path / "llama-other"
    shutil.copytree(folder, other)
    second = reference_load(str(other / "model-00002-of-00002.safetensors"))
    second["model.norm.weight"] = torch.randn(65)
    save_file(second, str(other / "model-00002-of-00002.safetensors"))
    procs, _ = start_group(folder, 2, "none", tmp_path, env={"OTHER_PATH_RANK": "1"})
    for code, err in finish(procs, limit=120):
        assert code != 0 and "planned different checkpoints" in err, err


def test_a_gloo_group_is_refused_a_cuda_device(tmp_path):
    """gloo sends and receives host tensors only: a CUDA device with it is refused before
    anything is read."""
    import torch.distributed as dist

    folder, _ = llama(tmp_path)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="a gloo group sends between host memory"):
            tensorlift.load_group(folder, device="cuda:0")
    finally:
        dist.destroy_process_group()


def test_sub_byte_tensors_are_refused_by_name(tmp_path):
    """F4 values are packed two a byte, which load_group does not cut between ranks: refused
    naming the tensor and the way out (it said torch has no such type, which it has)."""
    import json
    import struct

    import torch.distributed as dist

    h = json.dumps({"m": {"dtype": "F4", "shape": [4, 6], "data_offsets": [0, 12]}}).encode()
    p = tmp_path / "f4.safetensors"
    p.write_bytes(struct.pack("<Q", len(h)) + h + bytes(range(12)))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="tensor 'm': F4 values are packed below a byte.*load_file"):
            tensorlift.load_group(p)
    finally:
        dist.destroy_process_group()
