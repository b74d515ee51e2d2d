"""tensorlift as a vLLM model loader: ``load_format="tensorlift"``.

Installing the ``tensorlift`` package registers it through vLLM's ``vllm.general_plugins``
entry point, so that, unchanged::

    vllm serve MODEL --load-format tensorlift
    LLM(MODEL, load_format="tensorlift")

load the checkpoint's files through tensorlift (io_uring, file by file, as vLLM reads
them, straight onto the rank's device) and hand ``model.load_weights()`` the tensors already
on that device. Which files are read, how they are downloaded, and the check that every
parameter was loaded are vLLM's own (``DefaultModelLoader``, as for ``--load-format auto``:
safetensors files, or Mistral's ``consolidated*.safetensors`` where a repository has them,
else PyTorch ``.bin``/``.pt`` files, which tensorlift reads without running their pickle; such
a file tensorlift refuses is read as vLLM reads it, by ``torch.load(weights_only=True)`` onto
``pt_load_map_location``, unless ``TENSORLIFT_USE_SAFETENSORS`` is set to 1, true or yes). With expert
parallelism, a rank that reads the files on its own does not read other ranks' experts; ranks
that split the files read and broadcast every tensor, and each keeps its own.

With tensor parallelism the ranks of a tensor-parallel group split the files: each rank
reads its own files onto its device, and every tensor reaches the other ranks by a
broadcast over vLLM's own process group (NCCL on GPUs, gloo on CPUs), so a cold node reads
each byte from disk once. ``--model-loader-extra-config '{"distributed": false}'`` makes
every rank read every file itself instead (through the page cache, which the ranks share).

Options, through ``--model-loader-extra-config`` (JSON) or ``model_loader_extra_config``:

``distributed`` (bool, default true)
    With more than one rank in the tensor-parallel group: split the files between the ranks
    and broadcast (true), or read every file on every rank (false).
``enable_weights_track`` (bool)
    vLLM's own: check (or not) that every parameter was loaded; by default checked for
    models that are not quantized, as vLLM's default loader does.
``enable_multithread_load``, ``num_threads``
    vLLM's own, taken and not needed: tensorlift reads with threads of its own.

This module imports vLLM; ``import tensorlift`` does not.
"""

from __future__ import annotations

import dataclasses
import collections
import itertools
import math
import os
import re
import time

import torch
from vllm.logger import init_logger
from vllm.model_executor.model_loader import register_model_loader
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

import tensorlift

# Under "vllm", whose handlers vLLM sets up: a logger of our own name would print nothing.
logger = init_logger("vllm.tensorlift")

LOAD_FORMAT = "tensorlift"

# The options tensorlift takes, and vLLM's own that keep their meaning here.
_OPTIONS = {"distributed": bool}
_VLLM_OPTIONS = {"enable_weights_track", "enable_multithread_load", "num_threads"}

# What the last load in this process did: the files it read and the tensors it handed over
# (read here, or received from another rank). For logs and tests.
LAST_LOAD: dict = {}


def register():
    """The ``vllm.general_plugins`` entry point: makes ``load_format="tensorlift"`` known to
    vLLM in this process. vLLM calls it once in every process it starts; calling it again
    does nothing."""
    from vllm.model_executor.model_loader import _LOAD_FORMAT_TO_MODEL_LOADER

    if _LOAD_FORMAT_TO_MODEL_LOADER.get(LOAD_FORMAT) is not TensorliftModelLoader:
        register_model_loader(LOAD_FORMAT)(TensorliftModelLoader)


