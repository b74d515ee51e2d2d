"""tensorlift's Python API against the reference `safetensors` package: the same tensors,
slices, metadata and errors, plus what the reference lacks (folders, streaming, threads,
interruption, memory released)."""

import gc
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import safetensors
from safetensors.numpy import load_file as reference_load
from safetensors.numpy import save_file

import tensorlift




def same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def raw_file(path, entries, metadata=None):
    """A file written by hand, for dtypes the reference numpy writer has no type for."""
    header, data, off = {}, b"", 0
    for name, dtype, shape, payload in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(payload)]}
        data += payload
        off += len(payload)
    if metadata is not None:
        header["__metadata__"] = metadata
    h = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + data)


def test_safe_open_matches_the_reference(fixture):
    path = str(fixture / "single.safetensors")
    with safetensors.safe_open(path, framework="np") as ref, tensorlift.safe_open(path, framework="np") as ours:
        assert ours.keys() == sorted(ref.keys())
        assert ours.metadata() == ref.metadata()
        for name in ref.keys():
            assert same(ours.get_tensor(name), ref.get_tensor(name)), name
            assert ours.get_slice(name).get_shape() == ref.get_slice(name).get_shape(), name
            assert ours.get_slice(name).get_dtype() == ref.get_slice(name).get_dtype(), name


@pytest.mark.parametrize(
    "key",
    [
        slice(None),
        slice(1, 3),
        slice(2, None),
        slice(None, -1),
        slice(0, 17, 2),
        slice(None, None, -1),
        slice(8, 2, -3),
        1,
        -1,
        (slice(1, 4), slice(0, 2)),
        (2, 1),
        (Ellipsis, 0),
        (slice(5, 5),),
    ],
)
def test_slices_equal_numpy_slicing_of_the_reference(fixture, key):
    path = str(fixture / "single.safetensors")
    want = reference_load(path)["f32"]  # shape (17, 3)
    with tensorlift.safe_open(path, framework="np") as f:
        got = f.get_slice("f32")[key]
    expect = np.asarray(want[key])
    assert same(got, expect), key
    assert got.flags.writeable and got.flags.c_contiguous, key


def test_a_slice_reads_only_its_rows(fixture, tmp_path, spy_reads):
    path = str(tmp_path / "big.safetensors")
    save_file({"w": np.arange(1000 * 256, dtype=np.float32).reshape(1000, 256)}, path)
    with tensorlift.safe_open(path, framework="np") as f:
        calls = spy_reads(f)
        part = f.get_slice("w")[10:12, 5]
    assert part.tolist() == [10 * 256 + 5, 11 * 256 + 5]
    assert calls == [(10 * 256 * 4, 2 * 256 * 4)]


def test_every_dtype_numpy_has_and_ml_dtypes_for_the_rest(fixture, tmp_path):
    import ml_dtypes

    path = str(fixture / "single.safetensors")
    want = reference_load(path)
    got = tensorlift.load_file(path, framework="np")
    assert sorted(got) == sorted(want)
    for name in want:
        assert same(got[name], want[name]), name
    bf = np.arange(12, dtype=np.float32).astype(ml_dtypes.bfloat16).reshape(3, 4)
    f8 = np.linspace(-2, 2, 5).astype(ml_dtypes.float8_e4m3fn)
    p = str(tmp_path / "ml.safetensors")
    raw_file(p, [("bf", "BF16", [3, 4], bf.tobytes()), ("f8", "F8_E4M3", [5], f8.tobytes())])
    got = tensorlift.load_file(p, framework="np")
    assert same(got["bf"], bf) and same(got["f8"], f8)
    with tensorlift.safe_open(p, framework="np") as f:
        assert same(f.get_slice("bf")[1:, 2], np.ascontiguousarray(bf[1:, 2]))
        assert f.get_slice("bf")[1, 2].shape == ()


def test_folders_indexes_and_metadata(fixture, sharded_reference):
    folder = fixture / "sharded"
    want = sharded_reference
    for path in (folder, folder / "model.safetensors.index.json"):
        with tensorlift.safe_open(path, framework="np") as f:
            assert f.keys() == sorted(want)
            for name in want:
                assert same(f.get_tensor(name), want[name]), name
    info = tensorlift.inspect(folder)
    assert {t["name"] for t in info["tensors"]} == set(want)
    assert info["total_bytes"] == sum(v.nbytes for v in want.values())
    assert all(isinstance(t["shape"], list) and len(t["data_offsets"]) == 2 for t in info["tensors"])


def test_iter_tensors_yields_as_they_land(fixture, sharded_reference):
    folder = fixture / "sharded"
    seen, progress = {}, []
    for name, arr in tensorlift.iter_tensors(folder, framework="np", progress=lambda d, t: progress.append((d, t))):
        seen[name] = arr
    want = sharded_reference
    assert sorted(seen) == sorted(want)
    assert all(same(seen[n], want[n]) for n in want)
    assert progress and progress[-1][0] == progress[-1][1]
    # A filter, and stopping early.
    names = [n for n, _ in tensorlift.iter_tensors(folder, framework=None, filter=["model.layers.0.*"])]
    assert names and all(n.startswith("model.layers.0.") for n in names)
    it = tensorlift.iter_tensors(folder, framework=None)
    next(it)
    it.close()


