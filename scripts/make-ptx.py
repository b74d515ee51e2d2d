#!/usr/bin/env python3
"""Compiles every kernels/*.cu to kernels/*.ptx with NVRTC, the PTX tensorlift loads at run time.

NVRTC comes from PyPI's `nvidia-cuda-nvrtc-cu12` wheel, pinned to 12.0 in
requirements-test.txt: it runs without a GPU or a toolkit, its output is the same bytes on
every run, and the PTX it writes (ISA 8.0) loads on every driver from CUDA 12.0 on, where a
newer NVRTC's PTX is refused by older drivers (CUDA_ERROR_UNSUPPORTED_PTX_VERSION).
tests/python/test_ptx.py compiles the sources again and fails when a committed file differs.

    scripts/make-ptx.py          # rewrite kernels/*.ptx
    scripts/make-ptx.py --check  # exit 1 if any is stale
"""
import ctypes
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
KERNELS = ROOT / "kernels"
# Volta and later: the kernels use integer operations only.
OPTIONS = [b"--gpu-architecture=compute_70", b"--std=c++17"]


def nvrtc():
    """The NVRTC library of the pinned wheel, from this interpreter's site-packages."""
    try:
        import nvidia.cuda_nvrtc  # the wheel's namespace package
    except ImportError:
        sys.exit("NVRTC is missing: pip install -r requirements-test.txt (nvidia-cuda-nvrtc-cu12)")
    for base in nvidia.cuda_nvrtc.__path__:
        lib = pathlib.Path(base) / "lib" / "libnvrtc.so.12"
        if lib.exists():
            # Its builtins library is found beside it through the library's RUNPATH.
            return ctypes.CDLL(str(lib))
    sys.exit("libnvrtc.so.12 is not in the nvidia-cuda-nvrtc-cu12 wheel")


def compile_ptx(source: pathlib.Path) -> bytes:
    """The PTX NVRTC makes of `source`, as text without the trailing NUL."""
    lib = nvrtc()
    prog = ctypes.c_void_p()
    # A fixed program name: NVRTC 12.0 writes it into the PTX.
    rc = lib.nvrtcCreateProgram(ctypes.byref(prog), source.read_bytes(), source.name.encode(), 0, None, None)
    if rc != 0:
        raise RuntimeError(f"nvrtcCreateProgram: {rc}")
    try:
        opts = (ctypes.c_char_p * len(OPTIONS))(*OPTIONS)
        rc = lib.nvrtcCompileProgram(prog, len(OPTIONS), opts)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        if rc != 0:
            raise RuntimeError(f"{source.name}: NVRTC error {rc}:\n{log.value.decode(errors='replace')}")
        lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
        ptx = ctypes.create_string_buffer(size.value)
        if lib.nvrtcGetPTX(prog, ptx) != 0:
            raise RuntimeError("nvrtcGetPTX failed")
        return ptx.raw[: size.value].rstrip(b"\0")
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def sources():
    return sorted(KERNELS.glob("*.cu"))


def main() -> int:
    check = "--check" in sys.argv[1:]
    stale = []
    for cu in sources():
        ptx = compile_ptx(cu)
        target = cu.with_suffix(".ptx")
        if check:
            if not target.exists() or target.read_bytes() != ptx:
                stale.append(target.name)
        else:
            target.write_bytes(ptx)
            print(f"wrote {target.relative_to(ROOT)} ({len(ptx)} bytes)")
    if stale:
        print("stale PTX (run scripts/make-ptx.py):", ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
