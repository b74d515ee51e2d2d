"""The PyTorch fixtures committed for tensorlift-pickle are what scripts/make-torch-fixtures.py
writes today: a change to the script without regenerating them fails here."""
import filecmp
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES = os.path.join(ROOT, "crates", "tensorlift-pickle", "tests", "fixtures")


def test_committed_torch_fixtures_are_current(tmp_path):
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make-torch-fixtures.py"), str(tmp_path)], check=True)
    made = sorted(os.listdir(tmp_path))
    assert made == sorted(os.listdir(FIXTURES))
    _, mismatch, errors = filecmp.cmpfiles(FIXTURES, tmp_path, made, shallow=False)
    assert not mismatch and not errors, f"regenerate with scripts/make-torch-fixtures.py: {mismatch + errors}"


def test_a_pytorch_folder_loads_through_the_pickle_reader(tmp_path):
    import json
    import shutil

    import numpy as np

    import tensorlift

    shutil.copy(os.path.join(FIXTURES, "every_dtype.zip.bin"), tmp_path / "pytorch_model.bin")
    with open(os.path.join(FIXTURES, "every_dtype.expect.json")) as f:
        want = json.load(f)
    got = tensorlift.load_file(str(tmp_path), framework=None)
    assert sorted(got) == sorted(want)
    for name, t in got.items():
        assert t.dtype == want[name]["dtype"] and list(t.shape) == want[name]["shape"], name
        assert bytes(np.from_dlpack(t.raw_bytes())).hex() == want[name]["hex"], name
