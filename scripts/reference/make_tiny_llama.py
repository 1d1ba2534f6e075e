"""Make a tiny random Llama and its bitsandbytes-4bit checkpoints, as transformers writes them.

Writes under Tests/QLoRAFormatsTests/Resources/:
  tiny-llama/                  random LlamaForCausalLM (hidden 64, intermediate 128, 2 layers, 4 heads,
                               2 kv heads, vocab 256, untied lm_head), float32, save_pretrained (safetensors)
  tiny-llama-bnb-nf4/          that model loaded by transformers with BitsAndBytesConfig(load_in_4bit, nf4,
                               double quant, compute dtype float32) on the CPU, then save_pretrained
  tiny-llama-bnb-fp4-nodq/     the same with fp4 and no double quant
  tiny-llama-logits.safetensors  logits [1, 8, 256] f32 for input ids [[1, 5, 9, 200, 17, 3, 99, 42]]:
                               `logits.f32` (the float32 model), `logits.bnb_nf4`, `logits.bnb_fp4_nodq`,
                               and `input_ids` (i64)

Every bnb.nn.Linear4bit gets support_avx512bf16_for_cpu = False before any forward (see DESIGN.md, Traps).
Seed 0; CPU; one thread.
Run:  /work/refvenv/bin/python scripts/reference/make_tiny_llama.py
"""

import json
import os
import shutil
import sys

import torch

torch.set_num_threads(1)

import bitsandbytes as bnb  # noqa: E402
import numpy as np  # noqa: E402
import safetensors  # noqa: E402
import transformers  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

SEED = 0
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
RES = os.path.join(ROOT, "Tests", "QLoRAFormatsTests", "Resources")
F32_DIR = os.path.join(RES, "tiny-llama")
NF4_DIR = os.path.join(RES, "tiny-llama-bnb-nf4")
FP4_DIR = os.path.join(RES, "tiny-llama-bnb-fp4-nodq")
LOGITS = os.path.join(RES, "tiny-llama-logits.safetensors")
INPUT_IDS = [[1, 5, 9, 200, 17, 3, 99, 42]]


def versions():
    return {
        "generator": "scripts/reference/make_tiny_llama.py",
        "seed": str(SEED),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "bitsandbytes": bnb.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
    }


def disable_bf16_repack(model):
    n = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False
            n += 1
    return n


def fresh_dir(path):
    if os.path.isdir(path):
        shutil.rmtree(path)
    os.makedirs(path)


def load_quantized(src, quant_type, double_quant):
    cfg = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = LlamaForCausalLM.from_pretrained(src, quantization_config=cfg, device_map="cpu", dtype=torch.float32)
    n = disable_bf16_repack(model)
    assert n == 2 * 7, n  # q, k, v, o, gate, up, down per layer
    model.eval()
    return model


@torch.no_grad()
def logits_of(model):
    return model(torch.tensor(INPUT_IDS)).logits.float().contiguous()


def describe(dirpath):
    out = {}
    with safe_open(os.path.join(dirpath, "model.safetensors"), "np") as f:
        meta = f.metadata()
        for k in f.keys():
            t = f.get_tensor(k)
            out[k] = (str(t.dtype), list(t.shape))
    return meta, out


def main():
    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    fresh_dir(F32_DIR)
    model.save_pretrained(F32_DIR, safe_serialization=True)
    f32_logits = logits_of(model)

    # reload from disk to be sure the saved float32 checkpoint gives the same logits
    reloaded = LlamaForCausalLM.from_pretrained(F32_DIR, dtype=torch.float32).eval()
    assert torch.equal(logits_of(reloaded), f32_logits)

    results = {"logits.f32": f32_logits}
    for name, qt, dq, dst in (("bnb_nf4", "nf4", True, NF4_DIR), ("bnb_fp4_nodq", "fp4", False, FP4_DIR)):
        qmodel = load_quantized(F32_DIR, qt, dq)
        logits = logits_of(qmodel)
        fresh_dir(dst)
        qmodel.save_pretrained(dst, safe_serialization=True)
        # the saved 4-bit checkpoint must load back to the same logits
        again = LlamaForCausalLM.from_pretrained(dst, device_map="cpu", dtype=torch.float32)
        disable_bf16_repack(again)
        again.eval()
        same = torch.equal(logits_of(again), logits)
        print(f"{name}: reloaded saved checkpoint gives identical logits: {same}")
        assert same
        results[f"logits.{name}"] = logits
        print(f"{name}: max |logits - f32 logits| = {(logits - f32_logits).abs().max().item():.6f}")

    tensors = {k: v.numpy() for k, v in results.items()}
    tensors["input_ids"] = np.array(INPUT_IDS, dtype=np.int64)
    meta = versions()
    meta["input_ids"] = json.dumps(INPUT_IDS)
    meta["note"] = "support_avx512bf16_for_cpu=False on every Linear4bit; eval, no_grad, compute dtype float32"
    save_file(tensors, LOGITS, metadata=meta)

    for d in (F32_DIR, NF4_DIR, FP4_DIR):
        print(f"== {os.path.relpath(d, ROOT)}: {sorted(os.listdir(d))}")
        meta, desc = describe(d)
        print("   safetensors metadata:", meta)
        for k, (dt, shape) in desc.items():
            if "layers.0.self_attn.q_proj" in k or "layers" not in k:
                print(f"   {k}: {dt} {shape}")
        with open(os.path.join(d, "config.json")) as f:
            cfg = json.load(f)
        if "quantization_config" in cfg:
            print("   quantization_config:", json.dumps(cfg["quantization_config"], indent=1, sort_keys=True))
        with safe_open(os.path.join(d, "model.safetensors"), "np") as f:
            for k in f.keys():
                if k.startswith("model.layers.0.self_attn.q_proj.weight.quant_state."):
                    print(f"   {k} decoded:", bytes(f.get_tensor(k)).decode())
    print("versions:", versions())


if __name__ == "__main__":
    main()
