"""Make the GGUF reader fixtures in Tests/QLoRAFormatsTests/Resources/ with the real `gguf` package.

What it makes:

  mixed.gguf                        GGUF v3, little-endian, default alignment 32, written by
                                    gguf.GGUFWriter (arch "llama"). Metadata of every GGUF value type
                                    (test.*), a nested array, an empty string, a UTF-8 string, a few
                                    llama.* keys and tokenizer.* keys. Tensors (numpy shape = rows, cols;
                                    GGUF stores the dims reversed, ne[0] = cols):
                                      t.f32 F32, t.f16 F16, t.bf16 BF16, t.q8_0 Q8_0, t.q4_0 Q4_0,
                                      t.q4_1 Q4_1, t.q4_k Q4_K, t.q5_k Q5_K, t.q6_k Q6_K   all (4, 256)
                                      t.f32_1d F32 (7,)   t.f32_3d F32 (2, 3, 4)
                                      <200-character name> F32 (4, 256)
                                    F16/BF16/Q8_0/Q4_0/Q4_1 come from gguf.quants.quantize of random normal
                                    data; gguf-py has no quantizer for Q4_K/Q5_K/Q6_K, so those are raw
                                    blocks built here (random bytes, random finite fp16 scale fields).
  mixed_gguf_expected.safetensors   for each tensor T of mixed.gguf: T = float32 dequantization
                                    (gguf.quants.dequantize of what gguf.GGUFReader reads back),
                                    flattened in file order. __metadata__:
                                      type.<T>        ggml type name, e.g. "Q4_K"
                                      shape.<T>       dims as GGUF stores them (ne order), e.g. "256,4"
                                      offset.<T>      absolute file offset of T's data
                                      tensor_order    JSON list of tensor names in file order
                                      metadata.json   JSON {key: value} of every KV of mixed.gguf
                                                      (arrays as lists, nested arrays nested; GGUF.* excluded)
                                      metadata_types.json  JSON {key: "UINT8" | "ARRAY[STRING]" | ...}
                                      data_offset, alignment, tensor_count, kv_count, gguf_version
                                      v2.tensors, v2.metadata.json, v2.data_offset  (about mixed-v2.gguf)
                                      versions        gguf / numpy / safetensors / python versions
  mixed-v2.gguf                     GGUF v2 file: written by GGUFWriter (v3) then the version field
                                    (bytes 4..7) patched to 2; v2 and v3 have the same layout for
                                    little-endian files (v1 had 32-bit counts). Two F32 tensors with
                                    known values, general.alignment = 64 (custom alignment path) and
                                    general.name.

Besides writing, the script checks itself: an independent little header parser (the layout described in
GGUF_NOTES.md) must agree with GGUFReader on every key, type, tensor info and data offset, and a scalar
re-implementation of every dequantization formula in GGUF_NOTES.md must match gguf.quants.dequantize
bit for bit.

Fixed seed (numpy default_rng(20250611)). Versions used: gguf 0.19.0, numpy 2.4.6, safetensors 0.8.0,
Python 3.11 (recorded in the expected file's `versions` metadata).

Rerun with:  /work/refvenv/bin/python scripts/reference/make_gguf_fixtures.py
"""

import json
import os
import platform
import struct
import sys
from importlib.metadata import version as pkg_version

import numpy as np
from safetensors.numpy import save_file, load_file

import gguf
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT
from gguf.constants import GGML_QUANT_SIZES

SEED = 20250611
HERE = os.path.dirname(os.path.abspath(__file__))
OUT_DIR = os.path.normpath(os.path.join(HERE, "..", "..", "Tests", "QLoRAFormatsTests", "Resources"))
MIXED = os.path.join(OUT_DIR, "mixed.gguf")
MIXED_V2 = os.path.join(OUT_DIR, "mixed-v2.gguf")
EXPECTED = os.path.join(OUT_DIR, "mixed_gguf_expected.safetensors")

ROWS, COLS = 4, 256
LONG_NAME = ("blk.0.a_deliberately_long_tensor_name_"
             + "".join(f"segment{i:02d}_" for i in range(40)))[:196] + ".end"
