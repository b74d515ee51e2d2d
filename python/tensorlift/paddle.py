"""``safetensors.paddle`` reading through tensorlift: ``load_file`` loads with tensorlift
(``framework="paddle"``); ``load``, ``save`` and ``save_file`` are the reference's."""

from ._frameworks import load_file_for as _load_file_for
from ._frameworks import reference_attr as _reference_attr

load_file = _load_file_for("paddle")


def __getattr__(name):
    return _reference_attr("safetensors.paddle", name)
