#!/usr/bin/env python3
"""KTO losses and LoRA gradients from TRL's own KTOTrainer, for the Swift KTO tests.

The tiny f32 Llama of make_training_fixtures.py (Resources/tiny-llama-train) with PEFT LoRA r=8 alpha=16 on all
seven projections, its non-zero weights those of lora_grads.safetensors ("untied."), so the policy differs from
the reference (the base with the adapter off, as TRL does for a PEFT model made from peft_config). The word-level
tokenizer of make_preference_fixtures.py ("w4" ... "w319", <pad>=0 <s>=1 </s>=2 <unk>=3; no BOS is added) makes
the token ids exact.

Four unpaired rows in TRL's standard layout (prompt / completion / label), of different prompt and completion
lengths, labels True, False, False, True (so the chosen/rejected split is not a prefix split). TRL appends the EOS
text "</s>" to each completion, tokenizes prompt and prompt+completion, builds the KL rows by rotating the
completions by +1 within each batch of per_device_train_batch_size (4: one batch), and collates them with
DataCollatorForUnpairedPreference. Then KTOTrainer.compute_loss and backward, for the cases:

  kto                loss_type "kto", beta 0.1, desirable_weight 1.0, undesirable_weight 1.0 (the defaults)
  kto_weighted       loss_type "kto", beta 0.1, desirable_weight 1.33, undesirable_weight 0.5
  apo_zero_unpaired  loss_type "apo_zero_unpaired", beta 0.1 (no KL rows, no KL term)
  kto_clamped        as kto, on four other rows (CLAMPED) whose raw KL estimate is negative: TRL clamps it to 0

Saved per case ("<case>."): loss, every LoRA gradient ("<case>.grad.<peft name without .default>"), TRL's logged
metrics ("<case>.metric_<name with / -> _>"), and per-row sums of the completion log-probabilities of the policy and
the reference ("<case>.policy_logps", "<case>.ref_logps", and for the KL rows "<case>.policy_KL_logps",
"<case>.ref_KL_logps"), recomputed with the same fused LM head TRL uses. The batch TRL fed the model (int64):
input_ids, attention_mask, completion_mask, KL_input_ids, KL_attention_mask, KL_completion_mask, label (1 = desirable);
the same keys prefixed "kto_clamped." for that case's batch (the other cases share the unprefixed one; apo's batch
has no KL rows but the same main rows).
The log-probability of token t counts when completion_mask[t] == 1 (t >= 1; the label of position t-1).

Writes Tests/QLoRATrainingTests/Resources/kto_grads.safetensors.
"""
import os
import tempfile
import warnings

import peft
import torch
import torch.nn.functional as F
import transformers
import trl
from datasets import Dataset
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from trl import KTOConfig, KTOTrainer

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


# (prompt, completion, label). TRL appends "</s>" (id 2) to each completion. The ids were picked (a seeded random
# search) so that the batch KL estimate is clearly positive (about 2.0: it shifts every row's loss) and the log-ratios
# have both signs. CLAMPED: the first rows tried, whose raw KL estimate is negative, so TRL clamps it to 0.
ROWS = [
    ([231, 197, 310], [291, 32], True),
    ([22, 170, 17, 10, 239], [139], False),
    ([132, 112], [57, 74, 33, 9], False),
    ([94, 242, 56, 208], [135, 220, 272], True),
]
CLAMPED = [
    ([5, 9, 44], [17, 23], True),
    ([7, 8, 300, 12, 13], [200], False),
    ([50, 51], [88, 99, 111, 250], False),
    ([60, 61, 62, 63], [31, 32, 33], True),
]


def dataset(rows):
    return Dataset.from_list([{"prompt": words(p), "completion": " " + words(c), "label": lab} for p, c, lab in rows])


lora = load_file(os.path.join(RES, "lora_grads.safetensors"))

# (case, rows, config). The batch tensors of ROWS are saved once without a prefix, those of CLAMPED as "kto_clamped.*".
CASES = [
    ("kto", ROWS, dict(loss_type="kto", desirable_weight=1.0, undesirable_weight=1.0)),
    ("kto_weighted", ROWS, dict(loss_type="kto", desirable_weight=1.33, undesirable_weight=0.5)),
    ("apo_zero_unpaired", ROWS, dict(loss_type="apo_zero_unpaired", desirable_weight=1.0, undesirable_weight=1.0)),
    ("kto_clamped", CLAMPED, dict(loss_type="kto", desirable_weight=1.0, undesirable_weight=1.0)),
]
BATCH_KEYS = ["input_ids", "attention_mask", "completion_mask", "KL_input_ids", "KL_attention_mask", "KL_completion_mask", "label"]


