"""Checks (by hand, not in CI) that an adapter written by swift-qlora loads in PEFT and gives our logits:
Tests/QLoRATrainingTests/Resources/ours-lora/ (adapter_config.json, adapter_model.safetensors, and our
logits in our_logits.safetensors) on the f32 base Tests/QLoRAModelTests/Resources/tiny-llama-gqa.
Pinned: torch 2.15.0, transformers 5.24.0, peft 0.21.2.
"""
import os
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

ROOT = os.path.join(os.path.dirname(__file__), "../..")
BASE = os.path.join(ROOT, "Tests/QLoRAModelTests/Resources/tiny-llama-gqa")
ADAPTER = os.path.join(ROOT, "Tests/QLoRATrainingTests/Resources/ours-lora")


def main():
    torch.set_num_threads(1)
    base = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32, attn_implementation="eager")
    model = PeftModel.from_pretrained(base, ADAPTER)
    model.eval()
    ours = load_file(os.path.join(ADAPTER, "our_logits.safetensors"))
    with torch.no_grad():
        theirs = model(ours["input_ids"]).logits
    diff = (theirs - ours["logits"]).abs().max().item()
    scale = theirs.abs().max().item()
    print(f"PEFT loaded {ADAPTER}: max |PEFT - ours| = {diff:.3e} (max |logit| {scale:.2f}, relative {diff / scale:.2e})")
    return 0 if diff / scale < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
