#!/usr/bin/env python3
"""DPO losses and LoRA gradients from TRL's own DPOTrainer, for Tests/QLoRATrainingTests/PreferenceTests.swift.

The tiny f32 Llama of make_training_fixtures.py (Resources/tiny-llama-train) with PEFT LoRA r=8 alpha=16 on all
seven projections, its non-zero weights those of lora_grads.safetensors ("untied."), so the policy differs from
the reference (the base with the adapter off, as TRL does for a PEFT model without ref_model). A word-level
tokenizer over the model's 320 ids ("t0" ... "t319", eos t2, pad t0) makes the token ids exact. Three preference
pairs, plain text (TRL then appends EOS to chosen and rejected), of different prompt and completion lengths, go
through TRL's tokenization and DataCollatorForPreference; then DPOTrainer.compute_loss and backward for each loss
type (sigmoid, hinge, ipo) with beta 0.1: the loss, each LoRA gradient, and the logged rewards.

Then ORPO (TRL's experimental ORPOTrainer, beta 0.1) on the same six rows: loss, gradients and metrics.

Writes Tests/QLoRATrainingTests/Resources/dpo_grads.safetensors.
"""
import os
import tempfile
import warnings

import peft
import torch
import transformers
import trl
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from trl import DPOConfig, DPOTrainer

warnings.filterwarnings("ignore")
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
RES = os.path.join(ROOT, "Tests", "QLoRATrainingTests", "Resources")
BETA = 0.1

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
vocab = {(SPECIAL[i] if i < 4 else f"w{i}"): i for i in range(320)}
tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")

def words(ids):
    return " ".join(f"w{i}" for i in ids)

# TRL appends EOS (id 2) to chosen and rejected.
pairs = [
    ([5, 9, 44, 100], [17, 23], [31]),
    ([7, 8], [200, 201, 202, 203], [64, 65, 66]),
    ([50, 51, 52, 53, 54, 55], [77], [88, 99, 111]),
]
data = Dataset.from_list([{"prompt": words(p), "chosen": " " + words(c), "rejected": " " + words(r)} for p, c, r in pairs])
lora = load_file(os.path.join(RES, "lora_grads.safetensors"))

tensors = {}
for loss_type in ["sigmoid", "hinge", "ipo"]:
    base = AutoModelForCausalLM.from_pretrained(os.path.join(RES, "tiny-llama-train"), dtype=torch.float32, attn_implementation="eager")
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    args = DPOConfig(output_dir=tempfile.mkdtemp(), beta=BETA, loss_type=[loss_type], per_device_train_batch_size=3, report_to="none",
                     use_cpu=True, bf16=False, gradient_checkpointing=False, dataset_num_proc=None)
    # A new adapter made by the trainer (peft_config): its reference is the base with the adapter off. (Given a
    # PeftModel, TRL keeps a copy of its adapter as the reference instead.) The adapter's weights are set after.
    trainer = DPOTrainer(model=base, args=args, train_dataset=data, processing_class=tokenizer, peft_config=config)
    model = trainer.model
    assert "ref" not in model.peft_config
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(lora["untied." + n.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")])
    examples = [trainer.train_dataset[i] for i in range(len(pairs))]
    batch = trainer.data_collator(examples)
    model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    prefix = loss_type + "."
    tensors[prefix + "loss"] = loss.detach().reshape(1).float()
    for n, p in trainer.model.named_parameters():
        if "lora_" in n and p.requires_grad:
            tensors[prefix + "grad." + n.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")] = p.grad.detach().float().contiguous()
    m = trainer._metrics["train"]
    for key in ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"]:
        tensors[prefix + key.replace("/", "_")] = torch.tensor([m[key][-1]], dtype=torch.float32)
    if loss_type == "sigmoid":
        tensors["input_ids"] = batch["input_ids"].to(torch.int64)
        tensors["completion_mask"] = batch["completion_mask"].to(torch.int64)
        tensors["attention_mask"] = batch["attention_mask"].to(torch.int64)
    print(loss_type, float(loss), {k: m[k][-1] for k in ["rewards/chosen", "rewards/rejected", "rewards/margins"]})

# ORPO (TRL's experimental ORPOTrainer, beta 0.1) on the same six rows: its get_batch_loss_metrics on a batch made
# of them (labels: the completion tokens; its NLL runs over every attended token of the chosen rows).
from trl.experimental.orpo import ORPOConfig, ORPOTrainer  # noqa: E402

ids, cmask, amask = tensors["input_ids"], tensors["completion_mask"], tensors["attention_mask"]
labels = torch.where(cmask == 1, ids, torch.full_like(ids, -100))
P = ids.shape[0] // 2
base = AutoModelForCausalLM.from_pretrained(os.path.join(RES, "tiny-llama-train"), dtype=torch.float32, attn_implementation="eager")
config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
oargs = ORPOConfig(output_dir=tempfile.mkdtemp(), beta=BETA, per_device_train_batch_size=3, report_to="none", use_cpu=True, bf16=False,
                   gradient_checkpointing=False, max_length=64)
orpo = ORPOTrainer(model=base, args=oargs, train_dataset=data, processing_class=tokenizer, peft_config=config)
model = orpo.model
with torch.no_grad():
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.copy_(lora["untied." + n.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")])
batch = {"chosen_input_ids": ids[:P], "chosen_attention_mask": amask[:P], "chosen_labels": labels[:P],
         "rejected_input_ids": ids[P:], "rejected_attention_mask": amask[P:], "rejected_labels": labels[P:]}
model.train()
loss, metrics = orpo.get_batch_loss_metrics(model, batch)
loss.backward()
tensors["orpo.loss"] = loss.detach().reshape(1).float()
for n, p in model.named_parameters():
    if "lora_" in n and p.requires_grad:
        tensors["orpo.grad." + n.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")] = p.grad.detach().float().contiguous()
for key in ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected", "nll_loss"]:
    tensors["orpo." + key.replace("/", "_")] = torch.tensor([float(metrics[key])], dtype=torch.float32)
print("orpo", float(loss), {k: float(metrics[k]) for k in ["nll_loss", "rewards/margins", "log_odds_ratio"]})

meta = {"generator": "scripts/reference/make_preference_fixtures.py", "trl": trl.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "torch": torch.__version__, "beta": str(BETA)}
save_file(tensors, os.path.join(RES, "dpo_grads.safetensors"), metadata=meta)
