"""Processes that share one load: the ranks of a torch.distributed process group each read
a disjoint part of the checkpoint and send every other rank only its own slices.

Each rank owns a contiguous run of tensors, about ``1/world`` of the checkpoint's bytes, in
file order (so a rank's reads are a few long ranges). The load goes in rounds of about
``_ROUND_BYTES`` of the checkpoint (more where one tensor is larger): in each, the owners
load their tensors of the round with tensorlift, onto their devices, keep a copy of their
own slice of each and send each other rank that rank's slice (tensor-parallel slices, as
``load_file``'s ``tp`` cuts them, or the whole tensor for replicas), by point-to-point sends
on the group: NCCL between GPUs, gloo between CPUs. This is a scatter of slices, not an
all-gather of tensors: a rank receives only what it keeps, and holds at most a round of
loaded tensors beside what it keeps.

Each rank reads its part of the next round while the current one is exchanged (a thread
of its own, which tensorlift's load leaves the interpreter to): the reads and the sends
overlap, and a rank holds at most two rounds of loaded tensors beside what it keeps.

Before each round's exchange the ranks agree that every one of them got ready (one small
all-reduce): a rank that failed (a read, memory) raises its error, and the others raise
too, naming it, rather than wait for sends that will not come.
"""

import math
from concurrent.futures import ThreadPoolExecutor

from . import _NUMPY, _TORCH_RAW

_ROUND_BYTES = 256 << 20

# Stored dtypes as torch names them (numpy's names are torch's for the types numpy has); the
# bytes travel as uint8, which every backend sends.
_TORCH_DTYPES = {**_NUMPY, "BF16": "bfloat16", **_TORCH_RAW}


def _torch_dtype(torch, name, dtype):
    torch_name = _TORCH_DTYPES.get(dtype)
    if torch_name is None or not hasattr(torch, torch_name):
        raise ValueError(f"tensor '{name}': {dtype} cannot be shared between processes (torch has no such type)")
    return getattr(torch, torch_name)