assert len(LONG_NAME) == 200


# --------------------------------------------------------------------------------------------------
# raw block builders for the types gguf-py cannot quantize


def rand_f16(rng, n, lo, hi):
    """n random finite fp16 values uniform in [lo, hi], as their little-endian bytes (n, 2)."""
    v = rng.uniform(lo, hi, size=n).astype(np.float16)
    assert np.all(np.isfinite(v))
    return v.astype("<f2").view(np.uint8).reshape(n, 2)


def rand_bytes(rng, n, k):
    return rng.integers(0, 256, size=(n, k), dtype=np.uint8)


def raw_q4_k(rng, n_blocks):
    # block_q4_K: fp16 d, fp16 dmin, u8 scales[12], u8 qs[128]  = 144 bytes
    parts = [rand_f16(rng, n_blocks, -0.05, 0.05), rand_f16(rng, n_blocks, 0.0, 0.02),
             rand_bytes(rng, n_blocks, 12), rand_bytes(rng, n_blocks, 128)]
    return np.concatenate(parts, axis=1)


def raw_q5_k(rng, n_blocks):
    # block_q5_K: fp16 d, fp16 dmin, u8 scales[12], u8 qh[32], u8 qs[128]  = 176 bytes
    parts = [rand_f16(rng, n_blocks, -0.05, 0.05), rand_f16(rng, n_blocks, 0.0, 0.02),
             rand_bytes(rng, n_blocks, 12), rand_bytes(rng, n_blocks, 32), rand_bytes(rng, n_blocks, 128)]
    return np.concatenate(parts, axis=1)


def raw_q6_k(rng, n_blocks):
    # block_q6_K: u8 ql[128], u8 qh[64], i8 scales[16], fp16 d  = 210 bytes
    parts = [rand_bytes(rng, n_blocks, 128), rand_bytes(rng, n_blocks, 64), rand_bytes(rng, n_blocks, 16),
             rand_f16(rng, n_blocks, -0.05, 0.05)]
    return np.concatenate(parts, axis=1)


RAW_BUILDERS = {QT.Q4_K: (raw_q4_k, 144), QT.Q5_K: (raw_q5_k, 176), QT.Q6_K: (raw_q6_k, 210)}


