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


# ----------------------------------------------------------------------------------------------------------
# Datasets: make_shards --caseops / --byte-sidecar / --train-tokenizer


def build(corpus: Path, out: Path, *extra: str) -> int:
    return ms.main([str(corpus), "--out", str(out), "--no-progress", "--threads", "1", *extra])


@pytest.fixture(scope="session")
def datasets(tmp_path_factory) -> dict[str, Path]:
    """The 200 documents as a CaseOps dataset and as a plain one with sidecars, each with its own 512-piece
    tokenizer trained on the 180 training documents; validation in shards of 20,000 tokens (several files)."""
    if not DOCS.is_file():
        pytest.skip("the real documents are not in ../shared/data (set PG_SHARED_DATA)")
    root = tmp_path_factory.mktemp("caseops_datasets")
    common = ["--train-tokenizer", str(VOCAB), "--val-docs", str(VAL_DOCS), "--shard-tokens", "20000"]
    assert build(DOCS, root / "caseops", "--caseops", *common) == 0
    assert build(DOCS, root / "plain", "--byte-sidecar", *common) == 0
    return {"caseops": root / "caseops", "plain": root / "plain"}


def split_docs(tokens: np.ndarray, values: np.ndarray | None = None) -> list[np.ndarray]:
    """A BOS-separated stream (or values aligned with it) cut into documents, each starting with its BOS."""
    starts = np.flatnonzero(tokens == 1)
    assert starts[0] == 0
    return np.split(tokens if values is None else values, starts[1:])


def test_caseops_dataset_layout_and_tokenizer(datasets):
    out = datasets["caseops"]
    names = sorted(p.name for p in out.iterdir())
    vals = [n for n in names if re.fullmatch(r"fineweb_val_\d{6}\.bin", n)]
    assert len(vals) >= 3 and names == sorted(vals + [n.replace("val_", "val_bytes_") for n in vals] + [
        n for n in names if n.startswith("fineweb_train_")] + ["tokenizer.model", "tokenizer.vocab"])
    for name in vals:  # one sidecar per shard, the same length
        assert read_shard(out / name).size == read_shard(out / name.replace("val_", "val_bytes_")).size
    sp = load_sp(out / "tokenizer.model")
    assert sp.vocab_size() == VOCAB and [sp.id_to_piece(i) for i in range(4, 8)] == [T, A, C, E]
    assert [sp.is_control(i) for i in range(4)] == [True, True, True, False] and sp.is_unknown(3)
    assert sp.is_byte(8) and sp.is_byte(263)
    plain = load_sp(datasets["plain"] / "tokenizer.model")
    assert plain.vocab_size() == VOCAB and ms.caseops_pieces(plain) == []


@needs_shared
def test_caseops_tokens_spell_what_plain_tokens_spell(datasets):
    """Through its tokens, every one of the 200 documents decodes (SentencePiece, then the inverse transform) to
    exactly the text a plain tokenizer's tokens spell: the document as SentencePiece normalises it (nmt_nfkc: 196
    of the 200 change, mostly newlines to spaces). The exact original is what the transform's round trip gives."""
    sp, plain = load_sp(datasets["caseops"] / "tokenizer.model"), load_sp(datasets["plain"] / "tokenizer.model")
    docs = real_docs()
    ids = sp.encode([caseops.encode(d) for d in docs])
    assert [caseops.decode(sp.decode(i)) for i in ids] == plain.decode(plain.encode(docs))
    on_disk = split_docs(stream(datasets["caseops"], "val")) + split_docs(stream(datasets["caseops"], "train"))
    assert [d[1:].tolist() for d in on_disk] == ids  # the shards hold exactly these encodings, one BOS each


def reference_counts(sp, text: str, is_caseops: bool) -> list[int]:
    """§3.4's rule, char by char, on the surfaces SentencePiece's own offset API gives (not the tool's proto
    reader): an operator 0, ESC 0 and the character after it in full, any other character its UTF-8 length."""
    form = caseops.encode(text) if is_caseops else text
    out, escaped = [], False
    for begin, end in sp.encode(form, return_type="offset_mapping")["offsets"]:
        count = 0
        for ch in form[begin:end]:
            if escaped or not is_caseops or ch not in caseops.OPERATORS:
                count, escaped = count + len(ch.encode()), False
            else:
                escaped = ch == E
        out.append(count)
    return out


