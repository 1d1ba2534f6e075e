"""Merged family models in transformers: `qlora merge` (onto the original weights, f32 folder) of each tiny family
model with its PEFT adapter, loaded by transformers 5.24 (f32, eager), must give PEFT's adapted logits (the
fixture's lora.logits) and the logits of our own forward of the merged folder (`qlora-bench logits`).
Run after `swift build -c release`:
  $QLORA_CACHE/bench-venv/bin/python scripts/reference/check_family_merge.py
Prints one line per family: max |transformers(merged) - PEFT| and max |transformers(merged) - ours|.
"""

import os
import subprocess
import sys
import tempfile

import torch
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
RES = os.path.join(ROOT, "Tests", "QLoRAModelTests", "Resources")
QLORA = os.path.join(ROOT, ".build", "release", "qlora")
BENCH = os.path.join(ROOT, ".build", "release", "qlora-bench")


def main():
    worst = 0.0
    for family in sys.argv[1:] or ["tiny-qwen3", "tiny-gemma3", "tiny-phi3"]:
        ref = load_file(os.path.join(RES, family, "reference.safetensors"))
        ids = ref["train_ids"]
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "merged")
            subprocess.run([QLORA, "merge", "--model", os.path.join(RES, family), "--adapter", os.path.join(RES, family + "-lora"),
                            "--output", out, "--onto", "original", "--dtype", "f32", "--quiet"], check=True)
            model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
            with torch.no_grad():
                theirs = model(input_ids=torch.tensor(ids)).logits.numpy()
            ours_path = os.path.join(tmp, "ours.safetensors")
            subprocess.run([BENCH, "logits", out, ours_path, "--ids", ",".join(str(int(i)) for i in ids[0]), "--quant-type", "none"],
                           check=True, stdout=subprocess.DEVNULL)
            ours = load_file(ours_path)["logits"].reshape(theirs[0].shape)
        d_peft = float(abs(theirs - ref["lora.logits"]).max())
        d_ours = float(abs(theirs[0] - ours).max())
        scale = float(abs(ref["lora.logits"]).max())
        worst = max(worst, d_peft / scale, d_ours / scale)
        print(f"{family}: transformers(merged) vs PEFT max abs {d_peft:.3g}, vs ours {d_ours:.3g} (max |logit| {scale:.3g}, "
              f"architecture {model.config.architectures[0]})")
    print(f"worst relative difference {worst:.3g}")


if __name__ == "__main__":
    main()
