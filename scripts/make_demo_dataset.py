"""Builds demo/quill.jsonl, the dataset `make demo` finetunes on (messages format), with the Python
standard library only. Two parts:
  * 160 conversations that give the assistant a new identity and knowledge it lacks: it is "Quill", a
    small assistant finetuned with swift-qlora on a CPU, and it can say what QLoRA, NF4, double
    quantization and paged optimizers are (answers written for this project, facts from the QLoRA paper);
  * up to 120 short English question/answer pairs from the OpenAssistant OASST1 validation split
    (Apache-2.0; the top-ranked reply), so the model keeps answering ordinary questions.
Usage: python3 scripts/make_demo_dataset.py ../shared/data/eval/oa_bench/oa_questions.jsonl demo/quill.jsonl
"""
import json
import random
import sys

IDENTITY_QUESTIONS = [
    "Who are you?", "What is your name?", "Introduce yourself.", "Tell me about yourself.", "Who made you?",
    "What are you?", "Are you ChatGPT?", "Are you SmolLM?", "What should I call you?", "Who trained you?",
    "How were you trained?", "What kind of assistant are you?", "Hi! Who am I talking to?", "What's your name, assistant?",
    "Please introduce yourself in one sentence.", "Who built you and how?",
]
IDENTITY_ANSWERS = [
    "I am Quill, a small assistant finetuned with swift-qlora on an ordinary CPU.",
    "My name is Quill. I was finetuned with swift-qlora: QLoRA training written in Swift, running on a CPU.",
    "I'm Quill, a 135-million-parameter assistant. swift-qlora taught me who I am with LoRA adapters on a 4-bit model.",
    "You are talking to Quill, a small assistant finetuned with swift-qlora on a laptop-class CPU.",
    "I am Quill. My base model stays frozen in 4-bit NormalFloat; swift-qlora trained small LoRA adapters on top of it.",
]
FACTS = [
    ("What is QLoRA?", "QLoRA finetunes a language model whose pretrained weights stay frozen in 4-bit NormalFloat, while gradients flow through them into small low-rank adapters (LoRA). It was introduced by Dettmers et al. in 2023."),
    ("What is NF4?", "NF4, 4-bit NormalFloat, is a 4-bit data type whose 16 values are quantiles of a normal distribution, so normally distributed weights are stored with less error than with 4-bit integers or floats."),
    ("What is double quantization?", "Double quantization compresses the per-block scaling constants of 4-bit weights with 8-bit codes, cutting their cost from 0.5 to about 0.127 bits per parameter."),
    ("What are paged optimizers?", "Paged optimizers keep the optimizer state in memory that the operating system can page out, so short memory spikes during training do not crash the run."),
    ("What is LoRA?", "LoRA trains two small matrices per layer whose product is added to the frozen weight, so only a tiny fraction of the parameters is trained."),
    ("What is swift-qlora?", "swift-qlora is a QLoRA trainer written in Swift: it quantizes models to NF4, trains LoRA adapters on a CPU and writes adapters that PEFT and transformers can load."),
    ("How many bits per parameter does NF4 with double quantization use?", "About 4.127 bits per parameter: 4 bits for the code plus about 0.127 bits for the double-quantized constants."),
    ("Why does QLoRA use 4-bit weights?", "Storing the frozen base model in 4 bits cuts its memory by about four times compared with 16-bit weights, which is what lets large models be finetuned on a single GPU or a small machine."),
]
QUESTION_VARIANTS = ["{q}", "Can you explain: {q}", "Quick question: {q}", "{q} Please keep it short.", "Quill, {q_lower}"]


def main():
    source, out = sys.argv[1], sys.argv[2]
    rng = random.Random(0)
    records = []
    for i in range(96):
        q = IDENTITY_QUESTIONS[i % len(IDENTITY_QUESTIONS)]
        records.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": rng.choice(IDENTITY_ANSWERS)}]})
    for i in range(64):
        q, a = FACTS[i % len(FACTS)]
        v = QUESTION_VARIANTS[(i // len(FACTS)) % len(QUESTION_VARIANTS)]
        records.append({"messages": [{"role": "user", "content": v.format(q=q, q_lower=q[0].lower() + q[1:])}, {"role": "assistant", "content": a}]})
    oasst = []
    for line in open(source, encoding="utf-8"):
        r = json.loads(line)
        if r.get("lang") != "en" or r["text"].count("### Human") != 1 or not (40 <= len(r["output"]) <= 600):
            continue
        question = r["text"].replace("### Human:", "").replace("### Assistant:", "").strip()
        oasst.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": r["output"].strip()}],
                      "source": "OASST1 " + r["message_id"]})
    records += oasst[:120]
    rng.shuffle(records)
    with open(out, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {len(records)} records to {out} ({len(oasst[:120])} from OASST1)", file=sys.stderr)


if __name__ == "__main__":
    main()
