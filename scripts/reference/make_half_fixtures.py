"""Make Tests/QLoRACoreTests/Resources/half.safetensors: float16 / bfloat16 conversion fixtures.

Tensors (little-endian, contiguous):
  f16_to_f32        f32[65536]  numpy: uint16 bit pattern i (0..65535, implicit) viewed as float16,
                                then .astype(float32)
  f32_samples       f32[N]      about 20000 float32 values (see make_samples)
  f32_to_f16_bits   u16[N]      numpy: f32_samples.astype(float16).view(uint16)
  f32_to_bf16_bits  u16[N]      torch: torch.from_numpy(f32_samples).to(torch.bfloat16) viewed as int16
                                -> uint16 (one 1-D tensor, the vectorized CPU kernel)
  f32_samples_kind  u8[N]       what each sample is for (see KINDS in the metadata)

NaN handling differs between the two references; see scripts/reference/NOTES.md.
Fixed seed; CPU; one thread.
Run:  /work/refvenv/bin/python scripts/reference/make_half_fixtures.py
"""

import os
import sys

import numpy as np
import torch

torch.set_num_threads(1)

import safetensors  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

SEED = 1234
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT = os.path.join(ROOT, "Tests", "QLoRACoreTests", "Resources", "half.safetensors")

KINDS = {
    0: "random float32 bit pattern, any exponent (NaNs removed)",
    1: "random, exponent in the float16 range (2^-27 .. 2^17), random mantissa",
    2: "exact tie between two adjacent float16 values",
    3: "one float32 ulp above or below a float16 tie",
    4: "exact tie between two adjacent bfloat16 values",
    5: "one float32 ulp above or below a bfloat16 tie",
    6: "hand-picked boundary (overflow, subnormal, zero, inf, max)",
    7: "NaN with a payload",
}


def u32(v):
    return np.asarray(v, dtype=np.uint32)


def make_samples(rng):
    vals, kinds = [], []

    def add(bits_u32, kind):
        b = u32(bits_u32).reshape(-1)
        vals.append(b)
        kinds.append(np.full(b.size, kind, np.uint8))

    # 0: random bit patterns over every exponent, subnormals included
    r = rng.integers(0, 2**32, 6000, dtype=np.uint64).astype(np.uint32)
    r = r[(r & 0x7F800000) != 0x7F800000]
    sub = rng.integers(1, 2**23, 300, dtype=np.uint64).astype(np.uint32) | (rng.integers(0, 2, 300).astype(np.uint32) << 31)
    add(np.concatenate([r, sub]), 0)

    # 1: exponent in the float16 range
    e = rng.integers(127 - 27, 127 + 18, 6000).astype(np.uint32)
    m = rng.integers(0, 2**23, 6000, dtype=np.uint64).astype(np.uint32)
    s = rng.integers(0, 2, 6000).astype(np.uint32)
    add((s << 31) | (e << 23) | m, 1)

    # 2/3: ties between adjacent float16 values (finite, subnormals included), and their neighbours
    h = rng.integers(0, 0x7BFF, 2000).astype(np.uint16)  # below 0x7BFF so h+1 is finite
    h[:40] = np.arange(40, dtype=np.uint16)  # the smallest subnormals
    h[40:60] = np.arange(0x3FF - 10, 0x3FF + 10, dtype=np.uint16)  # around the largest subnormal
    lo = h.view(np.float16).astype(np.float64)
    hi = (h + 1).astype(np.uint16).view(np.float16).astype(np.float64)
    tie = ((lo + hi) / 2).astype(np.float32)
    assert np.all(tie.astype(np.float64) == (lo + hi) / 2)
    sign = (rng.integers(0, 2, tie.size).astype(np.uint32) << 31)
    tb = tie.view(np.uint32) | sign
    add(tb, 2)
    add(np.concatenate([tb[:1000] + 1, tb[1000:] - 1]), 3)

    # 4/5: ties between adjacent bfloat16 values, and their neighbours
    bb = rng.integers(0, 0x7F7F, 2000).astype(np.uint32)
    bb[:20] = np.arange(20)
    sign = (rng.integers(0, 2, bb.size).astype(np.uint32) << 31)
    bt = sign | (bb << 16) | 0x8000
    add(bt, 4)
    add(np.concatenate([bt[:1000] + 1, bt[1000:] - 1]), 5)

    # 6: boundaries
    f = np.float32
    special = [
        0.0, -0.0, np.inf, -np.inf, 65504.0, -65504.0, 65519.99, 65520.0, -65520.0, 65536.0, 1e5, -1e5,
        np.nextafter(f(65520.0), f(0)), np.nextafter(f(65520.0), f(np.inf)), np.nextafter(f(65504.0), f(np.inf)),
        np.finfo(np.float32).max, -np.finfo(np.float32).max, np.finfo(np.float32).tiny, 1.4e-45, -1.4e-45,
        2.0**-24, 2.0**-25, -(2.0**-25), np.nextafter(f(2.0**-25), f(1)), np.nextafter(f(2.0**-25), f(0)),
        3 * 2.0**-26, 2.0**-14, np.nextafter(f(2.0**-14), f(0)), 2.0**-14 - 2.0**-25, 2.0**-14 - 2.0**-26,
        2.0**-26, 1e-10, 1.0, -1.0, 0.1, 1.0 / 3.0, 2048.0, 2049.0, 2050.0, 2051.0, 4097.0,
    ]
    special_bits = [u32(np.float32(v).view(np.uint32)) for v in special]
    special_bits += [
        0x7F7F0000, 0x7F7F7FFF, 0x7F7F8000, 0x7F7F8001, 0x7F7FFFFF, 0xFF7F8000, 0x7F7E8000,  # bf16 overflow
        0x00008000, 0x00018000, 0x0000FFFF, 0x00010000, 0x007F8000, 0x007FFFFF, 0x00800000,  # bf16 subnormal
        0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001,  # bf16 ties near 1
        0x477FE000, 0x477FEFFF, 0x477FF000, 0x477FF001, 0x477FFFFF,  # around 65504 / 65520
    ]
    add(np.array(special_bits, dtype=np.uint32), 6)

    # 7: NaNs with payloads (quiet and signalling, both signs)
    nans = [0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FA00000, 0x7FBFFFFF, 0x7FC00001, 0x7FFFFFFF,
            0xFFFFFFFF, 0x7F802000, 0x7F800100, 0x7FC0A000, 0xFF812345, 0x7FD55555, 0x7F8FE000, 0xFFE00001]
    add(np.array(nans, dtype=np.uint32), 7)

    return np.concatenate(vals).view(np.float32), np.concatenate(kinds)


