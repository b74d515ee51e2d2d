"""Processes that share one load: the ranks of a torch.distributed process group each read
a disjoint part of the checkpoint and send every other rank only its own slices.

The load goes in rounds of about ``world * _ROUND_BYTES`` of the checkpoint, in file order
(a round ends with the tensor that brings it to that size, so a large tensor makes its
round larger), the same rounds on every rank. Each round's bytes are cut
into ``world`` runs of equal size, one a rank, at the nearest boundary between rows of the
first dimension: a tensor that a cut falls in is read by several ranks, each its own block
of rows (a tensor of no dimensions goes whole to the rank its middle byte falls to). So every
rank reads about ``1/world`` of every round, as a few long ranges, and the ranks read at
once; a tensor larger than a round is split among them too, as far as its rows allow (one
of a single row is read by one rank).

In each round the ranks load their pieces with tensorlift, onto their devices, and send each
other rank the part of each piece that rank keeps (its tensor-parallel slice, as
``load_file``'s ``tp`` cuts them, or the whole tensor for replicas), by point-to-point sends
on the group: NCCL between GPUs, gloo between CPUs. Each rank receives straight into its own
tensors. This is a scatter of slices, not an all-gather of tensors: a rank receives only
what it keeps.

Each rank reads its pieces of the next round while the current one is exchanged (a thread
of its own, which tensorlift's load leaves the interpreter to): the reads and the sends
overlap, and a rank holds at most two rounds' pieces (about ``2 * _ROUND_BYTES``, or
``2 * T / world`` where one tensor of ``T`` bytes is larger than a round) beside what it
keeps.

Before each round's exchange the ranks agree that every one of them got ready (one small
all-reduce): a rank that failed (a read, memory) raises its error, and the others raise
too, naming it, rather than wait for sends that will not come.
"""

import hashlib
import json
import math
from concurrent.futures import ThreadPoolExecutor

from . import _NUMPY, _SIX_BIT, _TORCH_RAW, _path

_ROUND_BYTES = 256 << 20

# How ranks cut a load into rounds and pieces and exchange them: in every rank's plan digest,
# with the round size, so that ranks that would cut otherwise (another version of this
# module) stop before anything is exchanged. Raised with every change to the cutting.
_PROTOCOL = 1

# Stored dtypes as torch names them (numpy's names are torch's for the types numpy has); the
# bytes travel as uint8, which every backend sends.
_TORCH_DTYPES = {**_NUMPY, "BF16": "bfloat16", **_TORCH_RAW}


def _torch_dtype(torch, name, dtype):
    if dtype == "F4" or dtype in _SIX_BIT:
        raise ValueError(
            f"tensor '{name}': {dtype} values are packed below a byte, which load_group does not cut "
            "between ranks (load the file with load_file)"
        )
    torch_name = _TORCH_DTYPES.get(dtype)
    if torch_name is None or not hasattr(torch, torch_name):
        raise ValueError(f"tensor '{name}': {dtype} cannot be shared between processes (torch has no such type)")
    return getattr(torch, torch_name)


