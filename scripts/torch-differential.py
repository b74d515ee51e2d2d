#!/usr/bin/env python3
"""Writes many PyTorch checkpoints and what `torch.load(weights_only=True, map_location="cpu")`
makes of each, for tensorlift-pickle's differential test (tests/differential): the reader
must read what torch reads to the same tensors, and refuse what torch refuses.

  python3 scripts/torch-differential.py OUT_DIR

Variants: state_dicts of every dtype, in the zip and legacy layouts, with pickle protocols
2 to 5; views, slices, transposes, expanded and tied tensors, parameters, tensors with
Python attributes, empty and 0-d tensors; values that are not tensors; storages saved from
CUDA devices; Python 2 pickles (short strings, OrderedDict from a list of items); legacy
files whose views share view keys; and hostile pickles (globals, opcodes). OUT_DIR gets
NAME.bin for each and expect.json:

  {NAME: {"ok": true, "tensors": [[name, dtype, shape, hex], ...], "other": [names]}
   NAME: {"ok": false, "error": torch's message, "names": what tensorlift's error must name}}

A few files torch reads hold what tensorlift cannot (complex128, quantized tensors): their
entry has "tensorlift_refuses" with what its error must say.
"""
import collections
import contextlib
import io
import json
import os
import pickle
import struct
import sys
import types
import warnings
import zipfile
import zlib

import torch
import torch.serialization

warnings.filterwarnings("ignore")

NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
    torch.complex64: "C64", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fnuz: "F8_E4M3FNUZ", torch.float8_e5m2fnuz: "F8_E5M2FNUZ", torch.float8_e8m0fnu: "F8_E8M0",
}
# Types the legacy layout cannot save (they need untyped storages).
LEGACY_UNSUPPORTED = {
    torch.uint16, torch.uint32, torch.uint64, torch.float8_e4m3fn, torch.float8_e5m2,
    torch.float8_e4m3fnuz, torch.float8_e5m2fnuz, torch.float8_e8m0fnu,
}

MAGIC = 0x1950A86A20F9469CFC6C


def values(dtype, n, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g) * 40
    if dtype == torch.bool:
        return base > 0
    if dtype.is_floating_point or dtype.is_complex:
        if dtype in (torch.float8_e8m0fnu,):
            return base.abs().add(1).to(dtype)
        return base.to(dtype)
    if dtype in (torch.uint8, torch.uint16, torch.uint32, torch.uint64):
        return base.abs().to(torch.int64).to(dtype)
    return base.to(torch.int64).to(dtype)


def raw(t):
    return t.resolve_neg().resolve_conj().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes().hex()


def answer(path):
    """What torch makes of the file: its tensors, or its error."""
    try:
        got = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - any refusal is the answer
        return {"ok": False, "error": f"{type(e).__name__}: {e}"[:400]}
    if not isinstance(got, dict):
        return {"ok": False, "error": f"not a dict: {type(got).__name__}"}
    tensors, other = [], []
    for k, v in got.items():
        if isinstance(v, torch.Tensor):
            tensors.append([k, NAMES.get(v.dtype, str(v.dtype)), list(v.shape), raw(v)])
        else:
            other.append(k)
    return {"ok": True, "tensors": tensors, "other": other}


@contextlib.contextmanager
def location(tag):
    """torch.save records every storage as saved from `tag` (a CUDA device, say)."""
    real = torch.serialization.location_tag
    torch.serialization.location_tag = lambda storage: tag
    try:
        yield
    finally:
        torch.serialization.location_tag = real