def test_a_loads_statistics_fill_the_dict_given(fixture, sharded_reference):
    folder = fixture / "sharded"
    want = sharded_reference
    nbytes = sum(v.nbytes for v in want.values())
    stats = {"kept": 1}
    tensors = tensorlift.load_file(folder, framework="np", stats=stats)
    assert sorted(tensors) == sorted(want)
    assert stats["kept"] == 1
    assert stats["tensors_loaded"] == len(want) and stats["bytes"] == nbytes
    assert stats["bytes_read"] >= nbytes and stats["checkpoint_bytes"] == nbytes
    assert stats["device"] == "cpu" and stats["io"] in ("uring", "pread")
    assert 0 < stats["planned_seconds"] <= stats["seconds"]
    assert 0 < stats["first_read_seconds"] <= stats["seconds"]
    # A stream's statistics come once its last tensor has: not before.
    streamed = {}
    it = tensorlift.iter_tensors(folder, framework=None, filter=["model.layers.0.*"], stats=streamed)
    first = next(it)
    assert first and streamed == {}
    rest = list(it)
    assert streamed["tensors_loaded"] == 1 + len(rest)
    assert streamed["bytes"] == sum(v.nbytes for n, v in want.items() if n.startswith("model.layers.0."))
    # A load stopped early leaves the dict as it was.
    stopped = {}
    it = tensorlift.iter_tensors(folder, framework=None, stats=stopped)
    next(it)
    it.close()
    assert stopped == {}


def test_memory_is_freed_after_the_last_array(tmp_path):
    path = str(tmp_path / "m.safetensors")
    save_file({"a": np.ones((256, 1024), dtype=np.float32), "b": np.zeros(10, dtype=np.int64)}, path)
    gc.collect()
    base = tensorlift._live_host_arenas()
    arrays = tensorlift.load_file(path, framework="np")
    assert tensorlift._live_host_arenas() > base
    a = arrays.pop("a")
    del arrays
    gc.collect()
    assert tensorlift._live_host_arenas() > base, "an array still views the load's memory"
    assert a.sum() == 256 * 1024
    del a
    gc.collect()
    assert tensorlift._live_host_arenas() == base


def test_two_threads_load_at_once(fixture):
    path = str(fixture / "single.safetensors")
    want = reference_load(path)
    results, errors = [], []

    def work():
        try:
            for _ in range(5):
                results.append(tensorlift.load_file(path, framework="np"))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 10
    assert all(same(r[n], want[n]) for r in results for n in want)


def test_ctrl_c_interrupts_a_load_and_frees_it(tmp_path):
    # Many shards, read with slow progress callbacks, so the load outlasts the signal.
    for i in range(8):
        save_file({f"w{i}": np.ones((1024, 1024), dtype=np.float32)}, str(tmp_path / f"s{i}.safetensors"))
    gc.collect()
    base = tensorlift._live_host_arenas()
    # A shell starts background jobs with SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler: this test installs it, wherever it was started from.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT))

    def slow(done, total):
        import time

        time.sleep(0.05)

    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            for _ in range(100):
                tensorlift.load(str(tmp_path), progress=slow)
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    gc.collect()
    import time

    for _ in range(100):
        if tensorlift._live_host_arenas() == base:
            break
        time.sleep(0.05)
    assert tensorlift._live_host_arenas() == base


@pytest.mark.parametrize("backend", ["pread", "mmap"])
def test_a_handle_for_a_device_that_cannot_be_used_opens_and_fails_at_its_first_tensor(tmp_path, backend):
    """As the reference's: names, shapes, dtypes and metadata are read; a tensor, whole or
    sliced, is a RuntimeError. (cuda:4096: no such device on any host.)"""
    path = str(tmp_path / "m.safetensors")
    save_file({"a": np.arange(6, dtype=np.float32).reshape(2, 3)}, path, metadata={"k": "v"})
    handles = (
        safetensors.safe_open(path, framework="pt", device="cuda:4096", backend=backend),
        tensorlift.safe_open(path, framework="pt", device="cuda:4096", backend=backend),
    )
    for f in handles:
        with f:
            assert list(f.keys()) == ["a"] and f.metadata() == {"k": "v"}
            s = f.get_slice("a")
            assert s.get_shape() == [2, 3] and s.get_dtype() == "F32"
            for read in (lambda: f.get_tensor("a"), lambda: s[0:1], lambda: s[:]):
                with pytest.raises(RuntimeError):
                    read()
    # Threads that load at once through one handle each hear the device's error (its loader
    # is made by one thread at a time, the others waiting, none holding the GIL).
    from concurrent.futures import ThreadPoolExecutor

    with tensorlift.safe_open(path, framework="pt", device="cuda:4096", backend=backend) as f:
        def first(_):
            try:
                f.get_tensor("a")
            except RuntimeError as e:
                return str(e)

        with ThreadPoolExecutor(8) as pool:
            said = list(pool.map(first, range(8)))
        assert all(s and "4096" in s for s in said), said


def test_errors_have_the_documented_types(fixture, tmp_path):
    with pytest.raises(FileNotFoundError):
        tensorlift.safe_open(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}x")
    with pytest.raises(ValueError, match="bad.safetensors"):
        tensorlift.load_file(bad, framework="np")
    with pytest.raises(ValueError, match="invalid device 'tpu'"):
        tensorlift.load_file(str(fixture / "single.safetensors"), device="tpu")
    with pytest.raises(RuntimeError, match="CUDA device 7 is unavailable|cuda:7"):
        tensorlift.load_file(str(fixture / "single.safetensors"), device="cuda:7", framework=None)
    with pytest.raises(ValueError, match="unknown framework 'xla'"):
        tensorlift.load_file(str(fixture / "single.safetensors"), framework="xla")
    with tensorlift.safe_open(fixture / "single.safetensors", framework="np") as f:
        with pytest.raises(KeyError):
            f.get_tensor("nope")
        with pytest.raises(IndexError):
            f.get_slice("f32")[17]
    p = str(tmp_path / "f4.safetensors")
    raw_file(p, [("q", "F4", [4], b"\x12\x34")])
    with pytest.raises(TypeError, match="sub-byte"):
        tensorlift.load_file(p, framework="np")
    assert tensorlift.load_file(p, framework=None)["q"].nbytes == 2


