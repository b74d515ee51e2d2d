"""``tensorlift.load_devices``: one load onto several CUDA devices, each byte read once, on the
emulated driver (four devices; CI has no GPU). Each check runs in a process of its own that
loads the emulator as its CUDA driver (``TENSORLIFT_LIBCUDA``), and compares every device's
tensors with the reference package's reading of the same files, sliced here with numpy."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import ROOT

EMULATOR = os.path.join(ROOT, "target", "debug", "libtensorlift_cuda_emulator.so")


def run_emulated(code, *args, env=None):
    """Runs ``code`` in a Python process whose CUDA driver is the emulator; returns what it
    printed as JSON."""
    if not os.path.exists(EMULATOR):
        # scripts/test builds it and requires it; a GPU host (scripts/gpu-host) has none.
        if os.environ.get("TENSORLIFT_REQUIRE_EMULATOR"):
            pytest.fail(f"{EMULATOR} is missing: cargo build -p tensorlift-cuda-emulator")
        pytest.skip(f"no emulated driver at {EMULATOR} (cargo build -p tensorlift-cuda-emulator)")
    env = dict(os.environ, TENSORLIFT_LIBCUDA=EMULATOR, TLEMU_DEVICES="4", **(env or {}))
    # Unbuffered, Python's stdout hands each print to one write(2) and drops what a partial
    # write leaves (a pipe fills at 64 KiB); buffered, it writes the rest. The JSON printed
    # here is larger than a pipe holds.
    env.pop("PYTHONUNBUFFERED", None)
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


# Each device's tensors as (device, dtype, shape, hex bytes), and the load's bytes_read.
DUMP = """
    import json, sys
    import tensorlift

    def dump(models):
        return [{n: [t.device, t.dtype, t.shape, t.tobytes().hex()] for n, t in m.items()} for m in models]
"""


def test_replicas_on_every_device_from_one_read(fixture, sharded_reference):
    got = run_emulated(
        DUMP
        + """
    stats, alone = {}, {}
    models = tensorlift.load_devices(sys.argv[1], ["cuda:0", 1, "cuda:2", "cuda:3"], framework=None, stats=stats)
    tensorlift.load_file(sys.argv[1], device="cuda:0", framework=None, stats=alone)
    print(json.dumps({"models": dump(models), "stats": stats, "alone": alone}))
    """,
        fixture / "sharded",
    )
    assert len(got["models"]) == 4
    for k, model in enumerate(got["models"]):
        assert sorted(model) == sorted(sharded_reference)
        for name, want in sharded_reference.items():
            device, dtype, shape, data = model[name]
            assert device == f"cuda:{k}", name
            assert dtype == {"float16": "F16", "float32": "F32"}[str(want.dtype)], name
            assert shape == list(want.shape), name
            assert bytes.fromhex(data) == want.tobytes(), f"{name} on cuda:{k}"
    # Read once for the four devices: what one device's load reads; the load's bytes and
    # tensors, every device's.
    stats, alone = got["stats"], got["alone"]
    assert stats["bytes_read"] == alone["bytes_read"]
    assert (stats["bytes"], stats["tensors_loaded"]) == (4 * alone["bytes"], 4 * alone["tensors_loaded"])
    assert stats["devices"] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]


def test_tensor_parallel_ranks_get_their_slices(tmp_path):
    rng = np.random.default_rng(7)
    tensors = {
        "model.embed_tokens.weight": rng.standard_normal((1000, 64), dtype=np.float32),
        "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((64, 64), dtype=np.float32),
        "model.layers.0.self_attn.k_proj.weight": rng.standard_normal((32, 64), dtype=np.float32),
        "model.layers.0.self_attn.o_proj.weight": rng.standard_normal((64, 64), dtype=np.float32),
        "model.layers.0.mlp.down_proj.weight": rng.standard_normal((64, 176), dtype=np.float32),
        "model.layers.0.mlp.up_proj.weight": rng.standard_normal((176, 64), dtype=np.float32),
        "model.norm.weight": rng.standard_normal((64,), dtype=np.float32),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    world = 4
    got = run_emulated(
        DUMP
        + """
    models = tensorlift.load_devices(sys.argv[1], [0, 1, 2, 3], framework=None, tp=8)
    print(json.dumps({"models": dump(models)}))
    """,
        tmp_path / "model.safetensors",
    )
    assert len(got["models"]) == world
    for rank, model in enumerate(got["models"]):

        def part(n):
            return slice(rank * n // world, (rank + 1) * n // world)

        for name, full in tensors.items():
            if name.endswith(("q_proj.weight", "k_proj.weight", "up_proj.weight")):
                want = full[part(full.shape[0])]
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                want = full[:, part(full.shape[1])]
            elif name.endswith("embed_tokens.weight"):
                per = 1024 // world  # the vocabulary padded to a multiple of 64, as vLLM pads it
                want = full[rank * per : (rank + 1) * per]
            else:
                want = full
            device, dtype, shape, data = model[name]
            assert (device, dtype, shape) == (f"cuda:{rank}", "F32", list(want.shape)), name
            assert bytes.fromhex(data) == np.ascontiguousarray(want).tobytes(), f"{name}, rank {rank}"


def test_misuse_is_a_clear_error(fixture):
    got = run_emulated(
        """
    import json, sys
    import tensorlift
    errors = []
    for devices in (["cuda:0", "cuda:0"], ["cuda:0", "cpu"], ["cuda:9"], []):
        try:
            tensorlift.load_devices(sys.argv[1], devices, framework=None)
            errors.append(None)
        except (ValueError, RuntimeError) as e:
            errors.append([type(e).__name__, str(e)])
    print(json.dumps(errors))
    """,
        fixture / "single.safetensors",
    )
    assert got[0] == ["ValueError", "not supported: cuda:0 twice in devices()"]
    assert got[1] == ["ValueError", "not supported: cpu in devices() (a load onto several devices is onto CUDA devices)"]
    assert got[2][0] == "RuntimeError" and got[2][1].startswith("CUDA device 9 is unavailable"), got[2]
    assert got[3] == ["ValueError", "not supported: devices() with no device"]


def test_numpy_is_refused_for_device_tensors(fixture):
    got = run_emulated(
        """
    import json, sys
    import tensorlift
    try:
        tensorlift.load_devices(sys.argv[1], ["cuda:0", "cuda:1"], framework=sys.argv[2])
        print(json.dumps(None))
    except ValueError as e:
        print(json.dumps(str(e)))
    """,
        fixture / "single.safetensors",
        "np",
    )
    assert got is not None and "cuda:0" in got


def test_a_device_without_room_raises_device_memory_error(tmp_path):
    """A device whose free memory does not hold the load raises ``DeviceMemoryError`` (a
    ``RuntimeError``), which a caller such as the vLLM loader catches to read to the host."""
    from safetensors.numpy import save_file

    big = tmp_path / "big.safetensors"
    save_file({"w": np.zeros((1024, 1024), dtype=np.float32)}, str(big))
    got = run_emulated(
        """
    import json, sys
    import tensorlift
    try:
        tensorlift.load_file(sys.argv[1], device="cuda:0", framework=None)
        print(json.dumps(None))
    except tensorlift.DeviceMemoryError as e:
        print(json.dumps([type(e).__name__, isinstance(e, RuntimeError), str(e)]))
    """,
        big,
        env={"TLEMU_DEVICE_MEMORY": str(1 << 20)},
    )
    assert got is not None and got[:2] == ["DeviceMemoryError", True], got
    assert "cuda:0" in got[2], got
