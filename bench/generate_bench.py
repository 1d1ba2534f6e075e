"""Side-by-side inference benchmark on the default model (SmolLM2-135M-Instruct, GGUF Q4_1 read by both):
transformers 5.24 (f32, and NF4 + double quantization through bitsandbytes 0.50.2) versus swift-qlora
(f32 and NF4 + DQ). Measured in one run, same machine, same thread count:
  prefill: a 512-token prompt (tokens/s), decode: 128 greedy tokens past EOS (tokens/s), peak RSS.
Each configuration runs in its own process so peak RSS is its own. transformers' NF4 row loads the GGUF's
weights from an f32 folder written beforehand (bench/reference_stack.py): it cannot quantize a GGUF as it loads.
Usage: python bench/generate_bench.py QLORA_BINARY MODEL.gguf TEXT_FILE
"""
import json
import os
import resource
import subprocess
import sys
import time

from reference_stack import dequantized_folder, load_nf4

PROMPT_TOKENS = 512
NEW_TOKENS = 128


def reference_worker(quant, model_path, text_file, threads, nf4_folder):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(threads)
    folder, name = os.path.dirname(model_path), os.path.basename(model_path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    ids = tok.encode(open(text_file, encoding="utf-8").read())[:PROMPT_TOKENS]
    ids = torch.tensor([ids])
    if quant == "nf4":
        model = load_nf4(nf4_folder, torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        model(ids[:, :8])  # warm-up
        t = time.perf_counter()
        model(ids)
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        total = time.perf_counter() - t
    new = out.size(1) - ids.size(1)
    decode = (total - prefill) / max(new - 1, 1)
    return {"prefill_tokens_per_second": ids.size(1) / prefill, "decode_tokens_per_second": 1 / decode,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def ours(binary, quant, model_path, text_file, threads):
    from transformers import AutoTokenizer
    folder, name = os.path.dirname(model_path), os.path.basename(model_path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    prompt = tok.decode(tok.encode(open(text_file, encoding="utf-8").read())[:PROMPT_TOKENS])
    cmd = ["/usr/bin/time", "-f", "%M", binary, "generate", "-m", model_path, "--quant-type", quant, "-p", prompt,
           "--temperature", "0", "--max-tokens", str(NEW_TOKENS), "--ignore-eos", "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "QLORA_THREADS": str(threads)}, check=True)
    r = json.loads(p.stdout)
    rss_kb = int(p.stderr.strip().splitlines()[-1])
    return {"prefill_tokens_per_second": r["prompt_tokens"] / r["prefill_seconds"],
            "decode_tokens_per_second": r["tokens_per_second"], "peak_rss_mb": rss_kb / 1024,
            "prompt_tokens": r["prompt_tokens"]}


def main():
    if sys.argv[1] == "--worker":
        print(json.dumps(reference_worker(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6])))
        return
    binary, model_path, text_file = sys.argv[1:4]
    threads = int(os.environ.get("QLORA_THREADS", os.cpu_count()))
    rows = []
    nf4_folder = dequantized_folder(model_path)
    for quant, label in [("none", "f32"), ("nf4", "NF4 + DQ")]:
        ref = json.loads(subprocess.run([sys.executable, __file__, "--worker", "nf4" if quant == "nf4" else "f32", model_path,
                                         text_file, str(threads), nf4_folder], capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
        mine = ours(binary, quant, model_path, text_file, threads)
        rows.append((label, ref, mine))
    import torch, transformers, bitsandbytes
    print(f"SmolLM2-135M-Instruct (GGUF Q4_1), {threads} threads; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"bitsandbytes {bitsandbytes.__version__}; prompt {PROMPT_TOKENS} tokens, {NEW_TOKENS} greedy tokens")
    print()
    print("| weights | metric | transformers | swift-qlora | ratio |")
    print("|---|---|---:|---:|---:|")
    for label, ref, mine in rows:
        for key, name, better in [("prefill_tokens_per_second", "prefill tokens/s", "higher"),
                                  ("decode_tokens_per_second", "decode tokens/s", "higher"),
                                  ("peak_rss_mb", "peak RSS MB", "lower")]:
            ratio = mine[key] / ref[key] if better == "higher" else ref[key] / mine[key]
            print(f"| {label} | {name} | {ref[key]:.1f} | {mine[key]:.1f} | {ratio:.1f}x |")
    os.makedirs("bench/out", exist_ok=True)
    json.dump([{"weights": l, "transformers": r, "swift_qlora": m} for l, r, m in rows], open("bench/out/generate_results.json", "w"), indent=2)


if __name__ == "__main__":
    main()