def test_auto_device_says_why():
    device, reason = tensorlift.resolve_device("auto")
    assert device in ("cpu", "cuda:0") and reason.startswith("auto: ")


def test_host_memory_reuse_is_opt_in_and_given_back(fixture, sharded_reference):
    import tensorlift as tl

    folder, want = fixture / "sharded", sharded_reference
    assert tl.retained_host_memory() == 0
    got = tl.load_file(str(folder), framework="np")
    del got
    assert tl.retained_host_memory() == 0, "off by default: dropped tensors give memory back"
    tl.reuse_host_memory()
    try:
        del_me = tl.load_file(str(folder), framework="np")
        del del_me
        kept = tl.retained_host_memory()
        assert kept > 0
        again = tl.load_file(str(folder), framework="np")
        assert tl.retained_host_memory() == 0, "the next load took it"
        for name, arr in want.items():
            assert again[name].tobytes() == arr.tobytes(), name
        del again
        tl.release_host_memory()
        assert tl.retained_host_memory() == 0
    finally:
        tl.reuse_host_memory(False)
    assert tl._live_host_arenas() == 0


def test_tensor_parallel_shares_and_dtype_conversion(tmp_path):
    # A small Llama-named checkpoint, written by the reference writer.
    rng = np.random.default_rng(3)
    t = {
        "model.embed_tokens.weight": rng.standard_normal((100, 8)).astype(np.float16),
        "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((16, 8)).astype(np.float32),
        "model.layers.0.self_attn.o_proj.weight": rng.standard_normal((8, 16)).astype(np.float32),
        "model.layers.0.input_layernorm.weight": rng.standard_normal((8,)).astype(np.float32),
    }
    path = tmp_path / "model.safetensors"
    save_file(t, str(path))
    for rank in range(4):
        got = tensorlift.load_file(path, framework="np", tp=(rank, 4, 4))
        q = t["model.layers.0.self_attn.q_proj.weight"]
        assert same(got["model.layers.0.self_attn.q_proj.weight"], q[rank * 4 : (rank + 1) * 4])
        o = t["model.layers.0.self_attn.o_proj.weight"]
        assert same(got["model.layers.0.self_attn.o_proj.weight"], o[:, rank * 4 : (rank + 1) * 4])
        # The vocabulary pads to 128 rows, 32 a rank: the last keeps the 4 that exist.
        rows = slice(rank * 32, min((rank + 1) * 32, 100))
        assert same(got["model.embed_tokens.weight"], t["model.embed_tokens.weight"][rows])
        assert same(got["model.layers.0.input_layernorm.weight"], t["model.layers.0.input_layernorm.weight"])
    # float16 to float32 is exact: the same values as numpy's conversion.
    got = tensorlift.load_file(path, framework="np", dtype="float32")
    assert got["model.embed_tokens.weight"].dtype == np.float32
    assert np.array_equal(got["model.embed_tokens.weight"], t["model.embed_tokens.weight"].astype(np.float32))
    streamed = dict(tensorlift.iter_tensors(path, framework="np", dtype="float32", tp=(1, 2, 2)))
    # Rows 64..100 of the padded 128, converted exactly.
    e = streamed["model.embed_tokens.weight"]
    assert e.dtype == np.float32 and e.shape == (36, 8)
    assert e.tobytes() == t["model.embed_tokens.weight"][64:100].astype(np.float32).tobytes()
    with pytest.raises(ValueError, match="bfloat16"):
        tensorlift.load_file(path, dtype="int8")
    with pytest.raises(ValueError, match="key/value heads"):
        tensorlift.load_file(path, tp=(0, 8, 4))


