"""What the bench scripts share on the reference side: the default model's weights as a transformers
folder, and loading it in NF4 + double quantization through bitsandbytes.

transformers reads a GGUF only into 16/32-bit weights and cannot hand a GGUF to bitsandbytes, so the 4-bit
rows load a folder of the GGUF's weights dequantized to f32. That folder is written once, by the calling
(parent) process, so that the process whose memory is measured loads the folder only, as a user of the
reference stack with an ordinary Hugging Face checkpoint would.
"""
import json
import os


def dequantized_folder(model_path, folder=None):
    """The GGUF's weights, dequantized by transformers, as an f32 safetensors folder (written once per GGUF
    file, and again when the file is newer than the folder)."""
    folder = folder or os.path.join("bench/out", "reference-f32-" + os.path.splitext(os.path.basename(model_path))[0])
    if os.path.exists(os.path.join(folder, "config.json")) and os.path.exists(os.path.join(folder, "model.safetensors")) \
            and os.path.getmtime(os.path.join(folder, "config.json")) >= os.path.getmtime(model_path):
        return folder
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(os.path.dirname(model_path), gguf_file=os.path.basename(model_path), dtype=torch.float32)
    os.makedirs(folder, exist_ok=True)
    state = {k: v.detach().clone().contiguous() for k, v in m.state_dict().items()}
    state.pop("lm_head.weight", None)  # tied to the embeddings
    save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    cfg = m.config.to_dict()
    cfg.pop("quantization_config", None)
    json.dump(cfg, open(os.path.join(folder, "config.json"), "w"))  # last: it marks the folder complete
    return folder


def load_nf4(folder, compute_dtype):
    """The folder's model with every linear layer in NF4 + double quantization (QLoRA's storage)."""
    import torch
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype),
        device_map="cpu", dtype=torch.float32)
    # DESIGN.md's trap: an eval pass would repack the 4-bit weights for a bf16 kernel without a backward.
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    return model