class Py2Pickler(pickle._Pickler):
    """Pickles as Python 2 did: `str` as SHORT_BINSTRING (BINSTRING past 255 bytes), an
    OrderedDict as its class called with a list of [key, value] items, attributes after."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_str(self, obj):
        b = obj.encode("utf-8")
        if len(b) < 256:
            self.write(b"U" + bytes([len(b)]) + b)
        else:
            self.write(b"T" + struct.pack("<i", len(b)) + b)
        self.memoize(obj)

    dispatch[str] = save_str

    def reducer_override(self, obj):
        if type(obj) is collections.OrderedDict:
            items = [[k, v] for k, v in obj.items()]
            state = dict(vars(obj))
            return (collections.OrderedDict, (items,), state) if state else (collections.OrderedDict, (items,))
        return NotImplemented


def py2_dump(obj, f, protocol=2):
    Py2Pickler(f, protocol).dump(obj)


PY2 = types.SimpleNamespace(__name__="py2_pickle", Pickler=Py2Pickler, dump=py2_dump)


def state_dict(dtypes, seed=0):
    sd = collections.OrderedDict()
    for i, dtype in enumerate(dtypes):
        t = values(dtype, 12, seed + i)
        sd[f"{str(dtype)[6:]}.matrix"] = t.reshape(3, 4)
        sd[f"{str(dtype)[6:]}.scalar"] = t[5].clone()
    return sd


def views_dict():
    w = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    sd = collections.OrderedDict()
    sd["tied.a"] = w
    sd["tied.b"] = w
    sd["transposed"] = w.t()
    sd["row_slice"] = w[2:]
    sd["column_slice"] = w[:, 2:5]
    sd["strided"] = w[::2, ::3]
    sd["offset_view"] = w.reshape(-1)[7:11]
    sd["expanded"] = torch.arange(3, dtype=torch.int16).reshape(3, 1).expand(3, 5)
    sd["empty"] = torch.zeros(0, 5)
    sd["empty_view"] = w[4:, 1:]
    sd["scalar"] = torch.tensor(2.5, dtype=torch.float64)
    sd["one"] = torch.ones(1, dtype=torch.bfloat16)
    return sd


def module_dict():
    torch.manual_seed(3)
    m = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2), torch.nn.Embedding(4, 2))
    sd = m.state_dict()  # with _metadata, as transformers saves it
    sd["requires_grad"] = torch.ones(2, requires_grad=True)
    sd["param"] = torch.nn.Parameter(torch.arange(4.0))
    return sd


def with_attributes():
    t = torch.arange(6, dtype=torch.int32)
    t.note = "an attribute"  # pickled through _rebuild_from_type_v2
    return collections.OrderedDict(t=t, plain=torch.ones(2))


def with_other_values():
    sd = collections.OrderedDict()
    sd["w"] = torch.arange(5, dtype=torch.int64)
    sd["step"] = 7
    sd["lr"] = 0.5
    sd["name"] = "adam"
    sd["blob"] = b"\x00\x01bytes"
    sd["none"] = None
    sd["flag"] = True
    sd["shape"] = torch.Size([2, 3])
    sd["device"] = torch.device("cpu")
    sd["dtype"] = torch.float16
    sd["nested"] = {"a": [1, 2, (3, 4)], "b": collections.OrderedDict(c=torch.zeros(1))}
    sd["set"] = {1, 2}
    sd["complex"] = 1 + 2j
    sd["big"] = 2**70
    sd["b"] = torch.full((2,), 3.0)
    return sd


def save(path, obj, **kw):
    torch.save(obj, path, **kw)


def legacy_file(path, storages, entries, pickler=pickle.Pickler, extra_keys=()):
    """A legacy-layout file written by hand: `storages` is {key: tensor} (stored in that
    order, their numel in the file), `entries` is [(name, pid, offset, size, stride)] where
    pid is (class, root_key, numel, view) with view None or (view_key, offset, size)."""

    class Pid:
        def __init__(self, pid):
            self.pid = pid

    class Rebuild:
        def __init__(self, pid, offset, size, stride):
            self.args = (Pid(pid), offset, size, stride)

        def __reduce__(self):
            return (torch._utils._rebuild_tensor_v2, self.args + (False, collections.OrderedDict()))

    class P(pickler):
        def persistent_id(self, obj):
            if isinstance(obj, Pid):
                cls, key, numel, view = obj.pid
                return ("storage", cls, key, "cpu", numel, view)
            return None

    sd = collections.OrderedDict((name, Rebuild(pid, o, s, st)) for name, pid, o, s, st in entries)
    f = io.BytesIO()
    for obj in (MAGIC, 1001, {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}):
        pickler(f, 2).dump(obj)
    P(f, 2).dump(sd)
    pickler(f, 2).dump(list(storages) + list(extra_keys))
    for key, t in storages.items():
        f.write(struct.pack("<q", t.numel()))
        f.write(t.contiguous().view(torch.uint8).numpy().tobytes())
    with open(path, "wb") as out:
        out.write(f.getvalue())


def hostile(path, pickle_bytes, zip_layout=False):
    """A legacy file whose state_dict pickle is `pickle_bytes`."""
    f = io.BytesIO()
    for obj in (MAGIC, 1001, {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}):
        pickle.dump(obj, f, 2)
    f.write(pickle_bytes)
    pickle.dump([], f, 2)
    with open(path, "wb") as out:
        out.write(f.getvalue())


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    expect = {}

    def case(name, write, names=None, tensorlift_refuses=None):
        path = os.path.join(out, name + ".bin")
        write(path)
        a = answer(path)
        if not a["ok"]:
            assert names, f"{name}: torch refused it, say what tensorlift's error names: {a['error']}"
            a["names"] = names
        elif names:
            raise AssertionError(f"{name}: torch read it; expected a refusal naming {names}")
        if tensorlift_refuses:
            assert a["ok"], name
            a["tensorlift_refuses"] = tensorlift_refuses
        expect[name] = a

    every = list(NAMES)
    legacy_ok = [d for d in every if d not in LEGACY_UNSUPPORTED]
    for proto in (2, 3):
        case(f"dtypes.zip.p{proto}", lambda p, proto=proto: save(p, state_dict(every), pickle_protocol=proto))
        case(
            f"dtypes.legacy.p{proto}",
            lambda p, proto=proto: save(p, state_dict(legacy_ok), pickle_protocol=proto, _use_new_zipfile_serialization=False),
        )
    # Protocols 4 and 5 frame their pickles: torch's weights-only reader refuses FRAME.
    for proto in (4, 5):
        case(f"dtypes.zip.p{proto}", lambda p, proto=proto: save(p, state_dict([torch.float32]), pickle_protocol=proto), names="(0x95)")
        case(
            f"dtypes.legacy.p{proto}",
            lambda p, proto=proto: save(p, state_dict([torch.float32]), pickle_protocol=proto, _use_new_zipfile_serialization=False),
            names="(0x95)",
        )
    for layout, zipped in (("zip", True), ("legacy", False)):
        kw = {"_use_new_zipfile_serialization": zipped}
        case(f"views.{layout}", lambda p, kw=kw: save(p, views_dict(), **kw))
        case(f"module.{layout}", lambda p, kw=kw: save(p, module_dict(), **kw))
        case(f"attributes.{layout}", lambda p, kw=kw: save(p, with_attributes(), **kw))
        case(f"other_values.{layout}", lambda p, kw=kw: save(p, with_other_values(), **kw))
        for tag in ("cuda:0", "cuda:3"):
            case(f"location_{tag.replace(':', '')}.{layout}", lambda p, kw=kw, tag=tag: _at(tag, p, views_dict(), **kw))
        # Python 2's pickles: short strings, OrderedDict(items), its _metadata after.
        case(f"py2.{layout}", lambda p, kw=kw: save(p, module_dict(), pickle_module=PY2, **kw))
        case(f"py2_views.{layout}", lambda p, kw=kw: save(p, views_dict(), pickle_module=PY2, **kw))
        # A name over 255 bytes: Python 2 wrote BINSTRING, which torch refuses.
        long_name = collections.OrderedDict({"x" * 300: torch.ones(1)})
        case(f"py2_long_name.{layout}", lambda p, kw=kw, d=long_name: save(p, d, pickle_module=PY2, **kw), names="BINSTRING")
        plain = {"a": torch.ones(2), "b": torch.arange(3)}
        case(f"plain_dict.{layout}", lambda p, kw=kw, d=plain: save(p, d, **kw))
        case(f"empty.{layout}", lambda p, kw=kw: save(p, collections.OrderedDict(), **kw))
    # as_strided views, whose dimensions may overlap or interleave. Close together, they are
    # read whole; spread wider than 8 MiB beyond their own size, they are read through a
    # window that moves forward only: a slice so spread is read as torch reads it, and a
    # view whose walk through the storage would go back is refused.
    small = torch.arange(64, dtype=torch.uint8)
    close = {"overlap": small.as_strided([2] * 5, [3] * 5), "interleave": small.as_strided([3, 2], [2, 3])}
    case("as_strided_close.zip", lambda p: save(p, close))
    mib = 1 << 20
    wide = torch.arange(14 * mib + 1, dtype=torch.int64).to(torch.uint8)
    case("as_strided_wide_slice.zip", lambda p: save(p, {"w": wide.as_strided([2, 3], [9 * mib, 2])}))
    case(
        "as_strided_wide_back.zip",
        lambda p: save(p, {"w": wide.as_strided([3, 2], [4 * mib, 6 * mib])}),
        tensorlift_refuses="overlap or interleave",
    )
    # Many views spread over one storage, each read on its own by its gather: what they
    # would read together is bounded as their sizes are (16 times the file).
    many = {f"v{i}": wide.as_strided([2], [9 * mib], i) for i in range(40)}
    case("as_strided_many_wide_views.zip", lambda p: save(p, many), tensorlift_refuses="whose gathering reads")
    # What torch reads and tensorlift cannot hold.
    case("complex128.zip", lambda p: save(p, {"c": torch.ones(2, dtype=torch.complex128)}), tensorlift_refuses="complex128")
    case(
        "quantized.zip",
        lambda p: save(p, {"q": torch.quantize_per_tensor(torch.ones(4), 0.5, 0, torch.quint8)}),
        tensorlift_refuses="quantized",
    )

    # Legacy views keyed by view key, as torch keys them.
    base = torch.tensor([1.0, 2, 3, 4, 5, 6, 7, 8], dtype=torch.float32)
    fs = torch.FloatStorage
    case(
        "legacy_view_key_shared",
        lambda p: legacy_file(p, {"r": base}, [
            ("a", (fs, "r", 8, ("v", 0, 3)), 0, (3,), (1,)),
            ("b", (fs, "r", 8, ("v", 3, 3)), 0, (3,), (1,)),
        ]),
    )
    case(
        "legacy_view_key_is_root",
        lambda p: legacy_file(p, {"r": base}, [
            ("whole", (fs, "r", 8, ("r", 4, 2)), 1, (2,), (1,)),
        ]),
    )
    case(
        "legacy_views_distinct",
        lambda p: legacy_file(p, {"r": base}, [
            ("a", (fs, "r", 8, ("v1", 1, 4)), 1, (2,), (2,)),
            ("b", (fs, "r", 8, ("v2", 5, 3)), 0, (3,), (1,)),
            ("root", (fs, "r", 8, None), 2, (2, 2), (1, 2)),
        ]),
    )
    case(
        "legacy_view_then_root",
        lambda p: legacy_file(p, {"r": base}, [
            ("a", (fs, "r", 8, ("v", 2, 2)), 0, (2,), (1,)),
            ("root", (fs, "r", 8, None), 0, (8,), (1,)),
            ("again", (fs, "r", 8, ("v", 0, 8)), 0, (2,), (1,)),
        ], pickler=Py2Pickler),
    )
    case(
        "legacy_numel_mismatch",
        lambda p: legacy_file(p, {"r": base}, [("a", (fs, "r", 6, None), 0, (2,), (1,))]),
        names="holds 8 elements, the pickle says 6",
    )
    case(
        "legacy_out_of_bounds",
        lambda p: legacy_file(p, {"r": base}, [("a", (fs, "r", 8, None), 5, (4,), (1,))]),
        names="its elements reach 8 but storage 'r' holds 8",
    )

    # Hostile pickles: globals and opcodes torch refuses, named by tensorlift too.
    case("global_os_system", lambda p: hostile(p, b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00ls\x85R."), names="os.system")
    case("global_alias", lambda p: hostile(p, b"\x80\x02ctorch\nfloat\n."), names="torch.float")
    case("global_builtins_eval", lambda p: hostile(p, b"\x80\x02c__builtin__\neval\n."), names="__builtin__.eval")
    case("opcode_inst", lambda p: hostile(p, b"\x80\x02(i__main__\nX\n."), names="INST")
    case("opcode_dup", lambda p: hostile(p, b"\x80\x02}2."), names="DUP")
    case("opcode_pop", lambda p: hostile(p, b"\x80\x02}N0."), names="POP")
    case("opcode_stack_global", lambda p: hostile(p, b"\x80\x02X\x02\x00\x00\x00osX\x06\x00\x00\x00system\x93."), names="STACK_GLOBAL")
    case("newobj_object", lambda p: hostile(p, b"\x80\x02c__builtin__\nobject\n)\x81."), names="__builtin__.object")
    case("build_on_dict", lambda p: hostile(p, b"\x80\x02}}b."), names="BUILD")
    case("append_to_dict", lambda p: hostile(p, b"\x80\x02}Na."), names="APPEND")

    # Found by a red-team pass: hand-written pickles over a zip of two storages, FloatStorage
    # '0' = [1, 2, 3, 4] and IntStorage '1' = [10, 20, 30, 40].
    def rebuild(key="0", cls=b"FloatStorage", shape=b"J\x04\x00\x00\x00\x85", stride=b"K\x01\x85",
                grad=b"\x89", extra=b""):
        return (b"ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\n" + cls + b"\nX\x01\x00\x00\x00"
                + key.encode() + b"X\x03\x00\x00\x00cpuK\x04tQK\x00" + shape + stride + grad
                + b"ccollections\nOrderedDict\n)R" + extra + b"tR")

    def sd(*items):
        body = b"".join(b"X" + struct.pack("<I", len(k)) + k.encode() + v for k, v in items)
        return b"\x80\x02}(" + body + b"u."

    def zipped(pk, records=None, version=True, first=None, more=None, last=None):
        """A zip of `pk` and `records` under archive/; `version` True for "3\n", or the
        version record's text; `first` an entry written before all others, `last` one after
        all others; `more` other records under archive/."""
        records = {"0": struct.pack("<4f", 1, 2, 3, 4), "1": struct.pack("<4i", 10, 20, 30, 40)} if records is None else records
        def write(path):
            with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
                if first:
                    z.writestr(first, b"x")
                for k, v in (more or {}).items():
                    z.writestr(f"archive/{k}", v)
                z.writestr("archive/data.pkl", pk)
                z.writestr("archive/byteorder", "little")
                for k, v in records.items():
                    z.writestr(f"archive/data/{k}", v)
                if version:
                    z.writestr("archive/version", "3\n" if version is True else version)
                if last:
                    z.writestr(last, b"x")
        return write

    from_type = b"ctorch._tensor\n_rebuild_from_type_v2\n"
    case("rt_plain", zipped(sd(("w", rebuild()), ("i", rebuild("1", b"IntStorage")))))
    # A list that holds itself as _rebuild_from_type_v2's arguments recursed without end.
    case("rt_self_args", lambda p: hostile(p, b"\x80\x02" + from_type + b"]q\x00(" + from_type + b"ctorch\nTensor\nh\x00NeR."),
         names="tensor-building function")
    # A state that sets a data descriptor changes the tensor in torch: refused by name.
    real = from_type + b"(ctorch._utils\n_rebuild_tensor_v2\nctorch\nTensor\n" + rebuild()[len(b"ctorch._utils\n_rebuild_tensor_v2\n"):-1] \
        + b"}X\x04\x00\x00\x00realG@\x14\x00\x00\x00\x00\x00\x00stR"
    case("rt_state_sets_real", zipped(sd(("w", real))), tensorlift_refuses="'real', which changes the tensor")
    note = real.replace(b"\x04\x00\x00\x00real", b"\x04\x00\x00\x00note")
    case("rt_state_sets_note", zipped(sd(("w", note))))
    # Metadata's negative bit changes the values in torch: refused by name.
    neg = rebuild(extra=b"}X\x03\x00\x00\x00neg\x88s")
    case("rt_metadata_neg", zipped(sd(("w", neg))), tensorlift_refuses="'neg'")
    # torch negates where the key is there at all, whatever its value.
    for tag, value in (("false", b"\x89"), ("none", b"N")):
        neg = rebuild(extra=b"}X\x03\x00\x00\x00neg" + value + b"s")
        case(f"rt_metadata_neg_{tag}", zipped(sd(("w", neg))), tensorlift_refuses="'neg'")
    case("rt_metadata_conj_on_floats", zipped(sd(("w", rebuild(extra=b"}X\x04\x00\x00\x00conj\x89s")))), names="'conj'")
    case("rt_metadata_int_key", zipped(sd(("w", rebuild(extra=b"}K\x01\x89s")))), names="not a string")
    # A storage key with a NUL: torch's record look-up (a C string) reads data/0.
    nul_key = rebuild().replace(b"X\x01\x00\x00\x000", b"X\x03\x00\x00\x000\x00x", 1)
    case("rt_storage_key_nul", zipped(sd(("w", nul_key)), records={"0": struct.pack("<4f", 1, 2, 3, 4), "0Qx": struct.pack("<4f", 9, 9, 9, 9)}),
         tensorlift_refuses="NUL")
    # The archive's folder is the first entry's, wherever data.pkl is.
    case("rt_first_entry_elsewhere", zipped(sd(("w", rebuild())), first="zzz/foo"), names="zzz/")
    case("rt_first_entry_in_no_folder", zipped(sd(("w", rebuild())), first="foo"), names="in no folder")
    # The version record, as std::stoull reads it, from 1 to 10.
    case("rt_version_padded", zipped(sd(("w", rebuild())), version=" 3 and more"))
    case("rt_version_too_new", zipped(sd(("w", rebuild())), version="99999\n"), names="format version")
    case("rt_version_zero", zipped(sd(("w", rebuild())), version="0\n"), names="format version")
    case("rt_version_text", zipped(sd(("w", rebuild())), version="three"), names="format version")
    case("rt_version_two_signs", zipped(sd(("w", rebuild())), version="++3"), names="format version")
    case("rt_version_nbsp", zipped(sd(("w", rebuild())), version="\u00a03"), names="format version")
    case("rt_version_c_blanks", zipped(sd(("w", rebuild())), version="\v\f +3x"))
    # Every record is under the archive's folder, spelled as it is.
    case("rt_entry_outside", zipped(sd(("w", rebuild())), last="other/foo"), names="outside the archive's folder")
    case("rt_entry_other_case", zipped(sd(("w", rebuild())), last="ARCHIVE/foo"), names="outside the archive's folder")
    # ... also where the same name, in the folder's case, came first.
    case("rt_entry_case_twin_outside", zipped(sd(("w", rebuild())), more={"extra": b"x"}, last="ARCHIVE/extra"),
         names="outside the archive's folder")
    # Metadata values torch takes as C++ bools, and one it cannot.
    case("rt_metadata_int_value", zipped(sd(("w", rebuild(extra=b"}X\x03\x00\x00\x00fooK\x01s")))))
    case("rt_metadata_str_value", zipped(sd(("w", rebuild(extra=b"}X\x03\x00\x00\x00fooX\x01\x00\x00\x00xs")))),
         names="not a bool")
    # The end records' entries-on-this-disk counts: miniz reads the zip64 record's where there
    # is one (torch.save writes one), and ignores the plain one's then.
    def bumped(signature, at, width):
        def write(path):
            save(path, state_dict([torch.float32]))
            data = bytearray(open(path, "rb").read())
            i = data.rfind(signature) + at
            data[i:i + width] = (int.from_bytes(data[i:i + width], "little") + 1).to_bytes(width, "little")
            open(path, "wb").write(bytes(data))
        return write
    case("rt_eocd_disk_count", bumped(b"PK\x05\x06", 8, 2))
    case("rt_zip64_disk_count", bumped(b"PK\x06\x06", 24, 8), names="entry counts disagree")
    # The disk numbers too: the zip64 record's where there is one, the plain one's unread.
    def disks(signature, at, width, value):
        def write(path):
            save(path, state_dict([torch.float32]))
            data = bytearray(open(path, "rb").read())
            i = data.rfind(signature) + at
            for k in (0, width):
                data[i + k:i + k + width] = value.to_bytes(width, "little")
            open(path, "wb").write(bytes(data))
        return write
    case("rt_eocd_disks_marked", disks(b"PK\x05\x06", 4, 2, 0xFFFF))
    case("rt_zip64_disks_two", disks(b"PK\x06\x06", 16, 4, 2), names="multi-disk")
    case("rt_zip64_disks_one", disks(b"PK\x06\x06", 16, 4, 1), names="multi-disk")
    def plain_disks(value):
        def write(path):
            zipped(sd(("w", rebuild())))(path)
            data = bytearray(open(path, "rb").read())
            i = data.rfind(b"PK\x05\x06") + 4
            data[i:i + 4] = value.to_bytes(2, "little") * 2
            open(path, "wb").write(bytes(data))
        return write
    case("rt_plain_disks_one", plain_disks(1), names="multi-disk")
    case("rt_plain_disks_two", plain_disks(2), names="multi-disk")
    # A TorchScript archive's constants.
    case("rt_torchscript", zipped(sd(("w", rebuild())), more={"constants.pkl": b"\x80\x02)."}), names="TorchScript")
    case("rt_metadata_not_dict", zipped(sd(("w", rebuild(extra=b"K\x05")))), names="not a dict")
    # A record larger than its storage, and an archive without a version record.
    case("rt_record_too_long", zipped(sd(("w", rebuild().replace(b"K\x04tQ", b"K\x03tQ").replace(b"J\x04\x00", b"J\x03\x00")))),
         names="entry has 16 bytes")
    case("rt_no_version", zipped(sd(("w", rebuild())), version=False), names="version")
    # requires_grad: a bool, and only for floating point.
    case("rt_grad_on_ints", zipped(sd(("i", rebuild("1", b"IntStorage", grad=b"\x88")))), names="requires_grad")
    case("rt_grad_not_bool", zipped(sd(("w", rebuild(grad=b"K\x01")))), names="requires_grad")
    case("rt_grad_on_floats", zipped(sd(("w", rebuild(grad=b"\x88")))))
    # A small int in a long encoding (9 bytes) is the same int.
    case("rt_long_size", zipped(sd(("w", rebuild(shape=b"\x8a\x09\x04\x00\x00\x00\x00\x00\x00\x00\x00\x85")))))
    # Values torch refuses to build.
    case("rt_bytearray_str", zipped(sd(("w", rebuild()), ("b", b"c__builtin__\nbytearray\nX\x03\x00\x00\x00abc\x85R"))),
         names="builtins.bytearray")
    case("rt_unknown_codec", zipped(sd(("w", rebuild()), ("b", b"c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00bogus\x86R"))),
         names="_codecs.encode")
    case("rt_unknown_device", zipped(sd(("w", rebuild()), ("d", b"ctorch\ndevice\nX\x05\x00\x00\x00bogus\x85R"))),
         names="torch.device")
    case("rt_unhashable_tuple_key", zipped(sd(("w", rebuild()), ("n", b"}(](t\x85K\x01u"))), names="unhashable")
    case("rt_set_of_lists", zipped(sd(("w", rebuild()), ("s", b"c__builtin__\nset\n]]a\x85R"))), names="builtins.set")

    # Record names: torch finds them ignoring ASCII case. Names that differ only so are one
    # name twice (torch reads one of them): refused. One record of each, in capitals: read.
    def records(entries):
        def write(path):
            with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
                for n, b in entries:
                    z.writestr(n, b)
        return write

    plain = sd(("w", rebuild()))
    four = struct.pack("<4f", 1, 2, 3, 4)
    case("rt_records_in_capitals", records([("archive/data.pkl", plain), ("archive/BYTEORDER", "little"),
                                            ("archive/DATA/0", four), ("archive/VERSION", "3\n")]))
    case("rt_byteorder_in_capitals_says_big", records([("archive/data.pkl", plain), ("archive/BYTEORDER", "big"),
                                                       ("archive/data/0", four), ("archive/version", "3\n")]),
         tensorlift_refuses="big-endian")
    case("rt_storage_twice_in_two_cases", records([("archive/data.pkl", plain), ("archive/byteorder", "little"),
                                                   ("archive/data/0", four), ("archive/DATA/0", struct.pack("<4f", 9, 9, 9, 9)),
                                                   ("archive/version", "3\n")]),
         tensorlift_refuses="differ only in case")
    case("rt_pickle_twice_in_two_cases", records([("archive/data.pkl", plain), ("archive/DATA.PKL", sd(("v", rebuild()))),
                                                  ("archive/byteorder", "little"), ("archive/data/0", four),
                                                  ("archive/version", "3\n")]),
         tensorlift_refuses="differ only in case")
    # Two names in two cases that no reader looks up: read.
    case("rt_other_files_in_two_cases", records([("archive/data.pkl", plain), ("archive/byteorder", "little"),
                                                 ("archive/data/0", four), ("archive/version", "3\n"),
                                                 ("archive/extra/README", "a"), ("archive/extra/readme", "b")]))
    # 65,535 entries: Python's zipfile marks the count (0xFFFF) and writes no zip64 records.
    case("rt_65535_entries", records([("archive/data.pkl", plain), ("archive/byteorder", "little"),
                                      ("archive/data/0", four), ("archive/version", "3\n")]
                                     + [(f"archive/extra/{i}", "") for i in range(65535 - 4)]))
    # The zip64 end record (which torch.save always writes, and torch reads the directory
    # from) names a second central directory, where data/0 is other bytes: refused.
    case("rt_zip64_names_another_directory", zip64_other_directory, tensorlift_refuses="two central directories")
    case("rt_zip64_two_offset_fields", zip64_two_fields, names="local header out of the file")
    # A zip64 end record without its signature: ignored, the end record read (as miniz does).
    case("rt_zip64_record_unsigned", zip64_unsigned)
    # Many small tensors, whose list (names, keys, shapes) is large beside their pickle.
    case("many_scalars.zip", lambda p: save(p, {str(i): torch.tensor(float(i)) for i in range(20000)}))
    case("many_scalars.legacy", lambda p: save(p, {str(i): torch.tensor(float(i)) for i in range(20000)},
                                               _use_new_zipfile_serialization=False))
    rows = torch.arange(20000, dtype=torch.float32).reshape(20000, 1)
    case("many_rows_of_one_storage.zip", lambda p: save(p, {f"r{i}": rows[i] for i in range(20000)}))
    # A legacy file whose GLOBAL line crosses the reader's first 1 MiB window.
    case("legacy_global_across_the_first_window", legacy_global_across)

    with open(os.path.join(out, "expect.json"), "w") as f:
        json.dump(expect, f, indent=1, sort_keys=True)


def _saved_archive():
    """A torch.save archive of one 4-float tensor, and its parts: the bytes, the number of
    entries, the central directory and where it starts, and its records' folder."""
    buf = io.BytesIO()
    torch.save({"w": torch.arange(4, dtype=torch.float32)}, buf)
    raw = buf.getvalue()
    eocd = raw.rfind(b"PK\x05\x06")
    count, cd_len, cd_at = struct.unpack("<HII", raw[eocd + 10 : eocd + 20])
    prefix = raw[30 : 30 + struct.unpack("<H", raw[26:28])[0]].split(b"/")[0]
    return raw, count, raw[cd_at : cd_at + cd_len], cd_at, prefix


