"""Side-by-side 4-bit quantization benchmark: bitsandbytes on CPU versus swift-qlora, on the same tensors,
in one run. Both sides: NF4, block 64, with and without double quantization; best of N runs per tensor;
throughput in GB/s of f32 input. torch uses the same thread count as swift-qlora (QLORA_THREADS or all CPUs).
Usage: python bench/quant_bench.py QLORA_BENCH_BINARY FILE.safetensors [FILE ...]
Prints a Markdown table and writes bench/out/quant_results.json.
"""
import json
import os
import platform
import subprocess
import sys
import time

import torch
import bitsandbytes
import bitsandbytes.functional as F
from safetensors.torch import load_file

REPEATS = 3


def best(fn):
    t = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        t = min(t, time.perf_counter() - start)
    return t


def bnb_side(path):
    tensors = load_file(path)
    totals = {"quantize_nf4_dq": 0.0, "quantize_nf4": 0.0, "dequantize_nf4_dq": 0.0, "dequantize_nf4": 0.0,
              "dequantize_nf4_dq_reused": 0.0}
    nbytes = 0
    for name, w in tensors.items():
        w = w.float().contiguous()
        nbytes += w.numel() * 4
        holder = {}

        def q_dq():
            holder["dq"] = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")

        def q_plain():
            holder["plain"] = F.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")

        totals["quantize_nf4_dq"] += best(q_dq)
        totals["quantize_nf4"] += best(q_plain)
        packed, state = holder["dq"]
        totals["dequantize_nf4_dq"] += best(lambda: F.dequantize_4bit(packed, state))
        packed2, state2 = holder["plain"]
        totals["dequantize_nf4"] += best(lambda: F.dequantize_4bit(packed2, state2))
        # bitsandbytes 0.50 registers no CPU kernel for dequantize_4bit's out= variant: there the
        # allocating call is its only path, and it is what this row times for bitsandbytes.
        out = torch.empty_like(w)
        try:
            F.dequantize_4bit(packed, state, out=out)
            totals["dequantize_nf4_dq_reused"] += best(lambda: F.dequantize_4bit(packed, state, out=out))
        except (NotImplementedError, RuntimeError):
            totals["dequantize_nf4_dq_reused"] += best(lambda: F.dequantize_4bit(packed, state))
    return nbytes, totals


def main():
    binary, files = sys.argv[1], sys.argv[2:]
    threads = int(os.environ.get("QLORA_THREADS", os.cpu_count()))
    torch.set_num_threads(threads)
    results = []
    for path in files:
        nbytes, bnb = bnb_side(path)
        ours = json.loads(subprocess.check_output([binary, "quant", path, "--repeats", str(REPEATS)],
                                                  env={**os.environ, "QLORA_THREADS": str(threads)}))
        assert ours["f32_bytes"] == nbytes
        row = {"file": os.path.basename(path), "f32_bytes": nbytes, "threads": threads, "kernels": ours["kernels"]}
        for k, secs in bnb.items():
            row[k] = {"bnb_gbps": nbytes / secs / 1e9, "ours_gbps": ours[k + "_gbps"],
                      "ratio": (nbytes / ours[k + "_seconds"]) / (nbytes / secs)}
        results.append(row)
    env = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": os.cpu_count(), "threads": threads, "torch": torch.__version__,
        "bitsandbytes": bitsandbytes.__version__, "python": platform.python_version(),
    }
    os.makedirs("bench/out", exist_ok=True)
    with open("bench/out/quant_results.json", "w") as f:
        json.dump({"env": env, "results": results}, f, indent=2)
    print(f"torch {env['torch']}, bitsandbytes {env['bitsandbytes']}, {threads} threads, swift-qlora kernels "
          f"{results[0]['kernels'] if results else '?'}")
    print()
    print("| tensors | operation | bitsandbytes GB/s | swift-qlora GB/s | ratio |")
    print("|---|---|---:|---:|---:|")
    names = {"quantize_nf4_dq": "quantize NF4 + DQ", "quantize_nf4": "quantize NF4",
             "dequantize_nf4_dq": "dequantize NF4 + DQ", "dequantize_nf4": "dequantize NF4",
             "dequantize_nf4_dq_reused": "dequantize NF4 + DQ into a reused buffer (bnb: no CPU out= kernel, allocates)"}
    for row in results:
        for k, label in names.items():
            r = row[k]
            print(f"| {row['file']} ({row['f32_bytes'] / 1e6:.0f} MB f32) | {label} | {r['bnb_gbps']:.2f} | "
                  f"{r['ours_gbps']:.2f} | {r['ratio']:.1f}x |")


if __name__ == "__main__":
    main()
