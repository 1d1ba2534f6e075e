"""Probe how bitsandbytes (0.50.2, CPU, float32) quantizes, for scripts/reference/NOTES.md.

Prints, section by section:
  a. NaN / +-Inf through quantize_4bit (nf4, fp4) and quantize_blockwise (8-bit).
  b. Hypotheses for the 8-bit CPU quantizer (exact nearest code vs the 65536-entry LUT of csrc/cpu_ops.cpp,
     with and without a fused multiply-add in the index computation), and for the 4-bit quantizer
     (the python default backend: bucketize against float32 midpoints), tested bit for bit in numpy.
  c. offset = absmax.mean() against other ways of computing a mean.
  d. Which FP4 zero code (0b0000 or 0b1000) 0, -0 and small values get.
  e. Whether dequantize_4bit equals code[idx] * absmax[block] in float32, per case and kernel path.

Needs bnb_quant.safetensors (make_quant_fixtures.py) for c and e. Seeded; one thread.
Run:  /work/refvenv/bin/python scripts/reference/investigate_bnb.py
"""

import os

import numpy as np
import torch

torch.set_num_threads(1)

import bitsandbytes  # noqa: E402
import bitsandbytes.functional as F  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIXTURE = os.path.join(ROOT, "Tests", "QLoRAKernelsTests", "Resources", "bnb_quant.safetensors")
SEED = 7
f32 = np.float32

NF4 = F.get_4bit_type("nf4", device="cpu").numpy()
FP4 = F.get_4bit_type("fp4", device="cpu").numpy()
DYN = F.create_dynamic_map(signed=True).numpy()


def bits(a):
    return np.asarray(a, dtype=np.float32).view(np.uint32)


def section(title):
    print()
    print("=" * 8, title)


# ---------------------------------------------------------------------------------------------- a
def part_a():
    section("a. NaN / Inf")
    nan, inf = float("nan"), float("inf")
    base = [0.5, -0.25, 0.125, 1.0]
    blocks = {
        "nan": [nan] + base[1:],
        "+inf": [inf] + base[1:],
        "-inf": [-inf] + base[1:],
        "nan+inf": [nan, inf, 0.0, -1.0],
        "finite": base,
    }
    for qt in ("nf4", "fp4"):
        for name, vals in blocks.items():
            for layout in ("full", "partial"):
                # full: a block of exactly 32 (x*(1/absmax) path); partial: 32 finite values + the
                # 4 probe values as a short last block (x/absmax path).
                if layout == "full":
                    x = np.array(vals + [0.0625] * 28, dtype=f32)
                else:
                    x = np.array([0.0625] * 32 + vals, dtype=f32)
                q, st = F.quantize_4bit(torch.from_numpy(x), blocksize=32, quant_type=qt)
                d = F.dequantize_4bit(q, st).numpy().reshape(-1)
                codes = np.stack([q.numpy().reshape(-1) >> 4, q.numpy().reshape(-1) & 15], 1).reshape(-1)
                s = slice(0, 4) if layout == "full" else slice(32, 36)
                print(
                    f"4bit {qt} {layout:7s} in={vals} absmax={st.absmax.numpy().tolist()} "
                    f"codes={codes[s].tolist()}{f' (the 0.0625s in the block: {codes[4]})' if layout == 'full' else ''} "
                    f"dequant={d[s].tolist()}"
                )
    for name, vals in blocks.items():
        x = np.array(vals + [0.0625] * 4, dtype=f32)
        q, st = F.quantize_blockwise(torch.from_numpy(x), blocksize=256)
        d = F.dequantize_blockwise(q, st).numpy()
        print(
            f"8bit in={vals + [0.0625]} absmax={st.absmax.numpy().tolist()} q={q.numpy()[:5].tolist()} "
            f"dequant={d[:5].tolist()}"
        )
    # double quant with a NaN / Inf weight
    for bad in (nan, inf):
        x = np.full(256, 0.01, dtype=f32)
        x[70] = bad
        q, st = F.quantize_4bit(torch.from_numpy(x), blocksize=64, quant_type="nf4", compress_statistics=True)
        d = F.dequantize_4bit(q, st).numpy().reshape(-1)
        print(
            f"nf4 dq bs64 one {bad} in block 1: offset={st.offset.item()} qabsmax={st.absmax.numpy().tolist()} "
            f"nested_absmax={st.state2.absmax.numpy().tolist()} dequant[0],[64],[128]={d[[0, 64, 128]].tolist()}"
        )


