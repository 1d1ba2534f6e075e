#!/usr/bin/env python3
"""The expected ids of a BPE tokenizer with a million merges, from Hugging Face tokenizers.

The tokenizer is made the same way by Tests/QLoRATokenizerTests/MillionMergesTests.swift (so that only the
expected ids are committed, not its 30 MB of JSON): 1,000 base characters (U+4E00 onwards, ids 0-999), and one
merge for every ordered pair of them, 1,000,000 in all; merge k joins the pair p = k * 999983 mod 10^6
(a = p / 1000, b = p mod 1000) into the token 1000 + k. No normalizer, no pre-tokenizer.

Writes Tests/QLoRATokenizerTests/Resources/million_merges_cases.json.
"""
import json
import os
import random

import tokenizers
from tokenizers import Tokenizer
from tokenizers.models import BPE

N = 1000
base = [chr(0x4E00 + i) for i in range(N)]
vocab = {c: i for i, c in enumerate(base)}
merges = []
for k in range(N * N):
    p = (k * 999983) % (N * N)
    a, b = base[p // N], base[p % N]
    merges.append((a, b))
    vocab[a + b] = N + k
tok = Tokenizer(BPE(vocab=vocab, merges=merges))

rng = random.Random(28)
texts = ["".join(rng.choice(base) for _ in range(n)) for n in [1, 2, 3, 5, 8, 13, 40, 200, 1000]]
texts.append(base[0] * 7)
cases = [{"text": t, "ids": tok.encode(t).ids} for t in texts]
out = os.path.join(os.path.dirname(__file__), "..", "..", "Tests", "QLoRATokenizerTests", "Resources", "million_merges_cases.json")
with open(out, "w") as f:
    json.dump({"generator": {"script": "scripts/reference/make_million_merges_fixture.py", "tokenizers": tokenizers.__version__},
               "cases": cases}, f, ensure_ascii=False)
print(out, len(cases), "cases")