class TensorliftModelLoader(DefaultModelLoader):
    """vLLM's default safetensors loading, with the reading done by tensorlift."""

    def __init__(self, load_config):
        extra = load_config.model_loader_extra_config
        if extra is None:
            extra = {}
        if not isinstance(extra, dict):
            raise ValueError(
                f"model_loader_extra_config must be a dict for load format {LOAD_FORMAT}, got {type(extra).__name__}"
            )
        unknown = set(extra) - set(_OPTIONS) - _VLLM_OPTIONS
        if unknown:
            raise ValueError(
                f"Unexpected extra config keys for load format {LOAD_FORMAT}: {sorted(unknown)} "
                f"(it takes {sorted(set(_OPTIONS) | _VLLM_OPTIONS)})"
            )
        for key, kind in _OPTIONS.items():
            if key in extra and not isinstance(extra[key], kind):
                raise ValueError(f"{key} must be a {kind.__name__}, got {extra[key]!r}")
        ours = {k: v for k, v in extra.items() if k in _VLLM_OPTIONS}
        super().__init__(dataclasses.replace(load_config, model_loader_extra_config=ours))
        self.load_config = load_config
        self.distributed = extra.get("distributed", True)
        # vLLM finds and downloads the files as for --load-format auto.
        self._files_config = dataclasses.replace(load_config, load_format="auto", model_loader_extra_config=ours)
        self._device = None
        # Whether tensors land on the device the parameters are on (else on the host).
        self._native = True

    def _prepare_weights(self, *args, **kwargs):
        ours, self.load_config = self.load_config, self._files_config
        try:
            return super()._prepare_weights(*args, **kwargs)
        finally:
            self.load_config = ours

    def load_weights(self, model, model_config):
        LAST_LOAD.clear()
        LAST_LOAD.update(files=[], tensors=0, bytes=0, received=0, seconds=0.0)
        super().load_weights(model, model_config)

    def get_all_weights(self, model_config, model):
        # Also the entry of vLLM's in-place weight reload, which skips load_weights.
        self._device, self._native = _rank_device(model)
        for key, empty in (("files", []), ("tensors", 0), ("bytes", 0), ("received", 0), ("seconds", 0.0)):
            LAST_LOAD.setdefault(key, empty)
        LAST_LOAD["device"] = self._device
        return super().get_all_weights(model_config, model)

    def _get_weights_iterator(self, source):
        if self._split_group() is None:
            return self._weights_of(source)
        # Ranks that split the files meet in collectives: a rank that cannot find its files
        # (a download that failed on one node) says so there, so that no rank waits.
        try:
            return self._weights_of(source)
        except Exception as e:  # noqa: BLE001 - raised on every rank, by the iterator
            return self._weights(e, None)

    def _split_group(self):
        """The tensor-parallel group whose ranks split the files, or ``None``."""
        group = _tp_group()
        if group is not None and group.world_size > 1 and self.distributed and self._native:
            return group
        return None

    def _weights_of(self, source):
        from vllm.model_executor.model_loader import weight_utils

        folder, files, use_safetensors, index_file = self._prepare_weights(
            source.model_or_path,
            source.subfolder,
            source.revision,
            source.fall_back_to_pt,
            source.allow_patterns_overrides,
        )
        if use_safetensors and self.load_config.safetensors_load_strategy == "torchao":
            raise ValueError("load format tensorlift does not rebuild torchao tensors; use --load-format safetensors")
        # The files vLLM's default loader would read (default_loader.py).
        if self._encoder_only_lm_prefixes is not None and use_safetensors and files:
            files = weight_utils.filter_mm_encoder_only_safetensors_files(
                files,
                folder,
                index_file,
                self._encoder_only_lm_prefixes,
                weights_mapper=self._encoder_only_weights_mapper,
            )
            if not files:
                raise RuntimeError(
                    "mm-encoder-only shard filter removed all weight files for "
                    f"`{source.model_or_path}`; check language_model prefixes {self._encoder_only_lm_prefixes}"
                )
        if source.is_unused_weight is not None and use_safetensors:
            files = weight_utils.filter_safetensors_files_by_weight_name(files, source.is_unused_weight)
        files = sorted(files, key=_natural_key)
        if self.counter_before_loading_weights == 0.0:
            self.counter_before_loading_weights = time.perf_counter()
        # PyTorch files (where there are no safetensors files) that tensorlift refuses are
        # read as vLLM reads them, unless TENSORLIFT_USE_SAFETENSORS refuses them all.
        torch_load = None
        if not use_safetensors and os.environ.get("TENSORLIFT_USE_SAFETENSORS", "").strip() not in _TRUE:
            torch_load = _TorchLoad(self.load_config.pt_load_map_location)
        weights = self._weights(files, torch_load)
        return ((source.prefix + name, tensor) for name, tensor in weights)

    def _weights(self, files, torch_load=None):
        """The tensors of ``files`` (a list; or, with split reading, the exception that kept
        this rank from finding them, raised on every rank)."""
        device = self._device or "cpu"
        group = self._split_group()
        keep = None
        if self.local_expert_ids is not None:
            from vllm.model_executor.model_loader.weight_utils import should_skip_weight

            local = self.local_expert_ids

            def keep(name):
                return not should_skip_weight(name, local)

        start = time.perf_counter()
        if group is not None:
            yield from _split_and_broadcast(files, device, group, keep, torch_load)
        else:
            # File by file, as vLLM reads them: every tensor of each file (whatever an index
            # says; with expert parallelism, not other ranks' experts, which are not read),
            # and at most one file's memory beyond the model's on the device.
            for path in files:
                for name, t in _file_tensors(path, device, keep, torch_load):
                    LAST_LOAD["tensors"] += 1
                    LAST_LOAD["bytes"] += t.nbytes
                    yield name, t
                    t = None
                LAST_LOAD["files"].append(path)
        LAST_LOAD["seconds"] = time.perf_counter() - start
        logger.info(
            "tensorlift: %d tensors (%.2f GB read here, %d received) onto %s in %.2f s",
            LAST_LOAD["tensors"],
            LAST_LOAD["bytes"] / 1e9,
            LAST_LOAD["received"],
            device,
            LAST_LOAD["seconds"],
        )


