#!/usr/bin/env python3
"""Writes PyTorch checkpoints as `torch.save` writes them, without torch, for
tensorlift-pickle's tests: the same pickle (protocol 2, persistent ids, the same globals
and argument tuples) in the zip layout (entries aligned to 64 bytes, as PyTorch's writer
aligns them) and in the legacy layout. Beside each checkpoint, NAME.expect.json holds
every tensor's dtype, shape and contiguous bytes (hex), from numpy: the independent reading
that the Rust tests compare with. Also writes the hostile files the reader must refuse.

  python3 scripts/make-torch-fixtures.py crates/tensorlift-pickle/tests/fixtures

The output is deterministic: tests/python checks that the committed files are current.
"""
import collections
import io
import json
import os
import pickle
import struct
import sys
import types
import zipfile

import numpy as np

# Stand-ins registered under torch's own module names, so that pickle writes the globals
# torch writes (pickle checks that module.name finds the same object).
torch = types.ModuleType("torch")
torch_utils = types.ModuleType("torch._utils")
sys.modules["torch"] = torch
sys.modules["torch._utils"] = torch_utils
torch._utils = torch_utils


def _rebuild_tensor_v2(*args):
    raise RuntimeError("never called")


def _rebuild_parameter(*args):
    raise RuntimeError("never called")


_rebuild_tensor_v2.__module__ = "torch._utils"
_rebuild_parameter.__module__ = "torch._utils"
torch_utils._rebuild_tensor_v2 = _rebuild_tensor_v2
torch_utils._rebuild_parameter = _rebuild_parameter

DTYPES = {  # numpy dtype name -> (storage class, safetensors dtype)
    "float64": ("DoubleStorage", "F64"), "float32": ("FloatStorage", "F32"), "float16": ("HalfStorage", "F16"),
    "bfloat16": ("BFloat16Storage", "BF16"), "int64": ("LongStorage", "I64"), "int32": ("IntStorage", "I32"),
    "int16": ("ShortStorage", "I16"), "int8": ("CharStorage", "I8"), "uint8": ("ByteStorage", "U8"),
    "bool": ("BoolStorage", "BOOL"),
}
for cls, _ in DTYPES.values():
    c = type(cls, (), {"__module__": "torch"})
    setattr(torch, cls, c)


class Storage:
    """A storage: a flat numpy array of its elements."""

    def __init__(self, key, kind, data):
        self.key, self.kind, self.data = key, kind, np.ascontiguousarray(data).reshape(-1)


class Tensor:
    """A view of a storage, pickled as torch.Tensor.__reduce_ex__ pickles one."""

    def __init__(self, storage, offset, shape, stride, parameter=False):
        self.storage, self.offset, self.shape, self.stride, self.parameter = storage, offset, shape, stride, parameter

    def __reduce_ex__(self, protocol):
        t = (_rebuild_tensor_v2, (self.storage, self.offset, tuple(self.shape), tuple(self.stride), False, collections.OrderedDict()))
        if self.parameter:
            return (_rebuild_parameter, (TensorArg(t), False, collections.OrderedDict()))
        return t

    def values(self):
        flat = self.storage.data
        idx = np.zeros(self.shape, dtype=np.int64) + self.offset
        for d, (n, s) in enumerate(zip(self.shape, self.stride)):
            shape = [1] * len(self.shape)
            shape[d] = n
            idx = idx + (np.arange(n) * s).reshape(shape)
        return flat[idx] if len(self.shape) else flat[self.offset:self.offset + 1].reshape(())


class TensorArg:
    def __init__(self, reduced):
        self.reduced = reduced

    def __reduce_ex__(self, protocol):
        return self.reduced


def storage_class(kind):
    return getattr(torch, DTYPES[kind][0])


def dump(obj, legacy):
    buf = io.BytesIO()
    p = pickle.Pickler(buf, protocol=2)
    storages = {}

    def persistent_id(o):
        if isinstance(o, Storage):
            storages[o.key] = o
            if legacy:
                return ("storage", storage_class(o.kind), o.key, "cpu", o.data.size, None)
            return ("storage", storage_class(o.kind), o.key, "cpu", o.data.size)
        return None

    p.persistent_id = persistent_id
    p.dump(obj)
    return buf.getvalue(), storages


def raw(s):
    if s.kind == "bfloat16":
        return s.data.view(np.uint16).astype("<u2").tobytes()
    return s.data.astype(s.data.dtype.newbyteorder("<")).tobytes()