def _mapping_of(address):
    """The file whose memory mapping holds ``address`` in this process, or None."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= address < hi:
                return fields[5] if len(fields) > 5 else None
    return None


def test_backend_mmap_serves_views_of_the_mapped_file_and_pread_copies(tmp_path):
    import torch

    path = tmp_path / "m.safetensors"
    save_file({"w": np.arange(4096, dtype=np.float32).reshape(64, 64)}, str(path))
    with tensorlift.safe_open(path, framework="pt", backend="mmap") as f:
        mapped = f.get_tensor("w")
        whole = f.get_slice("w")[...]
    with tensorlift.safe_open(path, framework="pt", backend="pread") as f:
        read = f.get_tensor("w")
    want = torch.arange(4096, dtype=torch.float32).reshape(64, 64)
    for t in (mapped, whole, read):
        assert torch.equal(t, want)
    assert _mapping_of(mapped.data_ptr()) == str(path.resolve())
    assert _mapping_of(whole.data_ptr()) == str(path.resolve())
    assert _mapping_of(read.data_ptr()) != str(path.resolve())
    # A write through a mapped tensor (torch in place) writes a private copy of the page, as
    # with the reference's maps: in a child process, since a read-only map would kill it.
    child = (
        "import sys, torch, tensorlift\n"
        "f = tensorlift.safe_open(sys.argv[1], framework='pt', backend='mmap')\n"
        "t = f.get_slice('w')[...]\n"
        "t.add_(1)\n"
        "assert float(t[0, 0]) == 1.0\n"
    )
    before = path.read_bytes()
    subprocess.run([sys.executable, "-c", child, str(path)], check=True)
    assert path.read_bytes() == before
    with pytest.raises(tensorlift.SafetensorError, match='backend "fast" is invalid'):
        tensorlift.safe_open(path, framework="pt", backend="fast")
    with pytest.raises(TypeError):
        tensorlift.safe_open(path, framework="pt", backend=1)


def test_tobytes_of_a_mapped_tensor_whose_file_was_cut_is_an_error_not_a_sigbus(tmp_path):
    """``Tensor.tobytes`` copies through the kernel: a mapped file cut short under a tensor
    is a RuntimeError naming it (the reference's arrays would raise SIGBUS on access), and
    nothing of tensorlift reads the mapped pages. In a child, which SIGBUS would kill."""
    path = tmp_path / "m.safetensors"
    want = np.arange(1 << 20, dtype=np.float32)
    save_file({"w": want}, str(path))
    child = (
        "import ctypes, os, sys, tensorlift\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "if libc.process_vm_readv(os.getpid(), None, 0, None, 0, 0) != 0 and not os.access('/proc/self/mem', os.R_OK):\n"
        "    print('skip: the kernel copies nothing here'); sys.exit(0)\n"
        "f = tensorlift.safe_open(sys.argv[1], framework=None, backend='mmap')\n"
        "t = f.get_tensor('w')\n"
        "data = open(sys.argv[1], 'rb').read()\n"
        "assert t.tobytes() == data[len(data) - t.nbytes :], 'bytes'\n"
        "os.truncate(sys.argv[1], 4096)\n"
        "try:\n"
        "    t.tobytes()\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", child, str(path)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, (out.returncode, out.stderr)
    if out.stdout.startswith("skip:"):
        pytest.skip(out.stdout)
    assert "w: tensor 'w': its bytes could not be read: a page could not be read" in out.stdout, out.stdout


# A launcher that runs a command under a seccomp filter refusing process_vm_readv with
# EPERM, as a sandbox's profile may.
_NO_PROCESS_VM_READV = r"""
#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
int main(int argc, char **argv) {
    struct sock_filter f[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_process_vm_readv, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = {sizeof f / sizeof f[0], f};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog)) {
        perror("seccomp");
        return 99;
    }
    execvp(argv[1], argv + 1);
    perror("exec");
    return 98;
}
"""


def test_tobytes_copies_where_a_sandbox_refuses_process_vm_readv(tmp_path):
    """Where a seccomp filter refuses ``process_vm_readv`` (EPERM), ``Tensor.tobytes`` copies
    through ``/proc/self/mem``: the bytes of a mapped tensor and of one read into memory, and
    a mapped file cut short is still an error, not a SIGBUS. The child checks the filter is
    in place, then compares with the file."""
    import shutil

    if shutil.which("cc") is None:
        pytest.skip("no C compiler (cc) to build the seccomp launcher")
    src, launcher = tmp_path / "sandbox.c", tmp_path / "sandbox"
    src.write_text(_NO_PROCESS_VM_READV)
    built = subprocess.run(["cc", "-o", str(launcher), str(src)], capture_output=True, text=True)
    if built.returncode != 0:
        pytest.skip(f"the seccomp launcher does not build here (no kernel headers?): {built.stderr}")
    path = tmp_path / "m.safetensors"
    save_file({"w": np.arange(1 << 16, dtype=np.float32)}, str(path))
    child = (
        "import ctypes, os, sys, tensorlift\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "assert libc.process_vm_readv(os.getpid(), None, 0, None, 0, 0) == -1\n"
        "assert ctypes.get_errno() == 1, ctypes.get_errno()\n"
        "data = open(sys.argv[1], 'rb').read()\n"
        "for backend in ('pread', 'mmap'):\n"
        "    t = tensorlift.safe_open(sys.argv[1], framework=None, backend=backend).get_tensor('w')\n"
        "    assert t.tobytes() == data[len(data) - t.nbytes :], backend\n"
        "os.truncate(sys.argv[1], 4096)\n"
        "try:\n"
        "    t.tobytes()\n"
        "except RuntimeError as e:\n"
        "    assert 'a page could not be read' in str(e), e\n"
        "    print('ok')\n"
    )
    try:
        out = subprocess.run(
            [str(launcher), sys.executable, "-c", child, str(path)], capture_output=True, text=True, timeout=120
        )
    except PermissionError as e:  # a temporary folder mounted noexec
        pytest.skip(f"the seccomp launcher cannot run here: {e}")
    if out.returncode in (98, 99):
        pytest.skip(f"seccomp filters are refused here: {out.stderr}")
    assert (out.returncode, out.stdout) == (0, "ok\n"), out.stderr


def test_host_loads_fill_by_copy_and_a_forked_child_reads_its_own(tmp_path):
    """A cached file's host load fills new memory by copying its pages in, where userfaultfd
    allows it; a process forked afterwards cannot use the descriptor it inherited (it serves
    the parent's memory), so its loads read, and give the file's bytes all the same."""
    rng = np.random.default_rng(7)
    want = {"w": rng.standard_normal((512, 1024), dtype=np.float32), "b": np.arange(7, dtype=np.int16)}
    path = tmp_path / "m.safetensors"
    save_file(want, str(path))
    stats = {}
    got = tensorlift.load_file(path, framework="np", stats=stats)
    assert all(same(got[k], reference_load(str(path))[k]) for k in want)
    copied = stats["copied_bytes"] > 0
    assert copied or stats["fill_by_copy_refused"], stats
    if copied or os.environ.get("TENSORLIFT_REQUIRE_FILL"):
        assert stats["copied_bytes"] == stats["bytes_read"] > 0, stats
        assert stats["fill_by_copy_refused"] is None
    pid = os.fork()
    if pid == 0:  # the child: report by exit status only
        code = 1
        try:
            child = {}
            again = tensorlift.load_file(path, framework="np", stats=child)
            ok = all(same(again[k], want[k]) for k in want) and all(same(got[k], want[k]) for k in want)
            if copied:
                ok = ok and child["copied_bytes"] == 0 and "forked" in (child["fill_by_copy_refused"] or "")
            code = 0 if ok else 3
        finally:
            os._exit(code)
    assert wait_child(pid, 120) == 0


def wait_child(pid, seconds):
    """The exit code of forked child `pid`; a child that hangs fails the test (and is
    killed) rather than stalling the suite."""
    for _ in range(seconds * 10):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail(f"the forked child did not end in {seconds} s")


@pytest.mark.parametrize("backend", ["pread", "mmap"])
def test_a_handle_opened_before_a_fork_reads_and_closes_in_the_child(tmp_path, backend):
    """A `safe_open` handle opened (and read) in the parent serves a forked child, as the
    reference's does (a data loader's workers): its reads in the child do not wait on the
    parent's threads, and closing it there does not either; the parent's handle still reads."""
    rng = np.random.default_rng(11)
    want = {"w": rng.standard_normal((256, 512), dtype=np.float32), "b": np.arange(9, dtype=np.int16)}
    path = tmp_path / "m.safetensors"
    save_file(want, str(path))
    f = tensorlift.safe_open(path, framework="np", backend=backend)
    assert same(f.get_tensor("b"), want["b"])
    pid = os.fork()
    if pid == 0:  # the child: report by exit status only
        code = 1
        try:
            ok = same(f.get_tensor("w"), want["w"]) and same(f.get_slice("w")[3:9, 100:], want["w"][3:9, 100:])
            # A handle opened here while the parent's is open has a reader of the child's
            # own (threads of its own), not the parent's (which has none here).
            threads = len(os.listdir("/proc/self/task"))
            g = tensorlift.safe_open(path, framework="np", backend=backend)
            ok = ok and len(os.listdir("/proc/self/task")) > threads and same(g.get_tensor("b"), want["b"])
            f.__exit__(None, None, None)
            del g
            code = 0 if ok else 3
        finally:
            os._exit(code)
    assert wait_child(pid, 60) == 0
    assert same(f.get_tensor("w"), want["w"])
    f.__exit__(None, None, None)


def test_an_invalid_file_raises_the_references_error_class(tmp_path):
    """A file that is not a valid checkpoint raises what the reference raises,
    ``safetensors.SafetensorError`` (code that falls back on it, as diffusers' LoRA loader
    does, still does), which is also a ``ValueError``; a missing file stays
    ``FileNotFoundError``."""
    import safetensors

    files = {
        "short.safetensors": b"\0" * 4,
        "json.safetensors": b"\x10\0\0\0\0\0\0\0{not json}      ",
        "cut.safetensors": None,
    }
    save_file({"a": np.zeros(100, np.float32)}, str(tmp_path / "ok.safetensors"))
    whole = (tmp_path / "ok.safetensors").read_bytes()
    for name, data in files.items():
        path = tmp_path / "bad" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(whole[:-8] if data is None else data)
        for call in (
            lambda: tensorlift.safe_open(path, framework="np"),
            lambda: tensorlift.safe_open(path, framework="np", backend="mmap"),
            lambda: tensorlift.load_file(path, framework="np"),
        ):
            with pytest.raises(safetensors.SafetensorError) as e:
                call()
            assert isinstance(e.value, ValueError) and str(path) in str(e.value), e.value
            with pytest.raises(safetensors.SafetensorError):
                safetensors.safe_open(str(path), framework="np")
    with pytest.raises(FileNotFoundError):
        tensorlift.safe_open(tmp_path / "none.safetensors", framework="np")


def test_handles_held_open_share_their_reader(tmp_path):
    """Handles held open at once (transformers holds every shard's of a model while it
    loads) share one reader's threads: twenty cost no more threads than one, and their
    tensors are the files'."""
    want = {}
    for i in range(20):
        want[i] = {"w": np.full((64, 8), i, dtype=np.float32)}
        save_file(want[i], str(tmp_path / f"s{i}.safetensors"))

    def threads():
        # The process's own threads that stay: not the kernel's io_uring workers (iou-wrk-N,
        # iou-sqp-N), which it starts for reads that would block (more under load) and ends
        # when idle, nor a plan's threads (tensorlift-plan), which end with it (one just
        # joined may still be listed a moment).
        n = 0
        for t in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{t}/comm") as f:
                    n += not f.read().startswith(("iou-", "tensorlift-plan"))
            except OSError:
                pass  # gone
        return n

    gc.collect()
    before = threads()
    first = tensorlift.safe_open(tmp_path / "s0.safetensors", framework="np")
    one = threads() - before
    handles = [first] + [tensorlift.safe_open(tmp_path / f"s{i}.safetensors", framework="np") for i in range(1, 20)]
    assert threads() - before <= one, (before, one, threads())
    for i, f in enumerate(handles):
        assert same(f.get_tensor("w"), want[i]["w"])
    del first, handles, f
    gc.collect()


