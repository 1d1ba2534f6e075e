"""Reference fixtures for the model families beyond Llama: Qwen3, Gemma 3 (text) and Phi-3, made with the real
stack (transformers, bitsandbytes, peft, and llama.cpp's own convert_hf_to_gguf.py).

Writes under Tests/QLoRAModelTests/Resources/, for NAME in tiny-qwen3, tiny-gemma3, tiny-phi3, tiny-phi3-longrope:

  NAME/                  the float32 model as save_pretrained writes it (config.json, generation_config.json,
                         model.safetensors) and a tiny tokenizer of its family's kind (so that the GGUF converter
                         runs): byte-level BPE tokenizer.json for Qwen3, a SentencePiece tokenizer.model (BPE,
                         300 pieces, no byte fallback, trained on the ASCII of Tests/QLoRAEvaluationTests/Resources/
                         war_and_peace_excerpt.txt) for Gemma 3 and Phi-3.
  NAME/reference.safetensors
      input_ids    I64 [2, 12]
      logits       F32 [2, 12, 320]  full-sequence forward, eager attention, f32
      logits_step  F32 [2, 12, 320]  prefill of 8 tokens, then one at a time through transformers' cache
      logits_nf4   F32 [2, 12, 320]  the same model loaded with bitsandbytes nf4 + double quant, compute f32
      logits_first8 F32 [2, 8, 320]  the first 8 tokens alone
      greedy_prompt I64 [6], greedy_ids I64 [10]   model.generate(do_sample=False, max_new_tokens=10), new tokens (for
                         LongRoPE this crosses the original length, where generate recomputes the cache with the long
                         factors)
      train_ids, train_labels I64 [2, 12]          the LoRA batch (labels -100 on the first 4 positions)
      lora.loss    F32 [1]           PEFT's loss on that batch (f32 base, LoRA r 4, alpha 8, dropout 0)
      lora.logits  F32 [2, 12, 320]  the adapted model's logits on train_ids
      grad.<key>   F32               PEFT's gradient of each LoRA tensor, <key> as adapter_model.safetensors names it
  NAME-lora/             the PEFT adapter (save_pretrained): every linear module of the family as PEFT names it
                         (Phi-3: qkv_proj, o_proj, gate_up_proj, down_proj), A and B drawn N(0, 0.1^2)
  NAME-bnb-nf4/          save_pretrained of the nf4 + double quant model (bitsandbytes' serialization)
  tiny-qwen2.gguf,       the converter's output for tiny-qwen2/ and tiny-llama3-rope/ (make_model_fixtures.py), with
  tiny-llama3-rope.gguf  the Qwen3 kind of tokenizer added.
  NAME.gguf              llama.cpp's convert_hf_to_gguf.py --outtype f32 of NAME/ (the llama-cpp-python 0.3.36
                         sdist's vendored converter, bench/llama_cpp_setup.sh downloads it). Its tokenizer
                         pre-type check hashes the tokenizer's output against known models; the tiny BPE is none,
                         so get_vocab_base_pre is told "qwen2" (tokenizer metadata only; the tensors and model keys
                         are the converter's own).

Weights are redrawn (Linear ~ N(0, 1/in), embeddings N(0, 0.25^2), norm weights 1 + 0.2 N(0,1) (Gemma: its (1 + w)
form gets w = 0.2 N(0,1)), biases 0.1 N(0,1)) so that attention is far from uniform and every norm matters.
All in-features are multiples of 64 (bitsandbytes' CPU dequantization indexes blocks per row).
Every bnb.nn.Linear4bit gets support_avx512bf16_for_cpu = False before any forward (DESIGN.md, Traps).
Seed 0, CPU, one thread.
Run:  $QLORA_CACHE/bench-venv/bin/python scripts/reference/make_family_fixtures.py [NAME ...]
"""

import json
import os
import runpy
import shutil
import sys
import tempfile

import torch

torch.set_num_threads(1)

import bitsandbytes as bnb  # noqa: E402
import numpy as np  # noqa: E402
import peft  # noqa: E402
import safetensors  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402
from transformers import (  # noqa: E402
    BitsAndBytesConfig,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GenerationConfig,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

transformers.logging.set_verbosity_error()

SEED = 0
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
RES = os.path.join(ROOT, "Tests", "QLoRAModelTests", "Resources")
TEXT = os.path.join(ROOT, "Tests", "QLoRAEvaluationTests", "Resources", "war_and_peace_excerpt.txt")
CACHE = os.environ.get("QLORA_CACHE", os.path.expanduser("~/.cache/swift-qlora"))
LLAMA_CPP = os.path.join(CACHE, "llama.cpp", "llama_cpp_python-0.3.36", "vendor", "llama.cpp")
PREFILL = 8
SEQS = [
    [1, 17, 250, 3, 99, 42, 7, 319, 128, 64, 5, 200],
    [1, 300, 12, 12, 12, 88, 150, 2, 45, 77, 310, 0],
]
LORA_R, LORA_ALPHA, LORA_STD = 4, 8, 0.1

COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, bos_token_id=1, eos_token_id=2)

