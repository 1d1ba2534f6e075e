"""Checks (by hand, not in CI) that transformers loads a checkpoint written by `qlora quantize` and gives
the same logits as transformers' own bitsandbytes 4-bit quantization of the same model.

Model: the default model, SmolLM2-135M-Instruct, read from its GGUF by transformers (dequantized to f32)
and saved as a Hugging Face folder; or any HF folder given with --hf.
Usage: python scripts/reference/check_quantize_roundtrip.py [--gguf FILE | --hf DIR] [--qlora .build/release/qlora]
Pinned: torch 2.15.0, transformers 5.24.0, bitsandbytes 0.50.2 (bench/requirements.txt).
"""
import argparse
import os
import subprocess
import sys
import tempfile

import torch
import bitsandbytes as bnb
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig


def disable_bf16_repack(model):
    # DESIGN.md, traps: bitsandbytes 0.50 repacks 4-bit weights for a bf16 kernel on AVX512-BF16 CPUs
    # on the first no_grad forward; keep both models on the same f32 path.
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit) and hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--gguf", default=os.path.expanduser("~/.cache/swift-qlora/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    p.add_argument("--hf")
    p.add_argument("--qlora", default=".build/release/qlora")
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    work = tempfile.mkdtemp(prefix="qlora-roundtrip-")
    hf = args.hf
    if hf is None:
        hf = os.path.join(work, "f32")
        m = AutoModelForCausalLM.from_pretrained(os.path.dirname(args.gguf), gguf_file=os.path.basename(args.gguf),
                                                 dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained; write its f32 weights and config by hand.
        os.makedirs(hf, exist_ok=True)
        state = {k: v.detach().clone().contiguous() for k, v in m.state_dict().items()}
        if m.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, os.path.join(hf, "model.safetensors"), metadata={"format": "pt"})
        config = m.config.to_dict()
        config.pop("quantization_config", None)
        import json
        with open(os.path.join(hf, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        del m
    ours_dir = os.path.join(work, "qlora-nf4")
    subprocess.run([args.qlora, "quantize", hf, "--output", ours_dir, "--quiet"], check=True)

    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(hf, quantization_config=cfg, device_map="cpu", dtype=torch.float32)
    ours = AutoModelForCausalLM.from_pretrained(ours_dir, device_map="cpu", dtype=torch.float32)
    disable_bf16_repack(theirs)
    disable_bf16_repack(ours)
    n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in ours.modules())
    print(f"transformers loaded {ours_dir}: {n4} Linear4bit modules, quantization_config "
          f"{ours.config.quantization_config.bnb_4bit_quant_type} dq={ours.config.quantization_config.bnb_4bit_use_double_quant}")

    # Tensor-by-tensor: what transformers would save from its own quantization versus our file.
    theirs_dir = os.path.join(work, "transformers-nf4")
    theirs.save_pretrained(theirs_dir, safe_serialization=True)
    a, b = load_file(os.path.join(ours_dir, "model.safetensors")), load_file(os.path.join(theirs_dir, "model.safetensors"))
    common = sorted(set(a) & set(b))
    differ = [k for k in common if a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]
    print(f"tensors: ours {len(a)}, transformers {len(b)}, common {len(common)}, differing {len(differ)}"
          + (f" (first: {differ[:3]})" if differ else ""))
    only = sorted(set(a) ^ set(b))
    if only:
        print(f"  only in one file: {only[:5]}")

    ids = torch.tensor([[1, 504, 3458, 282, 2367, 314, 260, 1345, 30, 657, 1023, 17, 5, 99, 4000, 2]])
    with torch.no_grad():
        la = ours(ids).logits
        lb = theirs(ids).logits
    diff = (la - lb).abs().max().item()
    print(f"logits {tuple(la.shape)}: max |ours - transformers| = {diff:.3e}, max |logit| = {lb.abs().max().item():.2f}, "
          f"argmax equal: {bool(torch.equal(la.argmax(-1), lb.argmax(-1)))}")
    return 0 if diff == 0 and not differ else 1


if __name__ == "__main__":
    sys.exit(main())