def test_a_mapped_files_tensors_read_one_by_one_share_one_mapping(tmp_path):
    """``get_tensor`` of every tensor of a mapped file, one at a time (as accelerate and
    transformers read a state dict), maps the file once, not once a tensor."""
    want = {f"t{i}": np.full((16,), i, dtype=np.int32) for i in range(300)}
    path = tmp_path / "many.safetensors"
    save_file(want, str(path))

    def mappings():
        with open("/proc/self/maps") as m:
            return sum(1 for line in m if line.rstrip().endswith(str(path)))

    # (tensorlift's own tensors: numpy's arrays are never views of the mapping.)
    with tensorlift.safe_open(path, framework=None, backend="mmap") as f:
        got = {k: np.from_dlpack(f.get_tensor(k)) for k in f.keys()}
        assert all(same(got[k], want[k]) for k in want)
        assert 1 <= mappings() <= 2, mappings()
        # Asked for again, a tensor is a view of its own.
        assert same(np.from_dlpack(f.get_tensor("t7")), want["t7"])
    # numpy's arrays are copies out of the one mapping (as the reference's are copies),
    # which lives while tensors of it are still to be taken.
    with tensorlift.safe_open(path, framework="np", backend="mmap") as f:
        keys = f.keys()
        got = {keys[0]: f.get_tensor(keys[0])}
        assert mappings() == 1, mappings()
        got.update({k: f.get_tensor(k) for k in keys[1:]})
        assert all(same(got[k], want[k]) for k in want)
        assert mappings() <= 1, mappings()
    del got
    gc.collect()