FAMILIES = {
    # Qwen3: per-head q/k RMSNorm before RoPE, head_dim 32 (q_proj 64 -> 128), tied head.
    "tiny-qwen3": (Qwen3ForCausalLM, lambda: Qwen3Config(
        **COMMON, num_hidden_layers=2, head_dim=32, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
        attention_bias=False, use_sliding_window=False), "bpe",
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    # Gemma 3 (text): (1 + w) norms, four per block, q/k norms, GELU-tanh, embeddings times sqrt(hidden), sliding
    # window 4 on five layers of six (the default pattern) with their own RoPE base, linear scaling on the global.
    "tiny-gemma3": (Gemma3ForCausalLM, lambda: Gemma3TextConfig(
        **{**COMMON, "bos_token_id": 2, "eos_token_id": 1}, pad_token_id=0, num_hidden_layers=6, head_dim=32,
        query_pre_attn_scalar=32, sliding_window=4, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}), "spm",
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    # Phi-3: fused qkv_proj and gate_up_proj, partial rotary (0.75 of head_dim 16), sliding window 5, untied.
    "tiny-phi3": (Phi3ForCausalLM, lambda: Phi3Config(
        **COMMON, num_hidden_layers=2, original_max_position_embeddings=256, sliding_window=5, pad_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75},
        tie_word_embeddings=False), "spm",
        ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
    # Phi-3.5 / Phi-4-mini's LongRoPE: short factors up to original_max_position_embeddings (8 here), long ones past
    # it, cos and sin times sqrt(1 + ln(256 / 8) / ln 8); partial rotary 0.75, no window.
    "tiny-phi3-longrope": (Phi3ForCausalLM, lambda: Phi3Config(
        **COMMON, num_hidden_layers=2, original_max_position_embeddings=8, sliding_window=None, pad_token_id=0,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                         "short_factor": [1.0, 1.1, 1.3, 1.7, 2.2, 3.0], "long_factor": [1.0, 1.5, 3.0, 6.0, 12.0, 24.0]},
        tie_word_embeddings=False), "spm",
        ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
}


def versions():
    return {
        "generator": "scripts/reference/make_family_fixtures.py",
        "seed": str(SEED),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "bitsandbytes": bnb.__version__,
        "peft": peft.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
    }


def fresh_dir(path):
    if os.path.isdir(path):
        shutil.rmtree(path)
    os.makedirs(path)


def f32(t):
    return t.detach().to(torch.float32).contiguous().numpy()


def maxdiff(a, b):
    return float((a.float() - b.float()).abs().max().item())


@torch.no_grad()
def randomize(model, gemma):
    g = torch.Generator().manual_seed(SEED)
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if name.endswith("bias"):
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
        elif "norm" in name:
            p.copy_((0.0 if gemma else 1.0) + 0.2 * torch.randn(p.shape, generator=g))
        elif "embed_tokens" in name:
            p.copy_(0.25 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(torch.randn(p.shape, generator=g) / (p.shape[1] ** 0.5))


def write_tokenizer(folder, kind, family):
    text = open(TEXT, encoding="utf-8").read()
    if kind == "bpe":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
        tok.train_from_iterator([text], trainer)
        tok.save(os.path.join(folder, "tokenizer.json"))
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "bos_token": None,
               "model_max_length": 256}
    else:
        import sentencepiece as spm
        with tempfile.TemporaryDirectory() as tmp:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(text.encode("ascii", "ignore").decode().splitlines()),
                model_prefix=os.path.join(tmp, "sp"), vocab_size=300, model_type="bpe", character_coverage=1.0, bos_id=1, eos_id=2, unk_id=3, pad_id=0,
                num_threads=1, minloglevel=2)
            shutil.copy(os.path.join(tmp, "sp.model"), os.path.join(folder, "tokenizer.model"))
        cfg = {"tokenizer_class": "LlamaTokenizer" if family != "tiny-gemma3" else "GemmaTokenizer",
               "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
               "add_bos_token": True, "model_max_length": 256}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def load(cls, folder, **kw):
    return cls.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager", **kw).eval()


def no_bf16_repack(model):
    n = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


@torch.no_grad()
def full_logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits.float()


@torch.no_grad()
def step_logits(model, ids):
    out = model(input_ids=ids[:, :PREFILL], use_cache=True)
    cache = out.cache
    parts = [out.logits.float()]
    for t in range(PREFILL, ids.shape[1]):
        out = model(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True)
        cache = out.cache
        parts.append(out.logits.float())
    return torch.cat(parts, dim=1)


def convert_gguf(folder, out):
    """llama.cpp's converter, in this process so that its tokenizer pre-type lookup can be told the answer."""
    sys.path.insert(0, LLAMA_CPP)
    sys.path.insert(1, os.path.join(LLAMA_CPP, "gguf-py"))
    import conversion.base as base
    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
    argv = sys.argv
    sys.argv = ["convert_hf_to_gguf.py", folder, "--outtype", "f32", "--outfile", out]
    try:
        runpy.run_path(os.path.join(LLAMA_CPP, "convert_hf_to_gguf.py"), run_name="__main__")
    finally:
        sys.argv = argv


