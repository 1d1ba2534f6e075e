"""MMLU 5-shot side by side: transformers (f32, and NF4 + double quantization through bitsandbytes) scoring
each prompt with one forward pass, as the hendrycks/test and QLoRA evaluation code do, against
`qlora eval mmlu` (which runs a subject's few-shot prefix once and continues each question from its keys and
values), on the same prompts: the first QUESTIONS test questions of SUBJECTS, in one run. Prints the time per
question of each, the ratio, the time the full test set (14,042 questions) would take at that rate, and the
agreement of the predictions.
Usage: python bench/mmlu_bench.py QLORA_BINARY MMLU_DATA_DIR [--questions 20]
"""
import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts", "reference"))
sys.path.insert(0, os.path.dirname(__file__))
from make_mmlu_fixtures import format_example, gen_prompt, read  # the prompt builder the fixtures come from
from reference_stack import dequantized_folder, load_nf4

SUBJECTS = ["high_school_biology", "philosophy", "professional_medicine"]
FULL_TEST_SET = 14042
MODEL = os.path.join(os.environ.get("QLORA_CACHE", os.path.expanduser("~/.cache/swift-qlora")), "models/SmolLM2-135M-Instruct.Q4_1.gguf")


def transformers_run(data, questions, quant, threads):
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    torch.set_num_threads(threads)
    folder = dequantized_folder(MODEL)
    model = load_nf4(folder, torch.float32) if quant == "nf4" else AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    tok = PreTrainedTokenizerFast(tokenizer_file="Tests/QLoRATokenizerTests/Resources/smollm2-tokenizer.json")
    letters = [tok("Answer: " + c, add_special_tokens=False).input_ids[-1] for c in "ABCD"]
    predictions, n = [], 0
    start = time.perf_counter()
    with torch.no_grad():
        for s in SUBJECTS:
            dev = read(os.path.join(data, "dev", s + "_dev.csv"))
            test = read(os.path.join(data, "test", s + "_test.csv"))[:questions]
            for row in test:
                ids = tok(gen_prompt(dev, s, 5) + format_example(row, False)).input_ids
                logits = model(torch.tensor([ids])).logits[0, -1]
                predictions.append("ABCD"[int(torch.argmax(logits[letters]))])
                n += 1
    return time.perf_counter() - start, predictions


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("data")
    ap.add_argument("--questions", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        return
    rows = []
    for quant, label in [("none", "f32"), ("nf4", "NF4 + DQ")]:
        t0 = time.perf_counter()
        out = subprocess.run([a.binary, "eval", "mmlu", "--data", a.data, "--subjects", ",".join(SUBJECTS), "--limit", str(a.questions),
                              "--quant-type", quant, "--json"], capture_output=True, text=True, check=True,
                             env={**os.environ, "QLORA_THREADS": str(a.threads)})
        ours_total = time.perf_counter() - t0
        r = json.loads(out.stdout)
        ours = r["seconds"]
        ref_seconds, ref_pred = transformers_run(a.data, a.questions, quant, a.threads)
        ours_pred = [p["prediction"] for p in r["predictions"]]
        agree = sum(x == y for x, y in zip(ours_pred, ref_pred)) / len(ref_pred)
        n = len(ref_pred)
        rows.append((label, n, ref_seconds / n, ours / n, ours_total, r["prompt_tokens"], r["tokens_computed"], agree, r["micro_accuracy"]))
    import torch, transformers
    print(f"MMLU 5-shot, {len(SUBJECTS)} subjects x {a.questions} questions, {a.threads} threads; torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    print()
    print("| weights | questions | transformers s/question | swift-qlora s/question | ratio | full test set at our rate | prompt tokens | tokens computed | same predictions | our accuracy |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, n, ref, ours, total, pt, tc, agree, acc in rows:
        print(f"| {label} | {n} | {ref:.3f} | {ours:.3f} | {ref / ours:.1f}x | {ours * FULL_TEST_SET / 60:.0f} min | {pt} | {tc} | {100 * agree:.0f}% | {100 * acc:.1f}% |")


if __name__ == "__main__":
    main()