def make_raw(rng, qtype, rows, cols):
    builder, size = RAW_BUILDERS[qtype]
    block, type_size = GGML_QUANT_SIZES[qtype]
    assert (block, type_size) == (256, size), (qtype.name, block, type_size)
    n_blocks = rows * cols // block
    blocks = builder(rng, n_blocks)
    assert blocks.shape == (n_blocks, type_size)
    return blocks.reshape(rows, cols // block * type_size)


def can_quantize(qtype):
    try:
        gguf.quants.quantize(np.zeros((1, 256), np.float32), qtype)
        return True
    except NotImplementedError:
        return False


# --------------------------------------------------------------------------------------------------
# independent header parser (mirrors GGUF_NOTES.md) used to cross-check GGUFReader

SCALAR_FMT = {VT.UINT8: "<B", VT.INT8: "<b", VT.UINT16: "<H", VT.INT16: "<h", VT.UINT32: "<I",
              VT.INT32: "<i", VT.FLOAT32: "<f", VT.BOOL: "<B", VT.UINT64: "<Q", VT.INT64: "<q",
              VT.FLOAT64: "<d"}


class Cursor:
    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def take(self, fmt):
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return v

    def string(self):
        n = self.take("<Q")
        s = self.buf[self.pos:self.pos + n].decode("utf-8")
        self.pos += n
        return s

    def value(self, vtype):
        """returns (python value, type description)"""
        vtype = VT(vtype)
        if vtype == VT.STRING:
            return self.string(), "STRING"
        if vtype == VT.ARRAY:
            item_type = VT(self.take("<I"))
            count = self.take("<Q")
            items, desc = [], None
            for _ in range(count):
                v, d = self.value(item_type)
                items.append(v)
                desc = desc or d
            return items, f"ARRAY[{desc or item_type.name}]"
        v = self.take(SCALAR_FMT[vtype])
        if vtype == VT.BOOL:
            assert v in (0, 1)
            v = bool(v)
        return v, vtype.name


def parse_header(path):
    buf = open(path, "rb").read()
    c = Cursor(buf)
    assert c.take("<I") == 0x46554747 and buf[:4] == b"GGUF"
    ver = c.take("<I")
    n_tensors = c.take("<Q")
    n_kv = c.take("<Q")
    kv, kv_types = {}, {}
    for _ in range(n_kv):
        key = c.string()
        kv[key], kv_types[key] = c.value(c.take("<I"))
    infos = []
    for _ in range(n_tensors):
        name = c.string()
        n_dims = c.take("<I")
        ne = [c.take("<Q") for _ in range(n_dims)]
        ttype = QT(c.take("<I"))
        off = c.take("<Q")
        infos.append((name, ne, ttype, off))
    align = kv.get("general.alignment", 32)
    data_offset = (c.pos + align - 1) // align * align
    for name, ne, ttype, off in infos:
        assert off % align == 0, name
    return dict(version=ver, kv=kv, kv_types=kv_types, infos=infos, alignment=align,
                data_offset=data_offset, size=len(buf))


# --------------------------------------------------------------------------------------------------
# scalar re-implementation of the dequantization formulas in GGUF_NOTES.md

f32 = np.float32


def h2f(b, o):
    return f32(np.frombuffer(bytes(b[o:o + 2]), dtype="<f2")[0])


def k_scale_min(sc12, j):
    if j < 4:
        return sc12[j] & 63, sc12[j + 4] & 63
    return ((sc12[j + 4] & 0x0F) | ((sc12[j - 4] >> 6) << 4),
            (sc12[j + 4] >> 4) | ((sc12[j] >> 6) << 4))


def ref_block(qtype, b):
    b = bytes(b)
    out = np.zeros(GGML_QUANT_SIZES[qtype][0], np.float32)
    if qtype == QT.Q8_0:
        d = h2f(b, 0)
        for i in range(32):
            out[i] = f32(struct.unpack_from("<b", b, 2 + i)[0]) * d
    elif qtype == QT.Q4_0:
        d = h2f(b, 0)
        for i in range(32):
            q = (b[2 + i % 16] >> (4 * (i // 16))) & 0xF
            out[i] = d * f32(q - 8)
    elif qtype == QT.Q4_1:
        d, m = h2f(b, 0), h2f(b, 2)
        for i in range(32):
            q = (b[4 + i % 16] >> (4 * (i // 16))) & 0xF
            out[i] = d * f32(q) + m
    elif qtype in (QT.Q4_K, QT.Q5_K):
        d, dmin = h2f(b, 0), h2f(b, 2)
        sc12 = b[4:16]
        if qtype == QT.Q4_K:
            qh, qs = None, b[16:144]
        else:
            qh, qs = b[16:48], b[48:176]
        for s in range(8):
            sc, mn = k_scale_min(sc12, s)
            dl = d * f32(sc)
            ml = dmin * f32(mn)
            for l in range(32):
                q = (qs[32 * (s // 2) + l] >> (4 * (s % 2))) & 0xF
                if qh is not None:
                    q |= ((qh[l] >> s) & 1) << 4
                out[32 * s + l] = dl * f32(q) - ml
    elif qtype == QT.Q6_K:
        ql, qh = b[0:128], b[128:192]
        scales = np.frombuffer(b[192:208], dtype=np.int8)
        d = h2f(b, 208)
        for e in range(256):
            h, t, l = e // 128, (e % 128) // 32, e % 32
            lo = (ql[64 * h + 32 * (t % 2) + l] >> (4 * (t // 2))) & 0xF
            hi = (qh[32 * h + l] >> (2 * t)) & 0x3
            q = (lo | (hi << 4)) - 32
            out[e] = (d * f32(scales[e // 16])) * f32(q)
    else:
        raise AssertionError(qtype)
    return out


def ref_dequant(qtype, raw):
    """raw: the reader's tensor.data; returns flat float32"""
    if qtype == QT.F32:
        return np.frombuffer(raw.tobytes(), dtype="<f4").astype(np.float32)
    if qtype == QT.F16:
        return np.frombuffer(raw.tobytes(), dtype="<f2").astype(np.float32)
    if qtype == QT.BF16:
        u = np.frombuffer(raw.tobytes(), dtype="<u2").astype(np.uint32) << 16
        return u.view(np.float32)
    block, size = GGML_QUANT_SIZES[qtype]
    flat = raw.reshape(-1)
    return np.concatenate([ref_block(qtype, flat[i:i + size]) for i in range(0, flat.size, size)])


# --------------------------------------------------------------------------------------------------


def write_mixed(rng):
    w = gguf.GGUFWriter(MIXED, arch="llama")  # adds general.architecture = "llama" first

    # every value type
    w.add_uint8("test.u8", 200)
    w.add_int8("test.i8", -100)
    w.add_uint16("test.u16", 60000)
    w.add_int16("test.i16", -30000)
    w.add_uint32("test.u32", 4_000_000_000)
    w.add_int32("test.i32", -2_000_000_000)
    w.add_float32("test.f32", 0.1)  # stored as the nearest float32, 0.10000000149011612
    w.add_bool("test.bool_true", True)
    w.add_bool("test.bool_false", False)
    w.add_string("test.str", "hello gguf")
    w.add_uint64("test.u64", 0xFEDCBA9876543210)  # above Int64.max
    w.add_int64("test.i64", -(2 ** 62) - 7)
    w.add_float64("test.f64", 3.141592653589793)
    w.add_array("test.arr_str", ["alpha", "", "gamma δ"])
    w.add_key_value("test.arr_i32", [1, -2, 3, 2_147_483_647, -2_147_483_648], VT.ARRAY, sub_type=VT.INT32)
    w.add_key_value("test.arr_f32", [0.5, -1.25, 1e-3], VT.ARRAY, sub_type=VT.FLOAT32)
    w.add_key_value("test.arr_u8", [0, 1, 255], VT.ARRAY, sub_type=VT.UINT8)
    w.add_key_value("test.arr_bool", [True, False, True], VT.ARRAY, sub_type=VT.BOOL)
    # nested array: GGUFWriter supports it (inner arrays each carry their own item type and count)
    w.add_array("test.arr_nested", [[1, 2], [3, 4, 5], [6]])
    # add_string() silently drops empty strings, so go through add_key_value
    w.add_key_value("test.str_empty", "", VT.STRING)
    w.add_string("test.str_utf8", "h\u00e9llo \u2713 \U0001F999")

    # real llama keys
    w.add_block_count(2)                  # llama.block_count (u32)
    w.add_embedding_length(64)            # llama.embedding_length (u32)
    w.add_context_length(128)             # llama.context_length (u32)
    w.add_head_count(4)                   # llama.attention.head_count (u32)
    w.add_head_count_kv(2)                # llama.attention.head_count_kv (u32)
    w.add_rope_freq_base(10000.0)         # llama.rope.freq_base (f32)
    w.add_layer_norm_rms_eps(1e-5)        # llama.attention.layer_norm_rms_epsilon (f32)
    w.add_feed_forward_length(128)        # llama.feed_forward_length (u32)
    w.add_tokenizer_model("gpt2")         # tokenizer.ggml.model
    w.add_token_list(["<s>", "</s>", "hello", "\u0120world", "!"])  # tokenizer.ggml.tokens
    w.add_chat_template("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}")

    quantizable = {t.name: can_quantize(t) for t in (QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1,
                                                    QT.Q4_K, QT.Q5_K, QT.Q6_K)}
    plan = [("t.f32", QT.F32), ("t.f16", QT.F16), ("t.bf16", QT.BF16), ("t.q8_0", QT.Q8_0),
            ("t.q4_0", QT.Q4_0), ("t.q4_1", QT.Q4_1), ("t.q4_k", QT.Q4_K), ("t.q5_k", QT.Q5_K),
            ("t.q6_k", QT.Q6_K)]
    how = {}
    for name, qt in plan:
        if qt == QT.F32:
            w.add_tensor(name, rng.standard_normal((ROWS, COLS)).astype(np.float32))
            how[name] = "random normal"
        elif quantizable[qt.name]:
            x = rng.standard_normal((ROWS, COLS)).astype(np.float32)
            q = gguf.quants.quantize(x, qt)
            if q.dtype == np.float16:
                w.add_tensor(name, q)  # plain F16 array
            else:
                assert q.dtype == np.uint8
                w.add_tensor(name, q, raw_dtype=qt)  # byte shape (4, nbytes/row) -> element shape
            how[name] = "gguf.quants.quantize(random normal)"
        else:
            w.add_tensor(name, make_raw(rng, qt, ROWS, COLS), raw_dtype=qt)
            how[name] = "raw random blocks"
    w.add_tensor("t.f32_1d", rng.standard_normal(7).astype(np.float32))
    w.add_tensor("t.f32_3d", np.arange(24, dtype=np.float32).reshape(2, 3, 4) - 11.5)
    w.add_tensor(LONG_NAME, rng.standard_normal((ROWS, COLS)).astype(np.float32))
    how["t.f32_1d"] = how[LONG_NAME] = "random normal"
    how["t.f32_3d"] = "arange(24) - 11.5"

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return quantizable, how


V2_TENSORS = [("v2.a", np.arange(6, dtype=np.float32).reshape(2, 3) * 0.5),
              ("v2.b", np.array([-2, -1, 0, 1, 2], dtype=np.float32))]


def write_v2():
    w = gguf.GGUFWriter(MIXED_V2, arch="llama")
    w.add_custom_alignment(64)  # general.alignment (u32) = 64
    w.add_name("mixed-v2")
    for name, t in V2_TENSORS:
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with open(MIXED_V2, "r+b") as f:
        f.seek(4)
        assert struct.unpack("<I", f.read(4))[0] == 3
        f.seek(4)
        f.write(struct.pack("<I", 2))


def reader_value(field):
    """GGUFReader's view of a KV; nested arrays come back flattened, so compare flattened."""
    return field.contents()


def flatten(v):
    if isinstance(v, list):
        return [y for x in v for y in flatten(x)]
    return [v]


def check_against_reader(path, hdr):
    r = gguf.GGUFReader(path)
    assert int(r.fields["GGUF.version"].contents()) == hdr["version"]
    keys = [k for k in r.fields if not k.startswith("GGUF.")]
    assert keys == list(hdr["kv"].keys()), (keys, list(hdr["kv"]))
    for k in keys:
        mine = hdr["kv"][k]
        theirs = reader_value(r.fields[k])
        if isinstance(mine, list):
            assert flatten(mine) == theirs, (k, mine, theirs)
        else:
            assert mine == theirs and type(mine) is type(theirs), (k, mine, theirs)
        tdesc = hdr["kv_types"][k]
        assert tdesc.split("[")[0] == r.fields[k].types[0].name, (k, tdesc)
    assert int(r.data_offset) == hdr["data_offset"], (r.data_offset, hdr["data_offset"])
    assert int(r.alignment) == hdr["alignment"]
    assert len(r.tensors) == len(hdr["infos"])
    for t, (name, ne, ttype, off) in zip(r.tensors, hdr["infos"]):
        assert t.name == name and list(map(int, t.shape)) == ne and t.tensor_type == ttype
        assert int(t.data_offset) == hdr["data_offset"] + off
        assert int(t.data_offset) + int(t.n_bytes) <= hdr["size"]
    return r


def main():
    os.makedirs(OUT_DIR, exist_ok=True)
    rng = np.random.default_rng(SEED)
    quantizable, how = write_mixed(rng)
    write_v2()

    hdr = parse_header(MIXED)
    assert hdr["version"] == 3 and hdr["alignment"] == 32 and "general.alignment" not in hdr["kv"]
    r = check_against_reader(MIXED, hdr)

    tensors, meta, order = {}, {}, []
    print(f"quantize support: {quantizable}")
    for t in r.tensors:
        deq = gguf.quants.dequantize(t.data, t.tensor_type)
        deq = np.ascontiguousarray(deq, dtype=np.float32)
        np_shape = tuple(reversed([int(x) for x in t.shape]))
        assert deq.shape == np_shape, (t.name, deq.shape, np_shape)
        assert np.all(np.isfinite(deq)), t.name
        flat = deq.reshape(-1)
        ref = ref_dequant(t.tensor_type, t.data)
        assert ref.dtype == np.float32 and ref.shape == flat.shape
        assert np.array_equal(ref.view(np.uint32), flat.view(np.uint32)), f"scalar reference differs: {t.name}"
        tensors[t.name] = flat.copy()
        ne = ",".join(str(int(x)) for x in t.shape)
        meta[f"type.{t.name}"] = t.tensor_type.name
        meta[f"shape.{t.name}"] = ne
        meta[f"offset.{t.name}"] = str(int(t.data_offset))
        order.append(t.name)
        shown = t.name if len(t.name) < 40 else t.name[:24] + f"...({len(t.name)} chars)"
        print(f"  {shown:44s} {t.tensor_type.name:5s} ne=[{ne}] np={np_shape} bytes={int(t.n_bytes)} "
              f"offset={int(t.data_offset)} absmax={float(np.abs(flat).max()):.4g}  ({how[t.name]})")

    meta["tensor_order"] = json.dumps(order)
    meta["metadata.json"] = json.dumps(hdr["kv"], ensure_ascii=False)
    meta["metadata_types.json"] = json.dumps(hdr["kv_types"])
    meta["data_offset"] = str(hdr["data_offset"])
    meta["alignment"] = str(hdr["alignment"])
    meta["tensor_count"] = str(len(hdr["infos"]))
    meta["kv_count"] = str(len(hdr["kv"]))
    meta["gguf_version"] = str(hdr["version"])

    hdr2 = parse_header(MIXED_V2)
    assert hdr2["version"] == 2 and hdr2["alignment"] == 64
    r2 = check_against_reader(MIXED_V2, hdr2)
    v2 = []
    for (name, values), t in zip(V2_TENSORS, r2.tensors):
        assert t.name == name and t.tensor_type == QT.F32
        got = gguf.quants.dequantize(t.data, t.tensor_type)
        assert np.array_equal(got, values)
        v2.append({"name": name, "type": "F32", "shape": [int(x) for x in t.shape],
                   "offset": int(t.data_offset), "values": values.reshape(-1).tolist()})
    meta["v2.tensors"] = json.dumps(v2)
    meta["v2.metadata.json"] = json.dumps(hdr2["kv"])
    meta["v2.data_offset"] = str(hdr2["data_offset"])
    meta["versions"] = json.dumps({"gguf": pkg_version("gguf"), "numpy": np.__version__,
                                   "safetensors": pkg_version("safetensors"),
                                   "python": platform.python_version(), "seed": SEED})

    save_file(tensors, EXPECTED, metadata=meta)
    back = load_file(EXPECTED)
    assert set(back) == set(tensors) and all(np.array_equal(back[k], tensors[k]) for k in tensors)

    for p in (MIXED, MIXED_V2, EXPECTED):
        size = os.path.getsize(p)
        assert size < 200 * 1024, (p, size)
        print(f"wrote {os.path.relpath(p, os.path.join(HERE, '..', '..'))}: {size} bytes")
    print(f"mixed.gguf: {len(hdr['kv'])} KVs, {len(hdr['infos'])} tensors, data_offset={hdr['data_offset']}")
    print(f"mixed-v2.gguf: {len(hdr2['kv'])} KVs, data_offset={hdr2['data_offset']}, tensors={v2}")


if __name__ == "__main__":
    sys.exit(main())
