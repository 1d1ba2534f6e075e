"""Reference fixtures for the training engine, made with the real stack (torch, transformers, peft,
bitsandbytes, safetensors) on the CPU, one thread.

Writes under Tests/QLoRATrainingTests/Resources/ (names and layouts: scripts/reference/TRAINING_NOTES.md):

  tiny-llama-train/              LlamaForCausalLM, vocab 320, hidden 64, intermediate 192, 2 layers, 4 heads,
                                 2 kv heads, head_dim 16, untied, float32 safetensors (save_pretrained).
                                 Every in_features (64 and 192) is a multiple of the 4-bit block size 64.
  tiny-llama-train-tied/         the same weights with tie_word_embeddings=True (no lm_head.weight stored)
  tiny-llama-train-bnb-nf4/      tiny-llama-train loaded by transformers in 4 bits (nf4, double quant, compute
                                 float32) and saved with save_pretrained, before any LoRA is added
  lora_grads.safetensors         LoRA r=8 alpha=16 on all 7 projections: loss, LoRA weights and gradients,
                                 with and without gradient checkpointing, untied and tied base
  lora_grads_nf4.safetensors     the same on the 4-bit base (untied only)
  adamw.safetensors              torch.optim.AdamW, 10 steps, weight decay 0 and 0.01
  adamw8bit.safetensors          bitsandbytes.optim.AdamW8bit on the CPU, 10 steps, with the quantized state
                                 after every step
  trainable_params.json          what PEFT's print_trainable_parameters() prints for SmolLM2-135M, r=16 and 64

Every bnb.nn.Linear4bit gets support_avx512bf16_for_cpu = False before its first forward (DESIGN.md, Traps).
Run:  /work/refvenv/bin/python scripts/reference/make_training_fixtures.py        (about 10 s)
"""

import contextlib
import io
import json
import math
import os
import shutil
import sys
import warnings

import torch

torch.set_num_threads(1)

import bitsandbytes as bnb  # noqa: E402
import numpy as np  # noqa: E402
import peft  # noqa: E402
import safetensors  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
RES = os.path.join(ROOT, "Tests", "QLoRATrainingTests", "Resources")
TRAIN_DIR = os.path.join(RES, "tiny-llama-train")
TIED_DIR = os.path.join(RES, "tiny-llama-train-tied")
NF4_DIR = os.path.join(RES, "tiny-llama-train-bnb-nf4")
GGUF = "/root/.cache/swift-qlora/models/SmolLM2-135M-Instruct.Q4_1.gguf"

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_R, LORA_ALPHA = 8, 16
LORA_STD = 0.1
SEED_MODEL, SEED_LORA, SEED_BATCH = 0, 1, 2
BATCH, SEQ, PROMPT = 2, 16, 5

ADAM_SHAPE, ADAM_SEED_P, ADAM_SEED_G = (37, 13), 3, 4          # gradient of step t (1..10): seed 4 + t
ADAM8_SHAPE, ADAM8_SEED_P, ADAM8_SEED_G = (37, 131), 5, 6      # gradient of step t (1..10): seed 6 + t
ADAM8_SMALL_SHAPE = (13, 7)                                    # below min_8bit_size: bnb keeps f32 state
STEPS, LR = 10, 1e-2


def versions(part):
    return {
        "generator": f"scripts/reference/make_training_fixtures.py ({part})",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bnb.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": str(torch.get_num_threads()),
    }


def fresh_dir(path):
    if os.path.isdir(path):
        shutil.rmtree(path)
    os.makedirs(path)


def no_bf16_repack(model):
    n = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


def c32(t):
    return t.detach().to(torch.float32).contiguous().clone()


def maxdiff(a, b):
    return float((a.double() - b.double()).abs().max().item())


# ---------------------------------------------------------------- 1. the models

def train_config(tied):
    return LlamaConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        attention_bias=False,
        mlp_bias=False,
        dtype="float32",
    )


def seeded_weights():
    """Draw every parameter of the untied model in named_parameters() order from one generator (seed 0):
    embeddings N(0, 0.25^2); RMSNorm weights 1 + 0.2 N(0,1); every Linear [out, in] N(0, 1/in)."""
    skeleton = LlamaForCausalLM(train_config(False))
    gen = torch.Generator().manual_seed(SEED_MODEL)
    out = {}
    for name, p in skeleton.named_parameters():
        z = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if name.endswith("embed_tokens.weight"):
            w = z * 0.25
        elif name.endswith("norm.weight"):
            w = 1.0 + 0.2 * z
        else:
            assert p.dim() == 2, name
            w = z / math.sqrt(p.shape[1])
        out[name] = w
    return out


