#!/usr/bin/env python3
"""Tensors read one at a time through ``safe_open``, as accelerate, transformers and vLLM's
weight iterators read a file: tensorlift (mapped and read into memory) against the
reference ``safetensors``, on a file of N small tensors written by the reference.

  python3 benches/key_by_key.py [N ...]     default 500 2000 8000

Prints, for each N and each reader, the seconds of ``get_tensor`` of every key and of
``get_slice(key)[1:3]`` of every key (the per-tensor cost of a handle; docs/BENCHMARKS.md).
"""
import os
import sys
import tempfile
import time

import numpy as np
import safetensors
from safetensors.numpy import save_file

import tensorlift


def timed(module, path, **kw):
    t = time.perf_counter()
    with module.safe_open(path, framework="np", **kw) as f:
        for k in f.keys():
            f.get_tensor(k)
    whole = time.perf_counter() - t
    t = time.perf_counter()
    with module.safe_open(path, framework="np", **kw) as f:
        for k in f.keys():
            f.get_slice(k)[1:3]
    return whole, time.perf_counter() - t


def main():
    sizes = [int(a) for a in sys.argv[1:]] or [500, 2000, 8000]
    with tempfile.TemporaryDirectory() as d:
        paths = {n: os.path.join(d, f"{n}.safetensors") for n in sizes}
        for n, path in paths.items():
            save_file({f"layer.{i}.weight": np.full((4, 4), i, dtype=np.float32) for i in range(n)}, path)
        # As a model downloaded earlier: a file changed under 2 s before a handle opened it
        # has its header compared again at each load (its times could hide a write since).
        time.sleep(2.5)
        for n, path in paths.items():
            for name, module, kw in [
                ("safetensors", safetensors, {}),
                ("tensorlift mmap", tensorlift, {"backend": "mmap"}),
                ("tensorlift pread", tensorlift, {"backend": "pread"}),
            ]:
                whole, sliced = timed(module, path, **kw)
                print(f"{n:>6} tensors  {name:<17} get_tensor {whole:8.3f} s ({whole / n * 1e6:6.1f} us each)"
                      f"   get_slice[1:3] {sliced:8.3f} s ({sliced / n * 1e6:6.1f} us each)")


if __name__ == "__main__":
    main()
