#!/usr/bin/env python3
"""What fresh memory costs a load: page faults and zeroing against the copy itself.

For one cached file, three trials of: an anonymous map of its size filled by `readinto`
(the faults happen inside the copy), and the same after `MADV_POPULATE_WRITE` (faults and
zeroing first, then the copy alone). Prints the seconds of each step. docs/BENCHMARKS.md
quotes it for the bound on fresh-memory loads (on the dev VM, about 0.5 s of CPU per GB for
fresh memory and the copy together, of which faults and zeroing are 0.35).

  python3 benches/fresh_memory.py target/bench-checkpoints/cpu-vs-reference/1GiB-4shards/model-00001-of-00004.safetensors
"""
import mmap
import os
import sys
import time

MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux 5.14


def fill(m, path, n):
    with open(path, "rb", buffering=0) as f:
        mv, off = memoryview(m), 0
        while off < n:
            off += f.readinto(mv[off:off + (8 << 20)])
        mv.release()


def main():
    path = sys.argv[1]
    n = os.path.getsize(path)
    with open(path, "rb") as f:  # cached, so that only memory is measured
        while f.read(64 << 20):
            pass
    print(f"{path}: {n / 1e9:.3f} GB")
    for _ in range(3):
        m = mmap.mmap(-1, n)
        t = time.perf_counter()
        fill(m, path, n)
        faulting = time.perf_counter() - t
        m.close()
        m = mmap.mmap(-1, n)
        t = time.perf_counter()
        m.madvise(MADV_POPULATE_WRITE)
        populate = time.perf_counter() - t
        t = time.perf_counter()
        fill(m, path, n)
        copy = time.perf_counter() - t
        m.close()
        print(f"  copy into fresh memory {faulting:.3f} s ({faulting / n * 1e9:.2f} s/GB)"
              f" | populate {populate:.3f} s ({populate / n * 1e9:.2f} s/GB: faults and zeroing)"
              f" + copy {copy:.3f} s")


if __name__ == "__main__":
    main()
