"""Inference side by side with llama.cpp on the default model (SmolLM2-135M-Instruct), in one run:
  - llama-bench -t T -p 512 -n 128 on llama.cpp's own Q4_0, Q4_K_M and F16 conversions (bench/llama_cpp_setup.sh);
  - qlora-bench infer -p 512 -n 128 on our NF4 + double quantization and on f32 weights (the same two tests:
    pp512 = one forward over 512 random tokens from an empty cache, tg128 = 128 one-token forwards from an empty cache);
  - batched decoding: llama-batched-bench -npp 128 -ntg 128 -npl 1,4,16 against qlora-bench batched (the defaults, and f32);
  - decoding at depth 512 / 2,048 / 4,096: llama-bench -d against qlora-bench infer -d (the defaults, and f32 throughout);
  - this machine's memory bandwidth (qlora-bench bandwidth) and the decode limit it sets: bandwidth / bytes read a token.
The configurations run in rounds, each round every configuration once, and each figure is the best over the rounds:
the machines here are shared and their speed drifts over minutes, so interleaving keeps the comparison fair.
Every process has its own peak RSS (/usr/bin/time). Prints a markdown report.
Usage: python bench/inference_bench.py QLORA_BENCH_BINARY [--rounds 3] [--threads 2]
"""
import argparse
import json
import os
import platform
import re
import subprocess
import sys

MODEL = os.path.join(os.environ.get("QLORA_CACHE", os.path.expanduser("~/.cache/swift-qlora")), "models/SmolLM2-135M-Instruct.Q4_1.gguf")


def timed(cmd, env=None):
    """stdout and peak RSS (MB) of a command."""
    p = subprocess.run(["/usr/bin/time", "-f", "RSS_KB %M"] + cmd, capture_output=True, text=True, env=env, check=True)
    rss = int(re.findall(r"RSS_KB (\d+)", p.stderr)[-1]) / 1024
    return p.stdout, rss


def llama_bench(bin_dir, gguf, threads):
    out, rss = timed([os.path.join(bin_dir, "llama-bench"), "-m", gguf, "-t", str(threads), "-p", "512", "-n", "128", "-r", "3", "-o", "json"])
    rows = json.loads(out)
    pp = next(r for r in rows if r["n_prompt"] == 512 and r["n_gen"] == 0)
    tg = next(r for r in rows if r["n_gen"] == 128 and r["n_prompt"] == 0)
    return {"prefill": pp["avg_ts"], "decode": tg["avg_ts"], "rss": rss, "bytes": os.path.getsize(gguf)}


def ours(binary, quant, threads, compute="f32", kv="f16"):
    env = {**os.environ, "QLORA_THREADS": str(threads)}
    out, rss = timed([binary, "infer", MODEL, "-p", "512", "-n", "128", "--repeats", "3", "--quant-type", quant, "--compute-dtype", compute,
                      "--kv-cache", kv], env)
    r = json.loads(out)
    return {"prefill": r["prefill_tokens_per_second"], "decode": r["decode_tokens_per_second"], "rss": rss,
            "bytes": r["decode_bytes_per_token"], "head": r["head"], "kernels": r["kernels"]}


def llama_depth(bin_dir, gguf, threads, depth):
    out, _ = timed([os.path.join(bin_dir, "llama-bench"), "-m", gguf, "-t", str(threads), "-p", "0", "-n", "128", "-d", str(depth), "-r", "2", "-o", "json"])
    return json.loads(out)[0]["avg_ts"]


def ours_depth(binary, threads, depth, kv, compute):
    env = {**os.environ, "QLORA_THREADS": str(threads)}
    out, _ = timed([binary, "infer", MODEL, "-p", "0", "-n", "128", "-d", str(depth), "--repeats", "2", "--kv-cache", kv, "--compute-dtype", compute], env)
    return json.loads(out)["decode_tokens_per_second"]


def llama_batched(bin_dir, gguf, threads):
    out, _ = timed([os.path.join(bin_dir, "llama-batched-bench"), "-m", gguf, "-t", str(threads), "-c", "4096", "-b", "2048", "-ub", "512",
                    "-npp", "128", "-ntg", "128", "-npl", "1,4,16", "--output-format", "jsonl"])
    rows = [json.loads(l) for l in out.splitlines() if l.startswith("{")]
    return {r["pl"]: r["speed_tg"] for r in rows}


def ours_batched(binary, threads, compute):
    env = {**os.environ, "QLORA_THREADS": str(threads)}
    out, _ = timed([binary, "batched", MODEL, "--batch", "1,4,16", "-p", "128", "-n", "128", "--repeats", "1", "--compute-dtype", compute], env)
    return {r["batch"]: r["decode_tokens_per_second"] for r in json.loads(out)["batches"]}


