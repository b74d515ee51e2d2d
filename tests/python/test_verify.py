"""Verified loads from Python: each shard's SHA-256, as hashlib computes it and a
SHA256SUMS beside the checkpoint lists it, is checked as the shard is read."""
import hashlib
import json
import os
import signal
import time

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
    want = np.arange(3000, dtype=np.float32)
    assert t["a"].dtype == want.dtype and t["a"].tobytes() == want.tobytes()
    assert (stats["verified_bytes"], stats["unverified_bytes"]) == (0, os.path.getsize(tmp_path / names[0]))
    sums(tmp_path, names)
    for name in names:
        stats = {}
        tensorlift.load_file(tmp_path / name, verify=True, stats=stats)
        assert stats["verified_bytes"] == os.path.getsize(tmp_path / name)
    got = dict(tensorlift.iter_tensors(tmp_path / names[1], framework="np", verify="required"))
    want = np.arange(9000, dtype=np.uint8)
    assert got["b"].dtype == want.dtype and got["b"].tobytes() == want.tobytes()
    # The folder: both files, each checked whole.
    stats = {}
    tensorlift.load_file(tmp_path, verify=True, stats=stats)
    assert (stats["verified_bytes"], stats["unverified_bytes"]) == (size, 0)


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


def test_a_filtered_verified_load_checks_the_shards_it_reads(tmp_path):
    # A folder of two files, SHA256SUMS listing the second alone: tensors of the second
    # load verified, the first is neither read nor asked for a digest.
    names = write(tmp_path)
    sums(tmp_path, names[1:])
    stats = {}
    got = dict(tensorlift.iter_tensors(tmp_path, framework="np", filter=["b"], verify=True, stats=stats))
    assert list(got) == ["b"] and got["b"].tobytes() == np.arange(9000, dtype=np.uint8).tobytes()
    size = os.path.getsize(tmp_path / names[1])
    assert (stats["verified_bytes"], stats["unverified_bytes"], stats["bytes_read"]) == (size, 0, size)
    with pytest.raises(ValueError, match="one.safetensors: no expected SHA-256 to verify it with"):
        list(tensorlift.iter_tensors(tmp_path, filter=["a"], verify=True))


def thread_names():
    """This process's threads' names (a thread that ends while they are read is left out)."""
    names = []
    for t in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{t}/comm") as f:
                names.append(f.read())
        except FileNotFoundError:
            pass
    return names


def test_a_verified_stream_open_at_a_fork_closes_in_the_child(tmp_path):
    """A verified stream still loading when the process forks (a prefork server, a data
    loader's workers) can be closed in the child: its hashing threads are the parent's,
    which the child does not have, so it must not wait for them (it used to panic there,
    or wait forever). The parent's stream goes on to the end, verified."""
    # A first shard of 64 MB, whose tensor comes once it is verified, and a second of
    # 1 GiB, being read and hashed meanwhile.
    want = {"a": np.arange(16 << 20, dtype=np.float32)}
    save_file(want, str(tmp_path / "one.safetensors"))
    two = {f"t{i:03}": np.full(1 << 20, i, dtype=np.float32) for i in range(256)}
    save_file(two, str(tmp_path / "two.safetensors"))
    want.update(two)
    weight_map = {k: "one.safetensors" if k == "a" else "two.safetensors" for k in want}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    sums(tmp_path, ["one.safetensors", "two.safetensors"])
    it = tensorlift.iter_tensors(tmp_path, framework="np", verify="required")
    first = next(it)
    hashing = [n for n in thread_names() if n.startswith("tensorlift-sha")]
    pid = os.fork()
    if pid == 0:  # the child: report by exit status only
        code = 1
        try:
            it.close()
            code = 0
        finally:
            os._exit(code)
    for _ in range(600):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child did not close the stream in 60 s")
    assert os.waitstatus_to_exitcode(status) == 0
    got = dict([first, *it])
    assert list(got) == list(want) and all(np.array_equal(got[k], want[k]) for k in want)
    # (Where the second shard was already hashed, the fork found no thread to skip.)
    if not hashing:
        pytest.skip("the second shard was hashed before the fork: nothing was shown")
