"""Reference fixtures for the Llama-family forward pass, made with the real stack (transformers, bitsandbytes, gguf).

Writes under Tests/QLoRAModelTests/Resources/:

  tiny-llama-gqa/            LlamaForCausalLM, vocab 320, hidden 64, inter 160, 2 layers, 4 heads / 2 kv heads,
                             head_dim 16, untied lm_head, default rope (theta 1e4); generation_config.json has
                             eos_token_id [2, 5]
  tiny-llama3-rope/          same shape, tied embeddings, rope_type llama3 (factor 8, low 1, high 4, orig 64), theta 5e5
  tiny-llama-linear-rope/    rope_type linear factor 2 (tied, inter 96 to save space)
  tiny-mistral/              MistralForCausalLM, GQA, sliding_window null (untied, inter 96)
  tiny-qwen2/                Qwen2ForCausalLM, q/k/v biases, tied (inter 96)
  tiny-llama-headdim/        LlamaForCausalLM hidden 64, 4 heads, head_dim 32 (q_proj 64 -> 128), tied (inter 96)
  tiny-llama-gqa-bnb-nf4/    save_pretrained of tiny-llama-gqa loaded with bnb nf4 + double quant, compute f32

  Each tiny-* folder has logits.safetensors with
    input_ids    I64 [2, 12]
    logits       F32 [2, 12, vocab]   full-sequence forward of the float32 model (eager attention)
    logits_step  F32 [2, 12, vocab]   prefill of tokens 0..7, then tokens 8..11 one at a time through the KV cache
    rope.inv_freq F32 [head_dim/2], rope.cos / rope.sin F32 [12, head_dim] for positions 0..11 (model.rotary_emb)
  and, for tiny-llama-gqa only,
    logits_nf4   F32 [2, 12, vocab]   the bnb nf4+dq model (the one saved in tiny-llama-gqa-bnb-nf4/)
    act.*        F32 layer-0 activations for sequence 0 (see ACT_DOC below)
  The __metadata__ holds versions, the config and the max differences (JSON strings).

  smollm2-logits.safetensors  SmolLM2-135M-Instruct from the Q4_1 GGUF, dequantized to float32 by transformers:
    input_ids I64 [1, T] (ChatML prompt, tokenizer from the GGUF), logits_last F32 [4, 49152] (last 4
    positions), greedy_ids I64 [n] (new tokens only, model.generate(do_sample=False, max_new_tokens=24)),
    logits_last_nf4 / greedy_ids_nf4 the same for the f32 weights quantized by bnb to nf4 + double quant.

Every bnb.nn.Linear4bit gets support_avx512bf16_for_cpu = False before any forward (DESIGN.md, Traps).
Seed 0, CPU, one thread.
Run:  /work/refvenv/bin/python scripts/reference/make_model_fixtures.py [tiny] [smollm2]   (default: both)
"""

import json
import os
import shutil
import sys
import tempfile

import torch

torch.set_num_threads(1)

import bitsandbytes as bnb  # noqa: E402
import numpy as np  # noqa: E402
import safetensors  # noqa: E402
import transformers  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.models.llama import modeling_llama  # noqa: E402

SEED = 0
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
RES = os.path.join(ROOT, "Tests", "QLoRAModelTests", "Resources")
GGUF_DIR = "/root/.cache/swift-qlora/models"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
PREFILL = 8
SEQS = [
    [1, 17, 250, 3, 99, 42, 7, 319, 128, 64, 5, 200],
    [1, 300, 12, 12, 12, 88, 150, 2, 45, 77, 310, 0],
]
ACT_DOC = (
    "layer 0, sequence 0, every act.* is [12, features], features in the q_proj output order "
    "(head-major: head h owns columns h*head_dim ..< (h+1)*head_dim): "
    "embed (embed_tokens out, [12,64]), input_norm (input_layernorm out), q, k, v (q/k/v_proj out, before rope: "
    "[12,64], [12,32], [12,32]), q_rope, k_rope (after apply_rotary_pos_emb, transposed back to [12, heads*head_dim]), "
    "attn (softmax(QK^T/sqrt(d)+mask)V, heads concatenated = o_proj input, [12,64]), attn_probs ([4 heads, 12, 12] "
    "softmax probabilities), o_proj (o_proj out), post_norm (post_attention_layernorm out; its input is "
    "embed + o_proj), mlp (mlp out), layer_out (decoder layer 0 out = embed + o_proj + mlp)"
)