def best(runs, key):
    return max(r[key] for r in runs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    setup = dict(l.split("=", 1) for l in subprocess.run(["bash", "bench/llama_cpp_setup.sh", sys.executable], capture_output=True,
                                                          text=True, check=True).stdout.split("\n") if "=" in l)
    bin_dir, models = setup["LLAMA_CPP_BIN"], setup["LLAMA_CPP_MODELS"]
    bf16_cpu = " avx512_bf16" in next((l for l in open("/proc/cpuinfo") if l.startswith("flags")), "")
    configs = [("llama.cpp Q4_0", lambda: llama_bench(bin_dir, os.path.join(models, "smollm2-Q4_0.gguf"), a.threads)),
               ("llama.cpp Q4_K_M", lambda: llama_bench(bin_dir, os.path.join(models, "smollm2-Q4_K_M.gguf"), a.threads)),
               ("llama.cpp F16", lambda: llama_bench(bin_dir, os.path.join(models, "smollm2-f16.gguf"), a.threads)),
               ("swift-qlora NF4 + DQ, the defaults (bf16 products where the CPU has it, f16 cache)",
                lambda: ours(a.binary, "nf4", a.threads, "bf16" if bf16_cpu else "f32")),
               ("swift-qlora NF4 + DQ, --compute-dtype f32 --kv-cache f32", lambda: ours(a.binary, "nf4", a.threads, "f32", "f32")),
               ("swift-qlora f32", lambda: ours(a.binary, "none", a.threads))]
    runs = {name: [] for name, _ in configs}
    default_compute = "bf16" if bf16_cpu else "f32"
    batched = {"llama.cpp Q4_0": [], "swift-qlora NF4 + DQ": [], "swift-qlora f32": []}
    bandwidth = []
    depths = (512, 2048, 4096)
    depth = {(name, d): [] for name in ("llama.cpp Q4_0", "swift-qlora f16 cache", "swift-qlora f32 cache") for d in depths}
    for rnd in range(a.rounds):
        print(f"round {rnd + 1} of {a.rounds}", file=sys.stderr)
        bandwidth.append(json.loads(subprocess.run([a.binary, "bandwidth"], capture_output=True, text=True, check=True).stdout))
        for name, run in configs:
            runs[name].append(run())
        if rnd < 2:
            batched["llama.cpp Q4_0"].append(llama_batched(bin_dir, os.path.join(models, "smollm2-Q4_0.gguf"), a.threads))
            batched["swift-qlora NF4 + DQ"].append(ours_batched(a.binary, a.threads, default_compute))
            batched["swift-qlora f32"].append(ours_batched(a.binary, a.threads, "f32"))
            for d in depths:
                depth[("llama.cpp Q4_0", d)].append(llama_depth(bin_dir, os.path.join(models, "smollm2-Q4_0.gguf"), a.threads, d))
                depth[("swift-qlora f16 cache", d)].append(ours_depth(a.binary, a.threads, d, "f16", default_compute))
                depth[("swift-qlora f32 cache", d)].append(ours_depth(a.binary, a.threads, d, "f32", "f32"))

    read = max(b["read_gbps"] for b in bandwidth)
    copy = max(b["copy_gbps"] for b in bandwidth)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    flags = next((l for l in open("/proc/cpuinfo") if l.startswith("flags")), "")
    isa = "AVX-512" if " avx512f" in flags else "AVX2"
    print(f"{cpu} ({isa}, family {next((l.split(':')[1].strip() for l in open('/proc/cpuinfo') if l.startswith('cpu family')), '?')}), "
          f"{a.threads} threads; llama.cpp {setup['LLAMA_CPP_COMMIT']} ({setup['LLAMA_CPP_VERSION']} sdist, GGML_NATIVE); "
          f"best of {a.rounds} interleaved rounds. Memory: read {read:.1f} GB/s, copy {copy:.1f} GB/s (STREAM counting, {a.threads} threads).")
    print()
    ref = runs["llama.cpp Q4_0"]
    rp, rd = best(ref, "prefill"), best(ref, "decode")
    print("| system | weights read a token | pp512 tokens/s | tg128 tokens/s | decode limit (read bandwidth / bytes) | tg128 / limit | peak RSS | pp vs Q4_0 | tg vs Q4_0 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, _ in configs:
        r = runs[name]
        p, d, mb = best(r, "prefill"), best(r, "decode"), r[0]["bytes"] / 1e6
        limit = read * 1e9 / r[0]["bytes"]
        label = name + (f" (head {r[0]['head']}, {r[0]['kernels']})" if "head" in r[0] else "")
        print(f"| {label} | {mb:.1f} MB | {p:.1f} | {d:.1f} | {limit:.0f} | {d / limit:.2f} | {min(x['rss'] for x in r):.0f} MB | "
              f"{p / rp:.2f}x | {d / rd:.2f}x |")
    print()
    print("Batched decoding, aggregate tokens/s (128-token prompts, 128 tokens each; llama-batched-bench S_TG):")
    print()
    print(f"| sequences | llama.cpp Q4_0 | swift-qlora NF4 + DQ, the defaults (--compute-dtype {default_compute}) | ratio | swift-qlora, --compute-dtype f32 | ratio |")
    print("|---:|---:|---:|---:|---:|---:|")
    for b in (1, 4, 16):
        l = max(x[b] for x in batched["llama.cpp Q4_0"])
        o = max(x[b] for x in batched["swift-qlora NF4 + DQ"])
        f = max(x[b] for x in batched["swift-qlora f32"])
        print(f"| {b} | {l:.1f} | {o:.1f} | {o / l:.2f}x | {f:.1f} | {f / l:.2f}x |")
    print()
    print("Decoding 128 tokens after a context of D tokens, tokens/s (llama-bench -d D -n 128, its cache f16; qlora-bench infer -d D):")
    print()
    print(f"| depth | llama.cpp Q4_0 | swift-qlora NF4 + DQ, the defaults (f16 cache, --compute-dtype {default_compute}) | ratio | swift-qlora, f32 cache and products | ratio |")
    print("|---:|---:|---:|---:|---:|---:|")
    for d in depths:
        l = max(depth[("llama.cpp Q4_0", d)])
        o16, o32 = max(depth[("swift-qlora f16 cache", d)]), max(depth[("swift-qlora f32 cache", d)])
        print(f"| {d} | {l:.1f} | {o16:.1f} | {o16 / l:.2f}x | {o32:.1f} | {o32 / l:.2f}x |")


if __name__ == "__main__":
    main()
