#!/usr/bin/env python3
"""Writes checkpoints with the reference `safetensors` package, as independent fixtures.

Usage: make_fixture.py OUT_DIR

Writes OUT_DIR/single.safetensors (every dtype numpy can express, scalars, zero-size and
odd-length tensors), a two-shard folder OUT_DIR/sharded/ with a
model.safetensors.index.json, and OUT_DIR/manifest.json listing, for each tensor as the
reference reader (`safe_open`) reads it back, its file, dtype, shape and SHA-256.
"""
import hashlib
import json
import os
import sys

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

rng = np.random.default_rng(7)


def arr(dtype, shape):
    n = int(np.prod(shape)) if shape else 1
    raw = rng.integers(0, 256, size=n * np.dtype(dtype).itemsize, dtype=np.uint8)
    return raw.view(dtype).reshape(shape)


def main(out):
    os.makedirs(os.path.join(out, "sharded"), exist_ok=True)
    single = {
        "bool": (rng.integers(0, 2, size=(3, 5)) == 1),
        "u8": arr(np.uint8, (7, 3)),
        "i8": arr(np.int8, (5,)),
        "i16": arr(np.int16, (3, 3)),
        "u16": arr(np.uint16, (9,)),
        "f16": arr(np.float16, (4, 13)),
        "i32": arr(np.int32, (11,)),
        "u32": arr(np.uint32, (2, 2, 2)),
        "f32": arr(np.float32, (17, 3)),
        "f64": arr(np.float64, (5, 1)),
        "i64": arr(np.int64, (3,)),
        "u64": arr(np.uint64, (1,)),
        "scalar_f32": np.array(3.5, dtype=np.float32),
        "empty_f32": np.zeros((0, 4), dtype=np.float32),
        "odd_u8": arr(np.uint8, (1, 1, 3)),
    }
    save_file(single, os.path.join(out, "single.safetensors"), metadata={"format": "np", "who": "reference"})

    shard_a = {f"model.layers.{i}.w": arr(np.float16, (64, 33)) for i in range(3)}
    shard_b = {f"model.layers.{i}.b": arr(np.float32, (33,)) for i in range(3)}
    shard_b["lm_head"] = arr(np.float16, (16, 64))
    names = {"model-00001-of-00002.safetensors": shard_a, "model-00002-of-00002.safetensors": shard_b}
    weight_map = {}
    for fname, tensors in names.items():
        save_file(tensors, os.path.join(out, "sharded", fname))
        weight_map.update({k: fname for k in tensors})
    with open(os.path.join(out, "sharded", "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)

    manifest = []
    files = [os.path.join(out, "single.safetensors")] + [os.path.join(out, "sharded", n) for n in names]
    for path in files:
        with safe_open(path, framework="np") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                data = np.ascontiguousarray(f.get_tensor(name))
                manifest.append({
                    "file": os.path.relpath(path, out),
                    "name": name,
                    "dtype": sl.get_dtype(),
                    "shape": list(sl.get_shape()),
                    "sha256": hashlib.sha256(data.tobytes()).hexdigest(),
                    "nbytes": data.nbytes,
                })
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