def _owners(sizes, world):
    """Each tensor's owner: contiguous runs of about ``1/world`` of the bytes, in order."""
    total = max(sum(sizes), 1)
    owners, at = [], 0
    for n in sizes:
        owners.append(min(world - 1, at * world // total))
        at += n
    return owners


def _rounds(sizes, limit):
    """The tensors of each round, as index ranges: every rank cuts the same rounds, by the
    checkpoint's bytes."""
    rounds, start, acc = [], 0, 0
    for i, n in enumerate(sizes):
        acc += n
        if acc >= limit:
            rounds.append(range(start, i + 1))
            start, acc = i + 1, 0
    if start < len(sizes) or not rounds:
        rounds.append(range(start, len(sizes)))
    return rounds


def _part_shape(shape, ranges):
    if ranges is None:
        return list(shape)
    return [b - a for a, b in ranges] + list(shape[len(ranges) :])


def _index(ranges):
    return tuple(slice(a, b) for a, b in ranges)


def _device(torch, dist, group, device):
    """The device this rank loads onto and receives into, one name for tensorlift and torch:
    ``"cuda"`` is torch's current device, as torch reads it; NCCL needs a GPU."""
    if str(device) == "auto":
        raise ValueError("load_group needs the device of this rank: 'cpu' or 'cuda:N'")
    d = torch.device(device)
    if d.type == "cuda":
        d = torch.device("cuda", torch.cuda.current_device() if d.index is None else d.index)
    elif d.type != "cpu":
        raise ValueError(f"load_group loads onto 'cpu' or a CUDA device, not {device!r}")
    if dist.get_backend(group) == "nccl" and d.type != "cuda":
        raise ValueError("a NCCL group sends between GPUs: give this rank's CUDA device (device='cuda:N')")
    return str(d)


def _agree(torch, dist, group, device, error, me, world):
    """Every rank says whether it is ready; if one is not, every rank raises (the failed one
    its own error)."""
    flags = torch.zeros(world, dtype=torch.int32, device=device)
    if error is not None:
        flags[me] = 1
    dist.all_reduce(flags, group=group)
    failed = [r for r, f in enumerate(flags.tolist()) if f]
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"load_group: rank {failed[0]} of the group failed (its own error says why)")


def load_group(ckpt_class, convert, path, group, device, tp, stats):
    import torch
    import torch.distributed as dist

    from ._tensorlift import _tp_slices

    if group is None:
        group = dist.group.WORLD
    world, me = dist.get_world_size(group), dist.get_rank(group)
    if me < 0:
        raise ValueError("load_group: this process is not a rank of the group")
    device = _device(torch, dist, group, device)
    error, plan = None, None
    try:
        ckpt = ckpt_class(str(path), device)
        names = ckpt.keys()
        infos = [ckpt.info(n) for n in names]
        shapes = [list(shape) for _, shape, _ in infos]
        sizes = [nbytes for _, _, nbytes in infos]
        dtypes = [_torch_dtype(torch, n, d) for n, (d, _, _) in zip(names, infos)]
        if tp is None:
            parts = [[None] * len(names) for _ in range(world)]
        else:
            parts = [_tp_slices(list(zip(names, shapes)), r, world, tp) for r in range(world)]
        plan = (ckpt, names, shapes, sizes, dtypes, parts)
    except Exception as e:  # noqa: BLE001 - every rank must hear of it, then it is raised
        error = e
    _agree(torch, dist, group, device, error, me, world)
    ckpt, names, shapes, sizes, dtypes, parts = plan
    owners = _owners(sizes, world)
    peer = [dist.get_global_rank(group, r) for r in range(world)]
    sent, received = [0] * world, [0] * world
    read = {"bytes_read": 0}
    # In file order, whatever order the tensors arrive in.
    out = dict.fromkeys(names)
    rounds = _rounds(sizes, _ROUND_BYTES)

    def load(k):
        """This rank's tensors of round ``k``, read while round ``k - 1`` is exchanged."""
        owned = [names[i] for i in rounds[k] if owners[i] == me]
        round_stats = {}
        mine = ckpt.load(owned, stats=round_stats) if owned else {}
        read["bytes_read"] += round_stats.get("bytes_read", 0)
        return mine

    # Leaving the block (an error included) waits for a read in flight before going on.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tensorlift-group") as reader:
        ahead = reader.submit(load, 0)
        for k, tensors in enumerate(rounds):
            ops, pending, error = [], [], None
            try:
                mine = ahead.result()
                ahead = reader.submit(load, k + 1) if k + 1 < len(rounds) else None
                for i in tensors:
                    name, owner, dtype = names[i], owners[i], dtypes[i]
                    if owner == me:
                        full = convert(mine.pop(name))
                        for r in range(world):
                            part = full if parts[r][i] is None else full[_index(parts[r][i])]
                            if r == me:
                                # A copy: the loaded memory goes when the round ends.
                                out[name] = part.clone()
                            elif part.numel() > 0:
                                data = part.contiguous().reshape(-1).view(torch.uint8)
                                ops.append(dist.P2POp(dist.isend, data, peer[r], group))
                                sent[r] += data.numel()
                        del full
                    else:
                        shape = _part_shape(shapes[i], parts[me][i])
                        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
                        buf = torch.empty(size, dtype=torch.uint8, device=device)
                        if size > 0:
                            ops.append(dist.P2POp(dist.irecv, buf, peer[owner], group))
                            received[owner] += size
                        pending.append((name, buf, dtype, shape))
                del mine
            except Exception as e:  # noqa: BLE001 - every rank must hear of it, then it is raised
                error = e
            # Every rank ready (this also sets up a NCCL group's communicator, which its
            # point-to-point batches need), then the round's sends and receives, while this
            # rank reads its part of the next round.
            _agree(torch, dist, group, device, error, me, world)
            if ops:
                for req in dist.batch_isend_irecv(ops):
                    req.wait()
            for name, buf, dtype, shape in pending:
                out[name] = buf.view(dtype).reshape(shape)
    if stats is not None:
        stats.update(read)
        stats["bytes_sent"] = sum(sent)
        stats["bytes_received"] = sum(received)
        stats["sent_to"] = {peer[r]: n for r, n in enumerate(sent) if n}
        stats["received_from"] = {peer[r]: n for r, n in enumerate(received) if n}
    return out
