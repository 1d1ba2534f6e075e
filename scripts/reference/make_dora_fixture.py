#!/usr/bin/env python3
"""DoRA reference fixtures from PEFT itself (LoraConfig(use_dora=True)), CPU, float32, one thread.

Writes under Tests/QLoRATrainingTests/Resources/:

  dora_grads.safetensors
    input_ids, labels                     I64 [2, 16]   the batch of lora_grads.safetensors (copied)
    dora.<key>                            F32           every trainable tensor as PEFT saves it (no adapter name):
                                                        ...<proj>.lora_A.weight [8, in], ...lora_B.weight [out, 8]
                                                        (= lora_grads.safetensors "untied.<key>") and
                                                        ...<proj>.lora_magnitude_vector [out] (the magnitude used)
    dora.magnitude.<key>                  F32 [out]     the same magnitude vectors again (key ends .lora_magnitude_vector)
    dora.loss                             F32 [1]       model.train(), loss of the batch
    dora.grad.<key>                       F32           gradient of every trainable tensor (A, B and magnitude)
    dora.grad_norm                        F32 [1]       clip_grad_norm_(all trainable, inf)
    dora.logits                           F32 [2,16,320] model.eval() logits of the batch (no_grad)
    dora.merged.model.layers.0.self_attn.q_proj.weight   F32 [64, 64]    after merge_and_unload()
    dora.merged.model.layers.0.mlp.down_proj.weight      F32 [64, 192]
    dora_nf4.*                            the same (no merged) on the bitsandbytes NF4 base tiny-llama-train-bnb-nf4
  peft-dora-adapter/                      PeftModel.save_pretrained of the f32 run (adapter_model.safetensors,
                                          adapter_config.json; base_model_name_or_path set to "tiny-llama-train",
                                          target_modules sorted; PEFT's README.md model card not copied)

Magnitude: PEFT initialises lora_magnitude_vector to ||W + s B A||_row at creation (B = 0 there); after copying the
non-zero A/B in, every magnitude is set to  m_j = n_j * (1 + 0.1 cos(0.7 j + 1.3 t)),  n_j = ||W + s B A|| of row j
(float64, then float32), t = the layer's index in sorted PEFT key order (0..13), W the (dequantized) base weight.

Run:  source ~/.cache/swift-qlora/bench-venv/bin/activate && python scripts/reference/make_dora_fixture.py
"""

import json
import math
import os
import shutil
import sys
import tempfile
import warnings

import torch

torch.set_num_threads(1)

import bitsandbytes as bnb  # noqa: E402
import peft  # noqa: E402
import safetensors  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()
warnings.filterwarnings("ignore")

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
RES = os.path.join(ROOT, "Tests", "QLoRATrainingTests", "Resources")
TRAIN_DIR = os.path.join(RES, "tiny-llama-train")
NF4_DIR = os.path.join(RES, "tiny-llama-train-bnb-nf4")
ADAPTER_OUT = os.path.join(RES, "peft-dora-adapter")
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA = 8, 16
SCALING = ALPHA / R
MERGED = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"]


def meta_base():
    return {
        "generator": "scripts/reference/make_dora_fixture.py",
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "bitsandbytes": bnb.__version__, "safetensors": safetensors.__version__,
        "python": sys.version.split()[0], "threads": str(torch.get_num_threads()),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def dora_config():
    return LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(PROJECTIONS), bias="none",
                      task_type="CAUSAL_LM", use_dora=True)


def load_f32():
    return LlamaForCausalLM.from_pretrained(TRAIN_DIR, dtype=torch.float32, attn_implementation="eager")


def load_nf4():
    m = LlamaForCausalLM.from_pretrained(NF4_DIR, device_map="cpu", dtype=torch.float32, attn_implementation="eager")
    n = 0
    for mod in m.modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            mod.support_avx512bf16_for_cpu = False  # as make_training_fixtures.py (DESIGN.md, Traps)
            n += 1
    assert n == 14, n
    return m


def key(name):
    """named_parameters() name -> the key PEFT writes (checked against get_peft_model_state_dict below)."""
    for a, b in ((".lora_A.default.weight", ".lora_A.weight"), (".lora_B.default.weight", ".lora_B.weight"),
                 (".lora_magnitude_vector.default.weight", ".lora_magnitude_vector")):
        if name.endswith(a):
            return name[: -len(a)] + b
    raise ValueError(name)


def c32(t):
    return t.detach().to(torch.float32).contiguous().clone()


def maxdiff(a, b):
    return float((a.double() - b.double()).abs().max())


