"""Make Tests/QLoRAFormatsTests/Resources/ggml_q4k.safetensors: f32 values and their Q4_K bytes as llama.cpp's
own quantizer writes them: quantize_row_q4_K_ref from the libggml-base that bench/llama_cpp_setup.sh builds (the
function llama-quantize calls for Q4_K without an importance matrix), called through ctypes. gguf-py has no Q4_K
quantizer.

Tensors:
  values  F32 (12, 512): rows 0-3 standard normal; row 4 normal with outliers (x 50 at every 37th value); row 5
          sub-blocks of 32 made by hand: zeros, a constant, all positive, all negative, one value apart, tiny
          (f16 scales underflow), large (near the f16 maximum), uniform; rows 6-7 uniform in (-1e-3, 1e-3);
          rows 8-11 weights of the default model (blk.0.ffn_down.weight of its GGUF, dequantized).
  q4_K    U8: the 12 x 2 super-blocks, 144 bytes each.
__metadata__: the llama.cpp commit and library.

Usage: python scripts/reference/make_q4k_fixtures.py LIBGGML_BASE_SO   (needs: pip install gguf safetensors numpy)
"""
import ctypes, os, subprocess, sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.numpy import save_file

lib_path = sys.argv[1]
lib = ctypes.CDLL(lib_path)
lib.quantize_row_q4_K_ref.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
lib.quantize_row_q4_K_ref.restype = None

rng = np.random.default_rng(20261204)
v = np.zeros((12, 512), dtype=np.float32)
v[0:4] = rng.standard_normal((4, 512), dtype=np.float32)
v[4] = rng.standard_normal(512, dtype=np.float32)
v[4, ::37] *= 50
row = rng.uniform(-1, 1, 512).astype(np.float32)
row[0:32] = 0
row[32:64] = 0.75
row[64:96] = rng.uniform(0.5, 2, 32)
row[96:128] = -rng.uniform(0.5, 2, 32)
row[128:160] = 1.0
row[140] = 1.001
row[160:192] = rng.uniform(-1, 1, 32) * 1e-7
row[192:224] = rng.uniform(-1, 1, 32) * 6e4
v[5] = row
v[6:8] = (rng.uniform(-1, 1, (2, 512)) * 1e-3).astype(np.float32)
cache = os.environ.get("QLORA_CACHE", os.path.expanduser("~/.cache/swift-qlora"))
reader = GGUFReader(os.path.join(cache, "models/SmolLM2-135M-Instruct.Q4_1.gguf"))
t = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
w = dequantize(t.data, t.tensor_type).reshape(-1)
v[8:12] = w[: 4 * 512].reshape(4, 512)

out = np.zeros(12 * 2 * 144, dtype=np.uint8)
x = np.ascontiguousarray(v.reshape(-1))
lib.quantize_row_q4_K_ref(x.ctypes.data, out.ctypes.data, x.size)
src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(lib_path))))
try:
    commit = subprocess.run(["git", "-C", src, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
except OSError:
    commit = ""
dest = os.path.join(os.path.dirname(__file__), "..", "..", "Tests", "QLoRAFormatsTests", "Resources", "ggml_q4k.safetensors")
save_file({"values": v, "q4_K": out}, dest, metadata={"source": f"quantize_row_q4_K_ref, {os.path.basename(lib_path)}, llama.cpp {commit or 'vendored in llama-cpp-python 0.3.36 (0c1e57098)'}"})
print("wrote", os.path.normpath(dest))
