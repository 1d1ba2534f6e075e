"""bf16 rounding and bf16-operand products as PyTorch computes them, for the bf16 GEMM tests.

Writes Tests/QLoRAKernelsTests/Resources/bf16.safetensors:
  x             f32 values: normals at many scales, exact ties between bf16 neighbours (both parities),
                values that round up to the next binade and to infinity, signed zeros, infinities.
                (No subnormals: vcvtneps2bf16 flushes them to zero, torch keeps them.)
  x_bf16        torch's x.to(torch.bfloat16) as int16 bits (round to nearest even)
  a, b          f32 [37, 61] and [61, 45]
  c             a and b rounded to bf16 by torch, multiplied in float64, stored f32
Run with the reference venv: python scripts/reference/make_bf16_fixtures.py
"""
import os
import torch
from safetensors.torch import save_file

torch.manual_seed(7)
parts = [torch.randn(4000) * torch.exp2(torch.randint(-60, 60, (4000,)).float())]
# Exact midpoints between two bf16 neighbours: a bf16 value plus half its ulp (lower 16 bits = 0x8000).
base = torch.randn(2000).to(torch.bfloat16).float()
bits = base.view(torch.int32) | 0x8000
parts.append(bits.view(torch.float32))
# Just below and above the midpoints.
parts.append((bits - 1).view(torch.float32))
parts.append((bits + 1).view(torch.float32))
# Rounding that carries into the exponent, and overflow to infinity.
parts.append(torch.tensor([1.9999999, 3.3895313e38, 3.39e38, -3.4e38, 0.0, -0.0, float("inf"), float("-inf"), 1.17549435e-38]))
x = torch.cat(parts).float()
x_bf16 = x.to(torch.bfloat16).view(torch.int16)

a = torch.randn(37, 61)
b = torch.randn(61, 45)
c = (a.to(torch.bfloat16).double() @ b.to(torch.bfloat16).double()).float()

out = os.path.join(os.path.dirname(__file__), "../../Tests/QLoRAKernelsTests/Resources/bf16.safetensors")
save_file({"x": x, "x_bf16": x_bf16, "a": a, "b": b, "c": c}, out, metadata={"torch": torch.__version__})
print("wrote", os.path.normpath(out), x.numel(), "values")