def main():
    rng = np.random.default_rng(SEED)
    torch.manual_seed(SEED)
    all16 = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    with np.errstate(all="ignore"):
        f16_to_f32 = all16.view(np.float16).astype(np.float32)
        samples, kinds = make_samples(rng)
        to_f16 = samples.astype(np.float16).view(np.uint16)
    to_bf16 = torch.from_numpy(samples.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)

    tensors = {
        "f16_to_f32": np.ascontiguousarray(f16_to_f32),
        "f32_samples": np.ascontiguousarray(samples),
        "f32_to_f16_bits": np.ascontiguousarray(to_f16),
        "f32_to_bf16_bits": np.ascontiguousarray(to_bf16),
        "f32_samples_kind": np.ascontiguousarray(kinds),
    }
    metadata = {
        "generator": "scripts/reference/make_half_fixtures.py",
        "seed": str(SEED),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "safetensors": safetensors.__version__,
        "python": sys.version.split()[0],
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "f16_to_f32": "numpy uint16(i).view(float16).astype(float32), i = 0..65535",
        "f32_to_f16_bits": "numpy astype(float16).view(uint16)",
        "f32_to_bf16_bits": "torch 1-D tensor .to(torch.bfloat16).view(torch.int16) as uint16",
        "kinds": "; ".join(f"{k}={v}" for k, v in KINDS.items()),
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    save_file(tensors, OUT, metadata=metadata)
    print(f"wrote {OUT}: {samples.size} samples, {os.path.getsize(OUT)} bytes")
    for k, v in metadata.items():
        print(f"  {k}: {v}")
    nan = np.isnan(samples)
    print("NaN samples (f32 bits -> numpy f16 bits, torch bf16 bits):")
    for b, h, bf in zip(samples[nan].view(np.uint32), to_f16[nan], to_bf16[nan]):
        print(f"  {b:#010x} -> {h:#06x}  {bf:#06x}")


if __name__ == "__main__":
    main()