# ---------------------------------------------------------------------------------------------- b
def hyp_4bit(x, bs, qt):
    """bitsandbytes' python default quantize_4bit, restated in numpy float32."""
    code = NF4 if qt == "nf4" else FP4
    order = np.argsort(code, kind="stable")
    mids = ((code[order[:-1]] + code[order[1:]]) / f32(2)).astype(f32)
    n = x.size
    rem = n % bs
    full = n - rem
    xb = x[:full].reshape(-1, bs)
    absmax = np.abs(xb).max(axis=1) if full else np.zeros(0, f32)
    scale = (f32(1) / np.maximum(absmax, f32(1e-38))).astype(f32)
    scaled = np.clip(xb * scale[:, None], f32(-1), f32(1)).reshape(-1)
    if rem:
        am = np.maximum(np.abs(x[full:]).max(), f32(1e-38)).astype(f32)
        absmax = np.concatenate([absmax, [am]]).astype(f32)
        scaled = np.concatenate([scaled, np.clip(x[full:] / am, f32(-1), f32(1))]).astype(f32)
    idx = np.searchsorted(mids, scaled, side="left")  # == torch.bucketize(right=False)
    idx = order[idx] if qt != "nf4" else idx
    if idx.size % 2:
        idx = np.concatenate([idx, [0 if qt == "nf4" else order[7]]])
    packed = ((idx[0::2] << 4) | idx[1::2]).astype(np.uint8)
    return packed, absmax.astype(f32)


