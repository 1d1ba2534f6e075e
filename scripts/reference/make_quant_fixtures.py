"""Make Tests/QLoRAKernelsTests/Resources/bnb_quant.safetensors from the real bitsandbytes.

What it makes (one safetensors file, every tensor little-endian and contiguous):

  code.nf4 f32[16], code.fp4 f32[16]      bitsandbytes.functional.get_4bit_type(...)
  code.dynamic f32[256]                   create_dynamic_map(signed=True), the nested-absmax map

  case.<name>.input f32[n]                1-D input
  case.<name>.<qt>.bs<B>.packed u8        quantize_4bit(compress_statistics=False), flattened
  case.<name>.<qt>.bs<B>.absmax f32       its per-block absmax
  case.<name>.<qt>.bs<B>.dequant f32      dequantize_4bit of the above, flattened
  case.<name>.<qt>.bs<B>.dq.qabsmax u8    quantize_4bit(compress_statistics=True): 8-bit absmax codes
  case.<name>.<qt>.bs<B>.dq.nested_absmax f32   state2.absmax (one per 256 absmax values)
  case.<name>.<qt>.bs<B>.dq.offset f32[1] the mean subtracted before the 8-bit quantization
  case.<name>.<qt>.bs<B>.dq.absmax f32    the absmax that dequantize_4bit reconstructs
                                          (dequantize_blockwise(qabsmax) + offset)
  case.<name>.<qt>.bs<B>.dq.dequant f32   dequantize_4bit of the compressed state

  blockwise8.<name>.input f32, .q u8, .absmax f32, .dequant f32
                                          quantize_blockwise(x, blocksize=256) with the default dynamic
                                          code, and dequantize_blockwise of it

qt is nf4 or fp4; B is 32, 64, 128, 256, 4096, except: `big` has only 64 and 4096, and `len1000` and
`outlier` have only 32, 64 and 4096 (dropped to keep the file under 3 MiB).
Everything runs on the CPU with float32 inputs, one thread, fixed seed. The tensor packed for an odd
n has (n + 1) // 2 bytes (the last low nibble is padding).

Rerun with:  /work/refvenv/bin/python scripts/reference/make_quant_fixtures.py
Pinned versions used to make the committed file are in its __metadata__ (bitsandbytes 0.50.2).
"""

import os
import sys

import numpy as np
import torch

torch.set_num_threads(1)

import bitsandbytes  # noqa: E402
import bitsandbytes.functional as F  # noqa: E402
import safetensors  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

SEED = 20240601
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT = os.path.join(ROOT, "Tests", "QLoRAKernelsTests", "Resources", "bnb_quant.safetensors")

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 4096)
# The larger cases skip some blocksizes to keep the file under 3 MiB.
CASE_BLOCKSIZES = {"big": (64, 4096), "len1000": (32, 64, 4096), "outlier": (32, 64, 4096)}


def f32(a):
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32))


def make_cases(rng):
    cases = {}
    normal = lambda n: f32(rng.standard_normal(n))  # noqa: E731
    cases["len1"] = normal(1)
    cases["len2"] = normal(2)
    cases["len3"] = normal(3)
    cases["len63"] = normal(63)
    cases["len64"] = normal(64)
    cases["len65"] = normal(65)
    cases["len127"] = normal(127)
    cases["len1000"] = normal(1000)
    cases["zeros130"] = np.zeros(130, dtype=np.float32)

    mixed = normal(192)
    mixed[64:128] = 0.0
    cases["mixed_zero_block"] = mixed

    # Magnitudes log-uniform in [1e30, 3e38], random signs; one element at the float32 maximum.
    mag = 10.0 ** rng.uniform(30.0, np.log10(3e38), 200)
    huge = f32(mag * rng.choice([-1.0, 1.0], 200))
    huge[17] = np.finfo(np.float32).max
    cases["huge"] = huge

    # 64 values around 1e-30, 64 subnormals around 1e-40 (down to the smallest subnormal), 64 mixed,
    # then an 8-value tail of subnormals (a short last block for blocksize 32/64).
    signs = lambda n: rng.choice([-1.0, 1.0], n)  # noqa: E731
    a = 10.0 ** rng.uniform(-31.0, -29.0, 64) * signs(64)
    b = 10.0 ** rng.uniform(-45.0, -39.0, 64) * signs(64)
    c = np.where(rng.random(64) < 0.5, 10.0 ** rng.uniform(-31.0, -29.0, 64), 10.0 ** rng.uniform(-45.0, -39.0, 64))
    c = c * signs(64)
    d = 10.0 ** rng.uniform(-44.0, -40.0, 8) * signs(8)
    tiny = f32(np.concatenate([a, b, c, d]))
    tiny[70] = np.float32(1.4e-45)  # smallest positive subnormal
    tiny[71] = -np.float32(1.4e-45)
    cases["tiny"] = tiny

    cases["ties"] = make_ties()

    cases["big"] = f32(rng.standard_normal(70000) * 0.02)

    out = normal(1000)
    idx = rng.choice(1000, 6, replace=False)
    out[idx] *= 100.0
    cases["outlier"] = out
    return cases


