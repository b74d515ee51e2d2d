#!/usr/bin/env python3
"""Checkpoints written by torch.save itself (needs PyTorch), for tensorlift-pickle's tests:
the same state_dict in the zip layout and in the legacy one, a whole nn.Module (which must
be refused), and expect.json with every tensor's dtype, shape and contiguous bytes as torch
reads them back. The files are committed (a few KB); rerun this on a new PyTorch to check
that its files still read:

  python3 scripts/make-real-torch-fixtures.py crates/tensorlift-pickle/tests/fixtures-torch
"""
import json
import os
import sys

import torch

NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
    torch.complex64: "C64", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
# Types the legacy layout cannot save (they need untyped storages).
LEGACY_UNSUPPORTED = {torch.uint16, torch.uint32, torch.uint64, torch.float8_e4m3fn, torch.float8_e5m2}


def raw(t):
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def state_dict():
    g = torch.Generator().manual_seed(11)
    sd = {}
    for dtype in NAMES:
        base = torch.randn(12, generator=g) * 50
        if dtype == torch.bool:
            t = base > 0
        elif dtype.is_floating_point or dtype.is_complex:
            t = base.to(dtype)
        else:
            t = base.to(torch.int64).to(dtype) if dtype not in (torch.uint16, torch.uint32, torch.uint64, torch.uint8) else base.abs().to(torch.int64).to(dtype)
        sd[f"{str(dtype)[6:]}.matrix"] = t.reshape(3, 4)
        sd[f"{str(dtype)[6:]}.scalar"] = t[5].clone()
    w = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    sd["tied.a"] = w
    sd["tied.b"] = w
    sd["transposed"] = w.t()
    sd["row_slice"] = w[2:]
    sd["column_slice"] = w[:, 2:5]
    sd["empty"] = torch.zeros(0, 5)
    lin = torch.nn.Linear(3, 2)
    for k, v in lin.state_dict().items():
        sd[f"linear.{k}"] = v
    return sd


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "crates/tensorlift-pickle/tests/fixtures-torch"
    os.makedirs(out, exist_ok=True)
    sd = state_dict()
    torch.save(sd, os.path.join(out, "state_dict.zip.bin"))
    legacy = {k: v for k, v in sd.items() if v.dtype not in LEGACY_UNSUPPORTED}
    torch.save(legacy, os.path.join(out, "state_dict.legacy.bin"), _use_new_zipfile_serialization=False)
    torch.save(torch.nn.Linear(2, 2), os.path.join(out, "module.bin"))
    expect = {k: {"dtype": NAMES[v.dtype], "shape": list(v.shape), "hex": raw(v).hex(), "legacy": k in legacy} for k, v in sd.items()}
    with open(os.path.join(out, "expect.json"), "w") as f:
        json.dump({"torch": torch.__version__, "tensors": expect}, f, indent=1, sort_keys=True)
        f.write("\n")
    # torch reads back what it wrote, as the reference for the bytes above.
    for name in ["state_dict.zip.bin", "state_dict.legacy.bin"]:
        back = torch.load(os.path.join(out, name), weights_only=True)
        for k, v in back.items():
            assert raw(v) == raw(sd[k]), (name, k)


if __name__ == "__main__":
    main()
