"""MMLU fixtures for Tests/QLoRAEvaluationTests: prompts and answer-letter log-probabilities from transformers.

Copies into Tests/QLoRAEvaluationTests/Resources/mmlu/ the 57 dev files (the few-shot examples) and the first
QUESTIONS rows of each test file, from ../shared/data/mmlu/data (the hendrycks/test CSV layout: no header,
question,A,B,C,D,answer; MIT, see SOURCES.md there), then scores with transformers 5.24 in f32:
  - every copied test question 0-shot, and the first question of SHOT_SUBJECTS 5-shot;
  - the prompt as the hendrycks/test code builds it ("The following are multiple choice questions (with answers)
    about " + " word" for each word of the subject (two spaces before the first, as there) + ".\\n\\n", examples as question, "\\nA. ...", "\\nAnswer:", " X\\n\\n");
  - the log-softmax over the vocabulary at the last position, at the four letter tokens: the token a letter
    gets right after "Answer:" (ids("Answer: A")[len(ids("Answer:"))]; for Llama's sentencepiece that is the
    "▁A" the QLoRA repo scores, for SmolLM2's byte-level BPE it is "ĠA").
The model: the default GGUF's weights dequantized to f32 (bench/reference_stack.py), with the real SmolLM2
tokenizer (our fixture tokenizer.json; transformers' GGUF conversion drops its digit splitting, DESIGN.md).
Usage: python scripts/reference/make_mmlu_fixtures.py [MODEL.gguf]
"""
import csv
import io
import json
import os
import sys

sys.path.insert(0, "bench")
DATA = os.environ.get("MMLU_DATA", "../shared/data/mmlu/data")
OUT = "Tests/QLoRAEvaluationTests/Resources/mmlu"
QUESTIONS = 4
SHOT_SUBJECTS = ["abstract_algebra", "college_physics", "high_school_us_history", "professional_law", "virology",
                 "world_religions", "econometrics", "moral_scenarios", "us_foreign_policy", "clinical_knowledge"]
CHOICES = ["A", "B", "C", "D"]


def read(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def write(path, rows):
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    for r in rows:
        w.writerow(r)
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(buf.getvalue())


def format_subject(subject):
    return "".join(" " + part for part in subject.split("_"))


def format_example(row, include_answer):
    prompt = row[0]
    for j, letter in enumerate(CHOICES):
        prompt += "\n{}. {}".format(letter, row[j + 1])
    prompt += "\nAnswer:"
    if include_answer:
        prompt += " {}\n\n".format(row[5])
    return prompt


def gen_prompt(dev, subject, k):
    prompt = "The following are multiple choice questions (with answers) about {}.\n\n".format(format_subject(subject))
    for i in range(k):
        prompt += format_example(dev[i], True)
    return prompt


def main():
    model_path = sys.argv[1] if len(sys.argv) > 1 else os.path.expanduser("~/.cache/swift-qlora/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    os.makedirs(os.path.join(OUT, "dev"), exist_ok=True)
    os.makedirs(os.path.join(OUT, "test"), exist_ok=True)
    subjects = sorted(f[:-len("_test.csv")] for f in os.listdir(os.path.join(DATA, "test")) if f.endswith("_test.csv"))
    dev, test = {}, {}
    for s in subjects:
        dev[s] = read(os.path.join(DATA, "dev", s + "_dev.csv"))
        test[s] = read(os.path.join(DATA, "test", s + "_test.csv"))[:QUESTIONS]
        write(os.path.join(OUT, "dev", s + "_dev.csv"), dev[s])
        write(os.path.join(OUT, "test", s + "_test.csv"), test[s])
        # The copies must be the originals' bytes (same csv dialect): a check, not an assumption.
        original = open(os.path.join(DATA, "dev", s + "_dev.csv"), encoding="utf-8", newline="").read()
        assert open(os.path.join(OUT, "dev", s + "_dev.csv"), encoding="utf-8", newline="").read() == original, s

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from reference_stack import dequantized_folder
    torch.set_num_threads(os.cpu_count())
    folder = dequantized_folder(model_path)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    tok = PreTrainedTokenizerFast(tokenizer_file="Tests/QLoRATokenizerTests/Resources/smollm2-tokenizer.json")
    base = tok("Answer:", add_special_tokens=False).input_ids
    letters = []
    for c in CHOICES:
        ids = tok("Answer: " + c, add_special_tokens=False).input_ids
        assert ids[:len(base)] == base and len(ids) == len(base) + 1, (c, ids)
        letters.append(ids[len(base)])
    cases = []
    jobs = [(s, 0, i) for s in subjects for i in range(len(test[s]))] + [(s, 5, 0) for s in SHOT_SUBJECTS]
    with torch.no_grad():
        for n, (s, k, i) in enumerate(jobs):
            prompt = gen_prompt(dev[s], s, k) + format_example(test[s][i], False)
            ids = tok(prompt, add_special_tokens=False).input_ids
            logits = model(torch.tensor([ids])).logits[0, -1].double()
            logprobs = torch.log_softmax(logits, dim=-1)[letters]
            cases.append({"subject": s, "shots": k, "index": i, "prompt": prompt, "tokens": len(ids),
                          "logprobs": [float(x) for x in logprobs], "prediction": CHOICES[int(torch.argmax(logprobs))],
                          "answer": test[s][i][5]})
            if n % 25 == 0:
                print(f"{n + 1}/{len(jobs)}", file=sys.stderr)
    out = {"source": "transformers %s, torch %s; %s dequantized to f32; tokenizer Tests/QLoRATokenizerTests/Resources/smollm2-tokenizer.json"
                     % (transformers.__version__, torch.__version__, os.path.basename(model_path)),
           "letter_tokens": letters, "cases": cases}
    with open(os.path.join(OUT, "..", "mmlu_cases.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=0)
    print(f"{len(cases)} cases; letters {letters}", file=sys.stderr)


if __name__ == "__main__":
    main()
