#!/usr/bin/env python3
"""Writes a small BERT (random weights, F16) for examples/candle-bert with the reference
`safetensors` writer: DIR/config.json and DIR/model.safetensors, names as Hugging Face's
BertModel saves them (with the `bert.` prefix a BertForMaskedLM checkpoint has).

    python3 examples/candle-bert/make_model.py DIR [--layers N] [--hidden H]
"""
import argparse
import json
import pathlib

import numpy as np
from safetensors.numpy import save_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir", type=pathlib.Path)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=64)
    args = ap.parse_args()
    h, layers, vocab, inter = args.hidden, args.layers, 1000, args.hidden * 4
    config = {
        "vocab_size": vocab, "hidden_size": h, "num_hidden_layers": layers, "num_attention_heads": 4,
        "intermediate_size": inter, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
        "max_position_embeddings": 128, "type_vocab_size": 2, "initializer_range": 0.02,
        "layer_norm_eps": 1e-12, "pad_token_id": 0, "model_type": "bert",
    }
    rng = np.random.default_rng(7)
    t = {}

    def add(name, *shape, scale=0.05, mean=0.0):
        t[f"bert.{name}"] = (mean + scale * rng.standard_normal(shape)).astype(np.float16)

    add("embeddings.word_embeddings.weight", vocab, h)
    add("embeddings.position_embeddings.weight", 128, h)
    add("embeddings.token_type_embeddings.weight", 2, h)
    add("embeddings.LayerNorm.weight", h, mean=1.0)
    add("embeddings.LayerNorm.bias", h)
    for i in range(layers):
        p = f"encoder.layer.{i}"
        for part in ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"]:
            add(f"{p}.{part}.weight", h, h)
            add(f"{p}.{part}.bias", h)
        add(f"{p}.attention.output.LayerNorm.weight", h, mean=1.0)
        add(f"{p}.attention.output.LayerNorm.bias", h)
        add(f"{p}.intermediate.dense.weight", inter, h)
        add(f"{p}.intermediate.dense.bias", inter)
        add(f"{p}.output.dense.weight", h, inter)
        add(f"{p}.output.dense.bias", h)
        add(f"{p}.output.LayerNorm.weight", h, mean=1.0)
        add(f"{p}.output.LayerNorm.bias", h)
    args.dir.mkdir(parents=True, exist_ok=True)
    (args.dir / "config.json").write_text(json.dumps(config, indent=2))
    save_file(t, str(args.dir / "model.safetensors"), metadata={"format": "pt"})
    print(f"wrote {args.dir} ({len(t)} tensors)")


if __name__ == "__main__":
    main()