def zip64_other_directory(path):
    """A torch.save archive followed by a second central directory, in which data/0 is
    another record (4 nines), named by the zip64 end record; the end record names the first."""
    raw, count, cd, cd_at, prefix = _saved_archive()
    name, data = prefix + b"/data/0", struct.pack("<4f", 9, 9, 9, 9)
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 0, zlib.crc32(data), 4 * 4, 4 * 4, len(name), 0)
    other, p = bytearray(), 0
    while p < len(cd):
        n, e, c = struct.unpack("<HHH", cd[p + 28 : p + 34])
        entry = bytearray(cd[p : p + 46 + n + e + c])
        if bytes(entry[46 : 46 + n]) == name:
            struct.pack_into("<I", entry, 16, zlib.crc32(data))
            struct.pack_into("<I", entry, 42, cd_at)
        other += entry
        p += 46 + n + e + c
    body = raw[:cd_at] + local + name + data
    first_at = len(body)
    body += cd
    other_at = len(body)
    body += other
    z64 = struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count, len(other), other_at)
    locator = struct.pack("<IIQI", 0x07064B50, 0, len(body), 1)
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, len(cd), first_at, 0)
    with open(path, "wb") as f:
        f.write(body + z64 + locator + end)


def zip64_two_fields(path):
    """A torch.save archive whose data/0 has its local header's offset in a zip64 extra
    field, twice: the first names 0xFFFFFFFF (past the file's end), the second its own
    bytes. miniz, torch's reader, takes the first zip64 field only, and fails."""
    raw, count, cd, cd_at, prefix = _saved_archive()
    name = prefix + b"/data/0"
    body = raw[:cd_at]
    new_cd, p = bytearray(), 0
    while p < len(cd):
        n, e, c = struct.unpack("<HHH", cd[p + 28 : p + 34])
        entry = bytearray(cd[p : p + 46 + n + e + c])
        if bytes(entry[46 : 46 + n]) == name:
            own = struct.unpack("<I", entry[42:46])[0]
            struct.pack_into("<I", entry, 42, 0xFFFFFFFF)
            fields = struct.pack("<HHQ", 1, 8, 0xFFFFFFFF) + struct.pack("<HHQ", 1, 8, own)
            struct.pack_into("<H", entry, 30, e + len(fields))
            entry = entry[: 46 + n + e] + fields + entry[46 + n + e :]
        new_cd += entry
        p += 46 + n + e + c
    cd_start = len(body)
    body += new_cd
    z64 = struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count, len(new_cd), cd_start)
    locator = struct.pack("<IIQI", 0x07064B50, 0, len(body), 1)
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, len(new_cd), 0xFFFFFFFF, 0)
    with open(path, "wb") as f:
        f.write(body + z64 + locator + end)


