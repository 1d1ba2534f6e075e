#!/usr/bin/env python3
"""Checks `qlora merge`'s outputs in the tools users run them with (not part of CI).

1. transformers loads the merged f32 folder; its logits are compared with ours for the unmerged model
   (the base in NF4 + the adapter, as qlora generate runs it): max |diff| / max |ours|.
2. llama.cpp (llama-simple, llama-perplexity, llama-completion from bench/llama_cpp_setup.sh) loads the merged
   GGUF in F32, F16, Q8_0, Q4_0 and Q4_K: greedy continuations of 4 prompts and perplexity by llama-perplexity's own
   protocol (chunks of --ctx tokens, the second half of each scored), against ours on the same file and on the
   unmerged model; llama-quantize's own Q4_0 and Q4_K_S of the F16 file for the spread; and the base GGUF with the adapter
   from `qlora export-adapter` (--lora) against ours on the same base and adapter.

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
    for t in ("f32", "f16", "q8_0", "q4_0", "q4_k"):
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

    # 2. llama.cpp on the merged GGUFs, and on the base GGUF with the exported adapter.
    if a.llama_bin:
        ids = tok(text, add_special_tokens=False)["input_ids"][: a.ctx * a.chunks]
        text_file = os.path.join(a.out, "ppl.txt")
        # The scored tokens as text, so that llama.cpp tokenizes what we scored.
        open(text_file, "w", encoding="utf-8").write(tok.decode(ids))

        def our_greedy(model_path, adapter=None, quant=None):
            out = []
            for prompt in PROMPTS:
                cmd = [qlora, "generate", "--model", model_path, "--prompt", prompt, "--max-tokens", str(a.tokens),
                       "--temperature", "0", "--json"]
                cmd += ["--adapter", adapter] if adapter else []
                cmd += ["--quant-type", quant] if quant else []
                out.append(json.loads(run(cmd))["text"])
            return out

        def our_perplexity(model_path, adapter=None, quant=None):
            # llama-perplexity's protocol: chunks of ctx tokens, the second half of each scored.
            nll, count = 0.0, 0
            for c in range(a.chunks):
                chunk = ids[c * a.ctx:(c + 1) * a.ctx]
                out = os.path.join(a.out, "ours.safetensors")
                cmd = [bench, "logits", model_path, out, "--ids", ",".join(map(str, chunk))]
                cmd += ["--adapter", adapter] if adapter else []
                cmd += ["--quant-type", quant] if quant else []
                run(cmd)
                logp = torch.log_softmax(load_file(out)["logits"].double(), dim=-1)
                for j in range(a.ctx // 2, a.ctx - 1):
                    nll -= logp[j, chunk[j + 1]].item()
                    count += 1
            return math.exp(nll / count)

        def llama_perplexity(model_path, lora=None):
            cmd = [os.path.join(a.llama_bin, "llama-perplexity"), "-m", model_path, "-f", text_file, "-c", str(a.ctx),
                   "--chunks", str(a.chunks), "-b", str(a.ctx)] + (["--lora", lora] if lora else [])
            r = subprocess.run(cmd, capture_output=True, text=True)
            m = re.search(r"Final estimate: PPL = ([0-9.]+)", r.stdout + r.stderr)
            return float(m.group(1)) if m else None

        def same(xs, ys):
            return [x.strip() == y.strip() for x, y in zip(xs, ys)]

        unmerged = our_greedy(a.model, a.adapter)
        results["unmerged"] = {"greedy": unmerged, "perplexity": our_perplexity(a.model, a.adapter)}
        for t, path in ggufs.items():
            cont = []
            for prompt in PROMPTS:
                o = run([os.path.join(a.llama_bin, "llama-simple"), "-m", path, "-n", str(a.tokens), prompt])
                cont.append(o[len(prompt):] if o.startswith(prompt) else o)
            # Ours on the same file, its weights as stored (dequantized, not requantized to NF4).
            ours_same = our_greedy(path, quant="none")
            ppl, ours_ppl = llama_perplexity(path), our_perplexity(path, quant="none")
            results[f"llama_cpp_{t}"] = {
                "greedy": cont, "greedy_equal_ours_same_file": same(cont, ours_same), "greedy_equal_unmerged": same(cont, unmerged),
                "perplexity": ppl, "perplexity_ours_same_file": ours_ppl, "ratio_to_ours_same_file": ppl / ours_ppl if ppl else None,
                "ratio_to_unmerged": ppl / results["unmerged"]["perplexity"] if ppl else None,
            }
        # llama.cpp's own Q8_0 of our merged F32 file: byte for byte ours?
        from gguf import GGUFReader
        ref = os.path.join(a.out, "llama-quantize-q8_0.gguf")
        run([os.path.join(a.llama_bin, "llama-quantize"), "--pure", ggufs["f32"], ref, "Q8_0"])
        theirs = {t.name: t for t in GGUFReader(ref).tensors}
        results["q8_0_tensors_byte_equal_to_llama_quantize"] = sum(
            t.tensor_type == theirs[t.name].tensor_type and bytes(t.data.tobytes()) == bytes(theirs[t.name].data.tobytes())
            for t in GGUFReader(ggufs["q8_0"]).tensors)
        # llama.cpp's own Q4_0 of the merged F16 file, for the spread its quantizer gives.
        ref = os.path.join(a.out, "llama-quantize-q4_0.gguf")
        run([os.path.join(a.llama_bin, "llama-quantize"), ggufs["f16"], ref, "Q4_0"])
        results["llama_quantize_q4_0_perplexity"] = llama_perplexity(ref)
        ref = os.path.join(a.out, "llama-quantize-q4_k_s.gguf")
        run([os.path.join(a.llama_bin, "llama-quantize"), ggufs["f16"], ref, "Q4_K_S"])
        results["llama_quantize_q4_k_s_perplexity"] = llama_perplexity(ref)

        # The base GGUF with the adapter exported for llama.cpp's --lora: the original (Q4_1) base weights, so
        # compared with ours on the same base unquantized (--quant-type none) with the same adapter.
        lora = os.path.join(a.out, "adapter.gguf")
        results["export_adapter"] = json.loads(run([qlora, "export-adapter", "--model", a.model, "--adapter", a.adapter,
                                                    "--output", lora, "--force", "--json"]))
        cont = []
        for prompt in PROMPTS:
            o = run([os.path.join(a.llama_bin, "llama-completion"), "-m", a.model, "--lora", lora, "-p", prompt, "-n", str(a.tokens),
                     "--temp", "0", "-no-cnv", "--no-display-prompt", "--no-warmup"], stdin=subprocess.DEVNULL)
            cont.append(o)
        ours_same = our_greedy(a.model, a.adapter, quant="none")
        ppl, ours_ppl = llama_perplexity(a.model, lora), our_perplexity(a.model, a.adapter, quant="none")
        results["llama_cpp_base_plus_lora"] = {
            "greedy": cont, "greedy_ours": ours_same, "greedy_equal": same(cont, ours_same),
            "perplexity": ppl, "perplexity_ours": ours_ppl, "ratio": ppl / ours_ppl if ppl else None,
        }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