def test_load_file_takes_the_references_backend(tmp_path):
    """``load_file(..., backend=)`` as the reference's: ``"pread"`` reads into memory,
    ``"mmap"`` serves views of the mapped file (the same bytes, the file mapped while they
    live) to torch and tensorlift's own tensors, and numpy memory of its own, as the
    reference's numpy arrays are copies; anything else is the reference's error."""
    import safetensors

    want = {"w": np.arange(4096, dtype=np.float32).reshape(64, 64), "b": np.arange(3, dtype=np.int8)}
    path = tmp_path / "m.safetensors"
    save_file(want, str(path))

    def mapped():
        with open("/proc/self/maps") as m:
            return any(line.rstrip().endswith(str(path)) for line in m)

    gc.collect()
    for backend, framework, views in (("pread", None, False), ("mmap", None, True), ("mmap", "np", False)):
        got = tensorlift.load_file(path, framework=framework, backend=backend)
        if framework is None:
            got = {k: np.from_dlpack(t) for k, t in got.items()}
        assert all(same(got[k], want[k]) for k in want), backend
        # In the reference's order: the order of the data in the file.
        assert list(got) == list(reference_load(str(path))), backend
        assert mapped() == views, backend
        del got
        gc.collect()
    # With what a view cannot do (statistics of a read), "mmap" reads: nothing is mapped.
    stats = {}
    got = tensorlift.load_file(path, framework=None, backend="mmap", stats=stats)
    assert not mapped() and stats["bytes_read"] > 0, stats
    assert all(same(np.from_dlpack(got[k]), want[k]) for k in want)
    del got
    for bad in ("fast", "MMAP"):
        with pytest.raises(safetensors.SafetensorError, match=f'backend "{bad}" is invalid'):
            tensorlift.load_file(path, framework="np", backend=bad)


@pytest.mark.parametrize("backend", ["pread", "mmap"])
def test_a_handle_reads_the_file_it_opened_after_its_name_changes(tmp_path, backend):
    """A handle reads the file it opened, as the reference's does, after a ``chmod``, a hard
    link made and removed, and an atomic replace of its name (what a new revision written
    beside it does): each changes the file's status, none its bytes. A handle opened after
    reads the new file."""
    path = tmp_path / "m.safetensors"
    old = {"a": np.arange(6, dtype=np.float32), "b": np.arange(3, dtype=np.uint8)}
    new = {"a": np.full(6, 9, dtype=np.float32), "b": np.zeros(3, dtype=np.uint8)}
    save_file(old, str(path))
    with tensorlift.safe_open(path, framework="np", backend=backend) as ours, safetensors.safe_open(
        str(path), framework="np"
    ) as ref:
        # Past the file system's clock tick, so that each change moves the status time.
        time.sleep(0.02)
        os.chmod(path, 0o600)
        os.link(path, tmp_path / "link")
        os.unlink(tmp_path / "link")
        save_file(new, str(tmp_path / "new"))
        os.replace(tmp_path / "new", path)
        for name in old:
            assert ours.get_tensor(name).tobytes() == ref.get_tensor(name).tobytes() == old[name].tobytes(), name
    with tensorlift.safe_open(path, framework="np", backend=backend) as again:
        assert all(same(again.get_tensor(k), new[k]) for k in new)


def test_paths_and_devices_as_the_reference_takes_them(tmp_path):
    """A path is what ``os.fspath`` gives (not ``str()`` of the object), ``bytes`` included;
    ``device=None`` is the host. Each as the reference reads it."""
    want = {"w": np.arange(6, dtype=np.float32)}
    save_file(want, str(tmp_path / "m.safetensors"))

    class Named(os.PathLike):
        def __fspath__(self):
            return str(tmp_path / "m.safetensors")

        def __str__(self):
            return "not the path"

    for path in (Named(), os.fsencode(tmp_path / "m.safetensors")):
        with tensorlift.safe_open(path, framework="np", device=None) as f:
            assert same(f.get_tensor("w"), want["w"]), path
        assert same(tensorlift.load_file(path, framework="np", device=None)["w"], want["w"]), path
        assert [n for n, _ in tensorlift.iter_tensors(path, framework="np")] == ["w"], path
    with safetensors.safe_open(Named(), framework="np", device=None) as ref:
        assert same(ref.get_tensor("w"), want["w"])


def test_a_bool_picked_by_index_keeps_its_byte(tmp_path):
    """A slice down to one bool gives the stored byte, as the reference does (numpy's bool
    scalar would make 2 or 255 a 1)."""
    path = tmp_path / "b.safetensors"
    raw_file(
        path,
        [("b", "BOOL", [3], b"\x00\x02\xff"), ("s", "BOOL", [], b"\x07"), ("m", "BOOL", [2, 2], b"\x03\x00\x09\x01")],
    )
    keys = {"b": [1, 2, -1, slice(1, 3), ...], "s": [(), ...], "m": [(0, 1), (1, 0), 1, (slice(None), 0), (..., 1)]}
    with safetensors.safe_open(str(path), framework="np") as ref, tensorlift.safe_open(path, framework="np") as ours:
        for name, ks in keys.items():
            for k in ks:
                want, got = np.asarray(ref.get_slice(name)[k]), np.asarray(ours.get_slice(name)[k])
                assert want.shape == got.shape and want.view(np.uint8).tobytes() == got.view(np.uint8).tobytes(), (
                    name,
                    k,
                )
    assert np.asarray(tensorlift.safe_open(path, framework="np").get_slice("b")[2]).view(np.uint8) == 255


