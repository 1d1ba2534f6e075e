"""Side-by-side QLoRA training step on the default model (SmolLM2-135M-Instruct from its GGUF, NF4 + double
quantization): transformers + peft + bitsandbytes (paged AdamW 32-bit, gradient checkpointing, compute
dtype f32 and bf16) versus `qlora-bench train-step` (same shapes, compute f32 and bf16). Batch 4 x 512 tokens, LoRA r 16 on every
linear layer. Tokens/s of the best of the steps after a warm-up, and the peak RSS of each process.
The reference loads the GGUF's weights from an f32 folder written beforehand (bench/reference_stack.py), so
its peak RSS is that of loading a checkpoint and training, as ours is.
Usage: python bench/train_bench.py QLORA_BENCH_BINARY MODEL.gguf [--dora]
With --dora both sides train DoRA instead (PEFT's use_dora; our --use-dora), dropout 0.05 on both;
results go to bench/out/train_results_dora.json.
"""
import json
import os
import resource
import subprocess
import sys
import time

from reference_stack import dequantized_folder, load_nf4

B, T, R, STEPS = 4, 512, 16, 3


def reference(folder, compute, threads, dora=False):
    import torch
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    torch.set_num_threads(threads)
    dtype = torch.bfloat16 if compute == "bf16" else torch.float32
    model = load_nf4(folder, dtype)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=R, lora_alpha=2 * R, lora_dropout=0.05, task_type="CAUSAL_LM", use_dora=dora,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    model.train()
    opt = bnb.optim.PagedAdamW32bit([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (B, T), generator=g)
    times = []
    for _ in range(STEPS + 1):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=compute == "bf16"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
    return {"tokens_per_second": B * T / min(times[1:]), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main():
    if sys.argv[1] == "--worker":
        print(json.dumps(reference(sys.argv[2], sys.argv[3], int(sys.argv[4]), dora=len(sys.argv) > 5 and sys.argv[5] == "--dora")))
        return
    binary, model_path = sys.argv[1], sys.argv[2]
    dora = "--dora" in sys.argv[3:]
    threads = int(os.environ.get("QLORA_THREADS", os.cpu_count()))
    rows = []
    folder = dequantized_folder(model_path)
    for compute in ["f32", "bf16"]:
        out = subprocess.run([sys.executable, __file__, "--worker", folder, compute, str(threads)] + (["--dora"] if dora else []),
                             capture_output=True, text=True, check=True)
        rows.append((f"transformers + peft + bitsandbytes{' (use_dora)' if dora else ''}, compute {compute}", json.loads(out.stdout.strip().splitlines()[-1])))
    for compute in ["f32", "bf16"]:
        p = subprocess.run(["/usr/bin/time", "-f", "%M", binary, "train-step", model_path, "--batch", str(B), "--seq", str(T),
                            "--rank", str(R), "--steps", str(STEPS), "--compute-dtype", compute] + (["--use-dora"] if dora else []),
                           capture_output=True, text=True, check=True)
        ours = json.loads(p.stdout)
        rows.append((f"swift-qlora{' (--use-dora)' if dora else ''}, compute {ours['compute_dtype']}", {"tokens_per_second": ours["tokens_per_second"],
                                                                     "peak_rss_mb": int(p.stderr.strip().splitlines()[-1]) / 1024}))
    print(f"QLoRA training step, SmolLM2-135M NF4 + DQ, batch {B} x {T}, {'DoRA' if dora else 'LoRA'} r {R} on all linear layers, gradient checkpointing, {threads} threads")
    print()
    print("| system | tokens/s | peak RSS MB |")
    print("|---|---:|---:|")
    for name, r in rows:
        print(f"| {name} | {r['tokens_per_second']:.1f} | {r['peak_rss_mb']:.0f} |")
    json.dump(rows, open("bench/out/train_results_dora.json" if dora else "bench/out/train_results.json", "w"), indent=2)


if __name__ == "__main__":
    main()
