#!/usr/bin/env python3
"""Checks `qlora merge`'s outputs in the tools users run them with (not part of CI).

1. transformers loads the merged f32 folder; its logits are compared with ours for the unmerged model
   (the base in NF4 + the adapter, as qlora generate runs it): max |diff| / max |ours|.
2. llama.cpp (llama-simple, llama-perplexity from bench/llama_cpp_setup.sh) loads the merged GGUF in F16,
   Q8_0 and Q4_0: greedy continuations of 4 prompts against `qlora generate --temperature 0` on the unmerged
   model, and perplexity by llama-perplexity's own protocol (chunks of --ctx tokens, the second half of each
   scored) against ours by the same protocol on the unmerged model.

Usage: verify_merge.py --adapter DIR [--model BASE.gguf] [--out DIR] [--llama-bin DIR] [--text FILE]
Needs torch, transformers, safetensors (bench/requirements.txt). Prints one JSON object.
"""
import argparse, json, math, os, re, subprocess, sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CACHE = os.environ.get("QLORA_CACHE", os.path.expanduser("~/.cache/swift-qlora"))
PROMPTS = ["The capital of France is", "Here is a short poem about the sea:\n", "def fibonacci(n):",
           "The three primary colors are"]


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    return r.stdout


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--adapter", required=True)
    p.add_argument("--model", default=os.path.join(CACHE, "models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    p.add_argument("--out", default=os.path.join(ROOT, "bench/out/merge"))
    p.add_argument("--llama-bin", default=None)
    p.add_argument("--text", default=os.path.join(ROOT, "../shared/data/text/war_and_peace.txt"))
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--tokens", type=int, default=24)
    a = p.parse_args()
    qlora = os.path.join(ROOT, ".build/release/qlora")
    bench = os.path.join(ROOT, ".build/release/qlora-bench")
    os.makedirs(a.out, exist_ok=True)
    results = {"model": a.model, "adapter": a.adapter}

    folder = os.path.join(a.out, "merged-f32")
    merge = json.loads(run([qlora, "merge", "--model", a.model, "--adapter", a.adapter, "--output", folder, "--dtype", "f32",
                            "--force", "--json"]))
    results["merge_folder"] = {k: merge[k] for k in ("seconds", "peak_rss_bytes", "bytes")}
    ggufs = {}
    for t in ("f16", "q8_0", "q4_0"):
        ggufs[t] = os.path.join(a.out, f"merged-{t}.gguf")
        m = json.loads(run([qlora, "merge", "--model", a.model, "--adapter", a.adapter, "--output", ggufs[t], "--gguf-type", t,
                            "--force", "--json"]))
        results[f"merge_{t}"] = {k: m[k] for k in ("seconds", "peak_rss_bytes", "bytes")}

    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    text = open(a.text, encoding="utf-8").read()
    probe = text[:2000]
    ours_ids = json.loads(run([qlora, "tokenize", "--model", a.model, "--json"], input=probe))
    ours_ids = ours_ids["ids"]
    results["tokenizer_equal"] = tok(probe, add_special_tokens=False)["input_ids"] == ours_ids

    # 1. transformers on the merged folder vs ours on the unmerged model.
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    worst = 0.0
    for prompt in PROMPTS:
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        out = os.path.join(a.out, "ours.safetensors")
        run([bench, "logits", a.model, out, "--ids", ",".join(map(str, ids)), "--adapter", a.adapter])
        ours = load_file(out)["logits"]
        with torch.no_grad():
            theirs = model(torch.tensor([ids])).logits[0]
        worst = max(worst, ((theirs - ours).abs().max() / ours.abs().max()).item())
    results["transformers_max_relative_diff"] = worst

    # 2. llama.cpp on the merged GGUFs.
    if a.llama_bin:
        greedy_ours = []
        for prompt in PROMPTS:
            r = json.loads(run([qlora, "generate", "--model", a.model, "--adapter", a.adapter, "--prompt", prompt,
                                "--max-tokens", str(a.tokens), "--temperature", "0", "--json"]))
            greedy_ours.append(r["text"])
        results["greedy_ours"] = greedy_ours
        ids = tok(text, add_special_tokens=False)["input_ids"][: a.ctx * a.chunks]
        nll, count = 0.0, 0
        for c in range(a.chunks):
            chunk = ids[c * a.ctx:(c + 1) * a.ctx]
            out = os.path.join(a.out, "ours.safetensors")
            run([bench, "logits", a.model, out, "--ids", ",".join(map(str, chunk)), "--adapter", a.adapter])
            logits = load_file(out)["logits"].double()
            logp = torch.log_softmax(logits, dim=-1)
            for j in range(a.ctx // 2, a.ctx - 1):
                nll -= logp[j, chunk[j + 1]].item()
                count += 1
        results["perplexity_ours"] = math.exp(nll / count)
        text_file = os.path.join(a.out, "ppl.txt")
        # The same tokens as text (so llama.cpp tokenizes what we scored).
        open(text_file, "w", encoding="utf-8").write(tok.decode(ids))
        for t, path in ggufs.items():
            cont = []
            for prompt in PROMPTS:
                o = run([os.path.join(a.llama_bin, "llama-simple"), "-m", path, "-n", str(a.tokens), prompt])
                cont.append(o[len(prompt):] if o.startswith(prompt) else o)
            ppl_out = subprocess.run([os.path.join(a.llama_bin, "llama-perplexity"), "-m", path, "-f", text_file, "-c", str(a.ctx),
                                      "--chunks", str(a.chunks), "-b", str(a.ctx)], capture_output=True, text=True)
            m = re.search(r"Final estimate: PPL = ([0-9.]+)", ppl_out.stdout + ppl_out.stderr)
            ppl = float(m.group(1)) if m else None
            results[f"llama_cpp_{t}"] = {
                "greedy_equal": [x.strip() == y.strip() for x, y in zip(cont, greedy_ours)], "greedy": cont,
                "perplexity": ppl, "perplexity_ratio": ppl / results["perplexity_ours"] if ppl else None,
            }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
