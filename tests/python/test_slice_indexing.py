"""``get_slice(name)[key]`` against the reference ``safetensors`` package and numpy.

For every key of a table, on tensors of a few shapes and with both frameworks: where the
reference accepts the key, tensorlift returns the same (type, dtype, shape and values); where
the reference refuses it, tensorlift refuses as well (the reference's exception type, or
numpy's where the reference raises its own ``SafetensorError``) or returns exactly numpy's
indexing of the whole tensor.

What the reference does (safetensors 0.8.0): with ``framework="pt"`` it indexes the whole
tensor with torch, so it takes whatever torch takes (lists, arrays, masks, ``None``, two
ellipses) and refuses negative steps; with ``framework="np"`` it takes ints (anything with
``__index__``, ``True`` as 1), slices of non-negative bounds within the dimension, one
ellipsis, and ``[]``, and refuses the rest.
"""

import os
import warnings

import numpy as np
import pytest
import safetensors
from safetensors.numpy import save_file

import tensorlift

try:
    import torch
except ImportError:  # the framework="pt" half needs it; the numpy half runs without
    # (but not where the test command installs it, TENSORLIFT_REQUIRE_DEPS)
    if os.environ.get("CI") or os.environ.get("TENSORLIFT_REQUIRE_DEPS"):
        raise
    torch = None

FRAMEWORKS = ["np", pytest.param("pt", marks=pytest.mark.skipif(torch is None, reason="torch is not installed"))]

E = Ellipsis
S = slice(None)

TENSORS = {
    "m": np.arange(12, dtype=np.float32).reshape(4, 3),
    "v": np.arange(5, dtype=np.int64) * 7 - 9,
    "s": np.array(2.5, dtype=np.float32),
    "e": np.zeros((0, 3), dtype=np.float32),
    "c": np.arange(24, dtype=np.int32).reshape(2, 3, 4) - 5,
    "h": np.linspace(-1, 1, 6, dtype=np.float16).reshape(3, 2),
    "b": (np.arange(6).reshape(2, 3) % 2).astype(np.bool_),
    # F64, whose name begins as the six-bit types' do (F6_E2M3), which torch has no type for
    "d": np.linspace(-3, 3, 6, dtype=np.float64).reshape(2, 3),
}

KEYS = [
    # ints, in and out of range, and what converts to one
    0, 1, 2, -1, -2, 3, 4, -4, -5, 2**31, -(2**31), 2**62, 2**63, -(2**63) - 1,
    np.int64(1), np.int32(-1), np.uint8(1), np.uint64(1),
    np.array(1), np.array(-1), np.array(1, dtype=np.uint8),
    # floats
    1.5, 1.0, -0.5, np.float64(1.0), np.float32(0.0), np.array(1.0),
    (0, 1.5), (S, 1.0),
    # bools
    True, False, np.True_, np.False_, np.array(True), (S, True), (True, 0), (0, False),
    # slices
    S, slice(1, 3), slice(2, None), slice(None, -1), slice(-2, None), slice(-10, 2), slice(10, 20),
    slice(None, 5), slice(3, 1), slice(2, 2), slice(0, 0), slice(4, 4), slice(3, 4), slice(0, 2**40),
    slice(None, None, 2), slice(1, None, 5), slice(None, None, 10), slice(np.int64(1), 3), slice(True, 3),
    slice(1.0, 2), slice(None, 2.0), slice(None, None, 0), slice(None, None, 2**63),
    (S, slice(0, 2)), (slice(1, 3), slice(2, 1)), (1, slice(1, None)), (S, slice(3, 3)),
    # negative steps
    slice(None, None, -1), slice(3, 0, -2), slice(None, None, -2), slice(-1, None, -3), slice(2, None, -1),
    slice(0, None, -1), slice(1, 3, -1), slice(10, -10, -3), slice(None, 1, -1),
    (0, slice(None, None, -1)), (S, slice(None, None, -1)), (slice(None, None, -1), 1), (slice(None, None, -2), S, 0),
    (E, slice(None, None, -1)),
    # ellipsis
    E, (E,), (E, E), (E, 0), (0, E), (E, 1, E), (E, S), (S, E), (0, 0, E), (E, 0, 0), (slice(0, 2), E, slice(1, 2)),
    (E, -1), (1, E, -1),
    # None
    None, (None,), (None, 0), (0, None), (None, None), (E, None), (None, E), (None, E, None), (-1, E, None),
    (slice(1, 3), None, 0), (None, slice(None, None, -1)), (None, None, 1, None, -1), (None, E, 0), (E, None, 0),
    (None, slice(1, 3), E, None), (None, -1, None),
    # lists, arrays, ranges (fancy indexing)
    [], [0], [0, 1], [1, -1], [[0, 1]], [0, S], np.array([0, 1]), np.array([1]), np.array([], dtype=np.int64),
    np.array([True, False, True, False]), (0, [0, 1]), (S, []), (S, [0, 1]), range(2),
    # as many indices as dimensions, and more
    (), (1, 2), (-1, -1), (1, 2, 3), (S, S, S), (S, -1), (S, 3), (S, -4), (0, 0, 0, 0),
    # not an index at all
    "a", (0, "a"), {0: 1},
]
if torch is not None:
    KEYS += [
        torch.tensor(1), torch.tensor(-1), torch.tensor(1, dtype=torch.uint8), torch.tensor([1]), torch.tensor(1.5),
        torch.tensor(True), torch.tensor([0, 1]), torch.tensor([True, False, True, False]), (S, torch.tensor([1])),
    ]