# How many bytes of one rank's tensors every rank makes room for before it hears that all
# could: what split reading holds on a device beyond the model and the file read there (a
# chunk ends with the tensor that brings it to this size, so it holds at most this much and
# one tensor more), and one all-reduce on the CPU group per this many bytes.
_PLACE_BYTES = 128 << 20

# What TENSORLIFT_USE_SAFETENSORS takes as set (as tensorlift's reader does).
_TRUE = ("1", "true", "TRUE", "True", "yes")


class _TorchLoad:
    """Reads a PyTorch file as vLLM's default loader does, ``torch.load(weights_only=True)``
    onto its ``pt_load_map_location``: for one that tensorlift's reader refuses."""

    def __init__(self, map_location):
        self.map_location = map_location

    def __call__(self, path, error):
        logger.warning("tensorlift: %s: %s; reading it with torch.load(weights_only=True), as vLLM does", path, error)
        LAST_LOAD.setdefault("torch_loaded", []).append(path)
        state = torch.load(path, map_location=self.map_location, weights_only=True)
        return dict(state.items())


def _literal(name):
    """A tensor name as a glob that matches only it (filters take globs; ``None`` for a name
    with a backslash, which a glob class does not hold plainly)."""
    if "\\" in name:
        return None
    return "".join(f"[{c}]" if c in "*?[]{}" else c for c in name)


def _file_tensors(path, device, keep, torch_load=None):
    """``(name, tensor)`` of every tensor of the file at ``path`` that ``keep`` (if given)
    keeps, as they land on ``device``: the others are not read. A PyTorch file tensorlift
    refuses is read by ``torch_load`` where given."""
    try:
        yield from _file_tensors_on(path, device, keep, torch_load)
    except _DeviceShort as short:
        # The device's free memory (torch's cache is not free to another allocator) does
        # not hold the file beside the model: read to the host, from where vLLM's weight
        # loaders copy each tensor into its parameter, as with its default loader.
        logger.warning("tensorlift: %s; reading %s to the host", short.args[0], path)
        yield from _file_tensors_on(path, "cpu", keep, torch_load)


class _DeviceShort(Exception):
    """A file that did not fit on the device, before any of its tensors was handed over."""


