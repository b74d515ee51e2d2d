#!/usr/bin/env python3
"""tensorlift's CPU path against the reference Python reader, side by side in one run.

Generates (once) a Llama-like sharded checkpoint of --size-gib with the reference writer,
then alternates, for each cache mode:
  - reference: safetensors.numpy.load_file over each shard, in this process; or, with
    --reference torch-clone-fresh, safetensors.torch.load_file over each shard and a clone
    of every tensor (private memory, as a load gives), in a new Python process each run,
    timed inside it once torch is imported (so its process start is not counted);
  - tensorlift: `tensorlift load --device cpu --json PATH` as a subprocess, timed from
    outside, so its process start is counted against it (a new process each run: its
    choice of huge or base pages is made anew each time, and reported).
Cold runs evict every shard from the page cache first (posix_fadvise DONTNEED, no root);
warm runs read every shard once first. Prints medians and the ratio, and with --json-out
writes them as JSON.

  python3 benches/cpu_vs_reference.py --tensorlift target/release/tensorlift
  python3 benches/cpu_vs_reference.py --python      # the Python package, in this process
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np
from safetensors.numpy import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pagecache import evict, shard_paths, warm  # noqa: E402


def make_checkpoint(folder, size_gib, shards):
    index_path = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index_path):
        return
    os.makedirs(folder, exist_ok=True)
    hidden, inter, vocab = 2048, 5632, 32000
    layer = {"q": (hidden, hidden), "k": (hidden, hidden), "v": (hidden, hidden), "o": (hidden, hidden),
             "gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter), "norm": (hidden,)}
    per_layer = sum(int(np.prod(s)) * 2 for s in layer.values())
    embed = vocab * hidden * 2
    layers = max(1, int((size_gib * 2**30 - 2 * embed) // per_layer))
    tensors = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        tensors += [(f"model.layers.{i}.{k}.weight", s) for k, s in layer.items()]
    tensors += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    rng = np.random.default_rng(0)
    total = sum(int(np.prod(s)) * 2 for _, s in tensors)
    per_shard = total / shards
    weight_map, shard, acc, n = {}, {}, 0, 1
    names = [f"model-{i:05d}-of-{shards:05d}.safetensors" for i in range(1, shards + 1)]
    for name, shape in tensors:
        shard[name] = rng.integers(0, 65535, size=shape, dtype=np.uint16).view(np.float16)
        acc += shard[name].nbytes
        if acc >= per_shard * n and n < shards:
            save_file(shard, os.path.join(folder, names[n - 1]))
            weight_map.update({k: names[n - 1] for k in shard})
            shard, n = {}, n + 1
    save_file(shard, os.path.join(folder, names[n - 1]))
    weight_map.update({k: names[n - 1] for k in shard})
    with open(index_path, "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)


def run_reference(paths):
    t = time.perf_counter()
    loaded = [load_file(p) for p in paths]
    dt = time.perf_counter() - t
    nbytes = sum(a.nbytes for d in loaded for a in d.values())
    del loaded
    return dt, nbytes


TORCH_CLONE = r"""
import sys, time
import torch
from safetensors.torch import load_file
t = time.perf_counter()
held = []
for p in sys.argv[1:]:
    held.append({k: v.clone() for k, v in load_file(p).items()})
