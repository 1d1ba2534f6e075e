"""Make Tests/QLoRATokenizerTests/Resources/tokenizer_cases.json (and smollm2-tokenizer.json) with the real
Hugging Face stack (tokenizers 0.23.3, transformers 5.24.0, gguf).

    /work/refvenv/bin/python scripts/reference/make_tokenizer_fixtures.py

Inputs:
  /work/shared/data/tokenizers/<name>/tokenizer.json      gpt2 llama2 llama3 mistral qwen3 phi3 (see shared/data/SOURCES.md)
  /work/shared/data/tokenizers/testvectors/...            a few corpus texts and a self-check against old baselines
  $SMOLLM2_GGUF (default ~/.cache/swift-qlora/models/SmolLM2-135M-Instruct.Q4_1.gguf)
                                                          smollm2: transformers builds a fast tokenizer from the GGUF
                                                          tokenizer.ggml.* keys; it is saved as smollm2-tokenizer.json
                                                          (SmolLM2 is Apache-2.0, general.license in the GGUF says so too)

Output JSON layout:
  {
    "generator": {...versions...},
    "corpus": [text, ...],                 about 60 texts
    "corpus_labels": [label, ...],         same order, a short name per text
    "tokenizers": {
      NAME: {
        "source": where the tokenizer came from,
        "kind": "byte-level" | "sentencepiece",
        "pipeline": normalizer / pre_tokenizer / post_processor / decoder / model flags from the tokenizer.json,
        "special": {"bos": [token, id] | null, "eos": ..., "unk": ..., "pad": ...}   (from tokenizer_config.json)
        "cases": [ one per corpus text, same order:
           {"text", "ids", "tokens", "ids_with_special", "decoded", "decoded_skip_special",
            "transformers": {...}   only where transformers' AutoTokenizer disagrees, see below} ],
        "decode_checks": [ {"text", "ids", "tokens", "splits_utf8_char", "per_token", "prefixes", "stream",
                            "decoded", "wrapped_ids", "wrapped_decoded", "wrapped_decoded_skip_special"} ],
        "transformers_class": AutoTokenizer class name,
        "transformers_divergent_cases": how many cases carry a "transformers" entry,
        "transformers_pipeline": the backend pipeline transformers built, where it differs from the file
      }
    }
  }

Field meanings (all from `tokenizers.Tokenizer.from_file(tokenizer.json)`, the Rust tokenizer that a tokenizer.json
describes, which is what the Swift code implements):
  ids                   encode(text, add_special_tokens=False).ids
  tokens                encode(text, add_special_tokens=False).tokens (the vocab strings, e.g. "Ġworld", "▁Hello",
                        "<0xF0>")
  ids_with_special      encode(text, add_special_tokens=True).ids (post_processor: BOS for llama2/llama3/mistral)
  decoded               decode(ids, skip_special_tokens=False)
  decoded_skip_special  decode(ids_with_special, skip_special_tokens=True)
  transformers          present only where transformers.AutoTokenizer.from_pretrained(folder) gives something else
                        for any of: ids (encode add_special_tokens=False), ids_with_special (add_special_tokens=True),
                        decoded, or its decode of the file's ids / ids_with_special (decoded_of_file_ids,
                        decoded_skip_special_of_file_ids). transformers 5.x LlamaTokenizer REBUILDS the pipeline of Llama-family tokenizers
                        (drops the legacy Prepend/Replace normalizer, uses Metaspace prepend_scheme "first"), so for
                        llama2 and phi3 it disagrees with both the tokenizer.json and sentencepiece (the
                        multilingual-conformance baselines made with transformers 4.57.1 agree with the file).

lossy_checks   hand-made id sequences with invalid UTF-8 in the middle, and their decode.
notes          short verified remarks on each tokenizer's oddities.

decode_checks (texts whose characters are multi-byte UTF-8; splits_utf8_char says whether some token holds only part
of a character):
  per_token    [decode([id]) for each id]  (a lone partial character decodes to U+FFFD)
  prefixes     [decode(ids[:k]) for k = 1..n]
  stream       tokenizers.decoders.DecodeStream(skip_special_tokens=False).step(tokenizer, id) for each id in turn:
               the chunk it emits, or null while it is holding an incomplete character. Concatenating the non-null
               chunks gives `decoded`.
  wrapped_*    the same ids with the BOS (or, without one, the EOS / first special token) before and the EOS after,
               decoded with and without skip_special_tokens.
"""

