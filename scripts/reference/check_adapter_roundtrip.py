"""Checks (by hand, not in CI) that an adapter written by swift-qlora loads in PEFT and gives our logits:
Tests/QLoRATrainingTests/Resources/ours-lora/ (adapter_config.json, adapter_model.safetensors, and our
logits in our_logits.safetensors) on the f32 base Tests/QLoRAModelTests/Resources/tiny-llama-gqa.
With `--dora DIR`: a DoRA adapter that DoRATests.writeAndRead wrote (run it with QLORA_KEEP_TEST_FILES=1; DIR is
/tmp/qlora-test-ours-dora-*) loads in PEFT on tiny-llama-train and gives the logits of dora_grads.safetensors
(PEFT's own, for the same weights).
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


def check_dora(folder):
    res = os.path.join(ROOT, "Tests/QLoRATrainingTests/Resources")
    base = AutoModelForCausalLM.from_pretrained(os.path.join(res, "tiny-llama-train"), dtype=torch.float32, attn_implementation="eager")
    model = PeftModel.from_pretrained(base, folder)
    model.eval()
    fixture = load_file(os.path.join(res, "dora_grads.safetensors"))
    with torch.no_grad():
        theirs = model(fixture["input_ids"]).logits
    diff = (theirs - fixture["dora.logits"]).abs().max().item()
    print(f"PEFT loaded {folder} (use_dora {model.peft_config['default'].use_dora}): max |PEFT - fixture| = {diff:.3e}")
    return 0 if model.peft_config["default"].use_dora and diff < 1e-4 else 1


def main():
    torch.set_num_threads(1)
    if len(sys.argv) == 3 and sys.argv[1] == "--dora":
        return check_dora(sys.argv[2])
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
