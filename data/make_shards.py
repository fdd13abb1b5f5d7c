"""Tokenise a text corpus into challenge-format shards (data/README.md has the details).

    python data/make_shards.py CORPUS --tokenizer path/to/tokenizer.model --out DIR [--val-docs K]

CORPUS is JSONL (a string field `text` per line) or plain text (documents separated by blank lines), UTF-8. Every
document is encoded with BOS first (no EOS), as in the published export; the first K documents are the validation
split (fineweb_val_*.bin), the rest the training split (fineweb_train_*.bin); the splits never share a shard. The
shards are built beside --out and moved in only at the end: a failed run writes nothing.

The shard format, the tools' one copy of it (train_gpt.py keeps its own): 256 little-endian int32 (magic 20240520,
version 1, token count, zeros), then the tokens as little-endian uint16.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

SHARD_MAGIC, SHARD_VERSION, HEADER_INTS, HEADER_BYTES = 20240520, 1, 256, 1024
MAX_TOKEN_ID = 2**16 - 1


class ShardError(Exception):
    """One `error:` line; exit status 2 for a problem with the arguments, else 1."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def write_shard(path: str | Path, tokens: np.ndarray) -> None:
    """Write `tokens` (ids in [0, 65535]) as one shard, atomically (beside its name, then renamed)."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or (tokens.size and (not np.issubdtype(tokens.dtype, np.integer) or tokens.min() < 0
                                             or tokens.max() > MAX_TOKEN_ID)):
        raise ValueError(f"{path}: expected a 1-D array of token ids in [0, {MAX_TOKEN_ID}], got {tokens!r:.60}")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, tokens.size)
    path, tmp = Path(path), Path(f"{path}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            f.write(tokens.astype("<u2").tobytes())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def shard_problem(path: Path) -> str | None:
    """None when `path` is a complete shard (magic, version, size = header + 2 bytes per token), else what is wrong."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            magic, version, n = np.frombuffer(f.read(12).ljust(12, b"\0"), dtype="<i4")
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    if magic != SHARD_MAGIC or version != SHARD_VERSION:
        return f"bad header (magic {magic}, version {version}; expected {SHARD_MAGIC}, {SHARD_VERSION})"
    if size != HEADER_BYTES + 2 * n:
        return f"{size} bytes, but its header promises {n} tokens = {HEADER_BYTES + 2 * n} bytes"
    return None


