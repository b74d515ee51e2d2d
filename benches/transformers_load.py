#!/usr/bin/env python3
"""transformers' from_pretrained through tensorlift against stock, on the CPU (or onto a GPU
with --device-map cuda:0).

Writes (once) a Llama-shaped model of about 1.1 GB in bfloat16 with transformers' own
save_pretrained, then alternates fresh Python processes that import torch and transformers
(its modeling code, and so safetensors, included) and time
`AutoModelForCausalLM.from_pretrained(FOLDER, dtype=torch.bfloat16)`, stock or after
`import tensorlift; tensorlift.patch()` (timed on its own clock: a process pays it once,
and the medians are given with and without it), warm (the files read once first), the
engines' order swapped each run. Onto a GPU, CUDA is started (its
context made) before the clock, and how long that took is printed beside: both engines pay
it alike. The first run of each engine hashes every parameter after its clock, and the two
digests must agree (a fast load of other bytes must not count). Prints each run as it ends
(a child that fails, with its stderr) and the medians.

  python3 benches/transformers_load.py --runs 5
"""
import argparse
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pagecache import shard_paths, warm  # noqa: E402

CHILD = r"""
import os, sys, time
os.environ["HF_HUB_OFFLINE"] = "1"
import hashlib
import torch, transformers, transformers.modeling_utils
t = time.perf_counter()
# A device map that may put weights on a GPU ("cuda:0", "auto", "0", ...): CUDA is started
# first, and the copies are waited for inside the clock.
on_gpu = sys.argv[3] not in ("none", "cpu") and torch.cuda.is_available()
if on_gpu:
    torch.empty(1, device="cuda")
    torch.cuda.synchronize()
init = time.perf_counter() - t
t = time.perf_counter()
if sys.argv[2] == "tensorlift":
    import tensorlift
    tensorlift.patch()
patched = time.perf_counter() - t
t = time.perf_counter()
kwargs = {"device_map": sys.argv[3]} if sys.argv[3] != "none" else {}
m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16, **kwargs)
if on_gpu:
    torch.cuda.synchronize()
dt = time.perf_counter() - t
digest = "-"
if sys.argv[4] == "check":
    h = hashlib.sha256()
    for name, p in sorted(m.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    digest = h.hexdigest()
print(dt, sum(p.numel() * p.element_size() for p in m.parameters()), init, patched, digest)
"""


def make(folder):
    if os.path.exists(os.path.join(folder, "config.json")):
        return
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
        num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(folder)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="target/bench-checkpoints/transformers-llama-1.1GB")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--device-map", default="none", help="from_pretrained's device_map (e.g. cuda:0); none: the host")
    a = ap.parse_args()
    make(a.dir)
    paths = shard_paths(a.dir)
    print(f"{a.dir}: {sum(os.path.getsize(p) for p in paths) / 1e9:.2f} GB in {len(paths)} file(s), "
          f"device_map={a.device_map}")
    times = {"stock": [], "tensorlift": []}
    patch_times = []
    digests = {}
    nbytes = 0
    for run in range(a.runs):
        # Swapped each run: the one that goes second may find the other's leftovers.
        for engine in list(times) if run % 2 == 0 else list(times)[::-1]:
            warm(paths)
            check = "check" if engine not in digests else "-"
            out = subprocess.run([sys.executable, "-c", CHILD, a.dir, engine, a.device_map, check],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                print(f"run {run + 1} {engine}: failed ({out.returncode})\n{out.stderr[-4000:]}", flush=True)
                sys.exit(1)
            dt, nbytes, init, patched, digest = out.stdout.split()[-5:]
            if digest != "-":
                digests[engine] = digest
            times[engine].append(float(dt))
            if engine == "tensorlift":
                patch_times.append(float(patched))
            print(f"run {run + 1} {engine:>10}: {float(dt):.3f} s (CUDA start before it: {float(init):.3f} s; "
                  f"import and patch(): {float(patched):.3f} s)", flush=True)
    if len(set(digests.values())) > 1:
        print(f"the parameters differ between the engines: {digests}", flush=True)
        sys.exit(1)
    if len(digests) == 2:
        print(f"parameters identical (sha256 {next(iter(digests.values()))[:16]}...)")
    for engine, ts in times.items():
        print(f"{engine:>10}: median {statistics.median(ts):.3f} s ({int(nbytes) / statistics.median(ts) / 1e9:.2f} GB/s); "
              f"runs {' '.join(f'{t:.3f}' for t in ts)}")
    stock, tl, patch = (statistics.median(times["stock"]), statistics.median(times["tensorlift"]),
                        statistics.median(patch_times))
    print(f"tensorlift's import and patch(), once a process: median {patch:.3f} s")
    print(f"stock / tensorlift (medians): {stock / tl:.2f}x; with import and patch(): {stock / (tl + patch):.2f}x")


if __name__ == "__main__":
    main()