@needs_shared
@pytest.mark.parametrize("kind", ["caseops", "plain"])
def test_sidecar_counts_the_original_bytes_exactly(datasets, kind):
    """Document by document and in total, the sidecar sums to the UTF-8 bytes of the original documents; token by
    token it matches an independent implementation of the rule; BOS and the operators count 0."""
    out, docs = datasets[kind], real_docs()[:VAL_DOCS]
    tokens, counts = stream(out, "val"), stream(out, "val_bytes")
    assert counts.sum() == sum(len(d.encode()) for d in docs) == 176_391
    per_doc = split_docs(tokens, counts)
    assert [int(c.sum()) for c in per_doc] == [len(d.encode()) for d in docs]
    assert not counts[tokens == 1].any()
    if kind == "caseops":  # no literal operator in these documents: every operator token counts 0
        assert np.isin(tokens, [4, 5, 6]).sum() > 2000 and not counts[np.isin(tokens, [4, 5, 6, 7])].any()
    sp = load_sp(out / "tokenizer.model")
    try:
        sp.encode("a", return_type="offset_mapping")
    except (TypeError, ValueError):
        pytest.skip("this sentencepiece has no offset_mapping API for the independent reference")
    for doc, c in zip(docs, per_doc):
        assert c[1:].tolist() == reference_counts(sp, doc, kind == "caseops")


@needs_shared
def test_table_and_sidecar_denominators_of_a_plain_dataset(datasets):
    """How the two byte counts of a plain dataset relate: the tokenizer's table counts the bytes of the text as
    SentencePiece normalised it (what the baseline scores, SPEC B2.4), the sidecar those of the original text.
    Normalisation changes the length both ways (a double space collapses, '™' -> 'TM' loses a byte, '″' -> '′′'
    gains three): document by document each sums to its own text's bytes; over these 20 validation documents the
    table counts 3 bytes more, from 2 documents. (Token by token they differ more often: '…' spelled '...' is three
    pieces, which the table counts 1+1+1 and the sidecar 0+0+3, the character on the piece that ends it.)"""
    out, docs = datasets["plain"], real_docs()[:VAL_DOCS]
    sp = load_sp(out / "tokenizer.model")
    tokens, counts = stream(out, "val"), stream(out, "val_bytes")
    table = tg.token_bytes(torch.from_numpy(tokens), tg.build_byte_luts(sp, VOCAB)).numpy()
    normalised = [len(sp.decode(sp.encode(d)).encode()) for d in docs]
    original = [len(d.encode()) for d in docs]
    assert [int(t.sum()) for t in split_docs(tokens, table)] == normalised
    assert [int(c.sum()) for c in split_docs(tokens, counts)] == original
    assert sum(normalised) - sum(original) == 3 and sum(n != o for n, o in zip(normalised, original)) == 2


def test_edge_whitespace_and_literal_operators(tmp_path, capsys):
    """Whitespace SentencePiece drops at a document's ends counts with its first and last real token (never an
    operator or BOS), so every document sums to its own bytes; literal operator characters cost their 3 bytes."""
    docs = ["  Hello there World  \n", f"keep {T}this{E} LITERAL", "x", "\t\u200bIndeed", "lower case only " * 30]
    corpus = write_jsonl(tmp_path / "c.jsonl", docs + filler(50))
    assert build(corpus, tmp_path / "out", "--caseops", "--train-tokenizer", "300", "--val-docs", "5") == 0
    tokens, counts = stream(tmp_path / "out", "val"), stream(tmp_path / "out", "val_bytes")
    per_doc = split_docs(tokens, counts)
    assert [int(c.sum()) for c in per_doc] == [len(d.encode()) for d in docs]
    first, second, fourth = (split_docs(tokens)[i] for i in (0, 1, 3))
    assert first[1] == 4 and per_doc[0][1] == 0 and per_doc[0][2] >= 2 + 1  # TITLE 0; 'h...' gets the 2 spaces
    assert fourth[1] == 4 and per_doc[3][1] == 0 and per_doc[3][2] >= 4 + 1  # '\t' and U+200B: dropped, counted
    after_esc = np.flatnonzero(np.r_[False, second[:-1] == 7])  # ESC TITLE ... ESC ESC: two literals, 3 bytes each
    assert second[after_esc[:2]].tolist() == [4, 7] and per_doc[1][after_esc[:2]].tolist() == [3, 3]
    assert per_doc[1][np.flatnonzero(second == 7)].tolist() == [0, 0, 3]
    assert "val byte sidecars: files=1 bytes=" in capsys.readouterr().out


