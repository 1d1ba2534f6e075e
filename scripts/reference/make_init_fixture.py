#!/usr/bin/env python3
"""PiSSA and LoftQ initialisation from PEFT itself, CPU, float32, one thread.

The tiny f32 Llama (Resources/tiny-llama-train), LoraConfig(r=8, lora_alpha=16 (scaling 2), dropout 0, all seven
projections) with init_lora_weights = "pissa", "pissa_niter_4" and "loftq" (LoftQConfig(loftq_bits=4,
loftq_iter=1 and 5)).

Writes Tests/QLoRATrainingTests/Resources/lora_init.safetensors, for the seven projections of layer 0 only:

  <v>.<key>.lora_A.weight   F32 [8, in]    the initial A   <key> = base_model.model.model.layers.0.<self_attn|mlp>.<proj>
  <v>.<key>.lora_B.weight   F32 [out, 8]   the initial B
  <v>.base.model.layers.0.<...>.<proj>.weight  F32 [out, in]  the base weight PEFT leaves in the model
                                           pissa: the residual W - s B A; loftq: the dequantized NF4 weight
                                           (absent for pissa_niter_4: it is W - s B A again)
  with <v> in  pissa, pissa_niter_4, loftq1, loftq5.

PEFT 0.21's loftq_init (peft/utils/loftq_utils.py) moves the weight to "cuda" (or "xpu") unconditionally; on this
CPU-only machine the function is re-created from its own source with that one line changed to "cpu" (everything else,
bitsandbytes' Params4bit / dequantize_4bit included, is PEFT's code as installed). pissa_niter_4 uses torch.svd_lowrank,
which draws from the global RNG: torch.manual_seed(0) right before get_peft_model.

Run:  source ~/.cache/swift-qlora/bench-venv/bin/activate && python scripts/reference/make_init_fixture.py
"""

import inspect
import json
import os
import sys
import warnings

import torch

torch.set_num_threads(1)

import bitsandbytes as bnb  # noqa: E402
import peft  # noqa: E402
import peft.tuners.lora.layer as lora_layer  # noqa: E402
import peft.utils.loftq_utils as loftq_utils  # noqa: E402
import safetensors  # noqa: E402
import transformers  # noqa: E402
from peft import LoftQConfig, LoraConfig, get_peft_model  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()
warnings.filterwarnings("ignore")

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
RES = os.path.join(ROOT, "Tests", "QLoRATrainingTests", "Resources")
TRAIN_DIR = os.path.join(RES, "tiny-llama-train")
NF4_DIR = os.path.join(RES, "tiny-llama-train-bnb-nf4")
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA = 8, 16
S = ALPHA / R
SAVE_LAYER = "model.layers.0."


def patch_loftq_for_cpu():
    src = inspect.getsource(loftq_utils.loftq_init)
    old = 'compute_device = "xpu" if is_xpu_available() else "cuda"'
    assert src.count(old) == 1, "loftq_init changed; re-read peft/utils/loftq_utils.py"
    ns = loftq_utils.__dict__
    exec(compile(src.replace(old, 'compute_device = "cpu"'), loftq_utils.__file__, "exec"), ns)
    lora_layer.loftq_init = ns["loftq_init"]  # layer.py did `from peft.utils.loftq_utils import loftq_init`


def load_f32():
    return LlamaForCausalLM.from_pretrained(TRAIN_DIR, dtype=torch.float32, attn_implementation="eager")


def config(init, loftq_iter=None):
    kw = {}
    if loftq_iter is not None:
        kw["loftq_config"] = LoftQConfig(loftq_bits=4, loftq_iter=loftq_iter)
    return LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(PROJECTIONS), bias="none",
                      task_type="CAUSAL_LM", init_lora_weights=init, **kw)


def maxdiff(a, b):
    return float((a.double() - b.double()).abs().max())


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def relnorm(x, ref):
    return float(x.double().norm() / ref.double().norm())


def layers(model):
    return {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}


def batch_logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def nf4_roundtrip(w, double_quant=False):
    q, st = bnb.functional.quantize_4bit(w.contiguous(), blocksize=64, quant_type="nf4",
                                         compress_statistics=double_quant)
    return bnb.functional.dequantize_4bit(q, st)


