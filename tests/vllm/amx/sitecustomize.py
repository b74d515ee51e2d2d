"""Asks the kernel for AMX state in every Python process of a vLLM test engine (its engine
core and workers are new processes, which start without it; this folder is put on their
PYTHONPATH by engine.py and vllm_cli.py).

On a host with AMX, vLLM 0.32's CPU attention runs AMX kernels for bfloat16 without asking
for AMX state: it relies on oneDNN having done so in the same process, which it does not
always, and the worker dies of SIGILL in `cpu_attention_with_kv_cache`. Elsewhere the call
fails and changes nothing."""
import ctypes

_SYS_ARCH_PRCTL = 158  # x86-64
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18

try:
    ctypes.CDLL(None).syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA)
except (OSError, AttributeError):
    pass
