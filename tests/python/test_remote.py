"""Checkpoints in a bucket of a real S3 server (s3s-fs, which the test command installs): the
Python API reads them as the reference reads the same files from disk, including the way
transformers calls ``safe_open`` (``backend="mmap"``, which on a remote checkpoint reads into
memory instead of mapping)."""

import os
import shutil
import socket
import subprocess
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file as reference_load
from safetensors.torch import save_file

import tensorlift

KEYS = ("tensorlift-test", "tensorlift-secret")


def _s3s_fs():
    path = os.environ.get("TENSORLIFT_S3S_FS") or os.path.expanduser("~/.cache/tensorlift/s3s-fs-0.14.1/bin/s3s-fs")
    if os.path.isfile(path):
        return path
    if os.environ.get("TENSORLIFT_REQUIRE_S3"):
        pytest.fail("s3s-fs is not installed (./scripts/test installs it)")
    pytest.skip("s3s-fs is not installed (./scripts/test installs it)")


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    """A server over a folder whose bucket holds a sharded and a single-file checkpoint
    written by the reference; yields the folder, with the environment pointed at it."""
    binary = _s3s_fs()
    root = tmp_path_factory.mktemp("s3")
    torch.manual_seed(0)
    model = root / "bucket" / "model"
    model.mkdir(parents=True)
    shards = [
        {"embed.weight": torch.randn(100, 64), "norm.weight": torch.randn(64).to(torch.bfloat16)},
        {"layer.0.weight": torch.randn(96, 64).to(torch.float16), "layer.0.bias": torch.arange(96, dtype=torch.int64)},
    ]
    weight_map = {}
    for i, tensors in enumerate(shards):
        name = f"model-{i + 1:05}-of-00002.safetensors"
        save_file(tensors, str(model / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
    import json

    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    single = root / "bucket" / "single"
    single.mkdir()
    save_file({"w": torch.randn(33, 17), "i": torch.arange(5, dtype=torch.int32)}, str(single / "model.safetensors"))
    # Llama's names, which tensor-parallel loads split.
    llama = root / "bucket" / "llama"
    llama.mkdir()
    save_file(
        {
            "model.embed_tokens.weight": torch.randn(100, 64),
            "model.layers.0.self_attn.q_proj.weight": torch.randn(96, 64).to(torch.float16),
            "model.layers.0.self_attn.o_proj.weight": torch.randn(64, 96).to(torch.bfloat16),
            "model.norm.weight": torch.randn(64),
        },
        str(llama / "model.safetensors"),
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [binary, "--host", "127.0.0.1", "--port", str(port), "--access-key", KEYS[0], "--secret-key", KEYS[1], str(root)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                server.kill()
                pytest.fail(f"s3s-fs did not start (exit status {server.poll()})")
            time.sleep(0.05)
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": KEYS[0],
        "AWS_SECRET_ACCESS_KEY": KEYS[1],
        "AWS_REGION": "us-east-1",
        "AWS_ALLOW_HTTP": "true",
    }
    # Only this server's settings: none of the caller's S3 setup or tensorlift's remote options.
    scrub = [k for k in os.environ if k.startswith("AWS_") or k.startswith("TENSORLIFT_REMOTE_")]
    saved = {k: os.environ.get(k) for k in list(env) + scrub}
    for k in scrub:
        del os.environ[k]
    os.environ.update(env)
    yield root
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.terminate()
    server.wait()
    shutil.rmtree(root, ignore_errors=True)


def _reference(folder):
    want = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            want.update(reference_load(str(folder / f)))
    return want


def _same(got, want):
    """The same names, dtypes, shapes and bytes (bit for bit: -0.0 is not 0.0)."""
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        raw = [t.contiguous().reshape(-1).view(torch.uint8) for t in (got[k], want[k])]
        assert torch.equal(*raw), k


def test_load_file_reads_a_bucket_as_the_reference_reads_the_files(bucket):
    want = _reference(bucket / "bucket" / "model")
    stats = {}
    _same(tensorlift.load_file("s3://bucket/model", stats=stats), want)
    assert stats["remote_shards"] == 2
    _same(tensorlift.load_file("s3://bucket/model/model.safetensors.index.json"), want)
    single = reference_load(str(bucket / "bucket" / "single" / "model.safetensors"))
    _same(tensorlift.load_file("s3://bucket/single/model.safetensors"), single)
    got = tensorlift.load_file("s3://bucket/model", framework="np")
    want_np = want["layer.0.bias"].numpy()
    assert got["layer.0.bias"].dtype == want_np.dtype and got["layer.0.bias"].tobytes() == want_np.tobytes()


def test_safe_open_as_transformers_calls_it(bucket):
    """transformers 5: safe_open(file, framework="pt", device="cpu", backend="mmap"), keys,
    get_slice kept and sliced later, get_tensor, metadata."""
    path = "s3://bucket/model/model-00002-of-00002.safetensors"
    want = reference_load(str(bucket / "bucket" / "model" / "model-00002-of-00002.safetensors"))
    with tensorlift.safe_open(path, framework="pt", device="cpu", backend="mmap") as f:
        assert sorted(f.keys()) == sorted(want)
        assert f.metadata() == {"format": "pt"}
        s = f.get_slice("layer.0.weight")
        assert s.get_shape() == [96, 64] and s.get_dtype() == "F16"
        assert torch.equal(f.get_tensor("layer.0.bias"), want["layer.0.bias"])
        assert torch.equal(s[10:20, 3:], want["layer.0.weight"][10:20, 3:])


def test_streaming_and_tensor_parallel_slices(bucket):
    want = _reference(bucket / "bucket" / "model")
    seen = dict(tensorlift.iter_tensors("s3://bucket/model", filter=["layer.*"]))
    _same(seen, {k: v for k, v in want.items() if k.startswith("layer.")})
    # Each rank's parts, against the reference's tensors cut by vLLM's rules for Llama.
    from test_group import rank_part

    full = reference_load(str(bucket / "bucket" / "llama" / "model.safetensors"))
    for rank in range(2):
        got = tensorlift.load_file("s3://bucket/llama", tp=(rank, 2, 2))
        want = {k: rank_part(k, v, rank, 2).contiguous() for k, v in full.items()}
        _same(got, want)
        assert got["model.layers.0.self_attn.q_proj.weight"].shape == (48, 64)
        assert got["model.layers.0.self_attn.o_proj.weight"].shape == (64, 48)
        assert got["model.embed_tokens.weight"].shape == ((64, 64) if rank == 0 else (36, 64))


def test_cache_dir_makes_the_next_load_local(bucket, tmp_path):
    want = _reference(bucket / "bucket" / "model")
    assert tensorlift.is_remote("s3://bucket/model") and not tensorlift.is_remote(tmp_path)
    first, second = {}, {}
    _same(tensorlift.load_file("s3://bucket/model", cache_dir=tmp_path, stats=first), want)
    _same(dict(tensorlift.iter_tensors("s3://bucket/model", cache_dir=tmp_path, stats=second)), want)
    assert first["remote_shards"] == 2
    assert second["remote_shards"] == 0 and second["shards"] == 2
    (store,) = list(tmp_path.iterdir())
    assert store.name.startswith("s3-bucket-")
    assert (store / "model" / "model-00001-of-00002.safetensors").is_file()


def test_verify_checks_the_buckets_sha256sums(bucket):
    import hashlib

    folder = bucket / "bucket" / "model"
    names = sorted(f for f in os.listdir(folder) if f.endswith((".safetensors", ".json")))
    lines = [f"{hashlib.sha256((folder / n).read_bytes()).hexdigest()}  {n}\n" for n in names]
    (folder / "SHA256SUMS").write_text("".join(lines))
    try:
        stats = {}
        _same(tensorlift.load_file("s3://bucket/model", verify=True, stats=stats), _reference(folder))
        assert stats["verified_bytes"] > 0 and stats["unverified_bytes"] == 0
    finally:
        (folder / "SHA256SUMS").unlink()


def test_errors_carry_the_servers_word(bucket):
    with pytest.raises(Exception, match="NoSuchBucket"):
        tensorlift.load_file("s3://no-such-bucket/model")
    os.environ["AWS_SECRET_ACCESS_KEY"] = "wrong"
    try:
        with pytest.raises(Exception, match="SignatureDoesNotMatch"):
            tensorlift.load_file("s3://bucket/model")
    finally:
        os.environ["AWS_SECRET_ACCESS_KEY"] = KEYS[1]


def test_a_process_group_reads_a_bucket_once(bucket, tmp_path):
    """Two processes over gloo share one load of the bucket (``load_group``): each GETs its
    own part of the objects, and both end with every tensor as the reference reads it."""
    from test_group import run_group

    want = _reference(bucket / "bucket" / "model")
    tensors, stats, _, _ = run_group("s3://bucket/model", 2, "none", tmp_path)
    for got in tensors:
        _same(got, want)
    whole = {}
    tensorlift.load_file("s3://bucket/model", stats=whole)
    read = [s["bytes_read"] for s in stats]
    assert all(r > 0 for r in read) and sum(read) <= whole["bytes_read"] + 2 * 4096, (read, whole)


def test_ctrl_c_interrupts_safe_open_of_a_server_that_never_answers(monkeypatch):
    # A server that takes connections and says nothing: planning waits on its first GET for
    # the default timeout (a minute), far longer than this test. Ctrl-C ends safe_open at
    # once, and its connection is let go.
    import signal
    import threading

    monkeypatch.delenv("TENSORLIFT_REMOTE_TIMEOUT_SECS", raising=False)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    taken, asked, closed = [], threading.Event(), threading.Event()

    def serve():
        conn, _ = listener.accept()
        taken.append(conn)
        conn.settimeout(60)
        try:
            while conn.recv(4096):
                asked.set()
            closed.set()  # The client closed its end.
        except OSError:
            pass

    def interrupt():
        # Once the request has come: Ctrl-C while planning waits for its reply.
        if asked.wait(30):
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=serve, daemon=True).start()
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Thread(target=interrupt, daemon=True)
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            tensorlift.safe_open(f"http://127.0.0.1:{port}/model.safetensors", framework="pt")
        interrupted = time.monotonic()
    finally:
        timer.join()
        signal.signal(signal.SIGINT, previous)
    assert asked.is_set(), "safe_open made no request"
    assert closed.wait(10), "the request outlived the interrupted safe_open"
    assert time.monotonic() - interrupted < 10
    for c in taken:
        c.close()
    listener.close()


def _serve_in_this_process(root):
    """An HTTP server with ``Range`` and ``ETag`` over ``root``, run by a thread of this
    process: it can answer only while the caller's thread has let go of the GIL. Returns its
    port, the paths it answered, and the server (to shut down)."""
    import http.server
    import threading

    answered = []

    class Files(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_HEAD(self):
            self._reply(body=False)

        def do_GET(self):
            self._reply(body=True)

        def _reply(self, body):
            path = root / self.path.lstrip("/")
            if ".." in self.path or not path.is_file():
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            data = path.read_bytes()
            start, end, code = 0, len(data), 200
            spec = self.headers.get("Range", "")
            if spec.startswith("bytes="):
                a, b = spec[len("bytes=") :].split("-")
                start, end, code = int(a), min(int(b) + 1 if b else len(data), len(data)), 206
            answered.append(self.path)
            self.send_response(code)
            self.send_header("Content-Length", str(end - start))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", f'"{len(data):x}-{path.stat().st_mtime_ns:x}"')
            if code == 206:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
            self.end_headers()
            if body:
                self.wfile.write(data[start:end])

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Files)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server.server_address[1], answered, server


def test_loads_let_this_processs_other_threads_run(bucket, monkeypatch):
    # The server runs on a thread of this process, so each call below finishes only if it
    # lets go of the GIL while it waits on the network; holding it, the call would wait for
    # a reply that cannot come until its timeout, and fail.
    monkeypatch.setenv("TENSORLIFT_REMOTE_TIMEOUT_SECS", "20")
    monkeypatch.setenv("TENSORLIFT_REMOTE_RETRIES", "0")
    port, answered, server = _serve_in_this_process(bucket / "bucket")
    url = f"http://127.0.0.1:{port}/model/model.safetensors.index.json"
    want = _reference(bucket / "bucket" / "model")
    try:
        _same(tensorlift.load_file(url), want)
        _same(dict(tensorlift.iter_tensors(url)), want)
        with tensorlift.safe_open(url, framework="pt") as f:
            assert sorted(f.keys()) == sorted(want)
            assert torch.equal(f.get_tensor("layer.0.bias"), want["layer.0.bias"])
            assert torch.equal(f.get_slice("embed.weight")[3:7], want["embed.weight"][3:7])
    finally:
        server.shutdown()
        server.server_close()
    assert any(p.endswith("model-00002-of-00002.safetensors") for p in answered), answered
