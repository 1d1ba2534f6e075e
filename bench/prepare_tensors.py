"""Writes the benchmark tensors to bench/out/ as f32 safetensors:
  smollm2_mlp.safetensors  the MLP weights (ffn_gate, ffn_up, ffn_down of all 30 blocks) of the default model,
                           SmolLM2-135M-Instruct, dequantized from its GGUF (Q4_1) with the gguf package;
  big_4096x11008.safetensors  one 4096 x 11008 normal(0, 0.02) tensor (a Llama-7B MLP shape), seed 0.
Usage: python bench/prepare_tensors.py MODEL.gguf OUT_DIR
"""
import os
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.numpy import save_file


def main():
    model, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    mlp_path = os.path.join(out, "smollm2_mlp.safetensors")
    if not os.path.exists(mlp_path):
        reader = GGUFReader(model)
        tensors = {}
        for t in reader.tensors:
            if ".ffn_" in t.name and t.name.endswith(".weight") and "norm" not in t.name:
                w = dequantize(t.data, t.tensor_type).astype(np.float32)
                tensors[t.name] = np.ascontiguousarray(w)
        save_file(tensors, mlp_path)
        print(f"wrote {mlp_path}: {len(tensors)} tensors", file=sys.stderr)
    big_path = os.path.join(out, "big_4096x11008.safetensors")
    if not os.path.exists(big_path):
        rng = np.random.default_rng(0)
        save_file({"big.weight": (rng.standard_normal((4096, 11008), dtype=np.float32) * 0.02)}, big_path)
        print(f"wrote {big_path}", file=sys.stderr)


if __name__ == "__main__":
    main()