def make_models():
    weights = seeded_weights()
    untied = LlamaForCausalLM(train_config(False))
    missing, unexpected = untied.load_state_dict(weights, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    fresh_dir(TRAIN_DIR)
    untied.save_pretrained(TRAIN_DIR, safe_serialization=True)

    tied = LlamaForCausalLM(train_config(True))
    w2 = {k: v for k, v in weights.items() if k != "lm_head.weight"}
    missing, unexpected = tied.load_state_dict(w2, strict=False)
    assert not unexpected, unexpected
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    fresh_dir(TIED_DIR)
    tied.save_pretrained(TIED_DIR, safe_serialization=True)

    # both folders load back to exactly the drawn weights
    for d, is_tied in ((TRAIN_DIR, False), (TIED_DIR, True)):
        m = load_f32(d)
        sd = m.state_dict()
        for k, v in weights.items():
            src = "model.embed_tokens.weight" if (is_tied and k == "lm_head.weight") else k
            assert torch.equal(sd[k], weights[src]), (d, k)
    print("models: weights reload bit-exact; stored:",
          {os.path.basename(d): sorted(os.listdir(d)) for d in (TRAIN_DIR, TIED_DIR)})


def load_f32(folder):
    return LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")


# ---------------------------------------------------------------- 2./3. LoRA gradients

def lora_config():
    return LoraConfig(
        r=LORA_R,
        lora_alpha=LORA_ALPHA,
        lora_dropout=0.0,
        target_modules=list(PROJECTIONS),
        bias="none",
        task_type="CAUSAL_LM",
    )


def batch():
    gen = torch.Generator().manual_seed(SEED_BATCH)
    ids = torch.randint(3, 320, (BATCH, SEQ), generator=gen, dtype=torch.int64)
    labels = ids.clone()
    labels[:, :PROMPT] = -100
    labels[1, -2:] = -100
    return ids, labels


def lora_params(model):
    return [(n, p) for n, p in model.named_parameters() if "lora_" in n]


def peft_key(name):
    """The name PEFT writes to adapter_model.safetensors (get_peft_model_state_dict drops the adapter name):
    base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight -> ...q_proj.lora_A.weight"""
    out = name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
    assert out != name, name
    return out


def draw_lora_weights(model):
    gen = torch.Generator().manual_seed(SEED_LORA)
    out = {}
    for n, p in lora_params(model):
        out[n] = torch.randn(p.shape, generator=gen, dtype=torch.float32) * LORA_STD
    return out


def set_lora_weights(model, weights):
    names = [n for n, _ in lora_params(model)]
    assert sorted(names) == sorted(weights), (names, sorted(weights))
    with torch.no_grad():
        for n, p in lora_params(model):
            p.copy_(weights[n])


def manual_loss(logits, labels):
    """Shift, ignore -100, mean over the kept positions: the formula the notes give, checked against
    the model's loss."""
    lg = logits[:, :-1, :].reshape(-1, logits.shape[-1]).double()
    tg = labels[:, 1:].reshape(-1)
    keep = tg != -100
    lse = torch.logsumexp(lg[keep], dim=-1)
    picked = lg[keep].gather(1, tg[keep].unsqueeze(1)).squeeze(1)
    return float((lse - picked).mean().item()), int(keep.sum().item())


def run_lora(base, weights, ids, labels):
    model = get_peft_model(base, lora_config())
    set_lora_weights(model, weights)
    model.train()
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    params = lora_params(model)
    grads = {n: c32(p.grad) for n, p in params}
    gnorm = torch.nn.utils.clip_grad_norm_([p for _, p in params], max_norm=float("inf"))
    gnorm64 = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads.values()))
    ml, n_items = manual_loss(out.logits.detach(), labels)
    scaling = {m.scaling["default"] for m in model.modules() if isinstance(getattr(m, "scaling", None), dict) and "default" in m.scaling}
    return {
        "loss": c32(out.loss).reshape(1),
        "grads": grads,
        "grad_norm": c32(gnorm).reshape(1),
        "grad_norm_f64": gnorm64,
        "manual_loss": ml,
        "n_items": n_items,
        "scaling": sorted(scaling),
        "logits": out.logits.detach(),
        "model": model,
    }