def bnb_midpoints(qt):
    """The exact float32 midpoints bitsandbytes' default quantize_4bit bucketizes against."""
    code = F.get_4bit_type(qt, device="cpu")
    order = torch.argsort(code)
    return ((code[order[:-1]] + code[order[1:]]) / 2).numpy()


def make_ties():
    """Values that land exactly on the NF4 / FP4 midpoints after scaling.

    Segment A (256 values, absmax 1.0, so x * (1/1) == x exactly): eight 32-chunks, each with one +-1.0.
      chunk 0: 1.0, the 15 NF4 midpoints, the 15 FP4 midpoints, 0.0
      chunk 1: -1.0, the NF4 midpoints negated, the FP4 midpoints negated, -0.0
      chunk 2: 1.0, nextafter(mid, +inf) for NF4 and FP4, and 2**-20
      chunk 3: -1.0, nextafter(mid, -inf) for NF4 and FP4, and -2**-20
      chunks 4-7: repeat 0-3 with the elements in a different (reversed) order
    Segment B (256 values, absmax 4.0, scale 0.25 exact; 4 * mid is exact): the same as A times 4.
    Tail (31 values, a short last block for every blocksize up to 256, scaled by x / am with am == 1.0):
      1.0, the 15 NF4 midpoints, the 15 FP4 midpoints.
    For blocksize 4096 the whole array is one block with absmax 4.0, so only segment B is tied there.
    """
    nf = bnb_midpoints("nf4").astype(np.float32)
    fp = bnb_midpoints("fp4").astype(np.float32)
    up = lambda v: np.nextafter(v, np.float32(np.inf))  # noqa: E731
    dn = lambda v: np.nextafter(v, np.float32(-np.inf))  # noqa: E731
    ch0 = np.concatenate([[1.0], nf, fp, [0.0]])
    ch1 = np.concatenate([[-1.0], -nf, -fp, [-0.0]])
    ch2 = np.concatenate([[1.0], up(nf), up(fp), [2.0**-20]])
    ch3 = np.concatenate([[-1.0], dn(nf), dn(fp), [-(2.0**-20)]])
    chunks = [ch0, ch1, ch2, ch3]
    seg_a = np.concatenate(chunks + [c[::-1] for c in chunks]).astype(np.float32)
    assert seg_a.size == 256 and np.abs(seg_a).max() == 1.0
    seg_b = (seg_a * np.float32(4.0)).astype(np.float32)
    assert np.array_equal(seg_b / np.float32(4.0), seg_a)
    tail = np.concatenate([[1.0], nf, fp]).astype(np.float32)
    return f32(np.concatenate([seg_a, seg_b, tail]))


def make_blockwise8_cases(rng):
    cases = {}
    cases["normal3000"] = f32(rng.standard_normal(3000))

    # What double quantization feeds the 8-bit quantizer: positive absmax-like values minus their mean.
    w = torch.from_numpy(f32(rng.standard_normal(64 * 1000) * 0.02))
    _, st = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    am = st.absmax
    cases["absmax_minus_mean"] = (am - am.mean()).numpy().astype(np.float32)

    # Block max 1.0 (or -1.0) with values 1e-7..1e-3 relative to it, both signs, log-spaced:
    # shows how the 8-bit quantizer treats the smallest codes (the dynamic map's smallest nonzero is 5.5e-7).
    rel = np.geomspace(1e-7, 1e-3, 255)
    b0 = np.concatenate([[1.0], rel * np.where(np.arange(255) % 2 == 0, 1.0, -1.0)])
    b1 = np.concatenate([[-1.0], -rel[::-1]])
    b2 = np.concatenate([[3.0], 3.0 * rel])
    cases["tiny_rel"] = f32(np.concatenate([b0, b1, b2]))

    # One full block of zeros and a short last block of zeros.
    cases["zeros"] = np.zeros(300, dtype=np.float32)

    # The midpoints of the dynamic map (and their float32 neighbours) at absmax 1.0.
    code = F.create_dynamic_map(signed=True).numpy()
    mids = ((code[:-1] + code[1:]) * np.float32(0.5)).astype(np.float32)
    b0 = np.concatenate([[1.0], mids])
    b1 = np.concatenate([[1.0], np.nextafter(mids, np.float32(np.inf))])
    b2 = np.concatenate([[1.0], np.nextafter(mids, np.float32(-np.inf))])
    cases["ties8"] = f32(np.concatenate([b0, b1, b2]))
    return cases


