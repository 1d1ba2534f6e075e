"""QLoRA's claim on our model, run by the reference stack: transformers + peft + bitsandbytes finetune
SmolLM2-135M-Instruct (from its GGUF, dequantized to f32) once on an NF4 + double-quantized base and once
on the f32 base, on exactly the batches `qlora train` trains on in bench/nf4_vs_f32.sh (taken from
`qlora-bench plan`), with the same LoRA, optimizer, clipping and bf16 compute. Prints the reference's two
loss curves beside ours (read from the folders bench/nf4_vs_f32.sh wrote), so the NF4 / f32 gap of the
two systems can be compared.

Usage: python bench/nf4_vs_f32_ref.py QLORA_BENCH MODEL.gguf [STEPS] [OURS_FOLDER] [OUT_FOLDER]
LORA_R, LORA_ALPHA, LORA_DROPOUT, DATA and SEED as in bench/nf4_vs_f32.sh. About 15 minutes on 2 cores.
"""
import json
import os
import subprocess
import sys
import time

from reference_stack import dequantized_folder, load_nf4

SEQ, VAL_SPLIT, BATCH, LR, MAX_NORM, EVAL_EVERY, WINDOW = 128, 0.1, 2, 2e-4, 0.3, 50, 20
SEED = int(os.environ.get("SEED", 1))


def batch(examples, pad):
    import torch
    T = max(len(e["tokens"]) for e in examples)
    ids = [e["tokens"] + [pad] * (T - len(e["tokens"])) for e in examples]
    labels = [e["labels"] + [-100] * (T - len(e["labels"])) for e in examples]
    return torch.tensor(ids), torch.tensor(labels)


def train(folder, base, plan, r, alpha, dropout, out):
    import torch
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(SEED)
    if base == "nf4":
        model = load_nf4(folder, torch.bfloat16)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = bnb.optim.PagedAdamW32bit(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    pad, train_set, val_set = plan["pad_token"], plan["train"], plan["validation"]

    def validation_loss():
        model.eval()
        total, count = 0.0, 0
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            for s in range(0, len(val_set), BATCH):
                ids, labels = batch(val_set[s:s + BATCH], pad)
                n = int((labels[:, 1:] != -100).sum())
                if n:
                    total += float(model(input_ids=ids, labels=labels).loss) * n
                    count += n
        model.train()
        return total / count

    rows = [{"step": 0, "val_loss": validation_loss()}]
    model.train()
    start = time.time()
    for step, micro in enumerate(plan["steps"], start=1):
        batches = [batch([train_set[i] for i in m], pad) for m in micro]
        counts = [int((lab[:, 1:] != -100).sum()) for _, lab in batches]
        loss_value = 0.0
        for (ids, labels), n in zip(batches, counts):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=labels).loss * (n / sum(counts))
            loss.backward()
            loss_value += float(loss)
        torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
        opt.step()
        opt.zero_grad()
        row = {"step": step, "loss": loss_value}
        if step % EVAL_EVERY == 0:
            row["val_loss"] = validation_loss()
        rows.append(row)
        if step % 20 == 0:
            print(f"reference {base}: step {step}, {time.time() - start:.0f} s", file=sys.stderr)
    with open(os.path.join(out, f"reference-{base}.jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return rows


def curves(rows):
    return {r["step"]: r["loss"] for r in rows if "loss" in r}, {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    bench_bin, model_path = sys.argv[1], sys.argv[2]
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 200
    ours = sys.argv[4] if len(sys.argv) > 4 else "bench/out/nf4-vs-f32"
    out = sys.argv[5] if len(sys.argv) > 5 else "bench/out/nf4-vs-f32-ref"
    r = int(os.environ.get("LORA_R", 16))
    alpha = float(os.environ.get("LORA_ALPHA", 32))
    dropout = float(os.environ.get("LORA_DROPOUT", 0.05))
    os.makedirs(out, exist_ok=True)
    import torch
    torch.set_num_threads(2)
    data = os.environ.get("DATA", "demo/quill.jsonl")
    plan = json.loads(subprocess.run([bench_bin, "plan", model_path, data, "--max-seq-len", str(SEQ),
                                      "--val-split", str(VAL_SPLIT), "--batch", str(BATCH), "--steps", str(steps),
                                      "--seed", str(SEED)], check=True, capture_output=True, text=True).stdout)
    folder = dequantized_folder(model_path)
    runs = {}
    for base in ("nf4", "f32"):
        runs[f"reference {base}"] = curves(train(folder, base, plan, r, alpha, dropout, out))
    for base, qt in (("nf4", "nf4"), ("f32", "none")):
        path = os.path.join(ours, qt, "metrics.jsonl")
        if os.path.exists(path):
            runs[f"ours {base}"] = curves([json.loads(l) for l in open(path)])
    names = list(runs)
    print(f"training loss, mean over windows of {WINDOW} steps; the batches are the same in every run")
    systems = sorted({n.split()[0] for n in names})
    header = "| steps | " + " | ".join(names) + " | " + " | ".join(f"{s} NF4 / f32" for s in systems) + " |"
    print(header)
    print("|---|" + "---:|" * (len(names) + len(systems)))
    for end in range(WINDOW, steps + 1, WINDOW):
        means = {n: sum(runs[n][0][s] for s in range(end - WINDOW + 1, end + 1)) / WINDOW for n in names}
        ratios = [means[f"{s} nf4"] / means[f"{s} f32"] for s in systems]
        print(f"| {end - WINDOW + 1}-{end} | " + " | ".join(f"{means[n]:.4f}" for n in names) + " | "
              + " | ".join(f"{x:.4f}" for x in ratios) + " |")
    print()
    print("validation loss")
    print(header.replace("| steps |", "| step |"))
    print("|---|" + "---:|" * (len(names) + len(systems)))
    for s in sorted(runs[names[0]][1]):
        if all(s in runs[n][1] for n in names):
            ratios = [runs[f"{x} nf4"][1][s] / runs[f"{x} f32"][1][s] for x in systems]
            print(f"| {s} | " + " | ".join(f"{runs[n][1][s]:.4f}" for n in names) + " | "
                  + " | ".join(f"{x:.4f}" for x in ratios) + " |")


if __name__ == "__main__":
    main()