def lora_grads():
    ids, labels = batch()
    tensors = {"input_ids": ids, "labels": labels}
    meta = versions("lora_grads")
    ref_weights = None
    for prefix, folder in (("untied.", TRAIN_DIR), ("tied.", TIED_DIR)):
        base = load_f32(folder)
        if ref_weights is None:
            probe = get_peft_model(load_f32(folder), lora_config())
            ref_weights = draw_lora_weights(probe)
            del probe
        r = run_lora(base, ref_weights, ids, labels)

        base_gc = load_f32(folder)
        base_gc.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        assert base_gc.is_activation_checkpointing
        r_gc = run_lora(base_gc, ref_weights, ids, labels)

        tensors[prefix + "loss"] = r["loss"]
        tensors[prefix + "grad_norm"] = r["grad_norm"]
        tensors[prefix + "gc.loss"] = r_gc["loss"]
        tensors[prefix + "gc.grad_norm"] = r_gc["grad_norm"]
        for n, w in ref_weights.items():
            k = peft_key(n)
            tensors[prefix + k] = w.clone()
            tensors[prefix + "grad." + k] = r["grads"][n]
            tensors[prefix + "gc.grad." + k] = r_gc["grads"][n]
        gd = max(maxdiff(r["grads"][n], r_gc["grads"][n]) for n in ref_weights)
        identical = all(torch.equal(r["grads"][n], r_gc["grads"][n]) for n in ref_weights)
        key = prefix.rstrip(".")
        meta[f"{key}.loss"] = repr(r["loss"].item())
        meta[f"{key}.loss_manual_f64"] = repr(r["manual_loss"])
        meta[f"{key}.loss_vs_manual"] = repr(abs(r["loss"].item() - r["manual_loss"]))
        meta[f"{key}.n_items"] = str(r["n_items"])
        meta[f"{key}.grad_norm_f64"] = repr(r["grad_norm_f64"])
        meta[f"{key}.gc.loss_diff"] = repr(abs(r["loss"].item() - r_gc["loss"].item()))
        meta[f"{key}.gc.grad_maxdiff"] = repr(gd)
        meta[f"{key}.gc.bit_identical"] = str(identical and torch.equal(r["loss"], r_gc["loss"]))
        meta[f"{key}.scaling"] = json.dumps(r["scaling"])
        print(f"lora_grads {key}: loss {r['loss'].item():.9g} (manual f64 {r['manual_loss']:.9g}), "
              f"n_items {r['n_items']}, grad_norm {r['grad_norm'].item():.9g} (f64 {r['grad_norm_f64']:.9g}), "
              f"gc loss diff {meta[key + '.gc.loss_diff']}, gc grad max diff {gd}, bit identical {identical}")
        # every LoRA gradient is nonzero (the checks in the brief: B != 0, so A gets a gradient too)
        zero = [n for n, g in r["grads"].items() if float(g.abs().max()) == 0.0]
        assert not zero, zero
    meta["key_format"] = ("LoRA tensors are named as PEFT writes adapter_model.safetensors (no adapter name): "
                          "<prefix><key>, <prefix>grad.<key>, <prefix>gc.grad.<key> with prefix untied. or tied.")
    meta["lora_config"] = json.dumps({"r": LORA_R, "lora_alpha": LORA_ALPHA, "lora_dropout": 0.0,
                                      "target_modules": PROJECTIONS, "bias": "none"})
    meta["lora_init"] = (f"every lora_A/lora_B weight overwritten with N(0, {LORA_STD}^2), torch.Generator seed "
                         f"{SEED_LORA}, in named_parameters() order of the PeftModel (layer 0 q_proj A, B, k_proj A, B, ...)")
    meta["batch"] = (f"input_ids randint[3,320) seed {SEED_BATCH} shape [{BATCH},{SEQ}]; labels = input_ids with "
                     f"[:, :{PROMPT}] = -100 and [1, -2:] = -100")
    save(os.path.join(RES, "lora_grads.safetensors"), tensors, meta)
    return ref_weights, ids, labels


def nf4_config():
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )


def load_nf4(folder, **kw):
    m = LlamaForCausalLM.from_pretrained(folder, device_map="cpu", dtype=torch.float32,
                                         attn_implementation="eager", **kw)
    n = no_bf16_repack(m)
    assert n == 2 * 7, n
    return m


def lora_grads_nf4(ref_weights, ids, labels):
    q = load_nf4(TRAIN_DIR, quantization_config=nf4_config())
    fresh_dir(NF4_DIR)
    q.save_pretrained(NF4_DIR, safe_serialization=True)

    # the run uses the saved checkpoint, so that our side loads exactly these 4-bit weights
    base = load_nf4(NF4_DIR)
    for n, p in base.named_parameters():
        assert p.dtype in (torch.float32, torch.uint8), (n, p.dtype)
    # the dequantized weights: the f32 model they define gives the reference for the 4-bit run
    deq = {}
    for name, m in base.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            assert m.in_features % 64 == 0, name
            deq[name + ".weight"] = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
    r = run_lora(base, ref_weights, ids, labels)

    plain = load_f32(TRAIN_DIR)
    with torch.no_grad():
        sd = dict(plain.named_parameters())
        for k, w in deq.items():
            assert sd[k].shape == w.shape, k
            sd[k].copy_(w)
    r_deq = run_lora(plain, ref_weights, ids, labels)

    tensors = {"input_ids": ids, "labels": labels, "loss": r["loss"], "grad_norm": r["grad_norm"]}
    for n, w in ref_weights.items():
        tensors[peft_key(n)] = w.clone()
        tensors["grad." + peft_key(n)] = r["grads"][n]
    gd = max(maxdiff(r["grads"][n], r_deq["grads"][n]) for n in ref_weights)
    grel = max(maxdiff(r["grads"][n], r_deq["grads"][n]) / float(r_deq["grads"][n].abs().max())
               for n in ref_weights)
    meta = versions("lora_grads_nf4")
    meta["base"] = "tiny-llama-train-bnb-nf4 (nf4, double quant, compute float32), prepare_model_for_kbit_training NOT applied"
    meta["loss"] = repr(r["loss"].item())
    meta["loss_manual_f64"] = repr(r["manual_loss"])
    meta["grad_norm_f64"] = repr(r["grad_norm_f64"])
    meta["dequantized_f32_model.loss"] = repr(r_deq["loss"].item())
    meta["dequantized_f32_model.loss_diff"] = repr(abs(r["loss"].item() - r_deq["loss"].item()))
    meta["dequantized_f32_model.grad_maxdiff"] = repr(gd)
    meta["dequantized_f32_model.grad_max_reldiff"] = repr(grel)
    meta["note"] = ("support_avx512bf16_for_cpu=False on every Linear4bit before any forward; the LoRA weights and "
                    "batch are those of lora_grads.safetensors (untied)")
    save(os.path.join(RES, "lora_grads_nf4.safetensors"), tensors, meta)
    print(f"lora_grads_nf4: loss {r['loss'].item():.9g}, grad_norm {r['grad_norm'].item():.9g}; vs the f32 model "
          f"built from the dequantized weights: loss diff {meta['dequantized_f32_model.loss_diff']}, "
          f"grad max diff {gd:.3g} (relative {grel:.3g})")


# ---------------------------------------------------------------- 4. torch AdamW