@pytest.mark.parametrize("backend", ["pread", "mmap"])
def test_a_file_rewritten_under_a_handle_is_refused_not_misread(tmp_path, backend):
    """A file rewritten in place under an open handle (same length, its modification time
    set back, so that only its status change time and its bytes tell) is refused by
    ``get_tensor`` and by ``get_slice``, rather than read at the old places."""
    path = tmp_path / "m.safetensors"
    save_file({"a": np.zeros(4, dtype=np.float32), "b": np.ones(4, dtype=np.int32)}, str(path))
    with tensorlift.safe_open(path, framework="np", backend=backend) as f:
        time.sleep(0.02)
        before = os.stat(path)
        save_file({"a": np.full(4, 7, dtype=np.int32), "b": np.full(4, 9, dtype=np.float32)}, str(tmp_path / "new"))
        new = (tmp_path / "new").read_bytes()
        assert len(new) == before.st_size
        with open(path, "r+b") as w:
            w.write(new)
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        for read in (lambda: f.get_tensor("a"), lambda: f.get_slice("a")[:], lambda: f.get_slice("b")[1:3]):
            with pytest.raises(OSError, match="header differs from the planned one"):
                read()


def test_a_file_cut_short_under_a_pread_handle_is_the_references_error_class(tmp_path):
    """The reference raises a SafetensorError for a read that fails; tensorlift raises one
    too (also an OSError, as it raised before, naming the change)."""
    path = str(tmp_path / "m.safetensors")
    save_file({"a": np.zeros(4, dtype=np.float32), "b": np.ones(1 << 16, dtype=np.int32)}, path)
    with safetensors.safe_open(path, framework="np", backend="pread") as ref, tensorlift.safe_open(path, framework="np") as ours:
        os.truncate(path, 4096)
        with pytest.raises(safetensors.SafetensorError):
            ref.get_tensor("b")
        with pytest.raises(safetensors.SafetensorError, match="changed since it was planned") as e:
            ours.get_tensor("b")
        assert isinstance(e.value, OSError)


@pytest.mark.parametrize("backend", ["pread", "mmap"])
def test_an_open_handle_holds_one_descriptor(tmp_path, backend):
    """transformers keeps a handle a shard open while it loads a model: each handle holds one
    descriptor, its file's, as the reference's pread handle does. (Each held the model
    folder's too: a model of 510 shards ran out of descriptors under ``ulimit -n 1024``,
    which the reference loads.) A handle on a folder of shards holds one a shard."""
    files = []
    for i in range(12):
        files.append(tmp_path / f"s{i}.safetensors")
        save_file({f"t{i}": np.full(3, i, dtype=np.int32)}, str(files[-1]))

    def fds():
        return len(os.listdir("/proc/self/fd"))

    # The shared loader's own descriptors (rings, threads' events) are there once. (Earlier
    # tests' garbage, such as a handle an exception's traceback holds in a cycle, is
    # collected first: its descriptors would close during this count.)
    warm = tensorlift.safe_open(files[0], framework="np", backend=backend)
    gc.collect()
    before = fds()
    handles = [tensorlift.safe_open(p, framework="np", backend=backend) for p in files]
    assert [int(h.get_tensor(f"t{i}")[0]) for i, h in enumerate(handles)] == list(range(12))
    assert fds() - before == len(files)
    del handles
    gc.collect()
    assert fds() == before

    folder = tmp_path / "folder"
    folder.mkdir()
    for p in files[:5]:
        os.link(p, folder / p.name)
    handle = tensorlift.safe_open(folder, framework="np", backend=backend)
    assert [int(handle.get_tensor(f"t{i}")[0]) for i in range(5)] == list(range(5))
    assert fds() - before == 5
    del handle, warm


@pytest.mark.parametrize("device", ["meta", "cpu:0", "disk", -1])
def test_a_device_or_framework_the_reference_refuses_is_its_error(tmp_path, device):
    """An unknown device or framework is the reference's ``SafetensorError`` (caught where
    code catches the reference's), and a ``ValueError`` as before."""
    p = tmp_path / "a.safetensors"
    save_file({"a": np.zeros(2, dtype=np.float32)}, str(p))
    with pytest.raises(safetensors.SafetensorError):
        safetensors.safe_open(str(p), framework="pt", device=device)
    for call in (
        lambda: tensorlift.safe_open(p, framework="pt", device=device),
        lambda: tensorlift.load_file(p, device=device),
    ):
        with pytest.raises(safetensors.SafetensorError, match="invalid device") as e:
            call()
        assert isinstance(e.value, ValueError)
    with pytest.raises(safetensors.SafetensorError):
        safetensors.safe_open(str(p), framework="xla")
    with pytest.raises(safetensors.SafetensorError, match="unknown framework 'xla'") as e:
        tensorlift.safe_open(p, framework="xla")
    assert isinstance(e.value, ValueError)


def test_a_name_that_is_not_a_str_is_the_reference_s_type_error(tmp_path):
    """``get_tensor(1)``, ``get_slice(None)``, ``get_tensor(b"a")``: the reference's
    ``TypeError`` (it was "does not contain tensor 1", a ``KeyError``)."""
    p = str(tmp_path / "a.safetensors")
    save_file({"a": np.zeros(2, dtype=np.float32)}, p)
    with safetensors.safe_open(p, framework="np") as ref, tensorlift.safe_open(p, framework="np") as ours:
        for key in (1, None, b"a"):
            for method in ("get_tensor", "get_slice"):
                with pytest.raises(TypeError) as want:
                    getattr(ref, method)(key)
                with pytest.raises(TypeError) as got:
                    getattr(ours, method)(key)
                assert str(got.value) == str(want.value), (method, key)


