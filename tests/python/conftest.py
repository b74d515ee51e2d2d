"""Fixtures shared by the Python tests: checkpoints written by the reference package."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session")
def fixture(tmp_path_factory):
    """A folder with single.safetensors, sharded/ and manifest.json, from the reference writer."""
    out = tmp_path_factory.mktemp("ref")
    subprocess.run([sys.executable, os.path.join(ROOT, "tests/reference/make_fixture.py"), str(out)], check=True)
    return out


@pytest.fixture(scope="session")
def sharded_reference(fixture):
    """Every tensor of fixture/sharded, as the reference package reads the shards one by one."""
    from safetensors.numpy import load_file as reference_load

    folder = fixture / "sharded"
    want = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            want.update(reference_load(str(folder / f)))
    return want


@pytest.fixture
def spy_reads():
    """spy(f) records the (start, length) of every read that the open ``safe_open`` f makes
    from then on, in the list it returns."""

    def spy(f):
        ckpt = f._open()
        calls = []
        real = ckpt.read_bytes

        class Spy:
            def __getattr__(self, a):
                return getattr(ckpt, a)

            def read_bytes(self, name, start, length):
                calls.append((start, length))
                return real(name, start, length)

        f._ckpt = Spy()
        return calls

    return spy


@pytest.fixture
def served(monkeypatch):
    """Counts the files tensorlift's safe_open opens and the whole tensors its slices hand
    over: a library that loads through tensorlift.patch() is seen to be served by it."""
    import tensorlift

    counts = {"opened": 0, "tensors": 0}
    real_init, real_getitem = tensorlift.safe_open.__init__, tensorlift._Slice.__getitem__

    def init(self, *a, **k):
        counts["opened"] += 1
        real_init(self, *a, **k)

    def getitem(self, key):
        counts["tensors"] += 1
        return real_getitem(self, key)

    monkeypatch.setattr(tensorlift.safe_open, "__init__", init)
    monkeypatch.setattr(tensorlift._Slice, "__getitem__", getitem)
    return counts