def seeded(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def run_torch_adamw(p0, grads, wd, **kw):
    p = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([p], lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd, **kw)
    params = []
    for g in grads:
        p.grad = g.clone()
        opt.step()
        params.append(p.detach().clone())
    st = opt.state[p]
    return params, st["exp_avg"].clone(), st["exp_avg_sq"].clone()


def f32(x):
    return np.float32(x)


def fma32(a, b, c):
    """float32 fused multiply-add, computed exactly in float64 then rounded once more (a*b is exact in f64;
    the double rounding of the sum can differ from a true fma only on rare ties)."""
    return (a.astype(np.float64) * np.asarray(b, dtype=np.float64) + np.asarray(c, dtype=np.float64)).astype(np.float32)


def torch_sqrt(a):
    """torch.sqrt as this build computes it on the CPU (within 1 ulp, not always correctly rounded; see
    TRAINING_NOTES.md), on an array of the same length."""
    return torch.from_numpy(np.ascontiguousarray(a)).sqrt().numpy()


def exact_sqrt(a):
    return np.sqrt(a)


def emulate_torch_adamw(p0, grads, wd, sqrt):
    """torch/optim/adam.py _single_tensor_adam with decoupled weight decay, restated in numpy float32, with
    each torch CPU kernel's rounding as measured: lerp_ with a scalar weight < 0.5 is fma(w, end - self, self);
    addcmul_ is fma(value * t1, t2, self); addcdiv_ is self + (value * t1) / t2; scalars become float32."""
    p = p0.numpy().copy()
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    b1, b2, eps = 0.9, 0.999, 1e-8
    out = []
    for t, g in enumerate(grads, start=1):
        g = g.numpy()
        if wd != 0:
            p = p * f32(1 - LR * wd)
        m = fma32(np.full_like(m, f32(1 - b1)), g - m, m)
        v = fma32(f32(1 - b2) * g, g, v * f32(b2))
        bc1 = 1 - b1 ** t
        bc2 = 1 - b2 ** t
        step_size = LR / bc1
        denom = sqrt(v) / f32(bc2 ** 0.5) + f32(eps)
        p = p + (f32(-step_size) * m) / denom
        out.append(p.copy())
    return out


def adamw():
    p0 = seeded(ADAM_SHAPE, ADAM_SEED_P)
    grads = [seeded(ADAM_SHAPE, ADAM_SEED_G + t) for t in range(1, STEPS + 1)]
    tensors = {"p0": p0}
    for t, g in enumerate(grads, start=1):
        tensors[f"grad.{t}"] = g
    meta = versions("adamw")
    meta["setup"] = (f"torch.optim.AdamW(lr={LR}, betas=(0.9, 0.999), eps=1e-8, weight_decay=WD), defaults otherwise "
                     f"(on the CPU: the single-tensor path); p0 randn{list(ADAM_SHAPE)} seed {ADAM_SEED_P}; "
                     f"grad.<t> (t = 1..{STEPS}) randn seed {ADAM_SEED_G}+t; param.<t> = the parameter after step t")
    for prefix, wd in (("wd0.", 0.0), ("wd001.", 0.01)):
        params, m, v = run_torch_adamw(p0, grads, wd)
        for t, p in enumerate(params, start=1):
            tensors[f"{prefix}param.{t}"] = p
        tensors[prefix + "exp_avg"] = m
        tensors[prefix + "exp_avg_sq"] = v
        key = prefix.rstrip(".")
        for label, kw in (("foreach_false", {"foreach": False}), ("foreach_true", {"foreach": True}),
                          ("fused_true", {"fused": True})):
            try:
                other, _, _ = run_torch_adamw(p0, grads, wd, **kw)
                meta[f"{key}.default_equals_{label}"] = str(all(torch.equal(a, b) for a, b in zip(params, other)))
                meta[f"{key}.maxdiff_vs_{label}"] = repr(max(maxdiff(a, b) for a, b in zip(params, other)))
            except Exception as e:  # noqa: BLE001
                meta[f"{key}.default_equals_{label}"] = f"error: {type(e).__name__}: {e}"
        for label, fn in (("torch_sqrt", torch_sqrt), ("correctly_rounded_sqrt", exact_sqrt)):
            em = emulate_torch_adamw(p0, grads, wd, fn)
            bad = sum(int((torch.from_numpy(e) != p).sum()) for e, p in zip(em, params))
            worst = max(maxdiff(torch.from_numpy(e), p) for e, p in zip(em, params))
            meta[f"{key}.emulation_mismatches.{label}"] = f"{bad} of {STEPS * p0.numel()} (max abs diff {worst:.3g})"
        print(f"adamw {key}: " + ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in meta.items() if k.startswith(key)))
    save(os.path.join(RES, "adamw.safetensors"), tensors, meta)


# ---------------------------------------------------------------- 5. bitsandbytes AdamW8bit

def adam8_grads():
    """randn (seed 6+t) times a column scale 10^(-3 c / 130), so that every 256-element block holds values over
    three decades (and their squares over six); block 0 of step 1 is exactly zero (as lora_A's gradient is
    at step 1 when lora_B starts at zero)."""
    col = torch.arange(ADAM8_SHAPE[1], dtype=torch.float64)
    scale = (10.0 ** (-3.0 * col / (ADAM8_SHAPE[1] - 1))).to(torch.float32)
    out = []
    for t in range(1, STEPS + 1):
        g = seeded(ADAM8_SHAPE, ADAM8_SEED_G + t) * scale
        if t == 1:
            g.view(-1)[:256] = 0.0
        out.append(g)
    return out