def versions(generator_part):
    return {
        "generator": "scripts/reference/make_model_fixtures.py " + generator_part,
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
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


def nf4_config():
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )


def fresh_dir(path):
    if os.path.isdir(path):
        shutil.rmtree(path)
    os.makedirs(path)


def f32(t):
    return t.detach().to(torch.float32).contiguous().numpy()


def maxdiff(a, b):
    return float((a.float() - b.float()).abs().max().item())


# ---------------------------------------------------------------------------------------------------------------
# tiny models


def base_kwargs(**over):
    kw = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
    )
    kw.update(over)
    return kw


TINY = [
    ("tiny-llama-gqa", LlamaForCausalLM, LlamaConfig, base_kwargs()),
    (
        "tiny-llama3-rope",
        LlamaForCausalLM,
        LlamaConfig,
        base_kwargs(
            tie_word_embeddings=True,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ),
    (
        "tiny-llama-linear-rope",
        LlamaForCausalLM,
        LlamaConfig,
        base_kwargs(tie_word_embeddings=True, intermediate_size=96, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    ),
    ("tiny-mistral", MistralForCausalLM, MistralConfig, base_kwargs(intermediate_size=96, sliding_window=None)),
    ("tiny-qwen2", Qwen2ForCausalLM, Qwen2Config, base_kwargs(intermediate_size=96, tie_word_embeddings=True)),
    (
        "tiny-llama-headdim",
        LlamaForCausalLM,
        LlamaConfig,
        base_kwargs(intermediate_size=96, tie_word_embeddings=True, head_dim=32),
    ),
]


@torch.no_grad()
def randomize(model):
    """Re-draw every parameter so that every part of the forward matters (the default init, std 0.02 and
    unit norms / zero biases, makes attention nearly uniform and hides norm-weight and bias mistakes).
    Linear weights ~ N(0, 1/in), embeddings ~ N(0, 0.25^2), norm weights 1 + 0.2 N(0,1), biases 0.1 N(0,1)."""
    g = torch.Generator().manual_seed(SEED)
    seen = set()
    for name, p in model.named_parameters():  # tied lm_head appears once (named_parameters dedups)
        if id(p) in seen:
            continue
        seen.add(id(p))
        if name.endswith("bias"):
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
        elif "norm" in name:
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
        elif "embed_tokens" in name:
            p.copy_(0.25 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(torch.randn(p.shape, generator=g) / (p.shape[1] ** 0.5))


@torch.no_grad()
def full_logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits.float()


@torch.no_grad()
def step_logits(model, ids):
    out = model(input_ids=ids[:, :PREFILL], use_cache=True)
    cache = out.cache
    parts = [out.logits.float()]
    for t in range(PREFILL, ids.shape[1]):
        out = model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True)
        cache = out.cache
        parts.append(out.logits.float())
    return torch.cat(parts, dim=1)


@torch.no_grad()
def rope_tables(model, n):
    rot = model.model.rotary_emb
    x = torch.zeros(1, n, 1, dtype=torch.float32)
    cos, sin = rot(x, torch.arange(n).unsqueeze(0))
    return rot.inv_freq.float(), cos[0], sin[0]


@torch.no_grad()
def layer0_activations(model, ids):
    """Forward hooks on layer 0 of a Llama model for one sequence; q/k after rope by wrapping the module-level
    apply_rotary_pos_emb that LlamaAttention.forward calls."""
    acts = {}
    layer = model.model.layers[0]
    attn = layer.self_attn
    hd = attn.head_dim

    def keep(name):
        def hook(_m, _inp, out):
            t = out[0] if isinstance(out, tuple) else out
            acts[name] = t[0].clone()

        return hook

    hooks = [
        model.model.embed_tokens.register_forward_hook(keep("embed")),
        layer.input_layernorm.register_forward_hook(keep("input_norm")),
        attn.q_proj.register_forward_hook(keep("q")),
        attn.k_proj.register_forward_hook(keep("k")),
        attn.v_proj.register_forward_hook(keep("v")),
        attn.o_proj.register_forward_pre_hook(lambda _m, inp: acts.__setitem__("attn", inp[0][0].clone())),
        attn.o_proj.register_forward_hook(keep("o_proj")),
        attn.register_forward_hook(lambda _m, _i, out: acts.__setitem__("attn_probs", out[1][0].clone())),
        layer.post_attention_layernorm.register_forward_hook(keep("post_norm")),
        layer.mlp.register_forward_hook(keep("mlp")),
        layer.register_forward_hook(keep("layer_out")),
    ]
    original = modeling_llama.apply_rotary_pos_emb

    def recording(q, k, cos, sin, *a, **kw):
        qe, ke = original(q, k, cos, sin, *a, **kw)
        if "q_rope" not in acts:  # first call = layer 0
            # [1, heads, seq, hd] -> [seq, heads*hd], the q_proj output layout
            acts["q_rope"] = qe[0].transpose(0, 1).reshape(qe.shape[2], -1).clone()
            acts["k_rope"] = ke[0].transpose(0, 1).reshape(ke.shape[2], -1).clone()
        return qe, ke

    modeling_llama.apply_rotary_pos_emb = recording
    try:
        logits = model(input_ids=ids[:1], use_cache=False).logits
    finally:
        modeling_llama.apply_rotary_pos_emb = original
        for h in hooks:
            h.remove()
    assert "q_rope" in acts, "apply_rotary_pos_emb wrapper was not called"
    # self-checks of the captured values against the formulas the Swift side implements
    x = acts["embed"]
    var = x.pow(2).mean(-1, keepdim=True)
    norm = layer.input_layernorm.weight * (x * torch.rsqrt(var + layer.input_layernorm.variance_epsilon))
    assert maxdiff(norm, acts["input_norm"]) < 1e-5
    assert maxdiff(x + acts["o_proj"] + acts["mlp"], acts["layer_out"]) < 1e-5
    _, cos, sin = rope_tables(model, ids.shape[1])
    q = acts["q"].view(ids.shape[1], -1, hd)
    half = hd // 2
    rot = torch.cat((-q[..., half:], q[..., :half]), dim=-1)
    mine = (q * cos[:, None, :] + rot * sin[:, None, :]).reshape(ids.shape[1], -1)
    assert maxdiff(mine, acts["q_rope"]) < 1e-5
    return {f"act.{k}": v for k, v in acts.items()}, logits


def expected_inv_freq(cfg):
    """inv_freq from config.json alone (float64 here), the formulas MODEL_NOTES.md states."""
    rp = cfg["rope_parameters"]
    d = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    inv = 1.0 / (rp["rope_theta"] ** (np.arange(0, d, 2, dtype=np.float64) / d))
    kind = rp.get("rope_type", "default")
    if kind == "linear":
        inv = inv / rp["factor"]
    elif kind == "llama3":
        f, lo, hi, old = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"], rp["original_max_position_embeddings"]
        wl = 2 * np.pi / inv
        smooth = (old / wl - lo) / (hi - lo)
        out = np.where(wl > old / lo, inv / f, inv)  # long wavelengths: divide by factor
        mid = (wl >= old / hi) & (wl <= old / lo)
        inv = np.where(mid, (1 - smooth) * inv / f + smooth * inv, out)
    else:
        assert kind == "default", kind
    return inv


def check_rope(cfg, inv_freq, cos, sin):
    mine = expected_inv_freq(cfg)
    rel = float(np.max(np.abs(inv_freq.double().numpy() - mine) / mine))
    assert rel < 1e-6, rel
    pos = np.arange(cos.shape[0], dtype=np.float64)[:, None]
    ang = pos * inv_freq.double().numpy()[None, :]
    emb = np.concatenate([ang, ang], axis=1)  # [cos(p*f0..f_{d/2-1}), same again]
    dc = float(np.max(np.abs(np.cos(emb) - cos.double().numpy())))
    ds = float(np.max(np.abs(np.sin(emb) - sin.double().numpy())))
    assert dc < 1e-5 and ds < 1e-5, (dc, ds)
    return rel, max(dc, ds)


def load_tiny(cls, folder, **kw):
    return cls.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager", **kw).eval()


def make_tiny():
    os.makedirs(RES, exist_ok=True)
    ids = torch.tensor(SEQS, dtype=torch.int64)
    summary = {}
    for name, cls, cfg_cls, kw in TINY:
        torch.manual_seed(SEED)
        config = cfg_cls(**kw)
        model = cls(config).to(torch.float32)
        randomize(model)
        folder = os.path.join(RES, name)
        fresh_dir(folder)
        if name == "tiny-llama-gqa":
            model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=[2, 5])
        model.save_pretrained(folder, safe_serialization=True)
        if name == "tiny-llama-gqa":
            # save_pretrained may skip a generation config that only restates defaults: write it explicitly
            GenerationConfig(bos_token_id=1, eos_token_id=[2, 5]).save_pretrained(folder)

        # everything below uses the checkpoint as reloaded from disk, i.e. what the Swift side loads
        m = load_tiny(cls, folder)
        logits = full_logits(m, ids)
        logits_step = step_logits(m, ids)
        d_step = maxdiff(logits, logits_step)
        m_sdpa = cls.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
        d_sdpa = maxdiff(logits, full_logits(m_sdpa, ids))
        inv_freq, cos, sin = rope_tables(m, ids.shape[1])
        tensors = {
            "input_ids": ids.numpy(),
            "logits": f32(logits),
            "logits_step": f32(logits_step),
            "rope.inv_freq": f32(inv_freq),
            "rope.cos": f32(cos),
            "rope.sin": f32(sin),
        }
        with open(os.path.join(folder, "config.json")) as f:
            cfg_json = json.load(f)
        rope_rel, rope_abs = check_rope(cfg_json, inv_freq, cos, sin)
        meta = versions("tiny")
        meta.update(
            {
                "model": name,
                "class": cls.__name__,
                "attn_implementation": "eager",
                "prefill": str(PREFILL),
                "max_abs_diff_logits_vs_logits_step": repr(d_step),
                "max_abs_diff_eager_vs_sdpa": repr(d_sdpa),
                "max_abs_logits": repr(float(logits.abs().max())),
                "config_json": json.dumps(cfg_json, sort_keys=True),
                "init": "Linear ~ N(0,1/in), embed ~ N(0,0.0625), norm 1+0.2N(0,1), bias 0.1N(0,1), generator seed 0",
            }
        )
        meta["rope_check"] = f"inv_freq rel err vs formula {rope_rel:.3g}; cos/sin abs err vs float64 {rope_abs:.3g}"
        info = {"step": d_step, "sdpa": d_sdpa, "max|logits|": float(logits.abs().max()), "rope": [rope_rel, rope_abs]}

        if name == "tiny-llama-gqa":
            acts, logits0 = layer0_activations(m, ids)
            assert maxdiff(logits0[0], logits[0]) < 1e-5
            tensors.update({k: f32(v) for k, v in acts.items()})
            meta["act_layout"] = ACT_DOC

            q = cls.from_pretrained(
                folder, quantization_config=nf4_config(), device_map="cpu", dtype=torch.float32,
                attn_implementation="eager",
            )
            nq = disable_bf16_repack(q)
            assert nq == 2 * 7, nq
            q.eval()
            logits_nf4 = full_logits(q, ids)
            nf4_step = step_logits(q, ids)
            qdir = os.path.join(RES, name + "-bnb-nf4")
            fresh_dir(qdir)
            q.save_pretrained(qdir, safe_serialization=True)
            again = cls.from_pretrained(qdir, device_map="cpu", dtype=torch.float32, attn_implementation="eager")
            disable_bf16_repack(again)
            again.eval()
            assert torch.equal(full_logits(again, ids), logits_nf4), "saved 4-bit checkpoint reloads differently"
            # bitsandbytes 0.50.2's AVX-512 dequantize_4bit indexes absmax per row, which is wrong when a
            # row is not a whole number of blocks (down_proj here: 160 inputs, blocks of 64). The reference
            # is therefore the f32 model with every 4-bit weight dequantized by bitsandbytes' own Python
            # path (backends/default/ops.py), which indexes blocks over the flattened tensor as the
            # format defines; the kernel's logits are kept as logits_nf4_bnb_cpu_kernel.
            from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
            from bitsandbytes.backends.utils import _get_4bit_code
            reference = cls.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
            state = reference.state_dict()
            for mod_name, mod in q.named_modules():
                if isinstance(mod, bnb.nn.Linear4bit):
                    qs = mod.weight.quant_state
                    absmax = bnb.functional.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
                    w = _dequantize_4bit_compute(mod.weight.data.reshape(-1), absmax.float(), _get_4bit_code(qs.quant_type, "cpu"),
                                                 qs.blocksize, tuple(qs.shape), torch.float32)
                    state[mod_name + ".weight"] = w
            reference.load_state_dict(state)
            reference.eval()
            tensors["logits_nf4_bnb_cpu_kernel"] = f32(logits_nf4)
            meta["max_abs_diff_nf4_flat_blocks_vs_bnb_cpu_kernel"] = repr(maxdiff(full_logits(reference, ids), logits_nf4))
            logits_nf4 = full_logits(reference, ids)
            nf4_step = step_logits(reference, ids)
            tensors["logits_nf4"] = f32(logits_nf4)
            d_nf4 = maxdiff(logits, logits_nf4)
            meta["max_abs_diff_logits_vs_logits_nf4"] = repr(d_nf4)
            meta["max_abs_diff_nf4_full_vs_step"] = repr(maxdiff(logits_nf4, nf4_step))
            meta["nf4_quantized_modules"] = json.dumps(
                sorted(n for n, mm in q.named_modules() if isinstance(mm, bnb.nn.Linear4bit))
            )
            meta["nf4"] = "BitsAndBytesConfig(load_in_4bit, nf4, double quant, compute float32), CPU; lm_head and embeddings stay f32"
            info["nf4"] = d_nf4
            info["nf4 full vs step"] = maxdiff(logits_nf4, nf4_step)

        save_file(tensors, os.path.join(folder, "logits.safetensors"), metadata=meta)
        summary[name] = info
        print(name, json.dumps(info))
    return summary


# ---------------------------------------------------------------------------------------------------------------
# SmolLM2 from GGUF


def reverse_permute(w, n_head):
    """Undo llama.cpp's Q/K row permutation: rows of each head are stored as [pairs... interleaved]."""
    rows = w.shape[0]
    d = rows // n_head // 2
    return w.reshape(n_head, d, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@torch.no_grad()
def greedy(model, ids, **kw):
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False, **kw
    )
    return out[0, ids.shape[1]:]


def make_smollm2():
    from gguf import GGUFReader
    from gguf import dequantize as gguf_dequantize
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor, get_gguf_hf_weights_map

    os.makedirs(RES, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(GGUF_DIR, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(
        GGUF_DIR, gguf_file=GGUF_NAME, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    cfg = model.config

    enc = tok(PROMPT, return_tensors="pt")
    ids = enc["input_ids"].to(torch.int64)
    ids_nospecial = tok(PROMPT, add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert torch.equal(ids, ids_nospecial), (ids, ids_nospecial)

    # GGUF facts
    reader = GGUFReader(os.path.join(GGUF_DIR, GGUF_NAME))
    gguf_names = [t.name for t in reader.tensors]
    has_output = "output.weight" in gguf_names
    tied_storage = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    name_map = get_gguf_hf_weights_map(model, LlamaTensorProcessor(config=cfg.to_dict()))
    shown = {k: v for k, v in sorted(name_map.items()) if not k.startswith("blk.") or k.startswith("blk.0.")}
    # independent check of the Q/K un-permutation against the raw GGUF tensors
    t_by_name = {t.name: t for t in reader.tensors}
    perm_checks = {}
    for gname, hf, heads in (
        ("blk.0.attn_q.weight", model.model.layers[0].self_attn.q_proj.weight, cfg.num_attention_heads),
        ("blk.0.attn_k.weight", model.model.layers[0].self_attn.k_proj.weight, cfg.num_key_value_heads),
        ("blk.0.attn_v.weight", model.model.layers[0].self_attn.v_proj.weight, None),
    ):
        t = t_by_name[gname]
        raw = gguf_dequantize(t.data, t.tensor_type).astype(np.float32)
        hfw = hf.detach().numpy()
        perm_checks[gname] = {
            "equal_raw": bool(np.array_equal(raw, hfw)),
            "equal_reverse_permuted": bool(heads is not None and np.array_equal(reverse_permute(raw, heads), hfw)),
        }
    print("permutation checks", perm_checks)

    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0].float()
    logits_last = logits[-4:]
    g = greedy(model, ids)
    g_noeos = greedy(model, ids, eos_token_id=None) if (g.numel() < 24) else g
    text = tok.decode(g, skip_special_tokens=False)
    print("greedy:", g.tolist(), repr(text))

    # NF4: write the dequantized f32 weights as a plain HF folder, load that with the bnb config
    tmp = tempfile.mkdtemp(prefix="smollm2-f32-")
    try:
        # the GGUF-loaded config carries quantization_config (GgufConfig), which from_pretrained would refuse to
        # merge with a BitsAndBytesConfig: write config.json by hand without it
        cfg_dict = cfg.to_dict()
        cfg_dict.pop("quantization_config", None)
        cfg_dict["architectures"] = ["LlamaForCausalLM"]
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg_dict, f, indent=1)
        sd = {k: v.detach().contiguous().numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        save_file(sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        back = LlamaForCausalLM.from_pretrained(tmp, dtype=torch.float32, attn_implementation="eager").eval()
        with torch.no_grad():
            assert torch.equal(back(input_ids=ids, use_cache=False).logits[0], logits), "hand-written HF folder differs"
        del back
        qm = LlamaForCausalLM.from_pretrained(
            tmp, quantization_config=nf4_config(), device_map="cpu", dtype=torch.float32, attn_implementation="eager"
        )
        nq = disable_bf16_repack(qm)
        assert nq == 7 * cfg.num_hidden_layers, nq
        qm.eval()
        with torch.no_grad():
            logits_nf4 = qm(input_ids=ids, use_cache=False).logits[0].float()
        g_nf4 = greedy(qm, ids)
        text_nf4 = tok.decode(g_nf4, skip_special_tokens=False)
        print("greedy nf4:", g_nf4.tolist(), repr(text_nf4))
    finally:
        shutil.rmtree(tmp)

    d_nf4 = maxdiff(logits_last, logits_nf4[-4:])
    tensors = {
        "input_ids": ids.numpy(),
        "logits_last": f32(logits_last),
        "greedy_ids": g.numpy().astype(np.int64),
        "logits_last_nf4": f32(logits_nf4[-4:]),
        "greedy_ids_nf4": g_nf4.numpy().astype(np.int64),
    }
    if g_noeos is not g:
        tensors["greedy_ids_noeos"] = g_noeos.numpy().astype(np.int64)
    meta = versions("smollm2")
    meta.update(
        {
            "gguf": GGUF_NAME,
            "prompt": PROMPT,
            "attn_implementation": "eager",
            "logits_last_positions": json.dumps(list(range(ids.shape[1] - 4, ids.shape[1]))),
            "greedy": "model.generate(do_sample=False, max_new_tokens=24), new tokens only, stops after an eos",
            "greedy_text": text,
            "greedy_text_nf4": text_nf4,
            "greedy_text_noeos": tok.decode(g_noeos, skip_special_tokens=False),
            "generation_config": model.generation_config.to_json_string(use_diff=False),
            "eos_token_id": json.dumps(model.generation_config.eos_token_id),
            "config": json.dumps(cfg.to_diff_dict(), sort_keys=True),
            "tie_word_embeddings": json.dumps(cfg.tie_word_embeddings),
            "gguf_has_output_weight": json.dumps(has_output),
            "lm_head_shares_embed_storage": json.dumps(tied_storage),
            "gguf_to_hf_names": json.dumps(shown, sort_keys=True),
            "qk_permutation_checks": json.dumps(perm_checks, sort_keys=True),
            "max_abs_diff_logits_last_vs_nf4": repr(d_nf4),
            "argmax_last": json.dumps(int(logits_last[-1].argmax())),
            "argmax_last_nf4": json.dumps(int(logits_nf4[-1].argmax())),
            "nf4": "f32 weights written to a temp HF folder, loaded with BitsAndBytesConfig(nf4, double quant, "
            "compute float32) on CPU; 7 Linear4bit per layer, lm_head (tied) and embeddings stay f32",
        }
    )
    out = os.path.join(RES, "smollm2-logits.safetensors")
    save_file(tensors, out, metadata=meta)
    info = {
        "ids": ids[0].tolist(),
        "tie": cfg.tie_word_embeddings,
        "has_output": has_output,
        "tied_storage": tied_storage,
        "nf4": d_nf4,
        "text": text,
        "text_nf4": text_nf4,
        "map": shown,
        "rope": cfg.rope_parameters,
        "head_dim": getattr(cfg, "head_dim", None),
    }
    print(json.dumps(info, indent=1, default=str))
    return info


def main():
    parts = sys.argv[1:] or ["tiny", "smollm2"]
    if "tiny" in parts:
        make_tiny()
    if "smollm2" in parts:
        make_smollm2()


if __name__ == "__main__":
    main()
