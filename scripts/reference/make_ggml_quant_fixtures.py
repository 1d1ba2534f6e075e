"""Make Tests/QLoRAFormatsTests/Resources/ggml_quant.safetensors: f32 values and their GGUF bytes in each type
that swift-qlora writes, as gguf-py's quantizers (gguf.quants.quantize, numpy ports of llama.cpp's reference
quantizers) write them.

Tensors:
  values  F32 (8, 256): rows 0-3 standard normal; row 4 normal with outliers (x 50 at every 37th value);
          row 5 hand-made blocks: all zeros, a tie of largest magnitude (+3 then -3: the first one decides),
          values that land on .5 after scaling, tiny values (fp16 scale underflows to subnormal), values near
          the fp16 maximum; rows 6-7 uniform in (-1e-3, 1e-3).
  q8_0, q4_0, f16, bf16  U8: gguf.quants.quantize(values, type) as bytes (row-major, blocks of 32 for q*).
__metadata__: versions (gguf, numpy, python).

Usage: python scripts/reference/make_ggml_quant_fixtures.py   (needs: pip install gguf safetensors)
"""
import os
import platform
from importlib.metadata import version

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import quantize
from safetensors.numpy import save_file

rng = np.random.default_rng(20261204)
v = np.zeros((8, 256), dtype=np.float32)
v[0:4] = rng.standard_normal((4, 256), dtype=np.float32)
v[4] = rng.standard_normal(256, dtype=np.float32)
v[4, ::37] *= 50
row = np.zeros(256, dtype=np.float32)
# block 0: zeros. block 1: a tie of largest magnitude.
row[32:64] = rng.uniform(-1, 1, 32).astype(np.float32)
row[32 + 5], row[32 + 9] = 3.0, -3.0
# block 2: q8_0 halves: amax 127 gives d = 1, so k + 0.5 rounds half away from zero.
row[64:96] = np.array([127.0] + [k + 0.5 for k in range(-15, 16)], dtype=np.float32)
# block 3: q4_0 halves: m = -8 gives d = 1, so x + 8.5 lands on whole numbers and x = k - 0.5 on .0.
row[96:128] = np.array([-8.0] + [(k % 16) - 8 + 0.5 * (k % 2) for k in range(31)], dtype=np.float32)
# block 4: tiny (the f16 scale is subnormal); block 5: near the f16 maximum.
row[128:160] = (rng.uniform(-1, 1, 32) * 1e-6).astype(np.float32)
row[160:192] = (rng.uniform(-1, 1, 32) * 6e4).astype(np.float32)
row[192:256] = rng.standard_normal(64, dtype=np.float32)
v[5] = row
v[6:8] = (rng.uniform(-1, 1, (2, 256)) * 1e-3).astype(np.float32)

tensors = {"values": v}
for name, t in [("q8_0", T.Q8_0), ("q4_0", T.Q4_0), ("f16", T.F16), ("bf16", T.BF16)]:
    tensors[name] = np.ascontiguousarray(quantize(v, t)).view(np.uint8).reshape(-1)
out = os.path.join(os.path.dirname(__file__), "..", "..", "Tests", "QLoRAFormatsTests", "Resources", "ggml_quant.safetensors")
versions = f"gguf {version('gguf')}, numpy {np.__version__}, python {platform.python_version()}"
save_file(tensors, out, metadata={"versions": versions})
print("wrote", os.path.normpath(out), {k: t.shape for k, t in tensors.items()}, versions)