def run_bnb(cls, p0, small0, grads, small_grads):
    p = torch.nn.Parameter(p0.clone())
    s = torch.nn.Parameter(small0.clone())
    opt = cls([p, s], lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    hist = []
    for g, gs in zip(grads, small_grads):
        p.grad = g.clone()
        s.grad = gs.clone()
        opt.step()
        st = opt.state[p]
        ss = opt.state[s]
        hist.append({
            "param": p.detach().clone(),
            "small": s.detach().clone(),
            "state1": st["state1"].clone(),
            "state2": st["state2"].clone(),
            "absmax1": st["absmax1"].clone(),
            "absmax2": st["absmax2"].clone(),
            "small_state1": ss["state1"].clone(),
            "small_state2": ss["state2"].clone(),
        })
    st = opt.state[p]
    return hist, st["qmap1"].clone(), st["qmap2"].clone(), {k: (v.dtype if torch.is_tensor(v) else v)
                                                              for k, v in opt.state[s].items()}


def lut_for(code):
    """bitsandbytes' CPU quantize LUT (csrc/cpu_ops.cpp build_quantize_lut): LUT[i] = number of float32
    midpoints 0.5f*(code[k]+code[k+1]) that are < -1 + (2 i)/65535 (float32)."""
    code = code.astype(np.float32)
    mids = (f32(0.5) * (code[:-1] + code[1:])).astype(np.float32)
    i = np.arange(65536, dtype=np.float32)
    val = (f32(-1.0) + (f32(2.0) * i) / f32(65535.0)).astype(np.float32)
    return np.searchsorted(mids, val, side="left").astype(np.uint8)


def quantize_lut(x, code, lut, bs=256):
    x = x.reshape(-1).astype(np.float32)
    n = x.size
    nb = -(-n // bs)
    q = np.zeros(n, np.uint8)
    absmax = np.zeros(nb, np.float32)
    for b in range(nb):
        blk = x[b * bs:(b + 1) * bs]
        a = np.float32(np.abs(blk).max())
        absmax[b] = a
        if a == 0:
            continue
        v = np.clip(blk * (f32(1.0) / a), -1, 1).astype(np.float32)
        idx = (((v + f32(1.0)) * f32(0.5)) * f32(65535.0) + f32(0.5)).astype(np.float32)
        q[b * bs:(b + 1) * bs] = lut[idx.astype(np.uint16)]
    return q, absmax


def dequant(q, absmax, code, bs=256):
    q = q.reshape(-1)
    scale = np.repeat(absmax, bs)[: q.size]
    return (code[q] * scale).astype(np.float32)


def emulate_bnb_step(p, q1, a1, q2, a2, g, code1, code2, lut1, lut2, step, sqrt):
    """bitsandbytes/backends/cpu/ops.py _optimizer_update_8bit_blockwise_cpu, "adam", weight decay 0, with the
    torch kernels' rounding (add_ with alpha is fma(other, alpha, self); addcmul_ is fma(value * t1, t2, self))."""
    b1, b2, eps = 0.9, 0.999, 1e-8
    s1 = dequant(q1, a1, code1)
    s2 = dequant(q2, a2, code2)
    g = g.reshape(-1)
    s1 = fma32(g, f32(1 - b1), s1 * f32(b1))
    s2 = fma32(f32(1 - b2) * g, g, s2 * f32(b2))
    c1 = 1.0 - b1 ** step
    c2 = math.sqrt(1.0 - b2 ** step)
    denom = sqrt(s2) / f32(c2) + f32(eps)
    p = p.reshape(-1) + (f32(-LR / c1) * s1) / denom
    nq1, na1 = quantize_lut(s1, code1, lut1)
    nq2, na2 = quantize_lut(s2, code2, lut2)
    return p, nq1, na1, nq2, na2


def emulate_bnb_small(p0, grads, sqrt):
    """bitsandbytes/backends/cpu/ops.py _optimizer_update_32bit_cpu, "adam", weight decay 0."""
    b1, b2, eps = 0.9, 0.999, 1e-8
    p = p0.numpy().copy()
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    out = []
    for t, g in enumerate(grads, start=1):
        g = g.numpy()
        m = fma32(g, f32(1 - b1), m * f32(b1))
        v = fma32(f32(1 - b2) * g, g, v * f32(b2))
        c1 = 1.0 - b1 ** t
        c2 = math.sqrt(1.0 - b2 ** t)
        step_size = -LR * c2 / c1
        upd = m / (sqrt(v) + f32(eps * c2))
        p = fma32(upd, f32(step_size), p)
        out.append(p.copy())
    return out


def adamw8bit():
    p0 = seeded(ADAM8_SHAPE, ADAM8_SEED_P)
    small0 = seeded(ADAM8_SMALL_SHAPE, 100)
    grads = adam8_grads()
    small_grads = [seeded(ADAM8_SMALL_SHAPE, 100 + t) for t in range(1, STEPS + 1)]
    hist, qmap1, qmap2, small_state = run_bnb(bnb.optim.AdamW8bit, p0, small0, grads, small_grads)

    meta = versions("adamw8bit")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            phist, _, _, _ = run_bnb(bnb.optim.PagedAdamW8bit, p0, small0, grads, small_grads)
            same = all(torch.equal(a[k], b[k]) for a, b in zip(hist, phist) for k in a)
            meta["paged_adamw8bit"] = f"runs on CPU; bit-identical to AdamW8bit: {same}"
        except Exception as e:  # noqa: BLE001
            meta["paged_adamw8bit"] = f"error: {type(e).__name__}: {e}"
    warn = sorted({str(w.message) for w in caught})
    if warn:
        meta["paged_adamw8bit_warnings"] = json.dumps(warn)

    # which implementation runs
    kernel = torch.ops.bitsandbytes.optimizer_update_8bit_blockwise.default
    meta["cpu_kernel"] = ("python: bitsandbytes/backends/cpu/ops.py:_optimizer_update_8bit_blockwise_cpu "
                          "(torch ops; quantize/dequantize_blockwise through the C++ cquantize_blockwise_cpu_fp32 / "
                          "cdequantize_blockwise_cpu_fp32)")
    meta["cpu_kernel_registered"] = str(torch._C._dispatch_has_kernel_for_dispatch_key(kernel.name(), "CPU"))
    meta["small_state_dtypes"] = json.dumps({k: str(v) for k, v in small_state.items()})

    # restate the algorithm in numpy and check it bit for bit, step by step from bnb's own previous state
    code1, code2 = qmap1.numpy(), qmap2.numpy()
    meta["qmap1_equals_create_dynamic_map_signed"] = str(torch.equal(qmap1, bnb.functional.create_dynamic_map(signed=True)))
    meta["qmap2_equals_create_dynamic_map_unsigned"] = str(torch.equal(qmap2, bnb.functional.create_dynamic_map(signed=False)))
    lut1, lut2 = lut_for(code1), lut_for(code2)
    nblocks = -(-p0.numel() // 256)
    zero_q1 = np.zeros(p0.numel(), np.uint8)
    zero_a = np.zeros(nblocks, np.float32)
    for label, sqrt in (("torch_sqrt", torch_sqrt), ("correctly_rounded_sqrt", exact_sqrt)):
        if True:
            bad = {"param": 0, "state1": 0, "state2": 0, "absmax1": 0, "absmax2": 0}
            prev = (p0.numpy().reshape(-1), zero_q1, zero_a, zero_q1, zero_a)
            for t, (h, g) in enumerate(zip(hist, grads), start=1):
                p, q1, a1, q2, a2 = emulate_bnb_step(*prev, g.numpy(), code1, code2, lut1, lut2, t, sqrt)
                bad["param"] += int((p != h["param"].numpy().reshape(-1)).sum())
                bad["state1"] += int((q1 != h["state1"].numpy().reshape(-1)).sum())
                bad["state2"] += int((q2 != h["state2"].numpy().reshape(-1)).sum())
                bad["absmax1"] += int((a1 != h["absmax1"].numpy()).sum())
                bad["absmax2"] += int((a2 != h["absmax2"].numpy()).sum())
                prev = (h["param"].numpy().reshape(-1), h["state1"].numpy().reshape(-1), h["absmax1"].numpy(),
                        h["state2"].numpy().reshape(-1), h["absmax2"].numpy())
            meta[f"emulation_mismatches.{label}"] = json.dumps(bad)
            em_small = emulate_bnb_small(small0, small_grads, sqrt)
            meta[f"small.emulation_mismatches.{label}"] = str(sum(int((torch.from_numpy(e) != h["small"]).sum())
                                                                  for e, h in zip(em_small, hist)))

    # the 8-bit state against an f32 Adam on the same gradients (how far the quantized moments drift)
    ref = torch.nn.Parameter(p0.clone())
    ropt = torch.optim.AdamW([ref], lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    for g in grads:
        ref.grad = g.clone()
        ropt.step()
    meta["param10_maxdiff_vs_torch_adamw_f32"] = repr(maxdiff(ref.detach(), hist[-1]["param"]))

    tensors = {"p0": p0, "qmap1": qmap1, "qmap2": qmap2, "small.p0": small0}
    for t, (h, g, gs) in enumerate(zip(hist, grads, small_grads), start=1):
        tensors[f"grad.{t}"] = g
        tensors[f"param.{t}"] = h["param"]
        tensors[f"state1.{t}"] = h["state1"]
        tensors[f"state2.{t}"] = h["state2"]
        tensors[f"absmax1.{t}"] = h["absmax1"]
        tensors[f"absmax2.{t}"] = h["absmax2"]
        tensors[f"small.grad.{t}"] = gs
        tensors[f"small.param.{t}"] = h["small"]
    tensors["small.state1"] = hist[-1]["small_state1"]
    tensors["small.state2"] = hist[-1]["small_state2"]
    meta["setup"] = (f"bitsandbytes.optim.AdamW8bit([p, small], lr={LR}, betas=(0.9, 0.999), eps=1e-8, "
                     f"weight_decay=0.0), CPU. p0 randn{list(ADAM8_SHAPE)} seed {ADAM8_SEED_P} "
                     f"({p0.numel()} elements: {nblocks} blocks of 256, the last one {p0.numel() - 256 * (nblocks - 1)}); "
                     f"grad.<t> = randn seed {ADAM8_SEED_G}+t times 10^(-3 c/130) for column c, block 0 of grad.1 zeroed; "
                     f"small.p0 randn{list(ADAM8_SMALL_SHAPE)} seed 100, small.grad.<t> seed 100+t "
                     f"({small0.numel()} < min_8bit_size 4096: f32 state)")
    save(os.path.join(RES, "adamw8bit.safetensors"), tensors, meta)
    print("adamw8bit:", {k: v for k, v in meta.items() if k.startswith(("emulation", "small.", "paged", "param10",
                                                                         "qmap", "cpu_kernel_registered"))})


# ---------------------------------------------------------------- 6. SmolLM2 trainable parameters

def smollm2_counts():
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.from_pretrained(os.path.dirname(GGUF), gguf_file=os.path.basename(GGUF))
    out = {"config": {k: getattr(cfg, k, None) for k in (
        "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "tie_word_embeddings", "rms_norm_eps", "max_position_embeddings")}}
    for r in (16, 64):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                              target_modules=list(PROJECTIONS), bias="none", task_type="CAUSAL_LM"))
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            pm.print_trainable_parameters()
        trainable, total = pm.get_nb_trainable_parameters()
        out[f"r{r}"] = {"printed": buf.getvalue().strip(), "trainable": trainable, "all": total}
        print(f"SmolLM2-135M r={r}: {buf.getvalue().strip()}")
    out["generator"] = "scripts/reference/make_training_fixtures.py (config from the GGUF via transformers, "
    out["generator"] += "model built on the meta device from the config, peft get_peft_model, all 7 projections)"
    with open(os.path.join(RES, "trainable_params.json"), "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)
        f.write("\n")


# ----------------------------------------------------------------

def save(path, tensors, meta):
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={k: str(v) for k, v in meta.items()})


def main():
    os.makedirs(RES, exist_ok=True)
    make_models()
    ref_weights, ids, labels = lora_grads()
    lora_grads_nf4(ref_weights, ids, labels)
    adamw()
    adamw8bit()
    smollm2_counts()
    total = 0
    for dirpath, _, files in os.walk(RES):
        for fn in sorted(files):
            sz = os.path.getsize(os.path.join(dirpath, fn))
            total += sz
            print(f"  {os.path.relpath(os.path.join(dirpath, fn), RES)}: {sz}")
    print(f"total {total} bytes ({total / 2**20:.2f} MiB)")
    assert total < 3 * 1000 * 1000, total


if __name__ == "__main__":
    main()
