"""The committed PTX (kernels/*.ptx) is what its source compiles to.

NVRTC from the pinned `nvidia-cuda-nvrtc-cu12` wheel compiles each kernels/*.cu again, with
the options scripts/make-ptx.py uses, and the bytes must equal the committed file's: a
source edited without running scripts/make-ptx.py fails here, before any GPU sees it.
"""
import importlib.util
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

# The test command installs the wheel (requirements-test.txt), and CI must have it; a GPU
# host without network (scripts/gpu-host) has no NVRTC, and skips these checks, which
# concern the source tree rather than the device.
if not (os.environ.get("CI") or os.environ.get("TENSORLIFT_REQUIRE_DEPS")):
    pytest.importorskip("nvidia.cuda_nvrtc", reason="NVRTC (nvidia-cuda-nvrtc-cu12) is not installed")


def make_ptx():
    spec = importlib.util.spec_from_file_location("make_ptx", ROOT / "scripts" / "make-ptx.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SOURCES = sorted((ROOT / "kernels").glob("*.cu"))


def test_there_are_kernels():
    assert [p.name for p in SOURCES] == ["convert.cu"]


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_committed_ptx_is_fresh(source):
    ptx = source.with_suffix(".ptx")
    assert ptx.exists(), f"{ptx.name} is missing: run scripts/make-ptx.py"
    assert make_ptx().compile_ptx(source) == ptx.read_bytes(), f"{ptx.name} is stale: run scripts/make-ptx.py"


def test_an_edited_source_would_be_stale(tmp_path):
    # The check can fail: the same source with one kernel fewer compiles to other bytes.
    source = ROOT / "kernels" / "convert.cu"
    edited = tmp_path / source.name
    edited.write_text(source.read_text().replace("CONVERT(f8e5m2, f32)\n", ""))
    assert make_ptx().compile_ptx(edited) != source.with_suffix(".ptx").read_bytes()


def test_the_ptx_loads_on_every_cuda_12_and_13_driver():
    # ISA 8.0 (NVRTC 12.0): drivers refuse PTX newer than their own ISA.
    text = (ROOT / "kernels" / "convert.ptx").read_text()
    assert "\n.version 8.0\n" in text
    assert "\n.target sm_70\n" in text
    for kernel in ["tl_convert_bf16_f32", "tl_convert_f32_bf16", "tl_convert_f8e4m3_f16"]:
        assert f".entry {kernel}(" in text