def dora_layers(model):
    out = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_magnitude_vector") and "default" in getattr(mod, "lora_magnitude_vector", {}):
            out[name] = mod
    return out


def base_weight(mod):
    """The base weight PEFT's DoRA uses: dequantize_module_weight (bnb Params4bit -> dequantize_4bit)."""
    from peft.utils.integrations import dequantize_module_weight
    return dequantize_module_weight(mod.get_base_layer()).detach().float()


def set_weights(model, ref):
    """A/B from lora_grads.safetensors ("untied."); then the non-trivial magnitude. Returns {key: magnitude}."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, p in params.items():
            if ".lora_A." in n or ".lora_B." in n:
                p.copy_(ref["untied." + key(n)])
    mags = {}
    layers = dora_layers(model)
    mkeys = sorted(key(n) for n in params if "lora_magnitude_vector" in n)
    with torch.no_grad():
        for modname, mod in layers.items():
            pname = modname + ".lora_magnitude_vector.default.weight"
            k = key(pname)
            t = mkeys.index(k)
            W = base_weight(mod).double()
            A = mod.lora_A["default"].weight.double()
            B = mod.lora_B["default"].weight.double()
            n = torch.linalg.norm(W + SCALING * (B @ A), dim=1)
            j = torch.arange(W.shape[0], dtype=torch.float64)
            m = (n * (1.0 + 0.1 * torch.cos(0.7 * j + 1.3 * t))).float()
            params[pname].copy_(m)
            mags[k] = m.clone()
    return mags


def check_layer_formula(model, meta, tag):
    """Restate PEFT's DoRA linear forward and its gradients on one layer with random x, and the dropout path."""
    mods = dora_layers(model)
    name = sorted(mods)[0]
    mod = mods[name]
    W = base_weight(mod)
    A = mod.lora_A["default"].weight.detach()
    B = mod.lora_B["default"].weight.detach()
    m = mod.lora_magnitude_vector["default"].weight.detach()
    x = torch.randn(3, 5, W.shape[1], generator=torch.Generator().manual_seed(11))

    def manual(x_base, x_lora, A_, B_, m_):
        norm = torch.linalg.norm(W + SCALING * (B_ @ A_).detach(), dim=1).detach()   # per output row, no grad
        scale = m_ / norm
        base = x_base @ W.T
        return base + (scale - 1) * (x_lora @ W.T) + scale * SCALING * ((x_lora @ A_.T) @ B_.T)

    was_training = model.training
    model.train()
    xs = x.clone().requires_grad_(True)
    y = mod(xs)
    ws = [mod.lora_A["default"].weight, mod.lora_B["default"].weight, mod.lora_magnitude_vector["default"].weight]
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(12))
    g_peft = torch.autograd.grad(y, ws + [xs], gy)
    A_, B_, m_ = (A.clone().requires_grad_(True), B.clone().requires_grad_(True), m.clone().requires_grad_(True))
    xm = x.clone().requires_grad_(True)
    ym = manual(xm, xm, A_, B_, m_)
    g_man = torch.autograd.grad(ym, [A_, B_, m_, xm], gy)
    meta[f"{tag}.formula_check.layer"] = name
    meta[f"{tag}.formula_check.forward_maxdiff"] = repr(maxdiff(y, ym))
    meta[f"{tag}.formula_check.grad_maxdiff(A,B,m,x)"] = json.dumps([maxdiff(a, b) for a, b in zip(g_peft, g_man)])
    # equivalent closed form: y = (m / ||W + sBA||_row) * (W x + s B A x)
    y2 = (m / torch.linalg.norm(W + SCALING * B @ A, dim=1)) * (x @ W.T + SCALING * (x @ A.T) @ B.T)
    meta[f"{tag}.formula_check.closed_form_maxdiff"] = repr(maxdiff(y, y2))

    # dropout > 0 in training: the DoRA term is computed from dropout(x), the base from x
    drop = torch.nn.Dropout(p=0.25)
    old = mod.lora_dropout["default"]
    mod.lora_dropout["default"] = drop
    torch.manual_seed(123)
    with torch.no_grad():
        yd = mod(x)
    torch.manual_seed(123)
    xd = torch.nn.functional.dropout(x, p=0.25, training=True)
    with torch.no_grad():
        yd_man = manual(x, xd, A, B, m)
    meta[f"{tag}.dropout_check.maxdiff"] = repr(maxdiff(yd, yd_man))
    mod.lora_dropout["default"] = old
    model.train(was_training)
    worst = max([maxdiff(y, ym), maxdiff(y, y2), maxdiff(yd, yd_man)] + [maxdiff(a, b) for a, b in zip(g_peft, g_man)])
    assert worst < 1e-4, (tag, worst)
    return worst