def block_scale(x, bs):
    n = x.size
    nb = -(-n // bs)
    pad = np.zeros(nb * bs, f32)
    pad[:n] = np.abs(x)
    absmax = pad.reshape(nb, bs).max(axis=1).astype(f32)
    inv = (f32(1) / absmax).astype(f32)
    v = (x * np.repeat(inv, bs)[:n]).astype(f32)
    return absmax, v


def h8_exact(v, code):
    """csrc lookup_code_index: lower_bound, then the nearer neighbour, ties to the lower one."""
    v = np.clip(v, f32(-1), f32(1))
    r = np.searchsorted(code, v, side="left")
    rr = np.clip(r, 1, 255)
    dl = np.abs(v - code[rr - 1]).astype(f32)
    dr = np.abs(code[rr] - v).astype(f32)
    idx = np.where(dr < dl, rr, rr - 1)
    idx = np.where(r == 0, 0, np.where(r == 256, 255, idx))
    return idx.astype(np.uint8)


def h8_mid(v, code):
    """bucketize against float32 midpoints 0.5*(c[i]+c[i+1]), value on a midpoint -> lower code."""
    mids = (f32(0.5) * (code[:-1] + code[1:])).astype(f32)
    return np.searchsorted(mids, np.clip(v, f32(-1), f32(1)), side="left").astype(np.uint8)


def build_lut(code):
    mids = (f32(0.5) * (code[:-1] + code[1:])).astype(f32)
    i = np.arange(65536)
    val = (f32(-1) + ((f32(2) * i.astype(f32)).astype(f32) / f32(65535)).astype(f32)).astype(f32)
    return np.searchsorted(mids, val, side="left").astype(np.uint8)  # count of midpoints < val


def h8_lut(v, code, fma):
    lut = build_lut(code)
    v = np.clip(v, f32(-1), f32(1))
    t = ((v + f32(1)).astype(f32) * f32(0.5)).astype(f32)
    if fma:
        w = (t.astype(np.float64) * 65535.0 + 0.5).astype(f32)  # exact in f64, one rounding to f32
    else:
        w = ((t * f32(65535)).astype(f32) + f32(0.5)).astype(f32)
    return lut[w.astype(np.int64)]


def part_b():
    section("b. 8-bit quantize_blockwise on CPU vs hypotheses")
    rng = np.random.default_rng(SEED)
    code = DYN
    inputs = []
    for _ in range(400):
        n = int(rng.integers(1, 3000))
        kind = rng.integers(0, 6)
        if kind == 0:
            x = rng.standard_normal(n)
        elif kind == 1:
            x = rng.uniform(-1, 1, n)
        elif kind == 2:
            x = rng.uniform(0, 1, n) ** 4 * rng.choice([-1, 1], n)
        elif kind == 3:
            x = np.exp(rng.uniform(-20, 0, n)) * rng.choice([-1, 1], n)
        elif kind == 4:
            a = np.abs(rng.standard_normal(n)) * 0.02 + 0.01
            x = a - a.astype(f32).mean()
        else:
            x = rng.standard_t(3, n) * 1e-3
        inputs.append(x.astype(f32))
    # a dense sweep of [-1, 1] at absmax 1.0, and the exact midpoints of the map
    sweep = np.linspace(-1, 1, 2_000_001).astype(f32)
    sweep[::256] = 1.0
    inputs.append(sweep)
    mids = (f32(0.5) * (code[:-1] + code[1:])).astype(f32)
    for m in (mids, np.nextafter(mids, f32(np.inf)), np.nextafter(mids, f32(-np.inf))):
        inputs.append(np.concatenate([[f32(1)], m]).astype(f32))

    total = 0
    mism = {"exact_nearest": 0, "midpoint_bucketize": 0, "lut_no_fma": 0, "lut_fma": 0, "absmax": 0}
    for x in inputs:
        q, st = F.quantize_blockwise(torch.from_numpy(x.copy()), blocksize=256)
        q = q.numpy()
        absmax, v = block_scale(x, 256)
        mism["absmax"] += int((bits(absmax) != bits(st.absmax.numpy())).sum())
        total += x.size
        mism["exact_nearest"] += int((h8_exact(v, code) != q).sum())
        mism["midpoint_bucketize"] += int((h8_mid(v, code) != q).sum())
        mism["lut_no_fma"] += int((h8_lut(v, code, False) != q).sum())
        mism["lut_fma"] += int((h8_lut(v, code, True) != q).sum())
    print(f"{len(inputs)} inputs, {total} values, blocksize 256, default dynamic code")
    for k, val in mism.items():
        print(f"  mismatches {k}: {val}")
    # Targeted: values where the LUT index differs with and without a fused multiply-add.
    cand = rng.uniform(-1, 1, 4_000_000).astype(f32)
    a_nofma, a_fma = h8_lut(cand, code, False), h8_lut(cand, code, True)
    diff = cand[a_nofma != a_fma]
    print(f"  targeted fma test: {diff.size} of 4e6 random v in [-1,1] get a different code with/without FMA")
    if diff.size:
        x = np.concatenate([[f32(1)], diff[:255]]).astype(f32)
        q = F.quantize_blockwise(torch.from_numpy(x.copy()), blocksize=256)[0].numpy()
        print(f"    on {x.size - 1} of them bnb agrees with no-FMA: {int((q == h8_lut(x, code, False)).sum()) - 1}, "
              f"with FMA: {int((q == h8_lut(x, code, True)).sum()) - 1}")
    # how small values fare
    x = np.concatenate([[f32(1)], np.geomspace(1e-8, 1e-3, 20).astype(f32)]).astype(f32)
    q, st = F.quantize_blockwise(torch.from_numpy(x.copy()), blocksize=256)
    print("  small values at absmax 1:", [f"{a:.2e}->{code[i]:.2e}" for a, i in zip(x[1:], q.numpy()[1:])])
    print("  exact nearest would give:", [f"{code[i]:.2e}" for i in h8_exact(x, code)[1:]])
    # zero block and a lone zero among nonzero values
    q, st = F.quantize_blockwise(torch.zeros(300), blocksize=256)
    print(f"  zeros: q={np.unique(q.numpy()).tolist()} absmax={st.absmax.tolist()} code[0]={code[0]} "
          f"dequant unique bits={sorted(set(bits(F.dequantize_blockwise(q, st).numpy()).tolist()))}")
    x = np.array([1.0, 0.0, -0.0], f32)
    q, _ = F.quantize_blockwise(torch.from_numpy(x), blocksize=256)
    print(f"  [1, 0, -0] -> q={q.tolist()} (code[127]={code[127]}, code[128]={code[128]})")

    section("b. 4-bit quantize_4bit on CPU vs numpy restatement of the default backend")
    fn = torch.ops.bitsandbytes.quantize_4bit.default
    print("  dispatch: quantize_4bit has a 'cpu' kernel?",
          torch._C._dispatch_has_kernel_for_dispatch_key("bitsandbytes::quantize_4bit", "CPU"), fn)
    total = mism_p = mism_a = 0
    for k, x in enumerate(inputs[:400]):
        for qt in ("nf4", "fp4"):
            bs = (32, 64, 128, 256, 512, 1024, 2048, 4096)[k % 8]
            q, st = F.quantize_4bit(torch.from_numpy(x.copy()), blocksize=bs, quant_type=qt)
            p, a = hyp_4bit(x, bs, qt)
            qb = q.numpy().reshape(-1)
            if x.size % 2:  # the padding nibble: compare only the real high nibble of the last byte
                mism_p += int((qb[:-1] != p[:-1]).sum()) + int((qb[-1] >> 4) != (p[-1] >> 4))
            else:
                mism_p += int((qb != p).sum())
            mism_a += int((bits(a) != bits(st.absmax.numpy())).sum())
            total += x.size
    print(f"  {total} values over nf4/fp4 and blocksizes 32..4096: packed byte mismatches {mism_p}, "
          f"absmax mismatches {mism_a}")
    # variant hypotheses to show what would NOT match
    alt = 0
    for x in inputs[:400]:
        n = x.size
        q, st = F.quantize_4bit(torch.from_numpy(x.copy()), blocksize=64, quant_type="nf4")
        idx = np.stack([q.numpy().reshape(-1) >> 4, q.numpy().reshape(-1) & 15], 1).reshape(-1)[:n]
        am = np.repeat(st.absmax.numpy(), 64)[:n]
        alt_idx = np.searchsorted(((NF4[:-1] + NF4[1:]) / f32(2)).astype(f32), np.clip(x / am, -1, 1), side="left")
        alt += int((alt_idx != idx).sum())
    print(f"  variant 'x / absmax for every block' (nf4, bs64): {alt} element mismatches")
    # Targeted: values where x * (1/a) and x / a fall on different sides of an NF4 midpoint.
    mids = ((NF4[:-1] + NF4[1:]) / f32(2)).astype(f32)
    found = []
    while len(found) < 60:
        a = f32(rng.uniform(0.3, 7.0))
        m = mids[rng.integers(0, 15)]
        x0 = f32(m * a)
        for k in range(-3, 4):
            xv = x0
            for _ in range(abs(k)):
                xv = np.nextafter(xv, f32(np.inf) if k > 0 else f32(-np.inf))
            s_mul = f32(xv * (f32(1) / a))
            s_div = f32(xv / a)
            if np.searchsorted(mids, s_mul) != np.searchsorted(mids, s_div) and abs(xv) < a:
                found.append((a, xv))
    agree = {"full:mul": 0, "full:div": 0, "partial:mul": 0, "partial:div": 0}
    for a, xv in found:
        for layout in ("full", "partial"):
            blk = np.array([a, xv] + [0.0] * 62, f32)
            x = blk if layout == "full" else np.concatenate([np.ones(64, f32), blk[:2]])
            q = F.quantize_4bit(torch.from_numpy(x), blocksize=64, quant_type="nf4")[0].numpy().reshape(-1)
            got = q[0] & 15 if layout == "full" else q[32] & 15
            agree[f"{layout}:mul"] += int(got == np.searchsorted(mids, f32(xv * (f32(1) / a))))
            agree[f"{layout}:div"] += int(got == np.searchsorted(mids, f32(xv / a)))
    print(f"  targeted x*(1/a) vs x/a test, {len(found)} values that tell them apart, codes agreeing: {agree}")
    # the padding nibble of an odd count
    for qt in ("nf4", "fp4"):
        q, _ = F.quantize_4bit(torch.tensor([0.5, 1.0, -1.0]), blocksize=64, quant_type=qt)
        print(f"  {qt} odd count [0.5, 1, -1] -> bytes {q.reshape(-1).tolist()} (pad nibble {q.reshape(-1)[-1].item() & 15})")


# ---------------------------------------------------------------------------------------------- c
def ulp_diff(a, b):
    ia = bits(a).astype(np.int64)
    ib = bits(b).astype(np.int64)
    ia = np.where(ia >= 2**31, 2**31 - ia, ia)
    ib = np.where(ib >= 2**31, 2**31 - ib, ib)
    return np.abs(ia - ib)


def ceil_log2(x):
    return 1 if x <= 2 else int(x - 1).bit_length()


def cascade_rows(X):
    """torch's multi_row_sum: X has shape (size, nrows, W); float32 accumulators in 4 levels."""
    size = X.shape[0]
    power = max(4, ceil_log2(size) // 4)
    step = 1 << power
    acc = np.zeros((4,) + X.shape[1:], f32)
    i = 0
    while i + step <= size:
        for _ in range(step):
            acc[0] = (acc[0] + X[i]).astype(f32)
            i += 1
        for j in range(1, 4):
            acc[j] = (acc[j] + acc[j - 1]).astype(f32)
            acc[j - 1] = 0
            if i & ((step - 1) << (j * power)):
                break
    while i < size:
        acc[0] = (acc[0] + X[i]).astype(f32)
        i += 1
    for j in range(1, 4):
        acc[0] = (acc[0] + acc[j]).astype(f32)
    return acc[0]


def row_sum(V):
    """torch's row_sum: V has shape (size, W); four interleaved rows, then the leftovers into row 0."""
    size = V.shape[0]
    ilp = size // 4
    part = cascade_rows(V[: ilp * 4].reshape(ilp, 4, V.shape[1]))
    for i in range(ilp * 4, size):
        part[0] = (part[0] + V[i]).astype(f32)
    for k in range(1, 4):
        part[0] = (part[0] + part[k]).astype(f32)
    return part[0]


def torch_cpu_sum(a, width):
    """A restatement of torch's CPU float32 sum of a contiguous 1-D tensor (vector width `width`)."""
    n = a.size
    if n < width:
        return f32(row_sum(a.reshape(n, 1))[0])
    nv = n // width
    vec = row_sum(a[: nv * width].reshape(nv, width))
    acc = f32(0)
    for v in a[nv * width:]:
        acc = f32(acc + v)
    for v in vec:
        acc = f32(acc + v)
    return acc


def part_c(fix):
    section("c. offset = absmax.mean()")
    samples = []
    for k in fix:
        if k.endswith(".dq.offset"):
            base = k[: -len(".dq.offset")]
            samples.append((k, fix[base + ".absmax"], fix[k][0]))
    rng = np.random.default_rng(SEED + 1)
    for _ in range(1500):
        n = int(rng.integers(1, 20000)) if rng.random() < 0.9 else int(rng.integers(20000, 300000))
        a = (np.abs(rng.standard_normal(n)) * rng.uniform(0.001, 10) + rng.uniform(0, 1)).astype(f32)
        samples.append(("random", a, torch.from_numpy(a).mean().item()))
    res = {"f64 mean -> f32": [], "f32(f64 sum) / n in f32": [], "sequential f32 sum / n": [],
           "torch cascade sum, width 16 (AVX512), / n": [], "torch cascade sum, width 8 (AVX2), / n": []}
    finite = np.array([np.isfinite(off) for _, _, off in samples])
    for _, a, off in samples:
        off = f32(off)
        res["f64 mean -> f32"].append(ulp_diff(f32(a.astype(np.float64).mean()), off))
        with np.errstate(over="ignore"):
            res["f32(f64 sum) / n in f32"].append(
                ulp_diff((f32(a.astype(np.float64).sum()) / f32(a.size)).astype(f32), off))
        s = f32(0)
        if a.size <= 5000:
            with np.errstate(over="ignore"):
                for v in a:
                    s = f32(s + v)
            res["sequential f32 sum / n"].append(ulp_diff((s / f32(a.size)).astype(f32), off))
        for w in (16, 8):
            t = torch_cpu_sum(a, w)
            res[f"torch cascade sum, width {w} ({'AVX512' if w == 16 else 'AVX2'}), / n"].append(
                ulp_diff((t / f32(a.size)).astype(f32), off))
    nfix = sum(1 for s in samples if s[0] != "random")
    print(f"{nfix} fixture offsets + {len(samples) - nfix} random absmax vectors (n 1..300000), "
          f"torch threads {torch.get_num_threads()}, capability {torch.backends.cpu.get_cpu_capability()}")
    for k, v in res.items():
        v = np.array(v, dtype=np.int64).reshape(-1)
        fin = finite[: v.size]
        print(f"  {k}: exact {int((v == 0).sum())}/{v.size}, max ulp {int(v.max())}, finite offsets max ulp "
              f"{int(v[fin].max())} "
              f"(fixture offsets: exact {int((v[:nfix] == 0).sum())}/{nfix}, max ulp {int(v[:nfix].max())})")
    for k, a, off in samples[:nfix]:
        if not np.isfinite(off):
            print(f"  {k}: offset {off!r} (f32 sum overflows; f64 mean {a.astype(np.float64).mean()!r})")


# ---------------------------------------------------------------------------------------------- d
def part_d():
    section("d. FP4 zero codes")
    vals = [1.0, 0.0, -0.0, 1e-4, -1e-4, 0.0026, -0.0026, 0.002604166, -0.002604166, 0.0027, -0.0027]
    for layout in ("full", "partial"):
        x = np.array(vals + [0.0] * (64 - len(vals)), f32) if layout == "full" else np.array([0.5] * 64 + vals, f32)
        q, st = F.quantize_4bit(torch.from_numpy(x), blocksize=64, quant_type="fp4")
        qb = q.numpy().reshape(-1)
        codes = np.stack([qb >> 4, qb & 15], 1).reshape(-1)
        off = 0 if layout == "full" else 64
        print(f"  {layout}: " + ", ".join(f"{v!r}->0b{c:04b}" for v, c in zip(vals, codes[off:off + len(vals)])))
    code = F.get_4bit_type("fp4", device="cpu")
    print("  torch.argsort(fp4 code) =", torch.argsort(code).tolist())
    print("  fp4 code bits of index 0 and 8:", hex(bits(code.numpy()[0])), hex(bits(code.numpy()[8])))
    q, st = F.quantize_4bit(torch.zeros(64), blocksize=64, quant_type="fp4")
    print("  all-zero block fp4 byte:", q.reshape(-1)[0].item(), "absmax", st.absmax.tolist())


# ---------------------------------------------------------------------------------------------- e
def path_of(n, bs):
    from bitsandbytes.backends.cpu.ops import _has_avx512

    if (_has_avx512 and bs >= 2048) or n % 2:
        return "python default (_dequantize_4bit_compute)"
    if _has_avx512 and n % 16 == 0 and bs >= 16:
        return "C AVX512 (_mm512_permutexvar_ps LUT)"
    return "C scalar loop (fp4_lut/nf4_lut constants)"


def part_e(fix):
    section("e. dequantize_4bit == code[idx] * absmax[block] in f32")
    code = {"nf4": NF4, "fp4": FP4}
    per_path = {}
    bad_keys = []
    for k in sorted(fix):
        if not k.endswith(".packed"):
            continue
        base = k[: -len(".packed")]
        name = base.split(".")[1]
        qt, bs = base.split(".")[2], int(base.split(".")[3][2:])
        x = fix[f"case.{name}.input"]
        n = x.size
        p = fix[k]
        idx = np.stack([p >> 4, p & 15], 1).reshape(-1)[:n]
        for variant in ("", ".dq"):
            am = fix[base + (".absmax" if not variant else ".dq.absmax")]
            if variant:
                # rebuild the absmax from the nested state in float32: code2[q] * absmax2 then + offset
                qa = fix[base + ".dq.qabsmax"]
                a2 = fix[base + ".dq.nested_absmax"]
                off = fix[base + ".dq.offset"][0]
                rebuilt = ((DYN[qa] * np.repeat(a2, 256)[: qa.size]).astype(f32) + off).astype(f32)
                same = np.array_equal(bits(rebuilt), bits(am))
                per_path.setdefault("nested absmax rebuild (code2[q]*absmax2 + offset)", [0, 0])
                per_path["nested absmax rebuild (code2[q]*absmax2 + offset)"][0] += 1
                per_path["nested absmax rebuild (code2[q]*absmax2 + offset)"][1] += 0 if same else 1
            want = (code[qt][idx] * np.repeat(am, bs)[:n]).astype(f32)
            got = fix[base + variant + ".dequant"]
            ok = np.array_equal(bits(want), bits(got))
            path = path_of(n, bs)
            if not ok and np.array_equal(want, got) and qt == "fp4":
                # same value; only the sign of zero differs: the C scalar loop's fp4_lut[8] is -0.0f
                assert set(idx[bits(want) != bits(got)].tolist()) == {8}
                path += " [fp4 code 8 gives -0.0]"
            per_path.setdefault(path, [0, 0])
            per_path[path][0] += 1
            per_path[path][1] += 0 if ok else 1
            if not ok:
                bad_keys.append((base + variant, int((bits(want) != bits(got)).sum())))
    for pth, (cnt, bad) in per_path.items():
        print(f"  {pth}: {cnt} tensors, {bad} not bit-identical")
    for k, c in bad_keys[:20]:
        print("  mismatch:", k, c)
    # 2-D shape whose rows are not a whole number of blocks (AVX512 path indexes absmax per row)
    for shape, bs in (((3, 96), 64), ((4, 48), 32), ((2, 128), 64)):
        x = torch.from_numpy(np.random.default_rng(3).standard_normal(shape).astype(f32))
        q, st = F.quantize_4bit(x, blocksize=bs, quant_type="nf4")
        d = F.dequantize_4bit(q, st).numpy().reshape(-1)
        qb = q.numpy().reshape(-1)
        idx = np.stack([qb >> 4, qb & 15], 1).reshape(-1)
        want = (NF4[idx] * np.repeat(st.absmax.numpy(), bs)[: idx.size]).astype(f32)
        print(f"  2-D {shape} bs{bs}: dequant mismatches vs flat-block formula: {int((bits(want) != bits(d)).sum())}")


def main():
    print("bitsandbytes", bitsandbytes.__version__, "torch", torch.__version__, "numpy", np.__version__,
          "cpu", torch.backends.cpu.get_cpu_capability())
    fix = load_file(FIXTURE)
    part_a()
    part_b()
    part_c(fix)
    part_d()
    part_e(fix)


if __name__ == "__main__":
    main()