def _key_id(key):
    return repr(key).replace(" ", "")


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    p = str(tmp_path_factory.mktemp("slices") / "t.safetensors")
    save_file(TENSORS, p)
    return p


def _outcome(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return True, fn()
        except Exception as e:  # the exception type is what is compared
            return False, type(e)


def _bytes(x):
    if torch is not None and isinstance(x, torch.Tensor):
        flat = torch.empty(x.numel(), dtype=x.dtype)  # strides of its own (views may have any)
        flat.copy_(x.reshape(-1))
        return flat.view(torch.uint8).numpy().tobytes()
    return x.tobytes()


def _c_layout(x):
    """Whether ``x`` (tensorlift's answer, a copy of its own) has a C layout's strides, as the
    reference's copies have: an empty one too, or it cannot be viewed as another dtype."""
    if torch is not None and isinstance(x, torch.Tensor):
        return x.stride() == torch.empty(x.shape).stride()
    return True


def _same(got, want):
    return (
        _c_layout(got)
        and type(got) is type(want)
        and got.dtype == want.dtype
        and tuple(got.shape) == tuple(want.shape)
        and _bytes(got) == _bytes(want)
    )


def _as(framework, array):
    array = np.array(array, order="C", copy=True)  # a 0-d array for a scalar
    return torch.from_numpy(array) if framework == "pt" else array


def _describe(x):
    return f"{type(x).__name__} {x.dtype} {tuple(x.shape)} {x.tolist()}"


def _check(path, framework, name, key):
    """None where tensorlift answers as it should, else what is wrong."""
    whole = TENSORS[name]
    with safetensors.safe_open(path, framework=framework) as ref, tensorlift.safe_open(path, framework=framework) as ours:
        ref_ok, ref_out = _outcome(lambda: ref.get_slice(name)[key])
        got_ok, got = _outcome(lambda: ours.get_slice(name)[key])
    np_ok, np_out = _outcome(lambda: whole[key])
    if ref_ok:
        if not got_ok:
            return f"the reference gives {_describe(ref_out)}, tensorlift raises {got.__name__}"
        if not _same(got, ref_out):
            return f"the reference gives {_describe(ref_out)}, tensorlift {_describe(got)}"
        return None
    if got_ok:
        if not np_ok:
            return f"the reference and numpy refuse ({ref_out.__name__}, {np_out.__name__}), tensorlift gives {_describe(got)}"
        want = _as(framework, np_out)
        if not _same(got, want):
            return f"the reference refuses ({ref_out.__name__}), tensorlift gives {_describe(got)}, not numpy's {_describe(want)}"
        return None
    if framework == "np" and issubclass(ref_out, safetensors.SafetensorError):
        # Refused as the reference refuses: code that catches its error catches ours (which
        # is also the error numpy's indexing raises).
        if not issubclass(got, safetensors.SafetensorError):
            return f"the reference raises SafetensorError, tensorlift {got.__name__}, which is not one"
        return None
    allowed = [ref_out]
    if not np_ok:
        allowed.append(np_out)
    elif ref_out is safetensors.SafetensorError:
        # The reference's own exception type is not ours to raise: a refused index is an IndexError.
        allowed.append(IndexError)
    if not issubclass(got, tuple(allowed)):
        return f"tensorlift raises {got.__name__}, expected one of {[t.__name__ for t in allowed]}"
    return None


@pytest.mark.parametrize("key", KEYS, ids=_key_id)
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_a_key_answers_as_the_reference_or_refuses(path, framework, key):
    wrong = {}
    for name in TENSORS:
        why = _check(path, framework, name, key)
        if why is not None:
            wrong[f"{name}{list(TENSORS[name].shape)}"] = why
    assert not wrong, wrong


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_the_cases_of_the_issue(path, framework):
    m, c = TENSORS["m"], TENSORS["c"]
    with tensorlift.safe_open(path, framework=framework) as f:
        # A float is not an index (it used to give row 1).
        with pytest.raises(IndexError):
            f.get_slice("m")[1.5]
        # Two ellipses: numpy and the numpy reference refuse; the torch reference takes them.
        if framework == "np":
            with pytest.raises(IndexError):
                f.get_slice("m")[..., ...]
        else:
            with safetensors.safe_open(path, framework="pt") as ref:
                assert _same(f.get_slice("m")[..., ...], ref.get_slice("m")[..., ...])
        # None does not take a dimension: the ellipsis stands for all the others.
        got = f.get_slice("m")[-1, ..., None]
        assert tuple(got.shape) == (3, 1)
        assert _same(got, _as(framework, m[-1, ..., None]))
        got = f.get_slice("c")[-1, ..., None]
        assert tuple(got.shape) == (3, 4, 1)
        assert _same(got, _as(framework, c[-1, ..., None]))


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize(
    "key",
    [
        slice(None, None, -1),
        slice(3, 0, -2),
        slice(None, None, -3),
        (slice(None, None, -1), slice(None, None, -1)),
        (1, slice(None, None, -2)),
        (E, slice(2, None, -2)),
        (None, slice(-1, 0, -1), None),
    ],
    ids=_key_id,
)
def test_negative_steps_are_numpy_s(path, framework, key):
    for name in ("m", "c", "e", "v"):
        ok, want = _outcome(lambda: TENSORS[name][key])
        if not ok:  # too many indices for the tensor
            continue
        with tensorlift.safe_open(path, framework=framework) as f:
            got = f.get_slice(name)[key]
        assert _same(got, _as(framework, want)), (name, key)


def test_a_key_reads_only_the_rows_it_touches(tmp_path, spy_reads):
    p = str(tmp_path / "rows.safetensors")
    w = np.arange(10 * 4, dtype=np.float32).reshape(10, 4)
    save_file({"w": w}, p)
    row = 4 * 4
    cases = [
        (slice(8, 1, -3), (2 * row, 7 * row)),  # rows 8, 5, 2
        (slice(None, None, -1), (0, 10 * row)),
        (slice(None, 3, -1), (4 * row, 6 * row)),  # rows 9..4
        ((None, 5), (5 * row, row)),  # None takes no dimension
        ((None, None, slice(6, 8), None), (6 * row, 2 * row)),
        ((E, 2, 1), (2 * row, row)),  # the ellipsis stands for no dimension
        ((None, E, 3, None, 1), (3 * row, row)),
        ((E, 1), (0, 10 * row)),  # the ellipsis stands for dimension 0
        (slice(20, 30), None),  # nothing to read
        (slice(3, 1), None),
    ]
    for framework in ("np", "pt") if torch is not None else ("np",):
        with tensorlift.safe_open(p, framework=framework) as f:
            calls = spy_reads(f)
            for key, read in cases:
                del calls[:]
                got = f.get_slice("w")[key]
                assert _same(got, _as(framework, w[key])), (framework, key)
                assert calls == ([read] if read else []), (framework, key)


def test_bf16_and_float8_with_torch(tmp_path):
    if torch is None:
        pytest.skip("torch is not installed")
    from safetensors.torch import save_file as save_torch

    p = str(tmp_path / "low.safetensors")
    tensors = {
        "bf": (torch.arange(12, dtype=torch.float32) / 3).reshape(4, 3).to(torch.bfloat16),
        "f8": torch.linspace(-2, 2, 6).reshape(3, 2).to(torch.float8_e4m3fn),
    }
    save_torch(tensors, p)
    keys = [1, -1, slice(1, 3), (S, 0), (E, None), (None, 2), [0, 2], (S, [1, 0]), torch.tensor([True, False, True])]
    with safetensors.safe_open(p, framework="pt") as ref, tensorlift.safe_open(p, framework="pt") as ours:
        for name, whole in tensors.items():
            for key in keys:
                ref_ok, want = _outcome(lambda: ref.get_slice(name)[key])
                got_ok, got = _outcome(lambda: ours.get_slice(name)[key])
                assert got_ok == ref_ok, (name, key, got, want)
                if ref_ok:
                    assert _same(got, want), (name, key)
                else:
                    assert got is want, (name, key)  # the same exception type
            # Negative steps, which torch refuses: numpy's answer (flipped as integers: torch
            # flips no float8).
            raw = whole.view(torch.int16 if whole.element_size() == 2 else torch.uint8)
            want = raw.flip(0).flip(1)[:, ::2].contiguous().view(whole.dtype)
            assert _same(ours.get_slice(name)[::-1, ::-2], want), name


def test_f4_tensors_as_the_reference_gives_them_to_torch(tmp_path):
    """F4 (two 4-bit floats a byte) goes to torch as the reference gives it:
    ``float4_e2m1fn_x2``, the last dimension halved, the file's bytes; an odd last
    dimension is the reference's error."""
    if torch is None or not hasattr(torch, "float4_e2m1fn_x2"):
        pytest.skip("torch with float4_e2m1fn_x2 is not installed")
    import json
    import struct

    from safetensors.torch import load_file as reference_load

    cases = {"v": ([2], b"\x12"), "m": ([4, 6], bytes(range(12))), "e": ([0], b""), "odd": ([2, 3], b"\x12\x34\x56")}
    header, data = {}, b""
    for name, (shape, payload) in cases.items():
        header[name] = {"dtype": "F4", "shape": shape, "data_offsets": [len(data), len(data) + len(payload)]}
        data += payload
    h = json.dumps(header).encode()
    p = tmp_path / "f4.safetensors"
    p.write_bytes(struct.pack("<Q", len(h)) + h + data)

    def raw(t):
        return t.dtype, tuple(t.shape), bytes(t.reshape(-1).view(torch.uint8).tolist())

    with safetensors.safe_open(str(p), framework="pt") as ref, tensorlift.safe_open(p, framework="pt") as ours:
        for name in ("v", "m", "e"):
            assert raw(ours.get_tensor(name)) == raw(ref.get_tensor(name)), name
        with pytest.raises(safetensors.SafetensorError, match="last dim be divisible by 2"):
            ref.get_tensor("odd")
        with pytest.raises(safetensors.SafetensorError, match="last dim be divisible by 2"):
            ours.get_tensor("odd")
    with pytest.raises(safetensors.SafetensorError, match="last dim be divisible by 2"):
        reference_load(str(p))
    with pytest.raises(safetensors.SafetensorError, match="last dim be divisible by 2"):
        tensorlift.load_file(p)


def test_sub_byte_types_are_refused_as_the_reference_refuses_them(tmp_path):
    """F6 tensors (torch has no such type) are the reference's ``SafetensorError`` "Dtype not
    understood" with torch, where the DLPack hand-over raised a ``BufferError``; a slice of
    an F4 tensor (read whole only: its values are packed two a byte) is a
    ``SafetensorError`` that says so, not numpy's advice; ``load_group`` says it does not cut
    them between ranks, where it said torch has no such type."""
    if torch is None:
        pytest.skip("torch is not installed")
    import json
    import struct

    header = {
        "x": {"dtype": "F6_E2M3", "shape": [4], "data_offsets": [0, 3]},
        "m": {"dtype": "F4", "shape": [4, 6], "data_offsets": [3, 15]},
    }
    h = json.dumps(header).encode()
    p = tmp_path / "sub.safetensors"
    p.write_bytes(struct.pack("<Q", len(h)) + h + bytes(range(1, 16)))
    for backend in ("pread", "mmap"):
        with safetensors.safe_open(str(p), framework="pt", backend=backend) as ref:
            with pytest.raises(safetensors.SafetensorError, match="Dtype not understood: F6_E2M3"):
                ref.get_tensor("x")
        with tensorlift.safe_open(p, framework="pt", backend=backend) as ours:
            with pytest.raises(safetensors.SafetensorError, match="Dtype not understood: F6_E2M3"):
                ours.get_tensor("x")
            with pytest.raises(safetensors.SafetensorError, match="Dtype not understood: F6_E2M3"):
                ours.get_slice("x")[1:]
            if hasattr(torch, "float4_e2m1fn_x2"):
                assert tuple(ours.get_slice("m")[:].shape) == (4, 3)
            with pytest.raises(safetensors.SafetensorError, match="F4, its values packed two a byte"):
                ours.get_slice("m")[0:2]
    with pytest.raises(safetensors.SafetensorError, match="Dtype not understood: F6_E2M3"):
        tensorlift.load_file(p)


def test_load_file_takes_the_reference_s_keyword(tmp_path):
    """``load_file(filename=...)``, as callers of the reference's ``load_file`` pass it."""
    save_file({"a": np.arange(3, dtype=np.int32)}, str(tmp_path / "a.safetensors"))
    got = tensorlift.load_file(filename=tmp_path / "a.safetensors", framework="np")
    assert got["a"].tolist() == [0, 1, 2]