def run(model, ref, ids, labels, prefix, tensors, meta):
    tag = prefix.rstrip(".")
    init_mag = {key(n): c32(p) for n, p in model.named_parameters() if "lora_magnitude_vector" in n}
    # the magnitude at creation (B = 0): ||W||_row
    init_ok = max(maxdiff(init_mag[key(name + ".lora_magnitude_vector.default.weight")],
                          torch.linalg.norm(base_weight(mod).double(), dim=1)) for name, mod in dora_layers(model).items())
    meta[f"{tag}.init_magnitude_vs_rownorm_W_maxdiff"] = repr(init_ok)
    assert init_ok < 1e-5, init_ok
    mags = set_weights(model, ref)
    check_layer_formula(model, meta, tag)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 14 * 3, len(trainable)
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    grads = {key(n): c32(p.grad) for n, p in trainable}
    zero = [k for k, g in grads.items() if float(g.abs().max()) == 0.0]
    assert not zero, zero
    gnorm = torch.nn.utils.clip_grad_norm_([p for _, p in trainable], max_norm=float("inf"))
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    meta[f"{tag}.train_vs_eval_logits_maxdiff"] = repr(maxdiff(out.logits, logits))
    tensors[prefix + "loss"] = c32(out.loss).reshape(1)
    tensors[prefix + "grad_norm"] = c32(gnorm).reshape(1)
    tensors[prefix + "logits"] = c32(logits)
    for n, p in trainable:
        k = key(n)
        tensors[prefix + k] = c32(p)
        tensors[prefix + "grad." + k] = grads[k]
    for k, m in mags.items():
        tensors[prefix + "magnitude." + k] = m
    meta[f"{tag}.loss"] = repr(out.loss.item())
    meta[f"{tag}.grad_norm"] = repr(float(gnorm))
    print(f"{tag}: loss {out.loss.item():.9g}, grad_norm {float(gnorm):.9g}")
    return logits


def save_and_merge(model, ids, logits, tensors, meta):
    # the state dict PEFT writes
    sd = get_peft_model_state_dict(model)
    mine = {key(n) for n, p in model.named_parameters() if p.requires_grad}
    assert set(sd) == mine, (sorted(set(sd) ^ mine))[:6]
    # portable and byte-stable, as make_adapter_fixtures.py: a relative base path, target_modules sorted (PEFT keeps
    # a set, which json-dumps in hash order)
    model.peft_config["default"].base_model_name_or_path = "tiny-llama-train"
    model.peft_config["default"].target_modules = sorted(model.peft_config["default"].target_modules)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        files = sorted(os.listdir(tmp))
        with safe_open(os.path.join(tmp, "adapter_model.safetensors"), "pt") as f:
            saved = {k: (str(f.get_tensor(k).dtype), list(f.get_tensor(k).shape)) for k in f.keys()}
            st_meta = f.metadata()
        with open(os.path.join(tmp, "adapter_config.json")) as f:
            cfg = json.load(f)
        # reload onto a fresh base: same logits
        re = PeftModel.from_pretrained(load_f32(), tmp)
        re.eval()
        with torch.no_grad():
            relog = re(input_ids=ids).logits
        meta["dora.save.reload_logits_maxdiff"] = repr(maxdiff(relog, logits))
        assert maxdiff(relog, logits) == 0.0
        fresh = os.path.join(ADAPTER_OUT)
        if os.path.isdir(fresh):
            shutil.rmtree(fresh)
        os.makedirs(fresh)
        for fn in ("adapter_model.safetensors", "adapter_config.json"):
            shutil.copy(os.path.join(tmp, fn), os.path.join(fresh, fn))
    mags = {k: v for k, v in saved.items() if "magnitude" in k}
    meta["dora.save.files"] = json.dumps(files)
    meta["dora.save.n_keys"] = str(len(saved))
    meta["dora.save.magnitude_keys"] = json.dumps(mags, sort_keys=True)
    meta["dora.save.safetensors_metadata"] = json.dumps(st_meta)
    meta["dora.save.adapter_config"] = json.dumps(cfg, sort_keys=True)
    print("saved files:", files, "| safetensors metadata:", st_meta)
    for k in sorted(mags):
        print("  ", k, mags[k])
    print("adapter_config.json:", json.dumps(cfg, sort_keys=True))

    # merge_and_unload (safe_merge False): W' = (m / ||W + s B A||_row)[:, None] * (W + s B A)
    manual = {}
    for name, mod in dora_layers(model).items():
        wname = name[len("base_model.model."):] + ".weight"
        if wname in MERGED:
            W = base_weight(mod)
            A = mod.lora_A["default"].weight.detach()
            B = mod.lora_B["default"].weight.detach()
            m = mod.lora_magnitude_vector["default"].weight.detach()
            dW = SCALING * (B @ A)
            manual[wname] = (m / torch.linalg.norm(W + dW, dim=1)).view(-1, 1) * (W + dW)
    merged = model.merge_and_unload()
    merged.eval()
    with torch.no_grad():
        mlog = merged(input_ids=ids).logits
    msd = merged.state_dict()
    for w in MERGED:
        tensors["dora.merged." + w] = c32(msd[w])
        meta[f"dora.merged.{w}.vs_formula_maxdiff"] = repr(maxdiff(msd[w], manual[w]))
        assert maxdiff(msd[w], manual[w]) < 1e-5
    meta["dora.merged.logits_vs_unmerged_maxdiff"] = repr(maxdiff(mlog, logits))
    print("merged logits vs unmerged max diff", maxdiff(mlog, logits))


