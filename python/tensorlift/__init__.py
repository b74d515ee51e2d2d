"""tensorlift: load safetensors checkpoints into GPU or host memory at the speed of the hardware.

Tensors are handed over without a copy through DLPack: ``numpy.from_dlpack(t)`` on the
host, ``torch.from_dlpack(t)`` on the host or a CUDA device.
"""

from ._tensorlift import Tensor, __version__, load, resolve_device

__all__ = ["Tensor", "load", "load_file", "resolve_device", "__version__"]


def load_file(path, device="cpu", framework="np"):
    """Loads every tensor of ``path`` (a ``.safetensors`` file, an index, or a folder).

    Returns a dict of name to array: numpy arrays (``framework="np"``) or torch tensors
    (``framework="pt"``), viewing the loaded memory without a copy; with ``framework=None``,
    tensorlift ``Tensor`` objects, which any DLPack consumer takes.
    """
    tensors = load(path, device=device)
    if framework is None:
        return tensors
    if framework in ("np", "numpy"):
        import numpy

        return {name: numpy.from_dlpack(t) for name, t in tensors.items()}
    if framework in ("pt", "torch"):
        import torch

        return {name: torch.from_dlpack(t) for name, t in tensors.items()}
    raise ValueError(f"unknown framework {framework!r} (expected 'np', 'pt' or None)")