def run_4bit(tensors, name, x, blocksizes):
    xt = torch.from_numpy(x.copy())
    for qt in QUANT_TYPES:
        for bs in blocksizes:
            key = f"case.{name}.{qt}.bs{bs}"
            q, st = F.quantize_4bit(xt.clone(), blocksize=bs, quant_type=qt, compress_statistics=False)
            assert q.dtype == torch.uint8 and q.numel() == (x.size + 1) // 2
            deq = F.dequantize_4bit(q, st)
            tensors[f"{key}.packed"] = q.reshape(-1).numpy().copy()
            tensors[f"{key}.absmax"] = f32(st.absmax.numpy())
            tensors[f"{key}.dequant"] = f32(deq.reshape(-1).numpy())

            q2, st2 = F.quantize_4bit(xt.clone(), blocksize=bs, quant_type=qt, compress_statistics=True)
            assert torch.equal(q2, q)
            assert st2.nested and st2.state2.blocksize == 256
            deq2 = F.dequantize_4bit(q2, st2)
            rebuilt = F.dequantize_blockwise(st2.absmax, st2.state2) + st2.offset
            tensors[f"{key}.dq.qabsmax"] = st2.absmax.reshape(-1).numpy().copy()
            tensors[f"{key}.dq.nested_absmax"] = f32(st2.state2.absmax.numpy())
            tensors[f"{key}.dq.offset"] = f32(np.array([st2.offset.item()]))
            tensors[f"{key}.dq.absmax"] = f32(rebuilt.numpy())
            tensors[f"{key}.dq.dequant"] = f32(deq2.reshape(-1).numpy())


def run_8bit(tensors, name, x):
    xt = torch.from_numpy(x.copy())
    q, st = F.quantize_blockwise(xt, blocksize=256)
    deq = F.dequantize_blockwise(q, st)
    tensors[f"blockwise8.{name}.input"] = x
    tensors[f"blockwise8.{name}.q"] = q.reshape(-1).numpy().copy()
    tensors[f"blockwise8.{name}.absmax"] = f32(st.absmax.numpy())
    tensors[f"blockwise8.{name}.dequant"] = f32(deq.reshape(-1).numpy())


def main():
    rng = np.random.default_rng(SEED)
    torch.manual_seed(SEED)
    tensors = {
        "code.nf4": f32(F.get_4bit_type("nf4", device="cpu").numpy()),
        "code.fp4": f32(F.get_4bit_type("fp4", device="cpu").numpy()),
        "code.dynamic": f32(F.create_dynamic_map(signed=True).numpy()),
    }
    cases = make_cases(rng)
    for name, x in cases.items():
        tensors[f"case.{name}.input"] = x
        run_4bit(tensors, name, x, CASE_BLOCKSIZES.get(name, BLOCKSIZES))
    for name, x in make_blockwise8_cases(rng).items():
        run_8bit(tensors, name, x)

    for k, v in tensors.items():
        assert v.flags["C_CONTIGUOUS"] and v.dtype.byteorder in ("<", "=", "|"), k
    metadata = {
        "generator": "scripts/reference/make_quant_fixtures.py",
        "seed": str(SEED),
        "torch": torch.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "numpy": np.__version__,
        "safetensors": safetensors.__version__,
        "python": sys.version.split()[0],
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cases": ",".join(cases),
        "quant_types": ",".join(QUANT_TYPES),
        "blocksizes": ",".join(str(b) for b in BLOCKSIZES),
        "case_blocksizes": ";".join(f"{k}={','.join(map(str, v))}" for k, v in CASE_BLOCKSIZES.items()),
        "nested_blocksize": "256",
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    save_file(tensors, OUT, metadata=metadata)
    print(f"wrote {OUT}: {len(tensors)} tensors, {os.path.getsize(OUT)} bytes")
    for k, v in metadata.items():
        print(f"  {k}: {v}")


if __name__ == "__main__":
    main()
