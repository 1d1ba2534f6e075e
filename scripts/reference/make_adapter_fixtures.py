"""Reference PEFT LoRA adapter fixtures, made with the real stack (torch, transformers, peft, safetensors).

Writes under Tests/QLoRAModelTests/Resources/:

  tiny-llama-gqa-lora/      LoraConfig(r=8, lora_alpha=16, dropout 0, bias "none", CAUSAL_LM,
                            target q/k/v/o/gate/up/down_proj) on tiny-llama-gqa   -> scaling 16/8 = 2
  tiny-llama-gqa-lora-rs/   LoraConfig(r=4, lora_alpha=8, use_rslora=True, target q_proj/v_proj) on tiny-llama-gqa
                            -> scaling 8/sqrt(4) = 4
  tiny-qwen2-lora/          same config as tiny-llama-gqa-lora on tiny-qwen2 (q/k/v biases stay in the base layer,
                            lora_B has no bias; tied embeddings are not targeted)

  Each folder holds
    adapter_config.json           written by PeftModel.save_pretrained (base_model_name_or_path set to the model
                                  folder name, target_modules written as a sorted list)
    adapter_model.safetensors     written by PeftModel.save_pretrained (safetensors), keys
                                  base_model.model.<module path>.lora_A.weight  F32 [r, in_features]
                                  base_model.model.<module path>.lora_B.weight  F32 [out_features, r]
    expected_logits.safetensors
      input_ids      I64 [2, 12]      the `input_ids` of <model>/logits.safetensors
      logits         F32 [2, 12, V]   base + adapter (unmerged PeftModel forward, eval, no_grad, eager attention)
      logits_merged  F32 [2, 12, V]   the same after merge_and_unload()
    __metadata__ holds versions, the LoRA config, the scaling and the max differences (strings).

Weights: every lora_A and lora_B weight is overwritten (so B != 0) with N(0, 0.1^2) values drawn from a
torch.Generator seeded with 0, visiting the LoRA layers in sorted module-name order, lora_A before lora_B.
PEFT computes, per targeted nn.Linear (peft/tuners/lora/layer.py, LoraLayer.update_layer and Linear.forward):
    scaling = lora_alpha / r                (use_rslora False)
    scaling = lora_alpha / sqrt(r)          (use_rslora True)
    y = base(x) + lora_B(lora_A(dropout(x))) * scaling ;  merged: W += (B @ A) * scaling
Every saved adapter is reloaded with PeftModel.from_pretrained onto a fresh base and its logits are asserted equal.

CPU, one thread.
Run:  /work/refvenv/bin/python scripts/reference/make_adapter_fixtures.py
"""

import json
import math
import os
import sys

import torch

torch.set_num_threads(1)

import peft  # noqa: E402
import safetensors  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
RES = os.path.join(ROOT, "Tests", "QLoRAModelTests", "Resources")

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEED = 0
STD = 0.1

ADAPTERS = [
    # (model folder, adapter folder, LoraConfig kwargs)
    ("tiny-llama-gqa", "tiny-llama-gqa-lora", dict(r=8, lora_alpha=16, target_modules=ALL_TARGETS, use_rslora=False)),
    ("tiny-llama-gqa", "tiny-llama-gqa-lora-rs", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True)),
    ("tiny-qwen2", "tiny-qwen2-lora", dict(r=8, lora_alpha=16, target_modules=ALL_TARGETS, use_rslora=False)),
]


def load_base(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()


def load_input_ids(model_dir):
    with safe_open(os.path.join(model_dir, "logits.safetensors"), "pt") as f:
        return f.get_tensor("input_ids"), f.get_tensor("logits")


@torch.no_grad()
def logits_of(model, input_ids):
    return model(input_ids=input_ids).logits.float().contiguous()


def randomize_lora(peft_model):
    """Overwrite every lora_A / lora_B weight with N(0, STD^2), deterministic order."""
    g = torch.Generator().manual_seed(SEED)
    layers = sorted(
        ((name, m) for name, m in peft_model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)),
        key=lambda t: t[0],
    )
    count = 0
    with torch.no_grad():
        for _, m in layers:
            for adapter in sorted(m.lora_A.keys()):
                for lin in (m.lora_A[adapter], m.lora_B[adapter]):
                    w = lin.weight
                    w.copy_(torch.randn(w.shape, generator=g, dtype=torch.float32) * STD)
                    count += 1
    return layers, count