def _file_tensors_on(path, device, keep, torch_load):
    try:
        patterns = None
        if keep is not None:
            patterns = [_literal(t["name"]) for t in tensorlift.inspect(path)["tensors"] if keep(t["name"])]
            if not patterns:
                return
            if None in patterns:
                patterns = None  # read whole, and kept below
        it = tensorlift.iter_tensors(path, device=device, filter=patterns)
        first = next(it)
    except StopIteration:
        return
    except tensorlift.DeviceMemoryError as e:
        raise _DeviceShort(str(e)) from e
    except tensorlift.SafetensorError as e:
        if torch_load is None or _unreadable(e):
            raise
        for name, t in torch_load(path, e).items():
            if keep is None or keep(name):
                yield name, t
        return
    for name, t in itertools.chain([first], it):
        if keep is None or keep(name):
            yield name, t


def _unreadable(error):
    """Whether a tensorlift error is a file that could not be read (or changed during the
    load), which torch.load would not read better, rather than one tensorlift refuses."""
    return isinstance(error, OSError)


def _load_whole(path, device, torch_load=None):
    """Every tensor of the file at ``path``, as a dict, and whether they are still to be
    moved to ``device``: on ``device``, read by tensorlift; where the device has no room for
    the file beside the model, views of the file mapped on the host, as vLLM's default
    loader reads it (the caller moves each to the device in turn, so that the device never
    holds the whole file); for a PyTorch file tensorlift refuses, ``torch_load``'s, where
    given (on its map location). Its error is the call's, which every rank hears before any
    broadcast."""
    try:
        return tensorlift.load_file(path, device=device), False
    except tensorlift.DeviceMemoryError as e:
        if device == "cpu":
            raise
        logger.warning("tensorlift: %s; reading %s to the host", e, path)
        try:
            return tensorlift.load_file(path, device="cpu", backend="mmap"), True
        except tensorlift.SafetensorError as e:
            if torch_load is None or _unreadable(e):
                raise
            return torch_load(path, e), True
    except tensorlift.SafetensorError as e:
        if torch_load is None or _unreadable(e):
            raise
        tensors = torch_load(path, e)
        # (On its map location, which may be the device already.)
        return tensors, any(t.device != torch.device(device) for t in tensors.values())


def _rank_device(model):
    """Where this rank's tensors go, as tensorlift names devices, and whether that is where
    its parameters are: ``cuda:N`` on a CUDA platform, else ``cpu`` (for parameters on
    other devices, vLLM copies them on)."""
    from vllm.platforms import current_platform

    for p in model.parameters():
        if p.device.type == "cuda" and current_platform.is_cuda():
            index = p.device.index if p.device.index is not None else torch.cuda.current_device()
            return f"cuda:{index}", True
        return "cpu", p.device.type == "cpu"
    return "cpu", True


def _tp_group():
    from vllm.distributed import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return None
    return parallel_state.get_tp_group()


def _natural_key(path):
    # vLLM's order of shard files: model-2-of-10 before model-10-of-10.
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", os.path.basename(path))]


def _chunks(tensors, size):
    """``tensors`` (``(name, dtype, shape)``, with ``dtype`` as torch prints it, such as
    ``"torch.bfloat16"``) in runs of about ``size`` bytes, each dtype as torch's own: each run
    ends with the tensor that brings it to ``size`` (so a large tensor ends one)."""
    run, total = [], 0
    for name, dtype, shape in tensors:
        dtype = getattr(torch, dtype.rpartition(".")[2])
        run.append((name, dtype, shape))
        total += math.prod(shape) * dtype.itemsize
        if total >= size:
            yield run
            run, total = [], 0
    if run:
        yield run


