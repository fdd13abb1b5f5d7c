"""CaseOps: the case transform (data/caseops.py), CaseOps datasets and byte sidecars (data/make_shards.py), and
scoring from a sidecar in train_gpt.py. The real-data tests use ../shared/data's 200 FineWeb documents: 20 for
validation, a 512-piece tokenizer of each kind trained here on the other 180."""
from __future__ import annotations

import json
import math
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import caseops
import make_shards as ms
import train_gpt as tg
from conftest import DOCS, REPO, TINY_ENV, field, lines_starting, log_lines, needs_shared, run_in_process, scorer_of

T, A, C, E = caseops.TITLE, caseops.ALLCAPS, caseops.CAPNEXT, caseops.ESC
VOCAB = 512
SMALL = "320"  # the vocabulary of the tokenizers of the small synthetic corpora: 4 + 4 + 256 pieces + 56
VAL_DOCS = 20


def real_docs() -> list[str]:
    return [json.loads(line)["text"] for line in DOCS.read_text(encoding="utf-8").splitlines()]


def read_shard(path: Path) -> np.ndarray:
    """An independent reader: header (magic, version, count, zeros), then the uint16 body of exactly that length."""
    raw = path.read_bytes()
    header = np.frombuffer(raw[:1024], dtype="<i4")
    assert header[0] == 20240520 and header[1] == 1 and not header[3:].any() and len(raw) == 1024 + 2 * header[2]
    return np.frombuffer(raw[1024:], dtype="<u2").astype(np.int64)


def stream(folder: Path, kind: str) -> np.ndarray:
    return np.concatenate([read_shard(p) for p in sorted(folder.glob(f"fineweb_{kind}_[0-9]*.bin"))])


def load_sp(path: Path):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(path))


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def filler(n: int, seed: int = 0) -> list[str]:
    """n documents of varied text in every case pattern: enough for a tokenizer of SMALL pieces."""
    rng = random.Random(seed)
    words = "the of and golf ball par green tee club swing putt eagle birdie Open OpenAI GOLF iPhone McDonald's " \
            "x-ray 1234 café Zürich NASA".split()
    return [" ".join(rng.choice(words) for _ in range(40)) + "." for _ in range(n)]


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------------------
# The transform


@pytest.mark.parametrize("text,expected", [
    ("golf", "golf"),                                  # lower case: unchanged
    ("Golf", f"{T}golf"),                              # title case
    ("A", f"{T}a"),                                    # a single capital is title case
    ("GOLF", f"{A}golf"), ("OK", f"{A}ok"),            # all caps, length >= 2
    ("OpenAI", f"{T}open{C}a{C}i"),                    # mixed: TITLE, then CAPNEXT per later capital
    ("iPhone", f"i{C}phone"), ("aBC", f"a{C}b{C}c"), ("ABc", f"{T}a{C}bc"),
    ("McDonald's GOLF-Club", f"{T}mc{C}donald's {A}golf-{T}club"),
    ("x2Y_zZ", f"x2{T}y_z{C}z"),                       # runs are ASCII letters only: digits, _ and - end them
    ("École ÉCOLE éCole", f"École É{A}cole é{T}cole"),  # non-ASCII characters are untouched, and end runs
    ("ǅemal ΣΑΣ", "ǅemal ΣΑΣ"),                       # non-ASCII capitals stay as they are
    (f"a{T}b{E}", f"a{E}{T}b{E}{E}"),                  # operator characters in the text are escaped
    (f"{E}{E}", f"{E}{E}{E}{E}"),
    ("", ""), ("  \n\t", "  \n\t"),
])
def test_encode_edge_cases(text, expected):
    assert caseops.encode(text) == expected
    assert caseops.decode(expected) == text


ALPHABET = list("aAzZbBqQ") + [T, A, C, E] + list(" \n\t0_-'.é É ß ẞ ǅ Σ 東😀\u0301")


@pytest.mark.parametrize("seed", range(4))
def test_random_round_trip(seed):
    """decode(encode(s)) == s, and encode's output is canonical (encode(decode(x)) == x) and free of capitals."""
    rng = random.Random(seed)
    for _ in range(500):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 30)))
        coded = caseops.encode(text)
        assert caseops.decode(coded) == text
        assert caseops.encode(caseops.decode(coded)) == coded
        assert not re.search("[A-Z]", coded)


@pytest.mark.parametrize("bad,position,op", [(T, 0, "TITLE"), (f"x{C}", 1, "CAPNEXT"), (f"{T}Golf", 0, "TITLE"),
                                             (f"ab{A}2", 2, "ALLCAPS"), (f"{E}a", 0, "ESC"), (f"{T}é", 0, "TITLE")])
def test_decode_refuses_stray_operators(bad, position, op):
    with pytest.raises(ValueError, match=f"character {position}: {op} "):
        caseops.decode(bad)


@needs_shared
def test_every_real_document_round_trips():
    docs = real_docs()
    coded = [caseops.encode(d) for d in docs]
    assert all(caseops.decode(c) == d for c, d in zip(coded, docs))
    assert not any(re.search("[A-Z]", c) for c in coded)
    assert sum(c.count(T) + c.count(A) + c.count(C) for c in coded) > 30_000  # the documents do have capitals


def test_cli(tmp_path):
    tool = [sys.executable, str(REPO / "data" / "caseops.py")]
    enc = subprocess.run(tool + ["encode"], input="Hello WORLD, iPhone\n".encode(), capture_output=True, check=True)
    assert enc.stdout.decode() == f"{T}hello {A}world, i{C}phone\n"
    dec = subprocess.run(tool + ["decode"], input=enc.stdout, capture_output=True, check=True)
    assert dec.stdout == b"Hello WORLD, iPhone\n"
    bad = subprocess.run(tool + ["decode"], input=f"ok {T}".encode(), capture_output=True)
    assert bad.returncode == 2 and bad.stdout == b""
    assert "character 3: TITLE" in one_error_line(bad.stderr.decode())
