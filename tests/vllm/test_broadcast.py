"""The tensor-parallel path of the vLLM plugin, alone: two processes in a real gloo group
split the files and broadcast, and each hands over exactly the tensors the reference reader
reads from every file (every dtype torch has, a 0-d tensor, empty tensors, a rank with no
file in the last round), in vLLM's order of files. A read that fails on one rank, or a
tensor one rank has no room to receive, is raised on both, naming the rank and the file,
instead of leaving the other waiting."""
import os
import tempfile
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

WORLD = 2


class Group:
    """What the plugin uses of vLLM's GroupCoordinator, over a plain torch group."""

    def __init__(self):
        self.world_size = dist.get_world_size()
        self.rank_in_group = dist.get_rank()
        self.ranks = list(range(self.world_size))
        self.cpu_group = dist.group.WORLD

    def broadcast(self, t, src):
        dist.broadcast(t, src=self.ranks[src], group=dist.group.WORLD)
        return t


def write_files(folder):
    torch.manual_seed(0)
    files = {
        "a-00001.safetensors": {
            "bool": torch.rand(3, 5) > 0.5,
            "f8": torch.randn(4, 4).to(torch.float8_e4m3fn),
            "bf16": torch.randn(7, 3).to(torch.bfloat16),
            "scalar": torch.tensor(3.5, dtype=torch.float64),
        },
        "a-00002.safetensors": {
            "empty": torch.zeros(0, 4, dtype=torch.float16),
            "i64": torch.arange(-5, 6, dtype=torch.int64),
            "u8": torch.arange(0, 250, dtype=torch.uint8),
        },
        # Three files for two ranks: rank 1 has none in the second round.
        "a-00010.safetensors": {"f32": torch.randn(2, 3, 4), "i8": torch.arange(-8, 8, dtype=torch.int8)},
    }
    paths = []
    for name, tensors in files.items():
        save_file(tensors, os.path.join(folder, name))
        paths.append(os.path.join(folder, name))
    return paths


def worker(rank, init, paths, results, short=None):
    # A regression that leaves a rank waiting fails in a minute, not gloo's default half hour.
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        import tensorlift.vllm as plugin

        if short is not None and rank == short[0]:
            # This rank's device has no room for a tensor of that shape.
            empty = torch.empty

            def no_room(*args, **kwargs):
                if args and isinstance(args[0], (list, tuple)) and list(args[0]) == short[1]:
                    raise torch.OutOfMemoryError("simulated: no room")
                return empty(*args, **kwargs)

            torch.empty = no_room

        plugin.LAST_LOAD.clear()
        plugin.LAST_LOAD.update(files=[], tensors=0, bytes=0, received=0)
        # Each rank lists the files in its own order: rank 0's is the one used.
        mine = paths if rank == 0 else list(reversed(paths))
        try:
            got = [(n, t.clone()) for n, t in plugin._split_and_broadcast(mine, "cpu", Group(), None)]
            results[rank] = {"tensors": got, "load": dict(plugin.LAST_LOAD)}
        except Exception as e:
            results[rank] = {"error": str(e)}
    finally:
        dist.destroy_process_group()
    # The results are sent. A gloo worker thread may still be dropping the last collective's
    # tensors, and were the interpreter finalizing then, taking the GIL would abort the
    # process ("terminate called without an active exception", pytorch/pytorch#179291): so
    # the rank leaves without finalizing.
    os._exit(0)


def run(paths, short=None):
    with tempfile.TemporaryDirectory() as d:
        init = f"file://{d}/store"
        with mp.Manager() as m:
            results = m.dict()
            mp.spawn(worker, args=(init, paths, results, short), nprocs=WORLD, join=True)
            return dict(results)


def test_every_rank_gets_every_tensor_as_the_reference_reads_it(tmp_path):
    paths = write_files(str(tmp_path))
    results = run(paths)
    want = []
    for p in paths:
        want.extend(load_file(p).items())
    for rank in range(WORLD):
        got = results[rank]["tensors"]
        # Each file's tensors, in the order of the files (rank 0's list).
        assert sorted(n for n, _ in got) == sorted(n for n, _ in want)
        file_of = {n: i for i, p in enumerate(paths) for n in load_file(p)}
        order = [file_of[n] for n, _ in got]
        assert order == sorted(order), order
        got = dict(got)
        for name, t in want:
            g = got[name]
            assert g.dtype == t.dtype and g.shape == t.shape, name
            assert torch.equal(g.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), name
    loads = [results[r]["load"] for r in range(WORLD)]
    assert loads[0]["files"] == [paths[0], paths[2]] and loads[1]["files"] == [paths[1]]
    assert all(load["tensors"] == len(want) for load in loads)
    assert loads[0]["received"] + loads[1]["received"] == len(want)


def test_a_failed_read_is_raised_on_every_rank(tmp_path):
    paths = write_files(str(tmp_path))
    os.truncate(paths[1], os.path.getsize(paths[1]) - 8)
    results = run(paths)
    for rank in range(WORLD):
        assert f"tensorlift: rank 1 could not read {paths[1]}" in results[rank]["error"], results[rank]


def test_a_rank_without_room_for_a_received_tensor_stops_every_rank(tmp_path):
    # Rank 1 receives "bf16" (7x3) from rank 0's first file and cannot allocate it: rank 0,
    # which would broadcast it, hears so instead of waiting for rank 1 in the broadcast.
    paths = write_files(str(tmp_path))
    results = run(paths, short=(1, [7, 3]))
    for rank in range(WORLD):
        error = results[rank].get("error", "")
        assert f"tensorlift: rank 1 could not place 'bf16' of {paths[0]} on its device: OutOfMemoryError: simulated: no room" == error, results[rank]


def test_no_files_is_nothing_on_every_rank():
    # vLLM's filters may leave a source no file (its unused-weight filter, say): every rank
    # gets nothing, as vLLM's own iterator gives, rather than an IndexError.
    results = run([])
    for rank in range(WORLD):
        assert results[rank].get("tensors") == [], results[rank]
        assert results[rank]["load"]["files"] == []


if __name__ == "__main__":
    pytest.main([__file__])