def _pieces(shapes, sizes, tensors, world):
    """Who reads what of one round's ``tensors`` (indexes, in file order): for each, a list
    of ``(rank, rows)``, in rank order, where ``rows`` is a ``(start, end)`` range of the
    first dimension or ``None`` for the whole tensor. The round's bytes are cut into
    ``world`` equal runs; each cut moves to the nearest row boundary of the tensor it falls
    in. A tensor of no bytes has no pieces: each rank makes its (empty) part itself."""
    total = sum(sizes[i] for i in tensors)
    cuts = [total * r // world for r in range(world + 1)]
    pieces, at = {}, 0
    for i in tensors:
        n, shape = sizes[i], shapes[i]
        if n == 0:
            pieces[i] = []
        elif shape and n % shape[0] == 0:
            # Rows of whole bytes (every type torch can send): each cut to its nearest row.
            rows, row = shape[0], n // shape[0]
            bounds = [min(rows, max(0, (c - at + row // 2) // row)) for c in cuts]
            bounds[0], bounds[-1] = 0, rows
            pieces[i] = [(r, (bounds[r], bounds[r + 1])) for r in range(world) if bounds[r] < bounds[r + 1]]
        else:
            middle = at + n // 2
            pieces[i] = [(next(r for r in range(world) if middle < cuts[r + 1]), None)]
        at += n
    return pieces


def _overlap(rows, part, shape):
    """Where a piece (``rows`` of a tensor of ``shape``, ``None``: all of it) meets a rank's
    part (ranges of the leading dimensions, ``None``: all of it): the index of the meeting
    into the piece and into the part, or ``None`` where they do not meet. Both are blocks
    of rows: contiguous in a contiguous part."""
    if rows is None:
        return (_index(part) if part else ()), ()
    a, b = rows
    lo, hi = part[0] if part else (0, shape[0])
    x0, x1 = max(a, lo), min(b, hi)
    if x0 >= x1:
        return None
    rest = _index(part[1:]) if part else ()
    return (slice(x0 - a, x1 - a),) + rest, (slice(x0 - lo, x1 - lo),)


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
    backend = dist.get_backend(group)
    if backend == "nccl" and d.type != "cuda":
        raise ValueError("a NCCL group sends between GPUs: give this rank's CUDA device (device='cuda:N')")
    if backend == "gloo" and d.type != "cpu":
        # gloo sends and receives host tensors only.
        raise ValueError("a gloo group sends between host memory: give device='cpu', or use a NCCL group for GPUs")
    return str(d)


def _flags_device(torch, dist, group):
    """Where the ranks' agreement is reduced: the host for gloo, this rank's current GPU for
    NCCL (the device a rank loads onto may be the very thing it failed on)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _agree(torch, dist, group, flags, error, me, world, digest=0):
    """Every rank says whether it is ready; if one is not, every rank raises (the failed one
    its own error, the others naming the ranks that failed and why). With ``digest`` (of
    what a rank planned), ranks that planned otherwise than the others make every rank raise
    too. ``flags``: a ``(world, 2)`` int64 tensor on ``_flags_device``, made once before the
    load (a rank short of memory can still agree)."""
    flags.zero_()
    flags[me, 0] = int(error is not None)
    flags[me, 1] = digest
    dist.all_reduce(flags, group=group)
    failed = [r for r, (f, _) in enumerate(flags.tolist()) if f]
    if failed:
        # Every rank asks the same question here: each one's reason, to name it.
        why = [None] * world
        mine = None if error is None else f"{type(error).__name__}: {error}"[:2000]
        dist.all_gather_object(why, mine, group=group)
        if error is not None:
            raise error
        reasons = "; ".join(f"rank {r}: {why[r]}" for r in failed)
        raise RuntimeError(f"load_group: rank {failed[0]} of the group failed ({reasons})")
    digests = [d for _, d in flags.tolist()]
    if any(d != digests[0] for d in digests):
        other = next(r for r, d in enumerate(digests) if d != digests[0])
        raise RuntimeError(
            f"load_group: ranks 0 and {other} planned different checkpoints (tensor names, types, shapes or "
            "parts differ): every rank must load the same one"
        )


def _digest(names, dtypes, shapes, sizes, parts, round_bytes):
    """A digest of a rank's plan (63 bits) and of how it cuts rounds (``_PROTOCOL``, the
    round size): ranks that differ in it would cut other rounds or expect other bytes. (It
    covers the layout, not the weights: ranks on several nodes must load identical copies.)"""
    text = json.dumps([_PROTOCOL, round_bytes, names, [str(d) for d in dtypes], shapes, sizes, parts])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def load_group(ckpt_class, convert, path, group, device, tp, stats):
    import torch
    import torch.distributed as dist

    from ._tensorlift import _tp_slices

    if group is None:
        group = dist.group.WORLD
    world, me = dist.get_world_size(group), dist.get_rank(group)
    if me < 0:
        raise ValueError("load_group: this process is not a rank of the group")
    # Made before anything can fail: every failure from here is agreed on, so that no rank
    # is left waiting for the others' collective until the group's timeout.
    flags = torch.zeros((world, 2), dtype=torch.int64, device=_flags_device(torch, dist, group))
    error, plan = None, None
    try:
        device = _device(torch, dist, group, device)
        ckpt = ckpt_class(_path(path), device)
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
        digest = _digest(names, dtypes, shapes, sizes, parts, world * _ROUND_BYTES)
    except BaseException as e:  # noqa: BLE001 - every rank must hear of it (Ctrl-C too), then it is raised
        error, digest = e, 0
    _agree(torch, dist, group, flags, error, me, world, digest)
    ckpt, names, shapes, sizes, dtypes, parts = plan
    peer = [dist.get_global_rank(group, r) for r in range(world)]
    sent, received = [0] * world, [0] * world
    read = {"bytes_read": 0}
    # In file order, whatever order the tensors arrive in.
    out = dict.fromkeys(names)
    rounds = _rounds(sizes, world * _ROUND_BYTES)
    pieces = [_pieces(shapes, sizes, tensors, world) for tensors in rounds]

    def load(k):
        """This rank's pieces of round ``k``, read while round ``k - 1`` is exchanged."""
        owned = [(i, rows) for i in rounds[k] for r, rows in pieces[k][i] if r == me]
        if not owned:
            return {}
        round_stats = {}
        blocks = {names[i]: rows for i, rows in owned if rows is not None and rows != (0, shapes[i][0])}
        mine = ckpt.load([names[i] for i, _ in owned], stats=round_stats, rows=blocks)
        read["bytes_read"] += round_stats.get("bytes_read", 0)
        return mine

    # Leaving the block (an error included) waits for a read in flight before going on.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tensorlift-group") as reader:
        ahead = reader.submit(load, 0)
        for k, tensors in enumerate(rounds):
            ops, error = [], None
            try:
                mine = ahead.result()
                ahead = reader.submit(load, k + 1) if k + 1 < len(rounds) else None
                for i in tensors:
                    name, shape, dtype = names[i], shapes[i], dtypes[i]
                    # This rank's part, received or copied into, block by block.
                    keep = torch.empty(_part_shape(shape, parts[me][i]), dtype=dtype, device=device)
                    out[name] = keep
                    for owner, rows in pieces[k][i]:
                        if owner == me:
                            piece = convert(mine.pop(name))
                            for r in range(world):
                                meet = _overlap(rows, parts[r][i], shape)
                                if meet is None:
                                    continue
                                block = piece[meet[0]]
                                if r == me:
                                    keep[meet[1]].copy_(block)
                                elif block.numel() > 0:
                                    data = block.contiguous().reshape(-1).view(torch.uint8)
                                    ops.append(dist.P2POp(dist.isend, data, peer[r], group))
                                    sent[r] += data.numel()
                            del piece
                        else:
                            meet = _overlap(rows, parts[me][i], shape)
                            if meet is None or keep[meet[1]].numel() == 0:
                                continue
                            # Rows of a contiguous tensor: the bytes land in place.
                            data = keep[meet[1]].reshape(-1).view(torch.uint8)
                            ops.append(dist.P2POp(dist.irecv, data, peer[owner], group))
                            received[owner] += data.numel()
                del mine
            except BaseException as e:  # noqa: BLE001 - every rank must hear of it (Ctrl-C too), then it is raised
                error = e
            # Every rank ready (this also sets up a NCCL group's communicator, which its
            # point-to-point batches need), then the round's sends and receives, while this
            # rank reads its part of the next round. A failure lets go of what this rank
            # holds of the load first: the error's traceback keeps this frame alive.
            try:
                _agree(torch, dist, group, flags, error, me, world)
            except BaseException:
                out.clear()
                ahead = mine = keep = ops = None
                raise
            if ops:
                for req in dist.batch_isend_irecv(ops):
                    req.wait()
            # Nothing of this round's pieces outlives it (the sends held some).
            ops = piece = block = data = None
    if stats is not None:
        stats.update(read)
        stats["bytes_sent"] = sum(sent)
        stats["bytes_received"] = sum(received)
        stats["sent_to"] = {peer[r]: n for r, n in enumerate(sent) if n}
        stats["received_from"] = {peer[r]: n for r, n in enumerate(received) if n}
    return out