def lora_batch():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 320, (2, 12), generator=g, dtype=torch.int64)
    labels = ids.clone()
    labels[:, :4] = -100
    return ids, labels


def make(name):
    cls, make_config, tok_kind, targets = FAMILIES[name]
    torch.manual_seed(SEED)
    config = make_config()
    model = cls(config).to(torch.float32)
    randomize(model, gemma=name == "tiny-gemma3")
    if name == "tiny-phi3-longrope":  # the same weights as tiny-phi3 (so only the rotary scaling differs)
        model.load_state_dict(load(Phi3ForCausalLM, os.path.join(RES, "tiny-phi3")).state_dict())
    folder = os.path.join(RES, name)
    fresh_dir(folder)
    model.save_pretrained(folder, safe_serialization=True)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id).save_pretrained(folder)
    write_tokenizer(folder, tok_kind, name)

    ids = torch.tensor(SEQS, dtype=torch.int64)
    m = load(cls, folder)
    logits = full_logits(m, ids)
    logits_step = step_logits(m, ids)
    prompt = ids[:1, :6]
    with torch.no_grad():
        out = m.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    greedy = out[0, 6:]
    tensors = {"input_ids": ids.numpy(), "logits": f32(logits), "logits_step": f32(logits_step),
               "greedy_prompt": prompt[0].numpy(), "greedy_ids": greedy.numpy(),
               # The first 8 tokens alone (within LongRoPE's original length: its short factors).
               "logits_first8": f32(full_logits(m, ids[:, :8]))}
    meta = versions()
    with open(os.path.join(folder, "config.json")) as f:
        meta["config_json"] = f.read()
    meta["max_abs_logits"] = repr(float(logits.abs().max()))
    meta["max_abs_diff_full_vs_step"] = repr(maxdiff(logits, logits_step))

    # NF4 + double quantization, compute f32, and its saved checkpoint.
    q = cls.from_pretrained(folder, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32), device_map="cpu", dtype=torch.float32, attn_implementation="eager")
    meta["nf4_modules"] = str(no_bf16_repack(q))
    q.eval()
    logits_nf4 = full_logits(q, ids)
    tensors["logits_nf4"] = f32(logits_nf4)
    meta["max_abs_diff_f32_vs_nf4"] = repr(maxdiff(logits, logits_nf4))
    qdir = os.path.join(RES, name + "-bnb-nf4")
    fresh_dir(qdir)
    q.save_pretrained(qdir, safe_serialization=True)

    # LoRA through PEFT on the f32 base: loss, logits and every gradient.
    train_ids, labels = lora_batch()
    base = load(cls, folder)
    lcfg = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=targets, bias="none",
                      task_type="CAUSAL_LM")
    pm = get_peft_model(base, lcfg)
    g = torch.Generator().manual_seed(1)
    params = [(n, p) for n, p in pm.named_parameters() if "lora_" in n]
    with torch.no_grad():
        for _, p in params:
            p.copy_(torch.randn(p.shape, generator=g) * LORA_STD)
    pm.train()
    res = pm(input_ids=train_ids, labels=labels)
    res.loss.backward()
    tensors["train_ids"] = train_ids.numpy()
    tensors["train_labels"] = labels.numpy()
    tensors["lora.loss"] = f32(res.loss).reshape(1)
    tensors["lora.logits"] = f32(res.logits)
    for n, p in params:
        key = n.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        tensors["grad." + key] = f32(p.grad)
    ldir = os.path.join(RES, name + "-lora")
    fresh_dir(ldir)
    pm.save_pretrained(ldir, safe_serialization=True)
    meta["lora"] = json.dumps({"r": LORA_R, "lora_alpha": LORA_ALPHA, "target_modules": targets, "std": LORA_STD})
    meta["lora_loss"] = repr(float(res.loss))

    save_file(tensors, os.path.join(folder, "reference.safetensors"), metadata=meta)

    gguf_path = os.path.join(RES, name + ".gguf")
    convert_gguf(folder, gguf_path)
    print(name, "max|logits|", meta["max_abs_logits"], "full vs step", meta["max_abs_diff_full_vs_step"],
          "f32 vs nf4", meta["max_abs_diff_f32_vs_nf4"], "lora loss", meta["lora_loss"], "greedy", greedy.tolist())


def make_converted_gguf(name):
    """A tiny model of make_model_fixtures.py as llama.cpp's converter writes it: tiny-qwen2 (q/k/v biases, no
    Q/K row permutation), tiny-llama3-rope (Llama 3.1's scaling as a rope_freqs tensor)."""
    with tempfile.TemporaryDirectory() as tmp:
        for f in ("config.json", "generation_config.json", "model.safetensors"):
            shutil.copy(os.path.join(RES, name, f), tmp)
        write_tokenizer(tmp, "bpe", name)
        convert_gguf(tmp, os.path.join(RES, name + ".gguf"))


def main():
    names = sys.argv[1:] or list(FAMILIES) + ["tiny-qwen2.gguf", "tiny-llama3-rope.gguf"]
    for n in names:
        make_converted_gguf(n[:-len(".gguf")]) if n.endswith(".gguf") else make(n)


if __name__ == "__main__":
    main()