def read_documents(path: Path, fmt: str, text_key: str) -> Iterator[tuple[int, str]]:
    """(first line number, text) of every document of the corpus."""
    jsonl = fmt == "jsonl" or (fmt == "auto" and path.suffix.lower() in (".jsonl", ".json"))
    lines, start = [], 0  # the text format's current document and its first line
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8").rstrip("\r\n")
                obj = json.loads(text) if jsonl and text.strip() else None
            except UnicodeDecodeError as exc:
                raise ShardError(f"{path}:{line_no}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
            except json.JSONDecodeError as exc:
                raise ShardError(f"{path}:{line_no}: bad JSON ({exc.msg} at column {exc.colno})") from None
            if jsonl and text.strip():
                if not isinstance(obj, dict) or not isinstance(obj.get(text_key), str):
                    raise ShardError(f"{path}:{line_no}: expected a JSON object with a string field {text_key!r}")
                yield line_no, obj[text_key]
            elif not jsonl and text.strip():
                start = start if lines else line_no
                lines.append(text)
            elif lines:
                yield start, "\n".join(lines)
                lines = []
    if lines:  # the last document of a text file that does not end in a blank line
        yield start, "\n".join(lines)


class SplitWriter:
    """Packs one split's token stream into shards of exactly `shard_tokens` (the last may be shorter)."""

    def __init__(self, out: Path, split: str, shard_tokens: int) -> None:
        self.out, self.split = out, split
        self.buf, self.fill = np.empty(shard_tokens, dtype=np.uint16), 0
        self.shards: list[str] = []
        self.documents = self.tokens = self.bytes = 0

    def add(self, ids: np.ndarray, text: str) -> None:
        self.documents += 1
        self.tokens += ids.size
        self.bytes += len(text.encode("utf-8"))
        while ids.size:
            take = min(self.buf.size - self.fill, ids.size)
            self.buf[self.fill : self.fill + take] = ids[:take]
            self.fill, ids = self.fill + take, ids[take:]
            if self.fill == self.buf.size:
                self.flush()

    def flush(self) -> None:
        if self.fill:
            self.shards.append(f"fineweb_{self.split}_{len(self.shards):06d}.bin")
            write_shard(self.out / self.shards[-1], self.buf[: self.fill])
            self.fill = 0


def load_tokenizer(path: Path):  # -> sentencepiece.SentencePieceProcessor
    import sentencepiece as spm

    if not path.is_file():
        raise ShardError(f"--tokenizer {path}: no such file", code=2)
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except Exception as exc:
        raise ShardError(f"--tokenizer {path}: not a loadable SentencePiece model ({exc})", code=2) from None
    if sp.bos_id() < 0:
        raise ShardError(f"--tokenizer {path}: the model has no BOS piece (bos_id -1)", code=2)
    return sp


def make_shards(args: argparse.Namespace, tmp: Path) -> tuple[SplitWriter, SplitWriter]:
    """Encode the corpus into val then train shards in `tmp`, in batches of 256 documents."""
    from tqdm import tqdm

    sp = load_tokenizer(args.tokenizer)
    val, train = SplitWriter(tmp, "val", args.shard_tokens), SplitWriter(tmp, "train", args.shard_tokens)
    docs = read_documents(args.corpus, args.format, args.text_key)
    bar = tqdm(desc="documents", unit="doc", disable=True if args.no_progress else None)
    while batch := list(itertools.islice(docs, 256)):
        encoded = sp.encode([text for _, text in batch], out_type=int, num_threads=args.threads or os.cpu_count() or 1)
        for (line_no, text), ids in zip(batch, encoded):
            ids = np.array([sp.bos_id(), *ids], dtype=np.int64)
            if ids.max() > MAX_TOKEN_ID:
                raise ShardError(f"{args.corpus}: document at line {line_no}: token id {ids.max()} does not fit in "
                                 f"uint16 (a tokenizer of at most 65536 pieces is needed)")
            writer = val if val.documents < args.val_docs else train
            if writer is train and val.fill:
                val.flush()  # the split switch closes the last validation shard
            writer.add(ids.astype(np.uint16), text)
        bar.update(len(batch))
    bar.close()
    val.flush()
    train.flush()
    return val, train


def run(args: argparse.Namespace) -> None:
    if not args.corpus.is_file():
        raise ShardError(f"{args.corpus}: no such corpus file")
    if args.out.exists() and not args.out.is_dir():
        raise ShardError(f"--out {args.out} exists and is not a folder", code=2)
    old = sorted(p for split in ("train", "val") for p in args.out.glob(f"fineweb_{split}_*.bin"))
    if old and not args.overwrite:
        raise ShardError(f"--out {args.out} already holds {len(old)} shards ({old[0].name}, ...); pass --overwrite "
                         "to replace them", code=2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.make_shards{os.getpid()}")
    tmp.mkdir()
    try:
        val, train = make_shards(args, tmp)
        total = val.documents + train.documents
        if not total:
            raise ShardError(f"{args.corpus}: no documents")
        if not train.documents:
            fix = f"e.g. --val-docs {max(1, round(total / 10))}" if total > 1 else "it needs at least 2 documents"
            raise ShardError(f"{args.corpus} has {total} document(s) and --val-docs is {args.val_docs}: all would be "
                             f"validation, no train shard; pass --val-docs below {total}, {fix}", code=2)
        if args.out.is_dir():
            for path in old:
                path.unlink()
            for name in val.shards + train.shards:
                os.replace(tmp / name, args.out / name)
        else:
            os.replace(tmp, args.out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for w in (val, train):
        print(f"{w.split}: documents={w.documents} tokens={w.tokens} bytes={w.bytes} shards={len(w.shards)}")
    print(f"wrote {len(val.shards) + len(train.shards)} shards to {args.out}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Tokenise a JSONL or plain-text corpus with a SentencePiece model into "
                                "challenge-format shards (the first K documents: validation).")
    p.add_argument("corpus", type=Path, help='JSONL ({"text": ...} per line) or plain text (blank-line separated)')
    p.add_argument("--tokenizer", type=Path, required=True, metavar="MODEL", help="SentencePiece .model file")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for the shards")
    p.add_argument("--val-docs", type=int, default=50_000, metavar="K",
                   help="the first K documents form the validation split (default: %(default)s, as the challenge)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, metavar="N",
                   help="tokens per shard; the last of each split may be shorter (default: %(default)s)")
    p.add_argument("--format", choices=("auto", "jsonl", "text"), default="auto", help="input format (default: auto)")
    p.add_argument("--text-key", default="text", help="JSONL field holding the document (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace the shards already in --out")
    p.add_argument("--threads", type=int, default=0, help="encoder threads (default: 0, all cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.val_docs < 0 or not 1 <= args.shard_tokens < 2**31 or args.threads < 0:
        p.error("--val-docs and --threads must be >= 0, --shard-tokens in [1, 2**31)")
    try:
        run(args)
    except ShardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
