"""A toy dataset made from text this clone already has: a first CPU run needs no download (README, "A first run").

    python data/make_toy.py [--out data/toy]

It trains a 1,024-piece SentencePiece BPE tokenizer with the challenge's settings and layout (pad 0, bos 1, eos 2,
unk 3, then the 256 byte-fallback pieces) on the repository's own documentation and script, then tokenises the same
text into challenge-format shards. Documents are the paragraphs (blank-line separated) of CORPUS, in that order;
every VAL_EVERY-th one is validation, the rest training (which alone trains the tokenizer). It writes
toy_1024_bpe.model, fineweb_val_000000.bin and fineweb_train_000000.bin into --out, each file through a temporary
name; the same clone gives the same bytes. It is not FineWeb: its losses say that a run works, nothing about the
challenge's scores.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import os
import sys
from pathlib import Path

import numpy as np

from make_shards import ShardError, read_documents, write_shard

REPO = Path(__file__).resolve().parent.parent
CORPUS = ("README.md", "data/README.md", "docs/BENCHMARKS.md", "train_gpt.py")
VAL_EVERY = 5
VOCAB_SIZE = 1024
TOKENIZER_NAME = f"toy_{VOCAB_SIZE}_bpe.model"
SHARDS = ("fineweb_val_000000.bin", "fineweb_train_000000.bin")
# The challenge tokenizer's trainer settings (SPEC B 1.1), with one thread so that training is deterministic.
TRAINER = dict(model_type="bpe", vocab_size=VOCAB_SIZE, character_coverage=0.999, byte_fallback=True,
               split_digits=True, normalization_rule_name="nmt_nfkc", add_dummy_prefix=False, pad_id=0, bos_id=1,
               eos_id=2, unk_id=3, hard_vocab_limit=False, num_threads=1, minloglevel=2)


def toy_documents(root: Path) -> tuple[list[str], list[str]]:
    """(validation, training) paragraphs of the corpus files under `root`."""
    docs = []
    for name in CORPUS:
        if not (root / name).is_file():
            raise ShardError(f"{root / name}: no such file; the toy corpus is {', '.join(CORPUS)} of the repository")
        docs += [text for _, text in read_documents(root / name, "text", "text")]
    return docs[VAL_EVERY - 1 :: VAL_EVERY], [d for i, d in enumerate(docs) if i % VAL_EVERY != VAL_EVERY - 1]


def train_tokenizer(texts: list[str]) -> bytes:
    """The serialised SentencePiece model trained on `texts` (one sentence per line), checked for the layout the
    challenge's tokenizers have."""
    import sentencepiece as spm

    model = io.BytesIO()
    lines = [line for text in texts for line in text.splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, **TRAINER)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    layout = [sp.vocab_size(), sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id(), sp.id_to_piece(4),
              sp.id_to_piece(259)]
    if layout != [VOCAB_SIZE, 0, 1, 2, 3, "<0x00>", "<0xFF>"]:
        raise ShardError(f"the trained tokenizer has [vocab, pad, bos, eos, unk, piece 4, piece 259] = {layout}; "
                         f"expected [{VOCAB_SIZE}, 0, 1, 2, 3, '<0x00>', '<0xFF>']")
    return model.getvalue()


def encode(model: bytes, docs: list[str]) -> np.ndarray:
    """Every document BOS-first, no EOS, concatenated: the challenge's stream."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=model)
    return np.concatenate([np.array([sp.bos_id(), *ids], dtype=np.int64) for ids in sp.encode(docs, out_type=int)])


def write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def make_toy(out: Path) -> list[str]:
    """Writes the tokenizer and the two shards into `out`; returns the lines to print."""
    if out.exists() and not out.is_dir():
        raise ShardError(f"--out {out} exists and is not a folder", code=2)
    others = sorted(p.name for p in out.glob("fineweb_*.bin") if p.name not in SHARDS) if out.is_dir() else []
    if others:
        raise ShardError(f"--out {out} holds other shards ({', '.join(others[:3])}) that the globs would also read; "
                         "expected a folder of its own for the toy data", code=2)
    val_docs, train_docs = toy_documents(REPO)
    model = train_tokenizer(train_docs)
    streams = [encode(model, val_docs), encode(model, train_docs)]
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(out / TOKENIZER_NAME, model)
    for name, tokens in zip(SHARDS, streams):
        write_shard(out / name, tokens)
    lines = [f"tokenizer: {out / TOKENIZER_NAME} vocab={VOCAB_SIZE} sha256={hashlib.sha256(model).hexdigest()[:16]}"]
    for split, docs, tokens in zip(("val", "train"), (val_docs, train_docs), streams):
        lines.append(f"{split}: documents={len(docs)} tokens={tokens.size} "
                     f"bytes={sum(len(d.encode('utf-8')) for d in docs)}")
    return lines + [f"wrote {TOKENIZER_NAME} and {len(SHARDS)} shards to {out}"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="A toy dataset (tokenizer and shards) from this repository's own text.")
    p.add_argument("--out", type=Path, default=REPO / "data" / "toy", metavar="DIR",
                   help="folder for the tokenizer and shards (default: data/toy)")
    args = p.parse_args(argv)
    try:
        print("\n".join(make_toy(args.out)))
    except ShardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
