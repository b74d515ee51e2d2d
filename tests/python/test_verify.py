"""Verified loads from Python: each shard's SHA-256, as hashlib computes it and a
SHA256SUMS beside the checkpoint lists it, is checked as the shard is read."""
import hashlib
import os

import numpy as np
import pytest
from safetensors.numpy import save_file

import tensorlift


def write(folder):
    save_file({"a": np.arange(3000, dtype=np.float32)}, os.path.join(folder, "one.safetensors"))
    save_file({"b": np.arange(9000, dtype=np.uint8)}, os.path.join(folder, "two.safetensors"))
    return ["one.safetensors", "two.safetensors"]


def sums(folder, names):
    lines = []
    for n in names:
        with open(os.path.join(folder, n), "rb") as f:
            lines.append(f"{hashlib.sha256(f.read()).hexdigest()}  {n}\n")
    with open(os.path.join(folder, "SHA256SUMS"), "w") as f:
        f.writelines(lines)


def test_verified_loads_and_their_stats(tmp_path):
    names = write(tmp_path)
    size = sum(os.path.getsize(tmp_path / n) for n in names)
    # No SHA256SUMS: a required check fails, naming where it looked; if-known loads.
    with pytest.raises(ValueError, match="no expected SHA-256 to verify it with"):
        tensorlift.load_file(tmp_path / names[0], verify=True)
    stats = {}
    t = tensorlift.load_file(tmp_path / names[0], framework="np", verify="if-known", stats=stats)
    assert np.array_equal(t["a"], np.arange(3000, dtype=np.float32))
    assert (stats["verified_bytes"], stats["unverified_bytes"]) == (0, os.path.getsize(tmp_path / names[0]))
    sums(tmp_path, names)
    for name in names:
        stats = {}
        tensorlift.load_file(tmp_path / name, verify=True, stats=stats)
        assert stats["verified_bytes"] == os.path.getsize(tmp_path / name)
    got = dict(tensorlift.iter_tensors(tmp_path / names[1], framework="np", verify="required"))
    assert np.array_equal(got["b"], np.arange(9000, dtype=np.uint8))
    assert size > 0


def test_a_changed_byte_fails_with_both_digests(tmp_path):
    names = write(tmp_path)
    sums(tmp_path, names)
    path = tmp_path / names[1]
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    actual = hashlib.sha256(bytes(data)).hexdigest()
    with pytest.raises(ValueError, match=f"its SHA-256 is {actual}, but .*SHA256SUMS expects"):
        tensorlift.load_file(path, verify=True)
    with pytest.raises(ValueError, match="its SHA-256 is"):
        list(tensorlift.iter_tensors(path, verify=True))
    with pytest.raises(ValueError, match="invalid verify policy 'sometimes'"):
        tensorlift.load_file(path, verify="sometimes")
