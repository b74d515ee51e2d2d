"""Runs one vLLM engine on the CPU and prints what the tests compare, as one JSON line:
the greedy tokens for fixed prompts, every rank's parameters (a SHA-256 of each one's
bytes) and what tensorlift's loader did on each rank. Run in a process of its own: vLLM
spawns its engine and workers, and keeps state per process.

    python engine.py MODEL LOAD_FORMAT TP [EXTRA_CONFIG_JSON]
"""
import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# One NUMA node here: vLLM's automatic thread binding wants one per rank.
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
# collective_rpc with a function of ours crosses vLLM's engine process by pickle.
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# AMX state for vLLM's CPU attention, in this process and the engine's (amx_state.py).
import amx_state  # noqa: E402

amx_state.ask()

PROMPTS = ["w1 w2 w3 w4", "w9 w8 w7 w100 w200", "w42"]


def digest(t):
    import hashlib

    import torch

    raw = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    return [str(t.dtype), list(t.shape), hashlib.sha256(raw.tobytes()).hexdigest()]


def rank_state(worker):
    """On each rank: what its loader did, its parameters, and every tensor that the
    configured loader's weights iterator hands model.load_weights() (run again, on the
    rank's own process group: vLLM's CPU backend repacks linear weights after loading, so
    most parameters no longer hold what was loaded)."""
    from vllm.model_executor.model_loader import get_model_loader

    import tensorlift.vllm

    load = json.loads(json.dumps(tensorlift.vllm.LAST_LOAD))  # before the iterator runs again
    model = worker.get_model()
    params = {name: digest(p) for name, p in model.named_parameters() if p.numel()}
    config = worker.vllm_config
    weights = {}
    for name, t in get_model_loader(config.load_config).get_all_weights(config.model_config, model):
        assert name not in weights, name
        weights[name] = digest(t)
    return {"params": params, "weights": weights, "load": load}


def main():
    model, load_format, tp = sys.argv[1], sys.argv[2], int(sys.argv[3])
    extra = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=model,
        load_format=load_format,
        tensor_parallel_size=tp,
        model_loader_extra_config=extra,
        dtype="bfloat16",
        max_model_len=64,
        gpu_memory_utilization=0.1,
        enforce_eager=True,
        seed=0,
    )
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    result = {
        "tokens": [list(o.outputs[0].token_ids) for o in outputs],
        "text": [o.outputs[0].text for o in outputs],
        "ranks": llm.collective_rpc(rank_state),
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
