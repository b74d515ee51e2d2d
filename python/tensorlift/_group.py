"""Processes that share one load: the ranks of a torch.distributed process group each read
a disjoint part of the checkpoint and send every other rank only its own slices.

Each rank owns a contiguous run of tensors, about ``1/world`` of the checkpoint's bytes, in
file order (so a rank's reads are a few long ranges), and loads those tensors whole with
tensorlift, onto its device. Then, tensor by tensor, the owner keeps its own slice and
sends each other rank that rank's slice (tensor-parallel slices, as ``load_file``'s ``tp``
cuts them, or the whole tensor for replicas), by point-to-point sends on the group: NCCL
between GPUs, gloo between CPUs. This is a scatter of slices, not an all-gather of
tensors: a rank receives only what it keeps. Sends go in rounds of at most
``_ROUND_BYTES`` of the checkpoint, so the slices in flight stay bounded.
"""

_ROUND_BYTES = 256 << 20

from . import _NUMPY, _TORCH_RAW

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


def _part_shape(shape, ranges):
    if ranges is None:
        return list(shape)
    return [b - a for a, b in ranges] + list(shape[len(ranges) :])


def _index(ranges):
    return tuple(slice(a, b) for a, b in ranges)


def load_group(ckpt_class, convert, path, group, device, tp, stats):
    import torch
    import torch.distributed as dist

    from ._tensorlift import _tp_slices

    if group is None:
        group = dist.group.WORLD
    world, me = dist.get_world_size(group), dist.get_rank(group)
    ckpt = ckpt_class(str(path), device)
    names = ckpt.keys()
    infos = [ckpt.info(n) for n in names]
    shapes = [list(shape) for _, shape, _ in infos]
    dtypes = [_torch_dtype(torch, n, d) for n, (d, _, _) in zip(names, infos)]
    owners = _owners([nbytes for _, _, nbytes in infos], world)
    if tp is None:
        parts = [[None] * len(names) for _ in range(world)]
    else:
        parts = [_tp_slices(list(zip(names, shapes)), r, world, tp) for r in range(world)]
    read = {}
    mine = ckpt.load([n for n, o in zip(names, owners) if o == me], stats=read)
    peer = [dist.get_global_rank(group, r) for r in range(world)]
    # One collective on every rank first: NCCL sets up the group's communicator there, which
    # its point-to-point batches need (a batch may leave a rank out).
    dist.barrier(group=group)
    sent, received = [0] * world, [0] * world
    out, ops, pending, in_round = {}, [], [], 0

    def flush():
        if ops:
            for req in dist.batch_isend_irecv(ops):
                req.wait()
        for name, buf, dtype, shape in pending:
            out[name] = buf.view(dtype).reshape(shape)
        ops.clear()
        pending.clear()

    for i, (name, (_, _, nbytes)) in enumerate(zip(names, infos)):
        owner, dtype = owners[i], dtypes[i]
        if owner == me:
            full = convert(mine.pop(name))
            for r in range(world):
                part = full if parts[r][i] is None else full[_index(parts[r][i])]
                if r == me:
                    # A slice is copied out, so that the whole tensor is freed.
                    out[name] = part if parts[r][i] is None else part.clone()
                elif part.numel() > 0:
                    data = part.contiguous().reshape(-1).view(torch.uint8)
                    ops.append(dist.P2POp(dist.isend, data, peer[r], group))
                    sent[r] += data.numel()
            del full
        else:
            shape = _part_shape(shapes[i], parts[me][i])
            count = 1
            for n in shape:
                count *= n
            size = count * torch.empty((), dtype=dtype).element_size()
            buf = torch.empty(size, dtype=torch.uint8, device=device)
            if size > 0:
                ops.append(dist.P2POp(dist.irecv, buf, peer[owner], group))
                received[owner] += size
            pending.append((name, buf, dtype, shape))
        # Every rank ends its rounds at the same tensors: by the checkpoint's bytes.
        in_round += nbytes
        if in_round >= _ROUND_BYTES:
            flush()
            in_round = 0
    flush()
    if stats is not None:
        stats.update(read)
        stats["bytes_sent"] = sum(sent)
        stats["bytes_received"] = sum(received)
        stats["sent_to"] = {peer[r]: n for r, n in enumerate(sent) if n}
        stats["received_from"] = {peer[r]: n for r, n in enumerate(received) if n}
    return out