dt = time.perf_counter() - t
print(dt, sum(v.numel() * v.element_size() for d in held for v in d.values()))
"""


def run_torch_clone_fresh(paths):
    out = subprocess.run([sys.executable, "-c", TORCH_CLONE, *paths], check=True, capture_output=True, text=True)
    dt, nbytes = out.stdout.split()
    return float(dt), int(nbytes)


def run_tensorlift(binary, folder, extra):
    t = time.perf_counter()
    out = subprocess.run([binary, "load", "--device", "cpu", "--json", *extra, folder], check=True, capture_output=True, text=True)
    dt = time.perf_counter() - t
    return dt, json.loads(out.stdout)


def run_python(folder):
    import tensorlift

    t = time.perf_counter()
    loaded = tensorlift.load_file(folder, framework="np")
    dt = time.perf_counter() - t
    nbytes = sum(a.nbytes for a in loaded.values())
    del loaded
    return dt, {"seconds": dt, "bytes": nbytes}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tensorlift", default="target/release/tensorlift")
    ap.add_argument("--dir", default="target/bench-checkpoints/cpu-vs-reference")
    ap.add_argument("--size-gib", type=float, default=1.0)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--cache", choices=["warm", "cold", "both"], default="both")
    ap.add_argument("--extra", default="", help="extra arguments for tensorlift load")
    ap.add_argument("--also", action="append", default=[], metavar="ARGS",
                    help="another tensorlift variant in the same rotation, with these arguments to tensorlift load "
                         "(repeatable; e.g. --also='--huge-pages never'); its in-process seconds are printed")
    ap.add_argument("--reference", choices=["numpy", "torch-clone-fresh"], default="numpy")
    ap.add_argument("--python", action="store_true",
                    help="time the tensorlift Python package in this process (tensorlift.load_file(framework='np')) "
                         "instead of the command")
    ap.add_argument("--json-out")
    a = ap.parse_args()
    folder = os.path.join(a.dir, f"{a.size_gib:g}GiB-{a.shards}shards")
    make_checkpoint(folder, a.size_gib, a.shards)
    paths = shard_paths(folder)
    total = sum(os.path.getsize(p) for p in paths)
    modes = ["warm", "cold"] if a.cache == "both" else [a.cache]
    results = {"machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()},
               "checkpoint": {"path": folder, "shards": len(paths), "bytes": total}, "modes": {}}
    print(f"checkpoint: {folder}: {len(paths)} shards, {total / 1e9:.3f} GB; {a.runs} runs per engine and mode")
    for mode in modes:
        ref, tl, tl_inner, huge = [], [], [], []
        also = {v: [] for v in a.also}
        for _ in range(a.runs):
            for engine in ("reference", "tensorlift"):
                evict(paths) if mode == "cold" else warm(paths)
                if engine == "reference":
                    dt, nbytes = run_torch_clone_fresh(paths) if a.reference == "torch-clone-fresh" else run_reference(paths)
                    ref.append(dt)
                else:
                    if a.python:
                        dt, out = run_python(folder)
                    else:
                        dt, out = run_tensorlift(a.tensorlift, folder, a.extra.split())
                    tl.append(dt)
                    tl_inner.append(out["seconds"])
                    huge.append(out.get("huge_pages"))
                    nbytes_tl = out["bytes"]
            for v in a.also:
                evict(paths) if mode == "cold" else warm(paths)
                also[v].append(run_tensorlift(a.tensorlift, folder, v.split())[1]["seconds"])
        assert nbytes == nbytes_tl, (nbytes, nbytes_tl)
        r, t = statistics.median(ref), statistics.median(tl)
        results["modes"][mode] = {"reference_s": r, "tensorlift_s": t, "tensorlift_in_process_s": statistics.median(tl_inner),
                                  "reference_gbps": nbytes / r / 1e9, "tensorlift_gbps": nbytes / t / 1e9, "speedup": r / t,
                                  "reference_runs": ref, "tensorlift_runs": tl, "tensorlift_in_process_runs": tl_inner,
                                  "tensorlift_huge_pages": huge,
                                  "reference": a.reference, "also_in_process_runs": also}
        print(f"{mode:>5}: reference ({a.reference}) {r:.3f} s ({nbytes / r / 1e9:.2f} GB/s)  tensorlift {t:.3f} s "
              f"({nbytes / t / 1e9:.2f} GB/s, {statistics.median(tl_inner):.3f} s in process)  speedup {r / t:.2f}x")
        print(f"       runs: reference {' '.join(f'{x:.3f}' for x in ref)}; tensorlift {' '.join(f'{x:.3f}' for x in tl)} "
              f"(slowest {max(tl):.3f} s; in process {' '.join(f'{x:.3f}' for x in tl_inner)}, slowest {max(tl_inner):.3f} s; "
              f"huge pages {huge})")
        for v, runs in also.items():
            print(f"       tensorlift {v}: in process median {statistics.median(runs):.3f} s, slowest {max(runs):.3f} s; "
                  f"runs {' '.join(f'{x:.3f}' for x in runs)}")
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