@pytest.mark.parametrize("device", ["cuda", "cuda:1", 1])
def test_numpy_on_a_device_is_the_references_error_before_anything_is_loaded(tmp_path, device):
    # The reference refuses numpy arrays off the host as the handle opens, with its error
    # (a SafetensorError), whether or not there is a GPU: so does tensorlift, and load_file
    # and iter_tensors refuse as early (a ValueError too, as before).
    path = str(tmp_path / "m.safetensors")
    save_file({"a": np.arange(4, dtype=np.float32)}, path)
    with pytest.raises(safetensors.SafetensorError) as want:
        safetensors.safe_open(path, framework="np", device=device)
    with pytest.raises(safetensors.SafetensorError) as got:
        tensorlift.safe_open(path, framework="np", device=device)
    if isinstance(device, str):
        assert str(got.value) == str(want.value)
    for call in (
        lambda: tensorlift.load_file(path, device=device, framework="np"),
        lambda: next(tensorlift.iter_tensors(path, device=device, framework="np")),
    ):
        with pytest.raises(ValueError, match="not supported for framework numpy"):
            call()


@pytest.mark.parametrize("framework", ["mlx", "tf", "paddle"])
def test_host_only_frameworks_on_a_device_are_a_safetensor_error_before_any_import(tmp_path, framework):
    # The reference refuses them off the host with a SafetensorError as the handle opens;
    # tensorlift too, before it imports the framework (not installed here: the refusal, not
    # a ModuleNotFoundError).
    path = str(tmp_path / "m.safetensors")
    save_file({"a": np.arange(4, dtype=np.float32)}, path)
    if framework != "paddle":  # (the reference imports paddle first)
        with pytest.raises(safetensors.SafetensorError, match="not supported for framework"):
            safetensors.safe_open(path, framework=framework, device="cuda:0")
    for call in (
        lambda: tensorlift.safe_open(path, framework=framework, device="cuda:0"),
        lambda: tensorlift.load_file(path, device="cuda", framework=framework),
    ):
        with pytest.raises(safetensors.SafetensorError, match="from host memory only") as e:
            call()
        assert isinstance(e.value, ValueError)


def test_arrays_of_a_mapped_file_outlive_its_truncation_as_the_references_copies_do(tmp_path):
    """With ``backend="mmap"``, numpy's arrays (and those of the frameworks built on them) are
    copies out of the mapping, as the reference's are copies: a file cut short afterwards leaves
    them readable, where views of the mapping would kill the process with SIGBUS. Under
    ``patch()``, the reference's own ``safetensors.numpy.load_file`` too. In a child, which
    SIGBUS would kill."""
    path = tmp_path / "m.safetensors"
    save_file({"w": np.arange(1 << 20, dtype=np.float32)}, str(path))
    child = (
        "import os, sys, numpy as np, safetensors.numpy, tensorlift\n"
        "tensorlift.patch()\n"
        "arrays = [safetensors.numpy.load_file(sys.argv[1])['w'],\n"
        "          tensorlift.load_file(sys.argv[1], framework='np', backend='mmap')['w']]\n"
        "with tensorlift.safe_open(sys.argv[1], framework='np', backend='mmap') as f:\n"
        "    arrays.append(f.get_tensor('w'))\n"
        "    arrays.append(f.get_slice('w')[:])\n"
        "os.truncate(sys.argv[1], 4096)\n"
        "for a in arrays:\n"
        "    assert np.array_equal(a, np.arange(1 << 20, dtype=np.float32))\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", child, str(path)], capture_output=True, text=True, timeout=120)
    assert (out.returncode, out.stdout) == (0, "ok\n"), (out.returncode, out.stderr)


def test_torch_and_numpy_modules_mirror_the_references(tmp_path):
    """``tensorlift.torch`` and ``tensorlift.numpy`` stand in for ``safetensors.torch`` and
    ``safetensors.numpy``: ``load_file`` (the reference's signature) reads through tensorlift
    (a folder too, which the reference does not read), to the reference's tensors; the
    functions that write, or read bytes in memory, are the reference's own."""
    import safetensors.numpy
    import safetensors.torch
    import torch

    import tensorlift.numpy
    import tensorlift.torch

    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3, dtype=torch.bfloat16)}
    path = tmp_path / "model.safetensors"
    for name in ("save", "save_file", "save_model", "load_model", "load"):
        assert getattr(tensorlift.torch, name) is getattr(safetensors.torch, name), name
    for name in ("save", "save_file", "load"):
        assert getattr(tensorlift.numpy, name) is getattr(safetensors.numpy, name), name
    with pytest.raises(AttributeError):
        tensorlift.torch.no_such_function
    tensorlift.torch.save_file(tensors, str(path))
    want = safetensors.torch.load_file(str(path))
    for source in (path, tmp_path):
        for backend in ("mmap", "pread"):
            got = tensorlift.torch.load_file(source, "cpu", backend=backend)
            assert sorted(got) == sorted(want)
            for k in want:
                assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), (source, backend, k)
    arrays = {"x": np.arange(5, dtype=np.int16), "y": np.ones((2, 2), dtype=np.float64)}
    np_path = tmp_path / "arrays" / "a.safetensors"
    np_path.parent.mkdir()
    tensorlift.numpy.save_file(arrays, str(np_path))
    want = safetensors.numpy.load_file(str(np_path))
    for backend in ("mmap", "pread"):
        got = tensorlift.numpy.load_file(np_path.parent, backend=backend)
        assert sorted(got) == sorted(want)
        for k in want:
            assert got[k].dtype == want[k].dtype and got[k].tobytes() == want[k].tobytes(), (backend, k)
            assert got[k].flags.writeable, (backend, k)
    assert tensorlift.torch.load(tensorlift.torch.save(tensors))["a"].tolist() == tensors["a"].tolist()