def test_a_blank_document_cannot_be_counted(tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", ["fine", " \n\t ", "more"] + filler(20))
    assert build(corpus, tmp_path / "out", "--caseops", "--train-tokenizer", SMALL, "--val-docs", "3") == 1
    line = one_error_line(capsys.readouterr().err)
    assert "line 2:" in line and "blank" in line and not (tmp_path / "out").exists()
    assert build(corpus, tmp_path / "out", "--train-tokenizer", SMALL, "--val-docs", "3") == 0  # no sidecar: fine


@pytest.mark.parametrize("dup_of,extra,which", [(2, [], "validation"), (5, ["--train-from", "6"], "--train-from")])
def test_a_held_out_document_in_training_is_refused(tmp_path, capsys, dup_of, extra, which):
    """The overlap check, by hash of the text with whitespace runs as one space: a planted copy of a held-out
    document among the training documents (with other line breaks) stops the tool; nothing is written."""
    docs = [f"Document number {i} says: {text}" for i, text in enumerate(filler(30))]
    docs[20] = docs[dup_of - 1].replace(" ", "\n  ")
    corpus = write_jsonl(tmp_path / "c.jsonl", docs)
    assert build(corpus, tmp_path / "out", "--caseops", "--train-tokenizer", SMALL, "--val-docs", "4", *extra) == 1
    line = one_error_line(capsys.readouterr().err)
    assert f"training document at line 21 has the text of the document at line {dup_of}" in line and which in line
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*"))
    docs[20] = "A different document."
    assert build(write_jsonl(tmp_path / "c.jsonl", docs), tmp_path / "out", "--caseops", "--train-tokenizer", SMALL,
                 "--val-docs", "4", *extra) == 0


def test_train_from_keeps_the_documents_between_out_of_every_shard(tmp_path, capsys):
    docs = [f"Doc {i}: {text}" for i, text in enumerate(filler(40))]
    corpus = write_jsonl(tmp_path / "c.jsonl", docs)
    assert build(corpus, tmp_path / "out", "--caseops", "--train-tokenizer", SMALL, "--val-docs", "5",
                 "--train-from", "25") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("val: documents=5 ") and out[1].startswith("train: documents=15 ")
    assert out[2].startswith("held out: documents=20 ")
    sp = load_sp(tmp_path / "out" / "tokenizer.model")
    train = [caseops.decode(sp.decode(d[1:].tolist())) for d in split_docs(stream(tmp_path / "out", "train"))]
    assert train == docs[25:]
    with pytest.raises(SystemExit) as exc:
        build(corpus, tmp_path / "o2", "--train-tokenizer", SMALL, "--val-docs", "5", "--train-from", "4")
    assert exc.value.code == 2 and "--train-from 4 must be >= --val-docs 5" in capsys.readouterr().err


def test_tokenizer_kinds_must_match_the_mode(tmp_path, capsys, datasets):
    corpus = write_jsonl(tmp_path / "c.jsonl", ["One", "Two", "Three"])
    assert build(corpus, tmp_path / "o", "--caseops", "--tokenizer", str(datasets["plain"] / "tokenizer.model"),
                 "--val-docs", "1") == 2
    assert "not a CaseOps tokenizer (it has 0 of the 4 operator pieces" in one_error_line(capsys.readouterr().err)
    assert build(corpus, tmp_path / "o", "--tokenizer", str(datasets["caseops"] / "tokenizer.model"),
                 "--val-docs", "1") == 2
    assert "is a CaseOps tokenizer" in one_error_line(capsys.readouterr().err) and not (tmp_path / "o").exists()
    assert build(corpus, tmp_path / "o", "--caseops", "--tokenizer", str(datasets["caseops"] / "tokenizer.model"),
                 "--val-docs", "1") == 0  # a given CaseOps tokenizer: no tokenizer written
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [
        "fineweb_train_000000.bin", "fineweb_val_000000.bin", "fineweb_val_bytes_000000.bin"]


def test_train_tokenizer_errors(tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", filler(5))
    assert build(corpus, tmp_path / "o", "--train-tokenizer", "5000", "--val-docs", "1") == 2
    assert "give only" in one_error_line(capsys.readouterr().err) and not (tmp_path / "o").exists()
    assert build(corpus, tmp_path / "o", "--train-tokenizer", SMALL, "--val-docs", "1") == 0
    capsys.readouterr()
    for f in (tmp_path / "o").glob("fineweb_*"):
        f.unlink()  # only the tokenizer is left: a new one would replace it
    assert build(corpus, tmp_path / "o", "--train-tokenizer", SMALL, "--val-docs", "1") == 2
    assert "tokenizer.model" in one_error_line(capsys.readouterr().err)
    with pytest.raises(SystemExit) as exc:
        build(corpus, tmp_path / "o", "--train-tokenizer", "100")
    assert exc.value.code == 2 and "[260, 65536]" in capsys.readouterr().err


def test_piece_spans_read_the_wire_format():
    """The proto reader against a hand-made SentencePieceText: unknown fields and wire types skipped, multi-byte
    varints, a piece whose begin (0) is left out."""
    def varint(n: int) -> bytes:
        out = b""
        while True:
            out += bytes([n & 0x7F | (0x80 if n > 0x7F else 0)])
            n >>= 7
            if not n:
                return out

    def piece(pid: int, begin: int | None, end: int) -> bytes:
        body = b"\x0a\x02ab" + b"\x10" + varint(pid) + b"\x1a\x01x" + (b"\x20" + varint(begin) if begin is not None
                                                                         else b"") + b"\x28" + varint(end)
        return b"\x12" + varint(len(body)) + body

    blob = b"\x0a\x03abc" + piece(300, None, 2) + piece(7, 2, 200) + b"\x1d\x00\x00\x80\x3f" + piece(1, 200, 70000)
    assert ms.piece_spans(blob) == [[300, 0, 2], [7, 2, 200], [1, 200, 70000]]


# ----------------------------------------------------------------------------------------------------------
# train_gpt.py: scoring from a sidecar


def hp_for(data: Path, **env) -> object:
    return tg.read_hyperparameters({"DATA_PATH": str(data), "VOCAB_SIZE": str(VOCAB),
                                    "TOKENIZER_PATH": str(data / "tokenizer.model"), **env})


def val_bytes_of(data: Path, seq_len: int = 64, **env) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    hp = hp_for(data, **env)
    sp = tg.load_tokenizer(hp.tokenizer_path, hp.vocab_size)
    files = tg.resolve_files(hp.val_glob, "VAL_FILES")
    tokens = tg.load_validation_tokens(files, seq_len, hp.val_max_tokens)
    got, sidecars = tg.validation_bytes(hp, sp, tg.build_byte_luts(sp, hp.vocab_size), files, tokens)
    return got, sidecars, tokens


def copy_dataset(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_default_globs_never_take_a_sidecar_for_a_shard(datasets, tmp_path):
    data = datasets["caseops"]
    hp = hp_for(data)
    assert tg.resolve_files(hp.val_glob, "VAL_FILES") == sorted(str(p) for p in data.glob("fineweb_val_0*.bin"))
    assert not any(tg.is_sidecar(f) for f in tg.resolve_files(hp.train_glob, "TRAIN_FILES"))
    with pytest.raises(tg.InputError, match=r"VAL_FILES=.*fineweb_val_\*\.bin matches .*fineweb_val_bytes_000000\.bin, "
                       r"a byte sidecar .* e\.g\. .*fineweb_val_\[0-9\]\*\.bin"):
        tg.resolve_files(str(data / "fineweb_val_*.bin"), "VAL_FILES")
    with pytest.raises(tg.InputError,
                       match=r"TRAIN_FILES=.* matches .*_bytes_.* e\.g\. .*/fineweb_train_\[0-9\]\*\.bin"):
        tg.resolve_files(str(data / "fineweb_*.bin"), "TRAIN_FILES")


@pytest.mark.parametrize("max_tokens", [0, 4096])
def test_the_sidecar_is_found_and_cut_as_the_tokens_are(datasets, max_tokens):
    data = datasets["caseops"]
    got, sidecars, tokens = val_bytes_of(data, VAL_MAX_TOKENS=str(max_tokens))
    assert sidecars == sorted(str(p) for p in data.glob("fineweb_val_bytes_*.bin")) and len(sidecars) >= 3
    assert got.dtype == torch.int16 and len(got) == len(tokens) and (not max_tokens or len(got) == max_tokens + 1)
    assert torch.equal(got.long(), torch.from_numpy(stream(data, "val_bytes")[: len(tokens)]))
    explicit, files, _ = val_bytes_of(data, VAL_MAX_TOKENS=str(max_tokens),
                                      VAL_BYTES_FILES=str(data / "fineweb_val_bytes_*.bin"))
    assert torch.equal(explicit, got) and files == sidecars


def test_without_a_sidecar_a_plain_tokenizer_uses_its_table(datasets, tmp_path):
    data = copy_dataset(datasets["plain"], tmp_path / "plain")
    for f in data.glob("fineweb_val_bytes_*"):
        f.unlink()
    got, sidecars, tokens = val_bytes_of(data)
    sp = load_sp(data / "tokenizer.model")
    assert sidecars == [] and torch.equal(got, tg.token_bytes(tokens, tg.build_byte_luts(sp, VOCAB)))


def corrupt(data: Path, name: str, edit) -> None:
    path = data / name
    raw = bytearray(path.read_bytes())
    edit(raw)
    path.write_bytes(bytes(raw))


def set_count(position: int, value: int):
    def edit(raw: bytearray) -> None:
        raw[1024 + 2 * position : 1026 + 2 * position] = value.to_bytes(2, "little")
    return edit


def first_after_esc(data: Path) -> int:
    tokens = read_shard(data / "fineweb_val_000000.bin")
    return int(np.flatnonzero(np.isin(tokens, [4, 5, 6]))[0])


@pytest.mark.parametrize("damage,expected", [
    ("short", r"fineweb_val_bytes_000001\.bin: \d+ byte counts, but its shard .*fineweb_val_000001\.bin holds \d+"),
    ("header", r"fineweb_val_bytes_000000\.bin: bad shard header"),
    ("missing", r"VAL_BYTES_FILES=.*: (\d+) byte sidecars for (?!\1)\d+ validation shards"),
    ("misnamed", r"fineweb_val_bytes_000003\.bin: not the byte sidecar of .*fineweb_val_000002\.bin by name"),
    ("bos", r"validation token 0 \(id 1, '<s>'\) has 5 bytes: a control token \(BOS\) stands for no text"),
    ("operator", r"validation token \d+ \(id [456], .*\) has 3 bytes: a case operator stands for no text"),
    ("huge", r"validation token 7 .* has 40000 bytes: more bytes than one token can stand for"),
    ("caseops-without", r"TOKENIZER_PATH=.* is a CaseOps tokenizer .* no byte sidecar matches .*fineweb_val_bytes_"),
    ("explicit-none", r"VAL_BYTES_FILES=.*nothing_\*\.bin: no files match"),
])
def test_a_sidecar_that_disagrees_is_one_clear_error(datasets, tmp_path, damage, expected):
    data = copy_dataset(datasets["caseops"], tmp_path / "d")
    env = {}
    if damage == "short":
        corrupt(data, "fineweb_val_bytes_000001.bin", lambda raw: raw.__delitem__(slice(-2, None)))
        corrupt(data, "fineweb_val_bytes_000001.bin", lambda raw: raw.__setitem__(slice(8, 12), (
            (len(raw) - 1024) // 2).to_bytes(4, "little")))
    elif damage == "header":
        corrupt(data, "fineweb_val_bytes_000000.bin", lambda raw: raw.__setitem__(slice(0, 4), b"\0\0\0\0"))
    elif damage == "missing":
        (data / "fineweb_val_bytes_000002.bin").unlink()
    elif damage == "misnamed":
        (data / "fineweb_val_bytes_000002.bin").rename(data / "fineweb_val_bytes_000009.bin")
    elif damage == "bos":
        corrupt(data, "fineweb_val_bytes_000000.bin", set_count(0, 5))
    elif damage == "operator":
        corrupt(data, "fineweb_val_bytes_000000.bin", set_count(first_after_esc(data), 3))
    elif damage == "huge":
        corrupt(data, "fineweb_val_bytes_000000.bin", set_count(7, 40000))
    elif damage == "caseops-without":
        for f in data.glob("fineweb_val_bytes_*"):
            f.unlink()
    else:
        env["VAL_BYTES_FILES"] = str(data / "nothing_*.bin")
    with pytest.raises(tg.InputError, match=expected):
        val_bytes_of(data, **env)


def scored_bytes(data: Path, targets: int) -> int:
    """What the final lines must report: the sidecar's counts of targets 1..N of the validation stream."""
    return int(stream(data, "val_bytes")[1 : targets + 1].sum())


@needs_shared
def test_caseops_run_end_to_end(datasets, tmp_path):
    """Training, the periodic eval, export, the round trip, sliding, document-isolated, LoRA TTT and TTT evals on a
    CaseOps dataset, then EVAL_ONLY of its artifact: every line's bytes are the sidecar's, and the loss/bpb pair uses
    them."""
    data = datasets["caseops"]
    env = dict(VOCAB_SIZE=str(VOCAB), TOKENIZER_PATH=str(data / "tokenizer.model"), ITERATIONS="8",
               VAL_LOSS_EVERY="4", WARMDOWN_ITERS="4", TTT_ENABLED="1", TTT_CHUNK_TOKENS="1024", TTT_EPOCHS="1",
               DOCS_EVAL="1", TTT_LORA_ENABLED="1", TTT_LORA_RANK="4", TTT_LORA_BATCH_DOCS="4",
               TTT_LORA_PREFIX_DOCS="4", TTT_LORA_PHASES="2")
    assert run_in_process(tmp_path / "run", data, **env) == 0
    log = log_lines(tmp_path / "run")
    sidecar_line = lines_starting(log, "val_bpb:byte_sidecar")
    assert len(sidecar_line) == 1 and f"files:{len(list(data.glob('fineweb_val_bytes_*')))} " in sidecar_line[0]
    finals = [line for line in log if re.match(r"final_int6_\w+_exact ", line)]
    assert {line.split()[0] for line in finals} == {"final_int6_roundtrip_exact", "final_int6_sliding_window_exact",
                                                    "final_int6_docs_exact", "final_int6_lora_ttt_exact",
                                                    "final_int6_ttt_exact"}
    targets = int(TINY_ENV["VAL_MAX_TOKENS"])
    expected = scored_bytes(data, targets)
    for line in finals:
        tokens, nbytes = int(field(line, "tokens")), int(field(line, "bytes"))
        loss, bpb = float(field(line, "val_loss")), float(field(line, "val_bpb"))
        assert (tokens, nbytes) == (targets, expected)
        assert bpb == pytest.approx(loss / math.log(2) * tokens / nbytes, rel=1e-6)
    sp = load_sp(data / "tokenizer.model")
    table = tg.token_bytes(torch.from_numpy(stream(data, "val")[: targets + 1]), tg.build_byte_luts(sp, VOCAB))
    assert int(table.sum()) > expected  # the table would count 3 bytes per operator: not what is scored
    artifact = tmp_path / "run" / tg.ARTIFACT_PATH
    assert run_in_process(tmp_path / "eval", data, EVAL_ONLY=str(artifact), RUN_ID="eval", **env) == 0
    again = [line for line in log_lines(tmp_path / "eval", "eval") if re.match(r"final_int6_\w+_exact ", line)]
    assert sorted(again) == sorted(finals)


@needs_shared
def test_caseops_and_plain_runs_share_their_denominator(datasets):
    """Scoring every validation target of each dataset (the same 20 documents, tokenised two ways: 18% more
    tokens with CaseOps here), bytes come out identical: the documents' UTF-8 bytes. The plain tokenizer's table
    would give 3 more: the normalised text's."""
    results = {}
    for kind, data in datasets.items():
        tokens = torch.from_numpy(stream(data, "val"))
        counts = torch.from_numpy(stream(data, "val_bytes")).to(torch.int16)
        uniform = scorer_of(lambda x: torch.zeros(*x.shape, VOCAB))
        results[kind] = tg.evaluate(uniform, tokens, counts, 256, 64, 8, 0, 1)
        if kind == "plain":
            table = tg.token_bytes(tokens, tg.build_byte_luts(load_sp(data / "tokenizer.model"), VOCAB))
            results["table"] = tg.evaluate(uniform, tokens, table, 256, 64, 8, 0, 1)
    original = sum(len(d.encode()) for d in real_docs()[:VAL_DOCS])
    assert results["caseops"][3] == results["plain"][3] == original == results["table"][3] - 3
    assert results["caseops"][2] > results["plain"][2]
    for kind in ("caseops", "plain"):  # uniform predictions: bpb = log2(V) * tokens / bytes, on the same bytes
        _, bpb, tokens, nbytes = results[kind]
        assert bpb == pytest.approx(math.log2(VOCAB) * tokens / original, rel=1e-6)