def _split_and_broadcast(files, device, group, keep, torch_load=None):
    """Each rank of ``group`` reads every ``world_size``-th file (in rounds of one file per
    rank) onto its device; then, rank by rank, each tensor of the round goes from the rank
    that read it to the others by a broadcast on the group's device group. Every rank first
    learns whether the others found their files (``files`` is the exception of a rank that
    did not), each round, read their file and what tensors it holds, and, every
    ``_PLACE_BYTES`` of a file, had room on the device for those tensors, so that a failure
    is raised on every rank instead of leaving the others waiting."""
    import torch.distributed as dist

    world, me = group.world_size, group.rank_in_group
    # One list for every rank, rank 0's: ranks that globbed their own folders in another
    # order would otherwise call the collectives below out of step. It names the files by
    # their place in the model folder, each rank reading its own copy (on another node, the
    # same snapshot may be in another folder).
    found = {"error": None, "names": []}
    if isinstance(files, BaseException):
        found["error"] = f"{type(files).__name__}: {files}"
    else:
        # (No files, where vLLM's filters left none of a source: nothing to read, on every
        # rank, as on vLLM's own path.)
        folder = os.path.commonpath(files) if len(files) > 1 else os.path.dirname(files[0]) if files else ""
        local = {os.path.relpath(f, folder): f for f in files}
        found["names"] = list(local)
    everyone = [None] * world
    dist.all_gather_object(everyone, found, group=group.cpu_group)
    if isinstance(files, BaseException):
        raise files
    failed = [(r, s["error"]) for r, s in enumerate(everyone) if s["error"] is not None]
    if failed:
        r, error = failed[0]
        raise RuntimeError(f"tensorlift: rank {r} could not find the checkpoint's files: {error}")
    names = everyone[0]["names"]
    for first in range(0, len(names), world):
        # A file this rank does not have is its read's error, heard by every rank below.
        batch = [local.get(n, os.path.join(folder, n)) for n in names[first : first + world]]
        mine, status = {}, {"error": None, "tensors": [], "to_move": False}
        if me < len(batch):
            LAST_LOAD["files"].append(batch[me])
            try:
                mine, status["to_move"] = _load_whole(batch[me], device, torch_load)
                status["tensors"] = [(n, str(t.dtype), list(t.shape)) for n, t in mine.items()]
            except Exception as e:  # every rank raises it below
                mine, status["error"] = {}, f"{type(e).__name__}: {e}"
        statuses = [None] * world
        dist.all_gather_object(statuses, status, group=group.cpu_group)
        failed = [(r, s["error"]) for r, s in enumerate(statuses) if s["error"] is not None]
        if failed:
            r, error = failed[0]
            raise RuntimeError(f"tensorlift: rank {r} could not read {batch[r]}: {error}")
        for owner, st in enumerate(statuses[: len(batch)]):
            for chunk in _chunks(st["tensors"], _PLACE_BYTES):
                # Every rank makes room for a chunk of the owner's tensors (the owner moves
                # them to its device if it read the file to the host; the others allocate
                # what they receive into), and every rank hears whether all of them could
                # before any broadcast: one that could not would leave the others waiting
                # in a broadcast it never joins.
                placed, error = collections.deque(), None
                try:
                    for name, dtype, shape in chunk:
                        if owner == me:
                            # Already there, unless the file was read to the host; contiguous,
                            # as the broadcast sends it (a view a PyTorch file holds would be
                            # copied after the ranks agreed, where it could fail alone).
                            placed.append((name, mine.pop(name).to(device).contiguous()))
                        else:
                            placed.append((name, torch.empty(shape, dtype=dtype, device=device)))
                except Exception as e:
                    placed, error = None, (name, f"{type(e).__name__}: {e}")
                failed = torch.tensor([int(error is not None)])
                dist.all_reduce(failed, group=group.cpu_group)
                if failed.item():
                    errors = [None] * world
                    dist.all_gather_object(errors, error, group=group.cpu_group)
                    r, (name, e) = next((r, e) for r, e in enumerate(errors) if e is not None)
                    raise RuntimeError(f"tensorlift: rank {r} could not place '{name}' of {batch[owner]} on its device: {e}")
                while placed:
                    name, t = placed.popleft()
                    if owner == me:
                        LAST_LOAD["bytes"] += t.nbytes
                    else:
                        LAST_LOAD["received"] += 1
                    if t.nbytes:
                        # As bytes: every dtype crosses gloo and NCCL alike.
                        group.broadcast(t.reshape(-1).view(torch.uint8), src=owner)
                    LAST_LOAD["tensors"] += 1
                    if keep is None or keep(name):
                        yield name, t
                    t = None
        # Nothing of this round outlives it (its last tensor would hold a whole file).
        t = mine = None
