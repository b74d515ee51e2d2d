#!/usr/bin/env python3
"""Python loaders against tensorlift, side by side in one run, on a GPU or on the CPU.

On a CUDA device (--device cuda:N, the default), times each installed loader loading every
tensor of FOLDER onto it, after CUDA is initialised (so no loader pays for context
creation), synchronizing before the clock stops; with --tensorlift, also
`tensorlift load --device cuda:N --json FOLDER` on the same files (a new process each run,
so that figure includes process start and CUDA context creation):

  tensorlift            tensorlift.load_file(FOLDER, device=..., framework="pt") in process
  safetensors           safe_open(..., device=...) + get_tensor (the reference, 0.8)
  fastsafetensors       SafeTensorsFileLoader(...).copy_files_to_device(), tuned as its
                        repository's perf script tunes it (below)
  instanttensor         instanttensor.safe_open([every shard], device=...) + tensors(), as
                        its README recommends (below)
  runai-model-streamer  SafetensorsStreamer().stream_files(..., device=...) + get_tensors(),
                        with the settings its docs recommend (below)

The peers run with the settings their own documentation recommends for one GPU (the
`settings` of each in the JSON output; each peer's defaults with --peer-defaults):
  - instanttensor 0.2.2 (README): every shard in one safe_open; warm, the buffered backend
    (BackendPolicy.BUFFERED: io_uring buffered, else mmap); cold, its default (io_uring or
    AIO with O_DIRECT); buffer, chunk, depth and concurrency automatic.
  - fastsafetensors 0.5.0 (perf/fastsafetensors_perf/perf.py): max_threads = the CPUs (16 at
    most, its default), a 16 MiB bounce buffer, and with fewer shards than threads a copy
    block of the checkpoint's bytes over the threads; nogds (no GDS here); O_DIRECT cold,
    buffered warm (FASTSAFETENSORS_ODIRECT).
  - runai-model-streamer 0.17.0 (docs: usage, env-vars, benchmarks):
    RUNAI_STREAMER_MEMORY_LIMIT=-1 (its fastest), RUNAI_STREAMER_CONCURRENCY=16 (8-16 best
    on SSDs), RUNAI_STREAMER_FS_STRATEGY io_uring_direct cold, io_uring_buffered warm. Its
    strategy is set once a process: a run with --cache both times run:ai in the first mode
    only, so time warm and cold in processes of their own (--cache warm, --cache cold).

With --device cpu, every engine materializes every byte in private host memory (no
engine may leave tensors as views of a memory map or of a loader's internal buffer;
memory an engine's allocator kept from its own last run may be reused, as malloc's is):

  tensorlift            tensorlift.load_file(FOLDER, framework=None) with reuse_host_memory()
                        (the others reuse what malloc kept from their last run); with
                        --tensorlift-fresh, into new memory every run
  safetensors.numpy     safetensors.numpy.load_file (needs no torch)
  safetensors.torch-mmap  safetensors.torch.load_file (a memory map) + clone
  safetensors.torch-read  safetensors.torch.load(open(f).read()): one read, then parsed
  fastsafetensors       copy_files_to_device to torch.device("cpu"), nogds, cloned
  runai-model-streamer  get_tensors(), cloned

With --idle-secs N, a third mode, warm-idle, warms the shards and then waits N seconds
before each run: a VM that hands idle memory back to its host (virtio-balloon free-page
reporting) makes the next first touch of memory much slower, and this is the state a
server's cold start often meets.

A package that is not installed is skipped with a note; one whose API differs from what
this script expects is reported as failed, with the exception, as is one that hands back
fewer or more tensor bytes than the files' headers hold. Every engine's package is imported
before any clock starts, and the engines' order rotates from round to round. Cold runs
evict every shard from the page cache first (posix_fadvise DONTNEED); warm runs read them
once first. Each figure is printed with its fastest and slowest runs.

  python3 benches/peers/compare.py /models/llama --tensorlift ./tensorlift --runs 3
  python3 benches/peers/compare.py /models/llama --device cpu --runs 5
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pagecache import evict, shard_paths, warm  # noqa: E402


def header_bytes(paths):
    """The tensor bytes the files' headers declare (read here, with no loader's help)."""
    import struct
    total = 0
    for p in paths:
        with open(p, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        total += sum(end - begin for k, v in header.items() if k != "__metadata__" for begin, end in [v["data_offsets"]])
    return total


def nbytes(tensors):
    """Bytes held: torch tensors by element size, numpy arrays and tensorlift tensors by
    their nbytes."""
    return sum(t.numel() * t.element_size() if hasattr(t, "element_size") else t.nbytes for t in tensors)


def load_tensorlift(paths, device):
    import tensorlift
    return list(tensorlift.load_file(os.path.dirname(paths[0]), device=device, framework="pt").values())


def load_safetensors(paths, device):
    from safetensors import safe_open
    out = []
    for p in paths:
        with safe_open(p, framework="pt", device=device) as f:
            out += [f.get_tensor(k) for k in f.keys()]
    return out


def load_fastsafetensors(paths, device):
    import torch
    from fastsafetensors import SafeTensorsFileLoader, SingleGroup
    loader = SafeTensorsFileLoader(SingleGroup(), torch.device(device), nogds=True)
    loader.add_filenames({0: paths})
    fb = loader.copy_files_to_device()
    keys = list(fb.key_to_rank_lidx.keys()) if hasattr(fb, "key_to_rank_lidx") else None
    if keys is None:
        from safetensors import safe_open
        keys = [k for p in paths for k in safe_open(p, framework="pt").keys()]
    out = [fb.get_tensor(k).clone() for k in keys]
    fb.close()
    loader.close()
    return out


def load_instanttensor(paths, device):
    from instanttensor import safe_open
    index = int(device.split(":")[1]) if ":" in device else 0
    out = []
    for p in paths:
        with safe_open(p, framework="pt", device=index) as f:
            # The yielded tensors live in the loader's reusable buffers: copy them out.
            out += [t.clone() for _, t in f.tensors()]
    return out


def load_runai(paths, device):
    from runai_model_streamer import SafetensorsStreamer
    out = []
    with SafetensorsStreamer() as streamer:
        for p in paths:
            streamer.stream_file(p)
            out += [t.to(device) for _, t in streamer.get_tensors()]
    return out


FRESH = False
# The cache mode of the run in progress (warm, cold, warm-idle): the tuned peers read
# buffered warm and with O_DIRECT cold, as their docs say.
MODE = "warm"
SETTINGS = {}


def load_fastsafetensors_tuned(paths, device):
    os.environ["FASTSAFETENSORS_ODIRECT"] = "1" if MODE == "cold" else "0"
    import torch
    from fastsafetensors import SafeTensorsFileLoader, SingleGroup
    threads = max(1, min(16, len(os.sched_getaffinity(0))))
    bbuf_kb = 16 * 1024
    total = sum(os.path.getsize(p) for p in paths)
    unit = bbuf_kb * 1024
    block = 16 << 30 if len(paths) >= threads else max(-(-(total // threads) // unit) * unit, unit)
    SETTINGS["fastsafetensors"] = {"max_threads": threads, "bbuf_size_kb": bbuf_kb, "max_copy_block_size": block,
                                   "nogds": True, "FASTSAFETENSORS_ODIRECT": os.environ["FASTSAFETENSORS_ODIRECT"]}
    loader = SafeTensorsFileLoader(SingleGroup(), torch.device(device), bbuf_size_kb=bbuf_kb, max_threads=threads,
                                   nogds=True)
    loader.add_filenames({0: paths})
    fb = loader.copy_files_to_device(max_copy_block_size=block)
    # The tensors are views of the loader's device buffer, freed by close(): copied out.
    out = [fb.get_tensor(k).clone() for k in loader.get_keys()]
    fb.close()
    loader.close()
    return out


def load_instanttensor_tuned(paths, device):
    from instanttensor import BackendPolicy, safe_open
    index = int(device.split(":")[1]) if ":" in device else 0
    kw = {} if MODE == "cold" else {"backend": BackendPolicy.BUFFERED}
    SETTINGS["instanttensor"] = {"one_safe_open": True, "backend": "default (O_DIRECT)" if MODE == "cold" else "BUFFERED"}
    # copy=True (its default): the tensors own their memory.
    with safe_open(sorted(paths), framework="pt", device=index, **kw) as f:
        return [t for _, t in f.tensors()]


def load_runai_tuned(paths, device):
    strategy = "io_uring_direct,libaio_direct,sync_buffered" if MODE == "cold" else "io_uring_buffered,sync_buffered"
    env = {"RUNAI_STREAMER_MEMORY_LIMIT": "-1", "RUNAI_STREAMER_CONCURRENCY": "16", "RUNAI_STREAMER_FS_STRATEGY": strategy}
    os.environ.update(env)
    SETTINGS["runai-model-streamer"] = env
    from runai_model_streamer import SafetensorsStreamer
    with SafetensorsStreamer() as streamer:
        streamer.stream_files(list(paths), device=device)
        # Tensors still in the host ring are copied to the device; those already there stay.
        return [t.to(device) for _, t in streamer.get_tensors()]


def load_tensorlift_cpu(paths, device):
    import tensorlift
    # In a loop of loads, the other engines get the memory their last run freed back from
    # malloc, already faulted in; tensorlift's equivalent is opt-in. --tensorlift-fresh
    # turns it off: every run then loads into new memory, a server's first load.
    tensorlift.reuse_host_memory(not FRESH)
    return list(tensorlift.load_file(os.path.dirname(paths[0]), device="cpu", framework=None).values())


def load_st_numpy(paths, device):
    from safetensors.numpy import load_file
    return [a for p in paths for a in load_file(p).values()]


def load_st_torch_mmap(paths, device):
    from safetensors.torch import load_file
    return [t.clone() for p in paths for t in load_file(p).values()]


def load_st_torch_read(paths, device):
    from safetensors.torch import load
    out = []
    for p in paths:
        with open(p, "rb") as f:
            out += list(load(f.read()).values())
    return out


def load_fastsafetensors_cpu(paths, device):
    return load_fastsafetensors(paths, "cpu")


def load_runai_cpu(paths, device):
    from runai_model_streamer import SafetensorsStreamer
    out = []
    with SafetensorsStreamer() as streamer:
        for p in paths:
            streamer.stream_file(p)
            out += [t.clone() for _, t in streamer.get_tensors()]
    return out


CPU_PEERS = {
    "tensorlift": ("tensorlift", load_tensorlift_cpu),
    "safetensors.numpy": ("safetensors", load_st_numpy),
    "safetensors.torch-mmap": ("torch", load_st_torch_mmap),
    "safetensors.torch-read": ("torch", load_st_torch_read),
    "fastsafetensors": ("fastsafetensors", load_fastsafetensors_cpu),
    "runai-model-streamer": ("runai_model_streamer", load_runai_cpu),
}

PEERS = {
    "tensorlift": ("tensorlift", load_tensorlift),
    "safetensors": ("safetensors", load_safetensors),
    "fastsafetensors": ("fastsafetensors", load_fastsafetensors_tuned),
    "instanttensor": ("instanttensor", load_instanttensor_tuned),
    "runai-model-streamer": ("runai_model_streamer", load_runai_tuned),
}

# Each peer with its defaults (--peer-defaults).
PEER_DEFAULTS = {
    **PEERS,
    "fastsafetensors": ("fastsafetensors", load_fastsafetensors),
    "instanttensor": ("instanttensor", load_instanttensor),
    "runai-model-streamer": ("runai_model_streamer", load_runai),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cache", choices=["warm", "cold", "both"], default="both")
    ap.add_argument("--tensorlift-fresh", action="store_true", help="--device cpu: tensorlift loads into new memory every run (no reuse_host_memory)")
    ap.add_argument("--idle-secs", type=float, default=0, help="also run warm-idle: warm, then wait this long before each run")
    ap.add_argument("--tensorlift", help="path to the tensorlift binary, to time it in the same run")
    ap.add_argument("--peer-defaults", action="store_true", help="on a GPU, run each peer with its defaults rather than tuned")
    ap.add_argument("--json-out")
    a = ap.parse_args()
    global FRESH, MODE
    FRESH = a.tensorlift_fresh
    cpu = a.device == "cpu"
    torch = None
    try:
        import torch
    except ImportError:
        if not cpu:
            print("torch is not installed: this script needs PyTorch with CUDA (or --device cpu)", file=sys.stderr)
            return 1
    if not cpu:
        if not torch.cuda.is_available():
            print("no CUDA device is visible to torch", file=sys.stderr)
            return 1
        torch.empty(1, device=a.device)
        torch.cuda.synchronize()
    paths = shard_paths(a.folder)
    total = sum(os.path.getsize(p) for p in paths)
    device_name = "cpu" if cpu else torch.cuda.get_device_name(a.device)
    print(f"{a.folder}: {len(paths)} shards, {total / 1e9:.2f} GB; device {device_name}")
    import importlib.util
    engines, notes = {}, {}
    for name, (module, fn) in (CPU_PEERS if cpu else PEER_DEFAULTS if a.peer_defaults else PEERS).items():
        if importlib.util.find_spec(module) is None:
            notes[name] = f"skipped: python package '{module}' is not installed"
            continue
        try:
            # Imported now: no engine's first run pays for its import.
            importlib.import_module(module)
        except Exception as e:
            notes[name] = f"failed: importing {module}: {type(e).__name__}: {e}"
            continue
        engines[name] = fn
    expected = header_bytes(paths)
    results = {"folder": a.folder, "bytes": total, "device": device_name, "modes": {}, "notes": notes,
               "peers": "defaults" if a.peer_defaults or cpu else "tuned as their docs recommend"}
    modes = ["warm", "cold"] if a.cache == "both" else [a.cache]
    if a.idle_secs > 0 and a.cache != "cold":
        modes.insert(modes.index("warm") + 1, "warm-idle")
    for mode in modes:
        MODE = mode
        SETTINGS.clear()
        times = {n: [] for n in engines}
        if a.tensorlift:
            times["tensorlift-cli"] = []
        moved = {}
        for round_ in range(a.runs):
            names = list(times)
            # Rotated each round: no engine always goes first.
            k = round_ % max(len(names), 1)
            for name in names[k:] + names[:k]:
                if name not in times:
                    continue
                evict(paths) if mode == "cold" else warm(paths)
                if mode == "warm-idle":
                    time.sleep(a.idle_secs)
                tensors = None
                try:
                    t = time.perf_counter()
                    if name == "tensorlift-cli":
                        out = subprocess.run([a.tensorlift, "load", "--device", a.device, "--json", a.folder], check=True, capture_output=True, text=True)
                        moved[name] = json.loads(out.stdout)["bytes"]
                    else:
                        tensors = engines[name](paths, a.device)
                        if not cpu:
                            torch.cuda.synchronize()
                        moved[name] = nbytes(tensors)
                    elapsed = time.perf_counter() - t
                    if moved[name] != expected:
                        raise RuntimeError(f"it handed back {moved[name]} tensor bytes of the files' {expected}")
                    times[name].append(elapsed)
                except Exception as e:  # a peer's API changed, or it does not run here
                    notes[name] = f"failed: {type(e).__name__}: {e}"
                    times.pop(name)
                finally:
                    # Freed before the next engine's run, whatever happened in this one.
                    tensors = None
                    if not cpu:
                        torch.cuda.empty_cache()
        results["modes"][mode] = {n: {"median_s": statistics.median(v), "gbps": moved[n] / statistics.median(v) / 1e9, "runs_s": v,
                                      "settings": SETTINGS.get(n, "defaults")} for n, v in times.items() if v}
        print(f"\n{mode} cache, median of {a.runs} runs (fastest-slowest)")
        for n, r in sorted(results["modes"][mode].items(), key=lambda kv: kv[1]["median_s"]):
            spread = f"({min(r['runs_s']):.3f}-{max(r['runs_s']):.3f})"
            print(f"  {n:<22} {r['median_s']:8.3f} s {spread:>15} {r['gbps']:8.2f} GB/s  "
                  f"{r['settings'] if r['settings'] != 'defaults' else ''}")
    for n, why in notes.items():
        print(f"{n}: {why}")
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
