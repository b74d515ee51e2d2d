"""Asks the kernel for AMX state in every Python process of a vLLM test engine (its engine
core and workers are new processes, which start without it; this folder is put on their
PYTHONPATH by ../amx_state.py).

On a host with AMX, vLLM 0.32's CPU attention runs AMX kernels for bfloat16 without asking
for AMX state: it relies on oneDNN having done so in the same process, which it does not
always, and the worker dies of SIGILL in `cpu_attention_with_kv_cache`. On an x86-64 host
without AMX the call fails and changes nothing; on other machines it is not made. The
`sitecustomize` this one shadows, if any, is run after it."""
import ctypes
import os
import platform
import sys

_SYS_ARCH_PRCTL = 158  # x86-64
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18

if platform.machine() in ("x86_64", "AMD64"):
    try:
        ctypes.CDLL(None).syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA)
    except (OSError, AttributeError):
        pass


def _chain():
    """Runs the next `sitecustomize` on the path (a distribution's, or a Nix Python's), as
    the interpreter would have, leaving what it does to `sys.path` in place."""
    import importlib.machinery
    import importlib.util

    here = os.path.realpath(os.path.dirname(os.path.abspath(__file__)))
    rest = [p for p in sys.path if os.path.realpath(os.path.abspath(p or ".")) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    mine = sys.modules.get("sitecustomize")
    sys.modules["sitecustomize"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules["sitecustomize"] = mine
        raise


if __name__ == "sitecustomize":
    _chain()
