"""``safetensors.numpy`` reading through tensorlift: ``load_file`` loads with tensorlift, with
the reference's signature and default (``backend="mmap"``); the arrays are writeable memory
of their own either way, as the reference's copies are. ``load`` (from bytes), ``save`` and
``save_file`` are the reference's."""

from . import load_file as _load_file
from ._frameworks import reference_attr as _reference_attr


def load_file(filename, *, backend="mmap"):
    """Loads every tensor of a ``.safetensors`` file as ``safetensors.numpy.load_file``
    does, reading through tensorlift (a folder or an index too): a dict of name to array."""
    return _load_file(filename, framework="np", backend=backend)


def __getattr__(name):
    return _reference_attr("safetensors.numpy", name)