def main():
    ref = load_file(os.path.join(RES, "lora_grads.safetensors"))
    ids, labels = ref["input_ids"], ref["labels"]
    tensors = {"input_ids": ids.clone(), "labels": labels.clone()}
    meta = meta_base()
    meta["dora_config"] = json.dumps({"r": R, "lora_alpha": ALPHA, "lora_dropout": 0.0, "target_modules": PROJECTIONS,
                                      "bias": "none", "use_dora": True, "scaling": SCALING})
    meta["weights"] = ("lora_A/lora_B = lora_grads.safetensors 'untied.<key>'; magnitude m_j = n_j (1 + 0.1 cos(0.7 j "
                       "+ 1.3 t)), n_j = ||W + s B A|| of output row j (f64 -> f32), t = index of the layer in sorted "
                       "magnitude-key order, W = the (dequantized) base weight")
    meta["key_format"] = ("dora.<key> / dora.grad.<key> / dora.magnitude.<key> with <key> as PEFT writes "
                          "adapter_model.safetensors: ...q_proj.lora_A.weight, ...lora_B.weight, "
                          "...q_proj.lora_magnitude_vector (no .weight); the same with dora_nf4.")

    model = get_peft_model(load_f32(), dora_config())
    logits = run(model, ref, ids, labels, "dora.", tensors, meta)
    save_and_merge(model, ids, logits, tensors, meta)

    model = get_peft_model(load_nf4(), dora_config())
    run(model, ref, ids, labels, "dora_nf4.", tensors, meta)
    # the NF4 DoRA run equals the f32 model built from the dequantized weights
    deq_model = load_f32()
    qm = load_nf4()
    with torch.no_grad():
        sd = dict(deq_model.named_parameters())
        for name, mod in qm.named_modules():
            if isinstance(mod, bnb.nn.Linear4bit):
                sd[name + ".weight"].copy_(bnb.functional.dequantize_4bit(mod.weight.data, mod.weight.quant_state))
    t2, m2 = {}, {}
    run(get_peft_model(deq_model, dora_config()), ref, ids, labels, "deq.", t2, m2)
    meta["dora_nf4.vs_dequantized_f32_model.loss_diff"] = repr(abs(t2["deq.loss"].item() - tensors["dora_nf4.loss"].item()))
    meta["dora_nf4.vs_dequantized_f32_model.grad_maxdiff"] = repr(max(
        maxdiff(t2["deq." + k[len("dora_nf4."):]], v) for k, v in tensors.items() if k.startswith("dora_nf4.grad.")))
    meta["dora_nf4.note"] = ("base tiny-llama-train-bnb-nf4 (nf4, double quant, compute f32) loaded by transformers; "
                             "support_avx512bf16_for_cpu=False; DoRA's norm uses dequantize_4bit(W)")
    print("nf4 vs dequantized f32 model:", meta["dora_nf4.vs_dequantized_f32_model.loss_diff"],
          meta["dora_nf4.vs_dequantized_f32_model.grad_maxdiff"])

    path = os.path.join(RES, "dora_grads.safetensors")
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={k: str(v) for k, v in meta.items()})
    for k in sorted(meta):
        if "check" in k or "maxdiff" in k or "diff" in k:
            print(f"  {k}: {meta[k]}")
    print(f"wrote {path} ({os.path.getsize(path)} bytes, {len(tensors)} tensors)")


if __name__ == "__main__":
    main()