def make(model_name, adapter_name, kw):
    model_dir = os.path.join(RES, model_name)
    out_dir = os.path.join(RES, adapter_name)
    os.makedirs(out_dir, exist_ok=True)
    input_ids, base_logits_fixture = load_input_ids(model_dir)

    base = load_base(model_dir)
    base_logits = logits_of(base, input_ids)
    base_diff = (base_logits - base_logits_fixture).abs().max().item()
    assert base_diff < 1e-4, f"{model_name}: base logits differ from fixture by {base_diff}"

    cfg = LoraConfig(lora_dropout=0.0, task_type="CAUSAL_LM", bias="none", **kw)
    model = get_peft_model(base, cfg)
    layers, n_weights = randomize_lora(model)
    expected_layers = 2 * len(kw["target_modules"])  # two decoder layers in every tiny model
    assert len(layers) == expected_layers, (len(layers), expected_layers)
    assert n_weights == 2 * expected_layers

    scalings = {m.scaling["default"] for _, m in layers}
    assert len(scalings) == 1
    scaling = scalings.pop()
    want = kw["lora_alpha"] / (math.sqrt(kw["r"]) if kw["use_rslora"] else kw["r"])
    assert abs(scaling - want) < 1e-12, (scaling, want)

    model.eval()
    logits = logits_of(model, input_ids)
    adapter_effect = (logits - base_logits).abs().max().item()
    assert adapter_effect > 1e-2, f"adapter has no visible effect ({adapter_effect})"

    # Manual check of one layer: base(x) + B(A(x)) * scaling.
    name0, m0 = layers[0]
    x = torch.randn(3, m0.in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        manual = m0.base_layer(x) + (x @ m0.lora_A["default"].weight.T @ m0.lora_B["default"].weight.T) * want
        manual_diff = (m0(x) - manual).abs().max().item()
    assert manual_diff < 1e-5, manual_diff

    # Keep the fixture portable and byte-stable: a relative base path, and target_modules as a sorted list
    # (PEFT stores a set, which json-dumps in hash order).
    model.peft_config["default"].base_model_name_or_path = model_name
    model.peft_config["default"].target_modules = sorted(model.peft_config["default"].target_modules)
    model.save_pretrained(out_dir, safe_serialization=True)
    readme = os.path.join(out_dir, "README.md")  # PEFT's generated model card; not part of the fixture
    if os.path.exists(readme):
        os.remove(readme)

    merged = model.merge_and_unload()
    logits_merged = logits_of(merged.eval(), input_ids)
    merged_diff = (logits - logits_merged).abs().max().item()
    assert merged_diff < 1e-4, merged_diff

    # Reload the saved adapter onto a fresh base.
    reloaded = PeftModel.from_pretrained(load_base(model_dir), out_dir).eval()
    logits_reloaded = logits_of(reloaded, input_ids)
    reload_diff = (logits - logits_reloaded).abs().max().item()
    assert reload_diff == 0.0 or reload_diff < 1e-6, reload_diff

    meta = {
        "generator": "scripts/reference/make_adapter_fixtures.py",
        "model": model_name,
        "adapter": adapter_name,
        "lora_config": json.dumps(
            {"r": kw["r"], "lora_alpha": kw["lora_alpha"], "use_rslora": kw["use_rslora"],
             "target_modules": kw["target_modules"], "lora_dropout": 0.0, "bias": "none"}
        ),
        "scaling": repr(scaling),
        "init": f"every lora_A/lora_B weight ~ N(0, {STD}^2), torch.Generator seed {SEED}, sorted module order, A then B",
        "max_abs_diff_logits_vs_logits_merged": repr(merged_diff),
        "max_abs_diff_logits_vs_reloaded": repr(reload_diff),
        "max_abs_diff_logits_vs_base": repr(adapter_effect),
        "max_abs_logits": repr(logits.abs().max().item()),
        "attn_implementation": "eager",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "safetensors": safetensors.__version__,
        "python": sys.version.split()[0],
    }
    save_file(
        {"input_ids": input_ids.to(torch.int64).contiguous(), "logits": logits, "logits_merged": logits_merged},
        os.path.join(out_dir, "expected_logits.safetensors"),
        metadata=meta,
    )
    print(f"{adapter_name}: scaling {scaling}, |logits - base| max {adapter_effect:.4f}, "
          f"merged diff {merged_diff:.3g}, reload diff {reload_diff:.3g}, manual layer diff {manual_diff:.3g}")
    return out_dir


def describe(out_dir):
    with open(os.path.join(out_dir, "adapter_config.json")) as f:
        print(f"--- {out_dir}/adapter_config.json\n{f.read()}")
    with safe_open(os.path.join(out_dir, "adapter_model.safetensors"), "pt") as f:
        print(f"--- adapter_model.safetensors metadata: {f.metadata()}")
        for k in sorted(f.keys()):
            t = f.get_tensor(k)
            print(f"  {k}  {str(t.dtype).replace('torch.', '')}  {list(t.shape)}")


def main():
    outs = [make(m, a, kw) for m, a, kw in ADAPTERS]
    for out in outs:
        describe(out)


if __name__ == "__main__":
    main()
