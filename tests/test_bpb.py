"""Tokenizer-agnostic bits per byte (SPEC B§2): per-token byte counts must sum to the UTF-8 length of the text."""
import json
import math

import numpy as np
import pytest
import sentencepiece as spm
import torch

import train_gpt as tg
from conftest import DOCS, TOKENIZER, TOKENIZER_8192, needs_shared, scorer_of


def stream_bytes(sp, luts, docs):
    """Per document: (bytes counted by the metric over its BOS-prefixed tokens, UTF-8 bytes of its decoding)."""
    ids = [sp.bos_id()]
    bounds = []
    for doc in docs:
        start = len(ids)
        ids += sp.encode(doc) + [sp.bos_id()]
        bounds.append((start, len(ids) - 1))
    ids = torch.tensor(ids)
    counted = tg.target_bytes(ids[:-1], ids[1:], luts)  # entry t counts target ids[t + 1]
    return [(int(counted[s - 1 : e - 1].sum()), len(sp.decode(ids[s:e].tolist()).encode("utf-8"))) for s, e in bounds]


@needs_shared
@pytest.mark.parametrize("vocab", [1024, 8192])
def test_real_tokenizers_luts_and_every_document(vocab):
    """The challenge's 1,024-token model and a record's 8,192-token one (same layout: 0-2 control, 3 unknown, 256
    byte pieces): the metric's bytes of every real document equal the UTF-8 bytes of its decoding."""
    path = TOKENIZER if vocab == 1024 else TOKENIZER_8192
    if not path.is_file():
        pytest.skip(f"{path} not found (set PG_SHARED_DATA)")
    sp = spm.SentencePieceProcessor(model_file=str(path))
    luts = tg.build_byte_luts(sp, vocab)
    base, space, boundary = luts
    assert len(base) == vocab and boundary[:4].all() and not boundary[4:].any()
    assert (base[4:260] == 1).all() and base[:4].sum() == 0
    if vocab == 1024:
        assert int(space.sum()) == 325 and int(base.max()) == 11
        assert base[939] == 0 and space[939]  # the bare '▁' piece
    docs = [json.loads(line)["text"] for line in DOCS.read_text(encoding="utf-8").splitlines()]
    assert len(docs) == 200
    pairs = stream_bytes(sp, luts, docs)
    assert all(counted == actual for counted, actual in pairs) and sum(a for _, a in pairs) > 1_000_000


def test_small_trained_tokenizer(tmp_path):
    """Same property with a byte-fallback BPE trained here, so the test needs nothing outside the repo."""
    rng = np.random.default_rng(0)
    words = ["golf", "parameter", "byte", "naïve", "café", "日本語", "tokens", "😀", "x", "∑"]
    lines = [" ".join(rng.choice(words, size=12)) + f" {i}" for i in range(400)]
    (tmp_path / "corpus.txt").write_text("\n".join(lines), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "tiny"), model_type="bpe", vocab_size=320,
        byte_fallback=True, character_coverage=0.98, add_dummy_prefix=False, split_digits=True,
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tiny.model"))
    luts = tg.build_byte_luts(sp, 320)
    docs = lines[:50] + ["rare glyphs ☃ ǅ and ⅞ fall back to bytes", "  leading spaces", "Ω"]
    assert any(sp.is_byte(i) for d in docs for i in sp.encode(d))  # byte pieces are exercised
    for counted, actual in stream_bytes(sp, luts, docs):
        assert counted == actual


def test_bpb_formula_and_vocab_mismatch(tmp_path):
    """val_bpb = loss / ln 2 * tokens / bytes: a uniform model over V costs log2(V) bits per token."""
    base = torch.tensor([0, 1, 2, 3], dtype=torch.int16)
    luts = (base, torch.zeros(4, dtype=torch.bool), torch.tensor([True, False, False, False]))
    val = torch.tensor([0, 1, 2, 3, 3, 2, 1, 1, 2])
    per_token = tg.token_bytes(val, luts)
    uniform = scorer_of(lambda x: torch.zeros(*x.shape, 4))
    loss, bpb, tokens, nbytes = tg.evaluate(uniform, val, per_token, 4, 4, 2, 0, 1)
    assert tokens == 8 and nbytes == int(base[val[1:]].sum())
    assert loss == pytest.approx(math.log(4)) and bpb == pytest.approx(2 * tokens / nbytes)
    if TOKENIZER.is_file():
        with pytest.raises(tg.InputError, match="VOCAB_SIZE=512"):
            tg.load_tokenizer(str(TOKENIZER), 512)
    with pytest.raises(tg.InputError, match="TOKENIZER_PATH"):
        tg.load_tokenizer(str(tmp_path / "missing.model"), 1024)