def write_zip(path, obj, archive="archive", byteorder=b"little", compress=False):
    pkl, storages = dump(obj, legacy=False)
    entries = [("data.pkl", pkl), ("byteorder", byteorder)]
    entries += [(f"data/{k}", raw(s)) for k, s in sorted(storages.items())]
    entries += [("version", b"3\n")]
    with open(path, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as z:
        for name, data in entries:
            info = zipfile.ZipInfo(f"{archive}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = z.compression
            # PyTorch pads each local header's extra field ("FB") so that data starts at a
            # multiple of 64.
            start = f.tell() + 30 + len(info.filename) + 4
            pad = (-start) % 64
            info.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad
            z.writestr(info, data)


def write_legacy(path, obj):
    out = io.BytesIO()
    pickle.dump(0x1950A86A20F9469CFC6C, out, protocol=2)
    pickle.dump(1001, out, protocol=2)
    pickle.dump({"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}, out, protocol=2)
    pkl, storages = dump(obj, legacy=True)
    out.write(pkl)
    keys = sorted(storages)
    pickle.dump(keys, out, protocol=2)
    for k in keys:
        out.write(struct.pack("<q", storages[k].data.size))
        out.write(raw(storages[k]))
    with open(path, "wb") as f:
        f.write(out.getvalue())


def expect(path, sd):
    out = {}
    for name, t in sd.items():
        if not isinstance(t, Tensor):
            continue
        v = np.ascontiguousarray(t.values())
        data = v.view(np.uint16).astype("<u2").tobytes() if t.storage.kind == "bfloat16" else v.astype(v.dtype.newbyteorder("<")).tobytes()
        out[name] = {"dtype": DTYPES[t.storage.kind][1], "shape": list(t.shape), "hex": data.hex()}
    with open(path, "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)
        f.write("\n")


def state_dict(items, metadata=True):
    sd = collections.OrderedDict(items)
    if metadata:
        sd._metadata = collections.OrderedDict([("", {"version": 1}), ("layer", {"version": 2})])
    return sd


def every_dtype():
    rng = np.random.default_rng(7)
    items, n = [], 0
    for kind in DTYPES:
        if kind == "bool":
            data = rng.integers(0, 2, 12).astype(bool)
        elif kind == "bfloat16":
            data = (rng.standard_normal(12).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
        elif kind.startswith("float"):
            data = rng.standard_normal(12).astype(kind)
        else:
            info = np.iinfo(kind)
            data = rng.integers(info.min, info.max, 12, dtype=kind, endpoint=True)
        s = Storage(str(n), kind, data)
        n += 1
        items.append((f"{kind}.matrix", Tensor(s, 0, [3, 4], [4, 1])))
        scalar = Storage(str(n), kind, data[:1])
        n += 1
        items.append((f"{kind}.scalar", Tensor(scalar, 0, [], [])))
    empty = Storage(str(n), "float32", np.zeros(0, np.float32))
    items.append(("empty", Tensor(empty, 0, [0, 5], [5, 1])))
    items.append(("param", Tensor(Storage(str(n + 1), "float32", np.arange(6, dtype=np.float32)), 0, [2, 3], [3, 1], parameter=True)))
    return state_dict(items)


def tied():
    """Contiguous views only, tied and overlapping: each is one byte range, so it loads."""
    base = Storage("0", "float32", np.arange(24, dtype=np.float32))
    return state_dict([
        ("embed.weight", Tensor(base, 0, [4, 6], [6, 1])),
        ("lm_head.weight", Tensor(base, 0, [4, 6], [6, 1])),
        ("row_slice", Tensor(base, 12, [2, 6], [6, 1])),
        ("overlap", Tensor(base, 3, [10], [1])),
        ("tail", Tensor(base, 19, [5], [1])),
        ("empty", Tensor(base, 24, [0], [1])),
        ("other", Tensor(Storage("1", "int16", np.arange(7, dtype=np.int16)), 2, [5], [1])),
    ])


def views():
    base = Storage("0", "float32", np.arange(24, dtype=np.float32))
    return state_dict([
        ("embed.weight", Tensor(base, 0, [4, 6], [6, 1])),
        ("lm_head.weight", Tensor(base, 0, [4, 6], [6, 1])),  # tied: the same storage and view
        ("transposed", Tensor(base, 0, [6, 4], [1, 6])),
        ("row_slice", Tensor(base, 12, [2, 6], [6, 1])),
        ("column_slice", Tensor(base, 2, [4, 3], [6, 1])),
        ("step", Tensor(Storage("1", "int64", np.arange(10, dtype=np.int64)), 1, [3], [3])),
        ("epoch", 3),
    ])


class Call:
    """An object whose unpickling would call `fn(*args)`."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "crates/tensorlift-pickle/tests/fixtures"
    os.makedirs(out, exist_ok=True)
    for name, sd in [("every_dtype", every_dtype()), ("views", views()), ("tied", tied())]:
        write_zip(os.path.join(out, f"{name}.zip.bin"), sd)
        write_legacy(os.path.join(out, f"{name}.legacy.bin"), sd)
        expect(os.path.join(out, f"{name}.expect.json"), sd)
    # A second shard for an index (pytorch_model.bin.index.json), contiguous tensors only.
    second = state_dict([("extra.weight", Tensor(Storage("0", "float16", np.arange(8, dtype=np.float16)), 2, [2, 3], [3, 1]))])
    write_zip(os.path.join(out, "second_shard.zip.bin"), second)
    expect(os.path.join(out, "second_shard.expect.json"), second)
    import builtins
    import subprocess
    ok = Tensor(Storage("0", "float32", np.ones(2, np.float32)), 0, [2], [1])
    hostile = {
        "evil_system": state_dict([("w", ok), ("x", Call(os.system, ("echo pwned",)))]),
        "evil_eval": state_dict([("x", Call(builtins.eval, ("1+1",)))]),
        "evil_subprocess": state_dict([("x", Call(subprocess.check_output, (["id"],)))]),
        "evil_rebuild_args": state_dict([("x", Call(_rebuild_tensor_v2, ("not a storage", 0, (2,), (1,), False, None)))]),
    }
    for name, sd in hostile.items():
        write_zip(os.path.join(out, f"{name}.bin"), sd)
    write_zip(os.path.join(out, "big_endian.bin"), every_dtype(), byteorder=b"big")
    write_zip(os.path.join(out, "compressed.bin"), state_dict([("z", Tensor(Storage("0", "uint8", np.zeros(1 << 20, np.uint8)), 0, [1 << 20], [1]))]), compress=True)
    huge = Tensor(Storage("0", "float32", np.ones(2, np.float32)), 0, [2], [1])
    write_zip(os.path.join(out, "storage_past_entry.bin"), state_dict([("w", huge)]))
    # The storage's entry is cut to 4 bytes while the pickle says 2 floats (8 bytes).
    with zipfile.ZipFile(os.path.join(out, "storage_past_entry.bin")) as z:
        names = z.namelist()
        data = {n: z.read(n) for n in names}
    with open(os.path.join(out, "storage_past_entry.bin"), "wb") as f, zipfile.ZipFile(f, "w") as z:
        for n in names:
            info = zipfile.ZipInfo(n, date_time=(1980, 1, 1, 0, 0, 0))
            z.writestr(info, data[n][:4] if n.endswith("data/0") else data[n])
    # A tensor named like the safetensors header's metadata entry: cannot be converted.
    meta = state_dict([("__metadata__", Tensor(Storage("0", "float32", np.ones(2, np.float32)), 0, [2], [1]))])
    write_zip(os.path.join(out, "name_metadata.bin"), meta)
    # Two archives in one zip: readers could disagree on which one is the checkpoint.
    with open(os.path.join(out, "zip_two_archives.bin"), "wb") as f, zipfile.ZipFile(f, "w") as z:
        for prefix in ("z", "a"):
            pkl, _ = dump(state_dict([]), legacy=False)
            z.writestr(zipfile.ZipInfo(f"{prefix}/data.pkl", date_time=(1980, 1, 1, 0, 0, 0)), pkl)
    # An entry whose central record points at another entry's local header (data.pkl's):
    # its "data" would be the pickle.
    with open(os.path.join(out, "views.zip.bin"), "rb") as f:
        raw_zip = bytearray(f.read())
    at = raw_zip.find(b"PK\x01\x02")
    first_local = None
    while at >= 0:
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", raw_zip, at + 28)
        name = bytes(raw_zip[at + 46:at + 46 + name_len])
        if first_local is None:
            first_local = struct.unpack_from("<I", raw_zip, at + 42)[0]
        if name.endswith(b"data/0"):
            struct.pack_into("<I", raw_zip, at + 42, first_local)
        at = raw_zip.find(b"PK\x01\x02", at + 46 + name_len + extra_len + comment_len)
    with open(os.path.join(out, "zip_alias.bin"), "wb") as f:
        f.write(raw_zip)
    with open(os.path.join(out, "views.zip.bin"), "rb") as f:
        whole = f.read()
    with open(os.path.join(out, "truncated.bin"), "wb") as f:
        f.write(whole[: len(whole) // 2])


if __name__ == "__main__":
    main()