def loftq_restated(W, iters):
    """loftq_utils.loftq_init restated: quantize (nf4, blocksize 64, no double quant), SVD of W - Q, repeat on
    W - L R. Returns Q, A = R, B = L."""
    res = W.clone()
    for i in range(iters):
        Q = nf4_roundtrip(res)
        U, Sv, Vh = torch.linalg.svd(W - Q, full_matrices=False)
        L = U @ torch.sqrt(torch.diag(Sv)[:, :R])
        Rm = torch.sqrt(torch.diag(Sv)[:R, :]) @ Vh
        if i + 1 == iters:
            break
        res = W - L @ Rm
    return Q, Rm, L


def main():
    patch_loftq_for_cpu()
    ids = torch.randint(3, 320, (2, 16), generator=torch.Generator().manual_seed(2))
    orig = load_f32()
    W0 = {n: p.detach().clone() for n, p in orig.named_parameters()}
    orig_logits = batch_logits(orig, ids)
    tensors, meta = {}, {
        "generator": "scripts/reference/make_init_fixture.py",
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "bitsandbytes": bnb.__version__, "safetensors": safetensors.__version__, "python": sys.version.split()[0],
        "threads": str(torch.get_num_threads()), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "lora_config": json.dumps({"r": R, "lora_alpha": ALPHA, "scaling": S, "lora_dropout": 0.0,
                                   "target_modules": PROJECTIONS}),
        "loftq_patch": "peft.utils.loftq_utils.loftq_init re-created from its source with compute_device = 'cpu'",
        "saved_layers": "the seven projections of model.layers.0 (A, B for every variant; base for pissa, loftq*)",
    }
    variants = [("pissa", "pissa", None), ("pissa_niter_4", "pissa_niter_4", None),
                ("loftq1", "loftq", 1), ("loftq5", "loftq", 5)]
    results = {}
    for tag, init, it in variants:
        torch.manual_seed(0)
        model = get_peft_model(load_f32(), config(init, it))
        stats = {"recon_err_rel_mean": [], "err_vs_W_max": 0.0}
        out = {}
        for name, mod in layers(model).items():
            wname = name[len("base_model.model."):] + ".weight"
            W = W0[wname]
            A = mod.lora_A["default"].weight.detach().clone()
            B = mod.lora_B["default"].weight.detach().clone()
            base = mod.get_base_layer().weight.detach().clone()
            assert base.dtype == torch.float32 and type(mod.get_base_layer()) is torch.nn.Linear
            out[wname] = (A, B, base)
            if name.startswith("base_model.model." + SAVE_LAYER):
                tensors[f"{tag}.{name}.lora_A.weight"] = A.contiguous()
                tensors[f"{tag}.{name}.lora_B.weight"] = B.contiguous()
                if tag != "pissa_niter_4":
                    tensors[f"{tag}.base.{wname}"] = base.contiguous()
        results[tag] = out
        meta[f"{tag}.logits_vs_original_maxdiff"] = repr(maxdiff(batch_logits(model, ids), orig_logits))
        print(f"{tag}: logits vs original model max diff {meta[tag + '.logits_vs_original_maxdiff']}")
        if init == "loftq":
            # PEFT does not divide LoftQ's factors by the scaling: with alpha/r = 2 the forward at init is
            # Q + 2 B A. The logits error of Q alone, of Q + 2 B A (as initialised) and of Q + B A (scaling set to 1)
            with model.disable_adapter():
                meta[f"{tag}.logits_err.Q_only"] = repr(maxdiff(batch_logits(model, ids), orig_logits))
            meta[f"{tag}.logits_err.Q_plus_sBA(as PEFT inits)"] = meta[f"{tag}.logits_vs_original_maxdiff"]
            for mod in layers(model).values():
                mod.scaling["default"] = 1.0
            meta[f"{tag}.logits_err.Q_plus_BA(scaling forced to 1)"] = repr(maxdiff(batch_logits(model, ids), orig_logits))
            print("  ", {k: v for k, v in meta.items() if k.startswith(tag + ".logits_err")})

    # ---- PiSSA checks
    worst = {"A": 0.0, "B": 0.0, "residual": 0.0, "sBA_niter_vs_exact_rel": 0.0, "residual_identity": 0.0}
    for wname, (A, B, base) in results["pissa"].items():
        W = W0[wname]
        V, Sv, Uh = torch.linalg.svd(W, full_matrices=False)
        Sr = Sv[:R] / S
        A_ = torch.diag(torch.sqrt(Sr)) @ Uh[:R]
        B_ = V[:, :R] @ torch.diag(torch.sqrt(Sr))
        worst["A"] = max(worst["A"], maxdiff(A, A_))
        worst["B"] = max(worst["B"], maxdiff(B, B_))
        worst["residual"] = max(worst["residual"], maxdiff(base, W - S * B_ @ A_))
        worst["residual_identity"] = max(worst["residual_identity"], maxdiff(base + S * B @ A, W))
        An, Bn, basen = results["pissa_niter_4"][wname]
        worst["sBA_niter_vs_exact_rel"] = max(worst["sBA_niter_vs_exact_rel"], rel(S * Bn @ An, S * B @ A))
        assert maxdiff(basen, W - S * Bn @ An) < 1e-5
    meta["pissa.restated_maxdiff"] = json.dumps(worst)
    print("pissa restated:", worst)
    assert worst["A"] < 1e-5 and worst["B"] < 1e-5 and worst["residual"] < 1e-5

    # PiSSA on a bitsandbytes 4-bit base: PEFT refuses (the user quantizes the residual model afterwards)
    try:
        qm = LlamaForCausalLM.from_pretrained(NF4_DIR, device_map="cpu", dtype=torch.float32, attn_implementation="eager")
        get_peft_model(qm, config("pissa"))
        meta["pissa.on_bnb_nf4_base"] = "no error"
    except Exception as e:  # noqa: BLE001
        meta["pissa.on_bnb_nf4_base"] = f"{type(e).__name__}: {e}"
    print("pissa on nf4 base:", meta["pissa.on_bnb_nf4_base"])

    # ---- LoftQ checks
    for tag, it in (("loftq1", 1), ("loftq5", 5)):
        # the errors are ||.||_F / ||W||_F averaged over the 14 layers
        c = {"restated_Q_maxdiff": 0.0, "restated_A_maxdiff": 0.0, "restated_B_maxdiff": 0.0,
             "err_W_minus_Q": 0.0, "err_W_minus_Q_minus_BA": 0.0, "err_W_minus_Q_minus_sBA": 0.0,
             "requant_nodq_maxdiff": 0.0, "requant_dq_maxdiff": 0.0}
        for wname, (A, B, Q) in results[tag].items():
            W = W0[wname]
            Q_, A_, B_ = loftq_restated(W, it)
            c["restated_Q_maxdiff"] = max(c["restated_Q_maxdiff"], maxdiff(Q, Q_))
            c["restated_A_maxdiff"] = max(c["restated_A_maxdiff"], maxdiff(A, A_))
            c["restated_B_maxdiff"] = max(c["restated_B_maxdiff"], maxdiff(B, B_))
            c["err_W_minus_Q"] += relnorm(W - Q, W) / 14
            c["err_W_minus_Q_minus_BA"] += relnorm(W - Q - B @ A, W) / 14
            c["err_W_minus_Q_minus_sBA"] += relnorm(W - Q - S * B @ A, W) / 14
            c["requant_nodq_maxdiff"] = max(c["requant_nodq_maxdiff"], maxdiff(nf4_roundtrip(Q), Q))
            c["requant_dq_maxdiff"] = max(c["requant_dq_maxdiff"], maxdiff(nf4_roundtrip(Q, True), Q))
        meta[f"{tag}.checks"] = json.dumps(c)
        print(tag, json.dumps(c))
        assert c["restated_Q_maxdiff"] == 0.0, c
    # iteration 1's base is the plain nf4 quantization of W (no double quant); against the double-quantized
    # tiny-llama-train-bnb-nf4 base
    qm = LlamaForCausalLM.from_pretrained(NF4_DIR, device_map="cpu", dtype=torch.float32, attn_implementation="eager")
    d1, d2 = 0.0, 0.0
    for name, mod in qm.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            dq = bnb.functional.dequantize_4bit(mod.weight.data, mod.weight.quant_state)
            Q = results["loftq1"][name + ".weight"][2]
            d1 = max(d1, maxdiff(Q, nf4_roundtrip(W0[name + ".weight"])))
            d2 = max(d2, maxdiff(Q, dq))
    meta["loftq1.base_vs_nf4_nodq_of_W_maxdiff"] = repr(d1)
    meta["loftq1.base_vs_tiny-llama-train-bnb-nf4(double quant)_maxdiff"] = repr(d2)
    print("loftq1 base vs nf4(W) no dq:", d1, "| vs the double-quant checkpoint:", d2)

    path = os.path.join(RES, "lora_init.safetensors")
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={k: str(v) for k, v in meta.items()})
    print(f"wrote {path} ({os.path.getsize(path)} bytes, {len(tensors)} tensors)")


if __name__ == "__main__":
    main()
