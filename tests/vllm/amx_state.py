"""AMX state for vLLM's CPU attention in a test engine's processes (see
amx/sitecustomize.py): asked for in this process, and in every Python process it starts,
through that folder on their PYTHONPATH. Imported by the scripts beside it (engine.py,
vllm_cli.py), whose folder is the first on the path."""
import os
import runpy

_AMX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "amx")


def ask():
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_AMX, os.environ.get("PYTHONPATH")) if p)
    runpy.run_path(os.path.join(_AMX, "sitecustomize.py"))