def zip64_unsigned(path):
    """A torch.save archive whose zip64 end record's signature is spoiled."""
    buf = io.BytesIO()
    torch.save({"w": torch.arange(4, dtype=torch.float32)}, buf)
    raw = bytearray(buf.getvalue())
    at = raw.rfind(b"PK\x06\x06")
    assert at > 0 and raw.rfind(b"PK\x06\x07") > at, "torch.save writes zip64 records"
    raw[at : at + 4] = b"XX\x06\x06"
    with open(path, "wb") as f:
        f.write(raw)


def legacy_global_across(path):
    """A legacy (pre-zip) torch.save whose `ctorch\nLongStorage\n` line spans byte 2^20."""
    def build(pad):
        sd = collections.OrderedDict((f"layer.{i}.weight", torch.zeros(1)) for i in range(9000))
        sd["x" * (1 + pad)] = torch.zeros(1)
        sd["late.ids"] = torch.arange(3)
        buf = io.BytesIO()
        torch.save(sd, buf, _use_new_zipfile_serialization=False)
        return buf.getvalue()

    at = build(0).find(b"ctorch\nLongStorage\n")
    data = build((1 << 20) - at - 10)
    at = data.find(b"ctorch\nLongStorage\n")
    assert at < 1 << 20 < at + 19, at
    with open(path, "wb") as f:
        f.write(data)


def _at(tag, path, obj, **kw):
    with location(tag):
        torch.save(obj, path, **kw)


if __name__ == "__main__":
    main()
