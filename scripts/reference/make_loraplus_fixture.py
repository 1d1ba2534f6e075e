#!/usr/bin/env python3
"""LoRA+ updates from PEFT's own create_loraplus_optimizer, for Tests/QLoRATrainingTests/OptimizerTests.swift.

The tiny f32 Llama (Resources/tiny-llama-train) with LoRA r=8 alpha=16 on all seven projections, its weights those
of lora_grads.safetensors ("untied."); create_loraplus_optimizer(optimizer_cls=torch.optim.AdamW, lr=1e-3,
loraplus_lr_ratio=16, loraplus_weight_decay=0.01); three steps, the gradient of step t drawn with seed 40 + t
(normal, std 0.01) for every LoRA tensor. Saves the gradients and the parameters after each step.

Writes Tests/QLoRATrainingTests/Resources/loraplus.safetensors.
"""
import os

import peft
import torch
from peft import LoraConfig, get_peft_model
from peft.optimizers import create_loraplus_optimizer
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
RES = os.path.join(ROOT, "Tests", "QLoRATrainingTests", "Resources")
LR, RATIO, DECAY, STEPS = 1e-3, 16.0, 0.01, 3

base = AutoModelForCausalLM.from_pretrained(os.path.join(RES, "tiny-llama-train"), dtype=torch.float32)
model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
weights = load_file(os.path.join(RES, "lora_grads.safetensors"))


def key(n):
    return n.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")


params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
with torch.no_grad():
    for n, p in params:
        p.copy_(weights["untied." + key(n)])
opt = create_loraplus_optimizer(model=model, optimizer_cls=torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO, loraplus_weight_decay=DECAY)
groups = {g["lr"]: len(g["params"]) for g in opt.param_groups}
print("groups (lr: tensors):", groups)
out = {}
for t in range(1, STEPS + 1):
    g = torch.Generator().manual_seed(40 + t)
    for n, p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=torch.float32) * 0.01
        out[f"step{t}.grad." + key(n)] = p.grad.clone()
    opt.step()
    for n, p in params:
        out[f"step{t}." + key(n)] = p.detach().clone()
save_file(out, os.path.join(RES, "loraplus.safetensors"), metadata={"generator": "scripts/reference/make_loraplus_fixture.py", "peft": peft.__version__,
                                                                    "torch": torch.__version__, "lr": str(LR), "ratio": str(RATIO), "weight_decay": str(DECAY)})