def short(name):
    return name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")


def seq_logps(model, ids, amask, cmask):
    labels = ids.masked_fill(cmask == 0, -100)
    out = model(input_ids=ids, attention_mask=amask, labels=labels, fused_lm_head=True, use_cache=False)
    return out.log_probs[:, -(ids.size(1) - 1):].sum(-1)


tensors = {}
batch0 = None
for case, rows, kw in CASES:
    base = AutoModelForCausalLM.from_pretrained(os.path.join(RES, "tiny-llama-train"), dtype=torch.float32, attn_implementation="eager")
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    args = KTOConfig(output_dir=tempfile.mkdtemp(), beta=BETA, per_device_train_batch_size=len(rows), report_to="none",
                     use_cpu=True, bf16=False, gradient_checkpointing=False, dataset_num_proc=None, **kw)
    trainer = KTOTrainer(model=base, args=args, train_dataset=dataset(rows), processing_class=tokenizer, peft_config=config)
    model = trainer.model
    assert "ref" not in model.peft_config and trainer.ref_model is None
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(lora["untied." + short(n)])
    examples = [trainer.train_dataset[i] for i in range(len(rows))]
    batch = trainer.data_collator(examples)
    model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    prefix = case + "."
    tensors[prefix + "loss"] = loss.detach().reshape(1).float()
    for n, p in model.named_parameters():
        if "lora_" in n and p.requires_grad:
            tensors[prefix + "grad." + short(n)] = p.grad.detach().float().contiguous()
    m = trainer._metrics["train"]
    for key, vals in m.items():
        tensors[prefix + "metric_" + key.replace("/", "_")] = torch.tensor([float(vals[-1])], dtype=torch.float32)

    # Per-row log-probability sums (policy, and reference = adapter off), and a check of the loss from them.
    with torch.no_grad():
        pol = seq_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        with model.disable_adapter():
            ref = seq_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        tensors[prefix + "policy_logps"] = pol.float()
        tensors[prefix + "ref_logps"] = ref.float()
        lab = batch["label"].bool()
        if "KL_input_ids" in batch:
            kpol = seq_logps(model, batch["KL_input_ids"], batch["KL_attention_mask"], batch["KL_completion_mask"])
            with model.disable_adapter():
                kref = seq_logps(model, batch["KL_input_ids"], batch["KL_attention_mask"], batch["KL_completion_mask"])
            tensors[prefix + "policy_KL_logps"] = kpol.float()
            tensors[prefix + "ref_KL_logps"] = kref.float()
            kl = (kpol - kref).mean().clamp(min=0)
            ch = 1 - F.sigmoid(BETA * ((pol - ref)[lab] - kl))
            rj = 1 - F.sigmoid(BETA * (kl - (pol - ref)[~lab]))
        else:
            kl = torch.tensor(0.0)
            ch = 1 - F.sigmoid(BETA * (pol - ref)[lab])
            rj = F.sigmoid(BETA * (pol - ref)[~lab])
        mine = torch.cat([kw["desirable_weight"] * ch, kw["undesirable_weight"] * rj]).mean()
        assert torch.allclose(mine, loss.detach(), rtol=1e-5, atol=1e-7), (case, float(mine), float(loss))
        assert abs(float(kl) - m["kl"][-1]) < 1e-5, (case, float(kl), m["kl"][-1])

    if case == "kto_clamped":
        assert m["kl"][-1] == 0.0 and float((kpol - kref).mean()) < 0, case
        for k in BATCH_KEYS:
            tensors[prefix + k] = batch[k].to(torch.int64).contiguous()
    elif batch0 is None:
        batch0 = batch
        assert m["kl"][-1] > 0.5, m["kl"][-1]
        for k in BATCH_KEYS:
            tensors[k] = batch[k].to(torch.int64).contiguous()
    else:  # same tokenization and collation in every case of ROWS (apo has no KL rows)
        for k in ["input_ids", "attention_mask", "completion_mask", "label"]:
            assert torch.equal(batch[k], batch0[k]), (case, k)
    print(case, float(loss), {k: round(float(v[-1]), 6) for k, v in m.items()})

meta = {"generator": "scripts/reference/make_kto_fixture.py", "trl": trl.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "torch": torch.__version__, "beta": str(BETA),
        "cases": ",".join(f"{c}:{kw['loss_type']}:dw={kw['desirable_weight']}:uw={kw['undesirable_weight']}" for c, _, kw in CASES)}
save_file(tensors, os.path.join(RES, "kto_grads.safetensors"), metadata=meta)
for k in BATCH_KEYS:
    print(k, tensors[k].tolist())
