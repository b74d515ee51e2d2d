"""``safetensors.torch`` reading through tensorlift: ``load_file`` loads with tensorlift, with
the reference's signature and defaults (``device="cpu"``, ``backend="mmap"``: on the host,
tensors that view the mapped file, under the reference's contract that it is not cut short
or written while they live); ``load`` (from bytes), ``save``, ``save_file``, ``save_model``
and ``load_model`` are the reference's (``load_model`` reads through tensorlift while
``tensorlift.patch()`` is in effect)."""

from . import load_file as _load_file
from ._frameworks import reference_attr as _reference_attr

_REFERENCE_NAMES = ("load", "save", "save_file", "save_model", "load_model")


def load_file(filename, device="cpu", *, backend="mmap"):
    """Loads every tensor of a ``.safetensors`` file as ``safetensors.torch.load_file``
    does, reading through tensorlift (a folder or an index too): a dict of name to tensor."""
    return _load_file(filename, device=device, framework="pt", backend=backend)


def __getattr__(name):
    return _reference_attr("safetensors.torch", name, _REFERENCE_NAMES)
