"""A DPO step side by side: TRL's DPOTrainer (transformers + peft + bitsandbytes NF4 + double quantization, bf16
compute, gradient checkpointing) against `qlora train --method dpo`, on the default model, the same pairs (the DPO
demo's, bench/dpo_demo.sh), the same shapes: 2 pairs a micro-batch, 4 micro-batches a step, LoRA r 16 on every
linear layer, sequences cut at 384 tokens. TRL runs twice: as configured by default (the reference's forward in every
step) and with precompute_ref_log_probs=True (the reference scored once before training, as we always do).
Pairs a second of the steps after the first; each in its own process, one after the other.

Usage: python bench/dpo_bench.py QLORA_BINARY MODEL.gguf PAIRS.jsonl [STEPS]
"""
import json
import os
import subprocess
import sys
import tempfile
import time

from reference_stack import dequantized_folder, load_nf4

PAIRS_PER_MICRO, ACCUM, R, MAX_LEN = 2, 4, 16, 384


def trl_worker(folder, gguf, pairs_path, steps, precompute, threads):
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer
    torch.set_num_threads(threads)
    model = load_nf4(folder, torch.bfloat16)
    # The tokenizer and chat template transformers reads from the GGUF (the f32 folder holds weights only).
    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    data = Dataset.from_list([json.loads(l) for l in open(pairs_path) if l.strip()])
    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    args = DPOConfig(output_dir=tempfile.mkdtemp(), beta=0.1, per_device_train_batch_size=PAIRS_PER_MICRO, gradient_accumulation_steps=ACCUM,
                     max_steps=steps, learning_rate=1e-4, max_length=MAX_LEN, bf16=True, use_cpu=True, gradient_checkpointing=True,
                     gradient_checkpointing_kwargs={"use_reentrant": False}, precompute_ref_log_probs=precompute, report_to="none",
                     logging_steps=1, save_strategy="no", optim="paged_adamw_32bit", dataloader_num_workers=0)
    lora = LoraConfig(r=R, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=lora, callbacks=[Clock()])
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    later = times[1:]
    return {"pairs_per_second": PAIRS_PER_MICRO * ACCUM / (sum(later) / len(later)), "step_seconds": sorted(later)[len(later) // 2],
            "train_seconds_with_reference_pass": total}


def main():
    if sys.argv[1] == "--worker":
        print(json.dumps(trl_worker(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6] == "1", int(sys.argv[7]))))
        return
    binary, model_path, pairs = sys.argv[1], sys.argv[2], sys.argv[3]
    steps = int(sys.argv[4]) if len(sys.argv) > 4 else 6
    threads = int(os.environ.get("QLORA_THREADS", os.cpu_count()))
    folder = dequantized_folder(model_path)
    rows = []
    for precompute in ["0", "1"]:
        out = subprocess.run([sys.executable, __file__, "--worker", folder, model_path, pairs, str(steps), precompute, str(threads)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(out.stderr[-3000:])
        label = "TRL DPOTrainer" + (", precompute_ref_log_probs" if precompute == "1" else " (reference forward each step)")
        rows.append((label, json.loads(out.stdout.strip().splitlines()[-1])))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        subprocess.run([binary, "train", "--method", "dpo", "--model", model_path, "--data", pairs, "--output", tmp + "/o", "--lora-r", str(R),
                        "--batch-size", str(PAIRS_PER_MICRO), "--grad-accum", str(ACCUM), "--max-steps", str(steps), "--max-seq-len", str(MAX_LEN),
                        "--val-split", "0", "--lora-dropout", "0", "--learning-rate", "1e-4", "--json"], check=True, capture_output=True)
        total = time.perf_counter() - t0
        lines = [json.loads(l) for l in open(tmp + "/o/metrics.jsonl") if l.strip()]
        later = [l["step_seconds"] for l in lines if "step_seconds" in l][1:]
        rows.append(("qlora train --method dpo", {"pairs_per_second": PAIRS_PER_MICRO * ACCUM / (sum(later) / len(later)),
                                                  "step_seconds": sorted(later)[len(later) // 2], "train_seconds_with_reference_pass": total}))
    print(f"{'system':<62} {'pairs/s':>8} {'median step s':>14} {'whole run s':>12}")
    for label, r in rows:
        print(f"{label:<62} {r['pairs_per_second']:>8.2f} {r['step_seconds']:>14.2f} {r['train_seconds_with_reference_pass']:>12.1f}")
    base = rows[0][1]["pairs_per_second"], rows[1][1]["pairs_per_second"]
    ours = rows[2][1]["pairs_per_second"]
    print(f"ours / TRL default: {ours / base[0]:.2f}x; ours / TRL with precomputed reference: {ours / base[1]:.2f}x")
    os.makedirs("bench/results", exist_ok=True)
    json.dump({"steps": steps, "threads": threads, "rows": rows}, open("bench/results/dpo_bench.json", "w"), indent=1)


if __name__ == "__main__":
    main()