import json
import os
import sys
import tempfile
from pathlib import Path

import tokenizers
import transformers
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream
from transformers import AutoTokenizer

transformers.logging.set_verbosity_error()

REPO = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("SHARED_DATA", "/work/shared/data"))
TOK_DIR = DATA / "tokenizers"
TV = TOK_DIR / "testvectors"
GGUF = Path(os.environ.get(
    "SMOLLM2_GGUF", str(Path.home() / ".cache/swift-qlora/models/SmolLM2-135M-Instruct.Q4_1.gguf")))
OUT_DIR = REPO / "Tests" / "QLoRATokenizerTests" / "Resources"
OUT = OUT_DIR / "tokenizer_cases.json"
SMOL_OUT = OUT_DIR / "smollm2-tokenizer.json"

FILE_TOKENIZERS = ["gpt2", "llama2", "llama3", "mistral", "qwen3", "phi3"]
KIND = {"gpt2": "byte-level", "llama3": "byte-level", "qwen3": "byte-level", "smollm2": "byte-level",
        "llama2": "sentencepiece", "mistral": "sentencepiece", "phi3": "sentencepiece"}


def build_corpus():
    """(label, text) pairs. Hand-written texts plus a few from the shared test vectors."""
    c = [
        # English prose
        ("prose", "The quick brown fox jumps over the lazy dog."),
        ("prose-paragraph", "QLoRA backpropagates gradients through a frozen, 4-bit quantized pretrained "
                            "language model into Low Rank Adapters (LoRA). It's memory-efficient!"),
        ("prose-punct", "Wait... what?! \"Quoted\" text, (parentheses), [brackets] & {braces}; semi-colons: yes."),
        # languages
        ("chinese", "我爱自然语言处理。今天天气很好!"),
        ("japanese", "東京は日本の首都です。ひらがなとカタカナ、そして漢字。"),
        ("korean", "안녕하세요, 만나서 반갑습니다."),
        ("arabic", "اللغة العربية جميلة جدا."),
        ("hindi", "हिन्दी भारत की राजभाषा है।"),
        ("russian", "Съешь же ещё этих мягких французских булок, да выпей чаю."),
        ("german-umlauts", "Größenwahn über Äpfel, Öl und Übermut: Straße, Fußgängerübergänge."),
        ("french-accents", "Où est la bibliothèque ? À côté du château, près de l'église — déjà vu."),
        ("vietnamese", "Tiếng Việt có nhiều dấu: ả, ẫ, ự, ỡ, ẹ."),
        # code
        ("code-python", "def add(a, b):\n    \"\"\"Add two numbers.\"\"\"\n    return a + b\n\n\nif __name__ == \"__main__\":\n"
                        "    print(add(1, 2))\n"),
        ("code-swift", "struct Point {\n    var x: Double\n    var y: Double\n\n    func length() -> Double {\n"
                       "        return (x * x + y * y).squareRoot()\n    }\n}\n"),
        ("code-json", "{\n  \"name\": \"swift-qlora\",\n  \"rank\": 64,\n  \"alpha\": 16.0,\n  \"targets\": "
                      "[\"q_proj\", \"v_proj\"],\n  \"nested\": {\"ok\": true, \"none\": null}\n}"),
        ("code-tabs", "func f() {\n\tif x {\n\t\treturn 1\n\t}\n\treturn 0\n}"),
        # emoji
        ("emoji-simple", "I love pizza 🍕 and tacos 🌮!"),
        ("emoji-zwj-family", "👨‍👩‍👧‍👦"),
        ("emoji-zwj-mixed", "Team: 👩🏽‍💻 and 🧑‍🚀 went to 🏳️‍🌈 parade"),
        ("emoji-flags", "Flags: 🇺🇸🇯🇵🇩🇪🇫🇷"),
        ("emoji-keycap-skin", "1️⃣ 👍🏿 ❤️"),
        # whitespace
        ("ws-multiple-spaces", "a  b   c    d"),
        ("ws-leading-trailing", "   leading and trailing   "),
        ("ws-newlines", "line1\nline2\n\nline4\n\n\n"),
        ("ws-crlf", "windows\r\nline\r\nendings\r\n"),
        ("ws-tabs", "col1\tcol2\t\tcol3\t"),
        ("ws-mixed", " \t \n \r\n  x  \n\t"),
        ("ws-only-newlines", "\n\n\n"),
        # numbers
        ("numbers-long", "1234567890 12345678901234567890"),
        ("numbers-float", "pi = 3.14159, e = 2.71828, -0.5e-10, 1,000,000"),
        ("numbers-mixed", "Version 2.0.1 was released on 2024-07-26 at 13:45:00 (UTC+02:00)."),
        # contractions
        ("contractions", "don't can't won't I'm you're he's she'd we've they'll it's"),
        ("contractions-upper", "I'LL DON'T WE'VE YOU'RE He'S"),
        ("apostrophes-curly", "It’s the user’s choice; don’t."),
        # special tokens written inside text
        ("sp-chatml", "<|im_start|>user\nhi<|im_end|>"),
        ("sp-llama2-inst", "<s>[INST] hi [/INST]"),
        ("sp-llama3-bot", "<|begin_of_text|>"),
        ("sp-endoftext", "<|endoftext|>"),
        ("sp-llama3-header", "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"),
        ("sp-phi3-turns", "<|user|>\nhi<|end|>\n<|assistant|>\nhello</s>"),
        ("sp-spaced", "a <s> b </s> c <|endoftext|> d"),
        ("sp-think", "<think>\nreasoning\n</think>\n\nanswer"),
        ("sp-glued", "x<s>y</s>z<|endoftext|>w"),
        ("sp-chatml-full", "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                           "<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"),
        # look-alikes
        ("sp-lookalike-open", "<|im_start"),
        ("sp-lookalike-spaces", "< s > </ s > <| im_start |>"),
        ("sp-lookalike-case", "<|IM_START|> <S> <|Endoftext|>"),
        # edge cases
        ("empty", ""),
        ("single-space", " "),
        ("single-char", "a"),
        ("long-word", "Pneumonoultramicroscopicsilicovolcanoconiosis supercalifragilisticexpialidocious"),
        ("long-repeat", "a" * 120 + " " + "=" * 64),
        ("long-digits", "3" * 80),
        ("combining-lone", "\u0301\u0308 x\u0301 \u0323"),
        ("nfd-vs-nfc", "cafe\u0301 caf\u00e9 A\u030a \u212b"),
        ("zero-width", "zero\u200bwidth\u200djoiner\ufeffbom\u00a0nbsp"),
        ("control-chars", "bell\u0007 nul\u0000 del\u007f private\ue000"),
        ("metaspace-char", "\u2581already\u2581has\u2581metaspace \u0120G-dot"),
    ]
    # From the shared test vectors (swift-transformers MultilingualConformance inputs, Apache-2.0).
    inputs = {e["id"]: e["text"] for e in json.loads((TV / "multilingual-conformance/inputs.json").read_text())}
    for key in ["math-astral-bold-script", "emoji-zwj-with-text-prefix", "thai-combining-marks-prose",
                "currency-symbols-multi", "german-compound-long-1"]:
        c.append(("tv-" + key, inputs[key]))
    c.append(("tv-llama_encoded", json.loads((TV / "swift-transformers/llama_encoded.json").read_text())["text"]))
    return c


DECODE_TEXTS = ["😀", "Hi 😀 there", "👨‍👩‍👧‍👦", "🇯🇵", "日本語", "é", "€ 100", "𝐀𝐁", "नमस्ते", "Größe"]


GPT2_BYTELEVEL_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

# Checked by hand against the cases this script writes; kept short.
NOTES = {
    "gpt2": [
        "pre_tokenizer ByteLevel(use_regex=true) splits with the GPT-2 regex built into tokenizers (not written in "
        "the JSON): " + GPT2_BYTELEVEL_REGEX,
        "the contraction alternatives are case-sensitive: \"I'LL\" gives I, ', LL",
        "no BOS/EOS added (post_processor ByteLevel only touches offsets); <|endoftext|> (50256) is matched in raw text",
    ],
    "llama2": [
        "no pre_tokenizer; normalizer Prepend('\u2581') then Replace(' ' -> '\u2581') (legacy sentencepiece "
        "emulation): the whole text gets ONE leading \u2581, every space becomes \u2581, and a literal \u2581 in "
        "the input cannot be told from a space (decode turns it into a space)",
        "BPE byte_fallback=true: characters outside the vocab become <0xXX> byte tokens",
        "<unk>/<s>/</s> are added tokens with normalized=true, so they are matched in the NORMALIZED text by their "
        "normalized form '\u2581<s>' (the Prepend normalizer applied to the token content): '<s>' becomes id 1 only "
        "at the start of the text or after a space (the \u2581 is swallowed into the token), 'x<s>y' stays text",
        "tokenizers 0.23.3: id_to_token(1) is '\u2581<s>', so decode prints ' <s>' and skip_special_tokens=True does "
        "NOT remove <s>/</s> (transformers 4.57.1 baselines in shared/data did remove them; transformers 5.24 does "
        "too, see decoded_skip_special_of_file_ids)",
        "decoder: Replace('\u2581' -> ' '), ByteFallback, Fuse, Strip(one leading space)",
        "transformers 5.24 AutoTokenizer rebuilds this tokenizer (no normalizer, Metaspace prepend_scheme 'first', "
        "added tokens still normalized=true), see transformers_pipeline and the per-case transformers entries",
    ],
    "mistral": [
        "pre_tokenizer Metaspace(replacement '\u2581', prepend_scheme 'first', split false): spaces become "
        "\u2581 and one \u2581 is prepended to the first section only when it does not already start with one, so "
        "'   leading' keeps 3 \u2581 and decodes with 2 leading spaces; ' ' decodes to ''",
        "BPE byte_fallback=true; added tokens normalized=false, so '<s>' is matched anywhere in the raw text",
        "the vocab has some control characters as plain tokens (\\x07, \\x7f) where Llama 2 uses byte tokens",
    ],
    "phi3": [
        "same legacy normalizer and vocab as llama2, but added tokens are normalized=false (matched anywhere) and "
        "</s>, <|assistant|>, <|end|>, <|user|>, <|system|> and the placeholders have rstrip=true: they swallow "
        "the whitespace after them, newlines included ('<|user|>\\n' is one token)",
        "the Prepend normalizer runs on every section between added tokens, so each section after an added token "
        "starts with \u2581: 'x<s>y' gives \u2581x <s> \u2581y and decodes to 'x<s> y'; '<|user|>\\nhi' decodes to "
        "'<|user|> hi'",
        "</s> has special=false here: skip_special_tokens keeps it",
        "no BOS added (post_processor has no special tokens; add_bos_token false)",
    ],
    "llama3": [
        "pre_tokenizer Sequence[Split(regex, Isolated), ByteLevel(use_regex=false)]; digits in runs of 1-3",
        "post_processor adds <|begin_of_text|> (128000); 257 added tokens, all special, normalized=false",
    ],
    "qwen3": [
        "normalizer NFC: NFD input (e + U+0301, U+212B ANGSTROM SIGN) is composed, decode returns the NFC text",
        "pre_tokenizer Sequence[Split(regex, Isolated), ByteLevel(use_regex=false)]; single digits (\\p{N} without "
        "{1,3})",
        "no BOS; merges stored as list-of-pairs",
    ],
    "smollm2": [
        "built by transformers from the GGUF: ByteLevel(use_regex=true, GPT-2 regex), no normalizer, no BOS/EOS "
        "added; tokenizer.ggml.pre is 'smollm' (llama.cpp splits digits one by one for it), but no merge in the "
        "GGUF involves a digit and no vocab entry has two digits, so that split cannot change any ids",
        "17 added tokens (ids 0-16), all special",
    ],
}


def pipeline_of(tok_json):
    d = json.loads(tok_json)
    m = d["model"]
    return {
        "normalizer": d.get("normalizer"),
        "pre_tokenizer": d.get("pre_tokenizer"),
        "post_processor": d.get("post_processor"),
        "decoder": d.get("decoder"),
        "model": {k: v for k, v in m.items() if k not in ("vocab", "merges")},
        "vocab_size": len(m["vocab"]),
        "merges": len(m["merges"]),
        "merges_format": "list-of-pairs" if m["merges"] and isinstance(m["merges"][0], list) else "space-separated",
        "added_tokens": len(d["added_tokens"]),
    }


def special_map(hf, raw):
    out = {}
    for name in ["bos", "eos", "unk", "pad"]:
        t = getattr(hf, name + "_token", None)
        out[name] = None if t is None else [str(t), raw.token_to_id(str(t))]
    return out


def encode_case(raw, hf, text):
    e = raw.encode(text, add_special_tokens=False)
    ids = e.ids
    ws = raw.encode(text, add_special_tokens=True).ids
    case = {
        "text": text,
        "ids": ids,
        "tokens": e.tokens,
        "ids_with_special": ws,
        "decoded": raw.decode(ids, skip_special_tokens=False),
        "decoded_skip_special": raw.decode(ws, skip_special_tokens=True),
    }
    h_ids = hf.encode(text, add_special_tokens=False)
    h_ws = hf.encode(text, add_special_tokens=True)
    h_dec = hf.decode(h_ids, skip_special_tokens=False)
    # transformers' own decode of the file's ids (checks the decoder side separately from the encoder side)
    h_dec_file_ids = hf.decode(ids, skip_special_tokens=False)
    h_skip_file_ids = hf.decode(ws, skip_special_tokens=True)
    if (h_ids != ids or h_ws != ws or h_dec != case["decoded"] or h_dec_file_ids != case["decoded"]
            or h_skip_file_ids != case["decoded_skip_special"]):
        case["transformers"] = {
            "ids": h_ids,
            "tokens": hf.convert_ids_to_tokens(h_ids),
            "ids_with_special": h_ws,
            "decoded": h_dec,
            "decoded_of_file_ids": h_dec_file_ids,
            "decoded_skip_special_of_file_ids": h_skip_file_ids,
        }
    return case


def decode_check(raw, text, pre, post):
    e = raw.encode(text, add_special_tokens=False)
    ids = e.ids
    per_token = [raw.decode([i], skip_special_tokens=False) for i in ids]
    ds = DecodeStream(skip_special_tokens=False)
    stream = [ds.step(raw, i) for i in ids]
    full = raw.decode(ids, skip_special_tokens=False)
    wrapped = pre + ids + post
    return {
        "text": text,
        "ids": ids,
        "tokens": e.tokens,
        "splits_utf8_char": any("\ufffd" in p for p in per_token),
        "per_token": per_token,
        "prefixes": [raw.decode(ids[:k], skip_special_tokens=False) for k in range(1, len(ids) + 1)],
        "stream": stream,
        "stream_joined_equals_decoded": "".join(s for s in stream if s is not None) == full,
        "decoded": full,
        "wrapped_ids": wrapped,
        "wrapped_decoded": raw.decode(wrapped, skip_special_tokens=False),
        "wrapped_decoded_skip_special": raw.decode(wrapped, skip_special_tokens=True),
    }


def lossy_checks(raw, checks):
    """Ids that are not valid UTF-8 in the middle of a sequence: a lone partial-character token, plain text, the same
    partial token twice in a row, then a whole text. Byte-level decoders replace each maximal invalid byte
    subsequence with one U+FFFD; ByteFallback gives one U+FFFD per byte token."""
    out = []
    a_ids = raw.encode("a", add_special_tokens=False).ids
    for c in checks:
        k = next((i for i, p in enumerate(c["per_token"]) if "\ufffd" in p), None)
        if k is None:
            continue
        seq = [c["ids"][k]] + a_ids + [c["ids"][k], c["ids"][k]] + c["ids"]
        out.append({"ids": seq, "tokens": [raw.id_to_token(i) for i in seq],
                    "decoded": raw.decode(seq, skip_special_tokens=False)})
        if len(out) == 2:
            break
    return out


def make_entry(name, raw, hf, source, corpus, tok_json):
    cases = [encode_case(raw, hf, text) for _, text in corpus]
    sp = special_map(hf, raw)
    bos = sp["bos"][1] if sp["bos"] and sp["bos"][1] is not None else None
    eos = sp["eos"][1] if sp["eos"] and sp["eos"][1] is not None else None
    pre = [bos] if bos is not None else ([eos] if eos is not None else [])
    post = [eos] if eos is not None else []
    checks = [decode_check(raw, t, pre, post) for t in DECODE_TEXTS]
    lossy = lossy_checks(raw, checks)
    entry = {
        "source": source,
        "kind": KIND[name],
        "pipeline": pipeline_of(tok_json),
        "special": sp,
        "cases": cases,
        "decode_checks": checks,
        "lossy_checks": lossy,
        "notes": NOTES[name],
        "transformers_class": type(hf).__name__,
        "transformers_divergent_cases": sum(1 for c in cases if "transformers" in c),
    }
    hp = pipeline_of(hf.backend_tokenizer.to_str())
    fp = entry["pipeline"]
    diff = {k: hp[k] for k in ("normalizer", "pre_tokenizer", "post_processor", "decoder", "model")
            if hp[k] != fp[k]}
    if diff:
        entry["transformers_pipeline"] = diff
    return entry


def self_check(raw_by_name, hf_by_name):
    """The file tokenizers must reproduce the transformers-4.57.1 baselines in the shared test vectors.
    transformers 5.x AutoTokenizer is only counted (it rebuilds Llama-family pipelines, see the module doc)."""
    mc = TV / "multilingual-conformance"
    inputs = {e["id"]: e["text"] for e in json.loads((mc / "inputs.json").read_text())}
    for name, fname in [("llama2", "tinyllama_multilingual.json"), ("gpt2", "gpt2_multilingual.json"),
                        ("qwen3", "qwen2_5_multilingual.json")]:
        rows = json.loads((mc / fname).read_text())["entries"]
        bad = hf_bad = 0
        for r in rows:
            text = inputs[r["id"]]
            if raw_by_name[name].encode(text, add_special_tokens=True).ids != r["input_ids"]:
                bad += 1
            if hf_by_name[name].encode(text, add_special_tokens=True) != r["input_ids"]:
                hf_bad += 1
        print(f"self-check {name} vs {fname}: tokenizer.json {bad}/{len(rows)} mismatches, "
              f"transformers {transformers.__version__} AutoTokenizer {hf_bad}/{len(rows)}", file=sys.stderr)
        assert bad == 0


def main():
    corpus = build_corpus()
    out = {
        "generator": {
            "script": "scripts/reference/make_tokenizer_fixtures.py",
            "tokenizers": tokenizers.__version__,
            "transformers": transformers.__version__,
            "python": sys.version.split()[0],
        },
        "corpus": [t for _, t in corpus],
        "corpus_labels": [l for l, _ in corpus],
        "tokenizers": {},
    }
    raws, hfs = {}, {}
    for name in FILE_TOKENIZERS:
        folder = TOK_DIR / name
        path = folder / "tokenizer.json"
        raw = Tokenizer.from_file(str(path))
        raws[name] = raw
        hf = AutoTokenizer.from_pretrained(str(folder))
        hfs[name] = hf
        src = f"shared/data/tokenizers/{name}/tokenizer.json (+ tokenizer_config.json for special tokens)"
        out["tokenizers"][name] = make_entry(name, raw, hf, src, corpus, path.read_text(encoding="utf-8"))
        print(name, "divergent (transformers vs file):", out["tokenizers"][name]["transformers_divergent_cases"],
              file=sys.stderr)

    # smollm2: the tokenizer transformers builds from the GGUF metadata, saved as a tokenizer.json
    with tempfile.TemporaryDirectory() as td:
        os.symlink(GGUF, Path(td) / GGUF.name)
        hf = AutoTokenizer.from_pretrained(td, gguf_file=GGUF.name)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    hf.backend_tokenizer.save(str(SMOL_OUT), pretty=False)  # compact: 1.6 MB instead of 3.5 MB
    raw = Tokenizer.from_file(str(SMOL_OUT))
    raws["smollm2"] = raw
    src = (f"{GGUF.name} (tokenizer.ggml.* metadata, tokenizer.ggml.pre = 'smollm'), converted by transformers "
           f"AutoTokenizer.from_pretrained(folder, gguf_file=...) and saved as smollm2-tokenizer.json")
    out["tokenizers"]["smollm2"] = make_entry("smollm2", raw, hf, src, corpus, SMOL_OUT.read_text(encoding="utf-8"))
    print("smollm2 divergent:", out["tokenizers"]["smollm2"]["transformers_divergent_cases"], file=sys.stderr)

    self_check(raws, hfs)

    text = json.dumps(out, ensure_ascii=False, separators=(",", ":"))
    OUT.write_text(text + "\n", encoding="utf-8")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes), {SMOL_OUT} ({SMOL_OUT.stat().st_size} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
