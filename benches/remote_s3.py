#!/usr/bin/env python3
"""tensorlift against the GET limit and Run:ai's model streamer, on one S3 server.

Starts s3s-fs (the S3 server from crates.io that the tests use; ./scripts/test installs it)
over a scratch folder on 127.0.0.1, uploads FOLDER's shards into a bucket by signed PUTs
(curl --aws-sigv4, so the server keeps each object's ETag), then, on the same objects:

  loader-bench --dir s3://bench/model   tensorlift's load, and get-limit: every byte by ranged
                                        GETs of the same size and concurrency, dropped
  runai-model-streamer                  SafetensorsStreamer().stream_file("s3://...") per shard,
                                        get_tensors(), each tensor cloned to host memory (or
                                        .to(device)); with its defaults, and with its
                                        concurrency set to tensorlift's

The server, the client and the clock share this machine: on a small one the server's own
CPU use is part of every figure, and the ratios between engines are what carry over.

  python3 benches/remote_s3.py ~/.cache/tensorlift/bench/llama-2048MiB-4shards-bf16 --runs 3

Run:ai's streamer (0.17.1) is installed with pip into ~/.cache/tensorlift/runai-0.17.1 on
first use (torch comes from the environment running this script).
"""
import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

KEYS = ("tensorlift-bench", "tensorlift-bench-secret")
CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "tensorlift")
RUNAI = "0.17.1"


def s3s_fs():
    path = os.environ.get("TENSORLIFT_S3S_FS") or os.path.join(CACHE, "s3s-fs-0.14.1/bin/s3s-fs")
    if not os.path.isfile(path):
        sys.exit(f"s3s-fs is not at {path}: cargo install s3s-fs@0.14.1 --features binary --locked --root {os.path.dirname(os.path.dirname(path))}")
    return path


def start_server(root):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [s3s_fs(), "--host", "127.0.0.1", "--port", str(port), "--access-key", KEYS[0], "--secret-key", KEYS[1], root],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(400):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    sys.exit("s3s-fs did not start")


def curl(port, method, path, upload=None):
    cmd = ["curl", "-sS", "--fail", "-X", method, "--aws-sigv4", "aws:amz:us-east-1:s3", "--user", f"{KEYS[0]}:{KEYS[1]}",
           "-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"]
    if upload:
        cmd += ["-T", upload]
    subprocess.run(cmd + [f"http://127.0.0.1:{port}{path}"], check=True, stdout=subprocess.DEVNULL)


def env_for(port):
    return {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": KEYS[0],
        "AWS_SECRET_ACCESS_KEY": KEYS[1],
        "AWS_REGION": "us-east-1",
        "AWS_ALLOW_HTTP": "true",
        "AWS_EC2_METADATA_DISABLED": "true",
        # Run:ai's S3 client: path-style requests to the endpoint above.
        "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0",
        "RUNAI_STREAMER_S3_ENDPOINT": f"http://127.0.0.1:{port}",
    }


def runai_path():
    target = os.path.join(CACHE, f"runai-{RUNAI}")
    if not os.path.isdir(os.path.join(target, "runai_model_streamer")):
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", target,
             f"runai-model-streamer=={RUNAI}", f"runai-model-streamer-s3=={RUNAI}", "humanize",
             # runai-model-streamer-s3's own dependencies (not torch, which is the environment's).
             "boto3", "botocore", "s3transfer", "jmespath", "python-dateutil", "six", "urllib3"],
            check=True,
        )
    return target


RUNAI_RUN = r"""
import json, sys, time, torch
from runai_model_streamer import SafetensorsStreamer
urls, device = json.loads(sys.argv[1]), sys.argv[2]
t = time.perf_counter()
n = 0
with SafetensorsStreamer() as s:
    for u in urls:
        s.stream_file(u)
        for _, x in s.get_tensors():
            y = x.to(device) if device != "cpu" else x.clone()
            n += y.numel() * y.element_size()
if device != "cpu":
    torch.cuda.synchronize()
print(json.dumps({"seconds": time.perf_counter() - t, "bytes": n}))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", help="a local safetensors checkpoint folder (shards and index)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--loader-bench", default="target/release/loader-bench")
    ap.add_argument("--scratch", default=None, help="folder for the server's data (default: a temp folder)")
    ap.add_argument("--no-runai", action="store_true")
    args = ap.parse_args()

    root = tempfile.mkdtemp(prefix="tl-s3bench-", dir=args.scratch)
    proc, port = start_server(root)
    results = {}
    try:
        # Nothing of the caller's S3 setup or tensorlift's remote settings but what is asked
        # for here (a local copy would make every run after the first local).
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("AWS_") and k not in ("TENSORLIFT_REMOTE_CACHE",)}
        env.update(env_for(port))
        curl(port, "PUT", "/bench")
        shards = sorted(f for f in os.listdir(args.folder) if f.endswith(".safetensors") or f.endswith(".json"))
        for f in shards:
            curl(port, "PUT", f"/bench/model/{f}", upload=os.path.join(args.folder, f))
        out = subprocess.run(
            [args.loader_bench, "--dir", "s3://bench/model", "--device", args.device, "--runs", str(args.runs), "--json"],
            env=env, check=True, capture_output=True, text=True,
        )
        report = json.loads(out.stdout)
        results["loader-bench"] = report
        if not args.no_runai:
            runai_env = dict(env, PYTHONPATH=runai_path())
            urls = [f"s3://bench/model/{f}" for f in shards if f.endswith(".safetensors")]
            conc = os.environ.get("TENSORLIFT_REMOTE_CONCURRENCY", "32")
            for label, extra in (("runai-model-streamer (defaults)", {}),
                                 ("runai-model-streamer (concurrency 32)", {"RUNAI_STREAMER_CONCURRENCY": conc})):
                times = []
                for _ in range(args.runs):
                    r = subprocess.run([sys.executable, "-c", RUNAI_RUN, json.dumps(urls), args.device],
                                       env=dict(runai_env, **extra), capture_output=True, text=True)
                    if r.returncode != 0:
                        times = None
                        results[label] = {"failed": r.stderr.strip().splitlines()[-1:] }
                        break
                    times.append(json.loads(r.stdout.strip().splitlines()[-1]))
                if times:
                    secs = statistics.median(t["seconds"] for t in times)
                    results[label] = {"seconds": secs, "gbps": times[0]["bytes"] / secs / 1e9}
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
