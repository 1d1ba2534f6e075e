"""Perplexity of the default model (SmolLM2-135M-Instruct, from its GGUF, dequantized to f32 by
transformers) on a public-domain excerpt (Tests/QLoRAEvaluationTests/Resources/war_and_peace_excerpt.txt),
with the Hugging Face sliding-window method, for context 128 and strides 128 and 64.
Writes Tests/QLoRAEvaluationTests/Resources/perplexity.json. Pinned: torch 2.15.0, transformers 5.24.0.
"""
import json
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

GGUF = os.path.expanduser("~/.cache/swift-qlora/models/SmolLM2-135M-Instruct.Q4_1.gguf")
RES = os.path.join(os.path.dirname(__file__), "../../Tests/QLoRAEvaluationTests/Resources")


def perplexity(model, ids, context, stride):
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    begin = 0
    while True:
        end = min(begin + context, ids.size(1))
        trg_len = end - max(prev_end, begin + 1) + 1 if prev_end == 0 else end - prev_end
        input_ids = ids[:, begin:end]
        target = input_ids.clone()
        target[:, :-trg_len] = -100
        with torch.no_grad():
            logits = model(input_ids).logits.double()
        logp = torch.log_softmax(logits[0, :-1], dim=-1)
        labels = target[0, 1:]
        mask = labels != -100
        nll_sum += -logp[mask].gather(1, labels[mask].unsqueeze(1)).sum().item()
        n_tokens += int(mask.sum())
        prev_end = end
        if end == ids.size(1):
            break
        begin += stride
    return nll_sum, n_tokens


def main():
    torch.set_num_threads(2)
    folder, name = os.path.dirname(GGUF), os.path.basename(GGUF)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    text = open(os.path.join(RES, "war_and_peace_excerpt.txt"), encoding="utf-8").read()
    ids = torch.tensor([tok.encode(text, add_special_tokens=True)])
    out = {"generator": "scripts/reference/make_perplexity_fixture.py", "torch": torch.__version__,
           "tokens": ids.size(1), "ids_head": ids[0, :16].tolist(), "runs": []}
    for context, stride in [(128, 128), (128, 64)]:
        nll, n = perplexity(model, ids, context, stride)
        out["runs"].append({"context": context, "stride": stride, "total_nll": nll, "scored_tokens": n,
                            "mean_nll": nll / n, "perplexity": float(torch.exp(torch.tensor(nll / n)))})
    with open(os.path.join(RES, "perplexity.json"), "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(out["runs"]))


if __name__ == "__main__":
    main()
