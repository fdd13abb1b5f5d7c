"""A newcomer's first run: data/make_toy.py makes a tokenizer and shards from the clone's own text (no download, no
../shared), and the README's CPU example runs as written on a copy of the repository."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import train_gpt as tg
from conftest import REPO, lines_starting

sys.path.insert(0, str(REPO / "data"))
import make_toy  # noqa: E402

FILES = ("toy_1024_bpe.model", "fineweb_val_000000.bin", "fineweb_train_000000.bin")


def run_make_toy(out: Path, root: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(root / "data" / "make_toy.py"), "--out", str(out)], capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("toy") / "toy"
    proc = run_make_toy(out)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout.splitlines()[-1] == f"wrote toy_1024_bpe.model and 2 shards to {out}"
    return out


def test_the_toy_tokenizer_is_laid_out_as_the_challenges(toy):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(toy / "toy_1024_bpe.model"))
    assert sp.vocab_size() == 1024 and (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert all(sp.is_control(i) for i in (0, 1, 2)) and sp.is_unknown(3)
    assert all(sp.is_byte(i) and sp.id_to_piece(i) == f"<0x{i - 4:02X}>" for i in range(4, 260))
    assert not any(sp.is_byte(i) or sp.is_control(i) for i in range(260, 1024))
    assert tg.load_tokenizer(str(toy / "toy_1024_bpe.model"), 1024).vocab_size() == 1024  # what train_gpt.py accepts


def test_the_toy_shards_hold_the_corpus_paragraphs_bos_first(toy):
    """Every paragraph of the corpus once, in order, BOS-first with no EOS; every fifth is validation; the bytes
    train_gpt.py counts for them are the UTF-8 bytes of the tokenizer's own decoding."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(toy / "toy_1024_bpe.model"))
    val_docs, train_docs = make_toy.toy_documents(REPO)
    assert len(val_docs) >= 20 and len(train_docs) == pytest.approx(4 * len(val_docs), abs=4)
    luts = tg.build_byte_luts(sp, 1024)
    for name, docs in zip(FILES[1:], (val_docs, train_docs)):
        tokens = tg.load_data_shard(str(toy / name)).astype(np.int64)
        assert (tokens == 1).sum() == len(docs) and tokens[0] == 1
        assert np.array_equal(tokens, np.concatenate([[1] + ids for ids in sp.encode(docs)]))
        t = tg.torch.from_numpy(tokens)
        counted = int(tg.target_bytes(t[:-1], t[1:], luts).sum())
        assert counted == sum(len(sp.decode(ids).encode("utf-8")) for ids in sp.encode(docs))
    assert tg.read_shard_header(str(toy / FILES[1])) > 4096  # the README's toy run scores 4,096 targets


def test_make_toy_is_deterministic_and_never_mixes_with_other_shards(toy, tmp_path):
    again = tmp_path / "again"
    for _ in range(2):  # a fresh folder, then the same one again: the same bytes each time
        assert run_make_toy(again).returncode == 0
        assert all((again / f).read_bytes() == (toy / f).read_bytes() for f in FILES)
    assert sorted(p.name for p in again.iterdir()) == sorted(FILES)  # no temporary file left
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "fineweb_train_000007.bin").write_bytes(b"someone else's")
    proc = run_make_toy(mixed)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (f"error: --out {mixed} holds other shards (fineweb_train_000007.bin) that the globs would "
                           "also read; expected a folder of its own for the toy data\n")
    assert [p.name for p in mixed.iterdir()] == ["fineweb_train_000007.bin"]
