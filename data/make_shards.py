"""Tokenise a text corpus into challenge-format shards (see data/README.md).

    python data/make_shards.py CORPUS --tokenizer path/to/tokenizer.model --out DIR [--val-docs K]

Input (``--format``, default ``auto``: ``.jsonl``/``.json`` files are JSONL, anything else is text):
  * jsonl: one JSON object per line with a string field ``text`` (``--text-key``); blank lines are skipped.
  * text:  documents separated by one or more blank lines; the lines of a document are joined with "\\n".
Input must be UTF-8.

Output, matching the published export: every document is encoded with the SentencePiece model and prefixed
with one BOS id (the model's ``bos_id()``); no EOS. The first K documents form the validation split, written
first as ``fineweb_val_000000.bin ...``; the remaining documents become ``fineweb_train_000000.bin ...``.
At least one document must be left for training: a corpus of K documents or fewer is an error (exit 2) that
says how many documents it has and which ``--val-docs`` to pass.
A split switch closes the current shard, so val and train never share a file. Every shard except the last of
its split holds exactly ``--shard-tokens`` tokens (documents may straddle shard boundaries).

Shard format: 256 little-endian int32 header (magic 20240520, version 1, token count, zeros), then the
tokens as little-endian uint16.

Shards are written into a temporary folder beside ``--out`` and moved into place only when the whole corpus
has been processed, so a failed run leaves nothing behind.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
MAX_TOKEN_ID = 2**16 - 1
MAX_SHARD_TOKENS = 2**31 - 1  # the header stores the count as int32
DEFAULT_SHARD_TOKENS = 100_000_000
DEFAULT_VAL_DOCS = 50_000
PROG = "make_shards.py"


def write_shard(path: str | Path, tokens: np.ndarray) -> None:
    """Write `tokens` (ids < 2**16) as one shard: 256 little-endian int32 header, then uint16 ids.

    The file appears atomically: it is written beside its final name and renamed into place.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"{path}: tokens must be 1-D, got shape {tokens.shape}")
    if tokens.size and not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"{path}: token ids must be integers, got dtype {tokens.dtype}")
    if tokens.size > MAX_SHARD_TOKENS:
        raise ValueError(f"{path}: {tokens.size} tokens do not fit in one shard (at most {MAX_SHARD_TOKENS})")
    if tokens.size and tokens.dtype != np.uint16 and (tokens.min() < 0 or tokens.max() > MAX_TOKEN_ID):
        raise ValueError(f"{path}: token ids must lie in [0, {MAX_TOKEN_ID}]")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, tokens.size)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            f.write(tokens.astype("<u2", copy=False).tobytes())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class ShardError(Exception):
    """A failure reported to the user as one line on stderr (exit status 1)."""

    exit_code = 1


class ArgumentProblem(ShardError):
    """The arguments cannot work with this corpus (exit status 2, like a usage error); nothing is written."""

    exit_code = 2


def suggest_val_docs(total: int) -> int:
    """A --val-docs that leaves both splits non-empty: about a tenth of the corpus (total >= 2)."""
    return max(1, min(total - 1, round(total / 10)))


# ----------------------------------------------------------------------------------------------------------
# Reading the corpus


def detect_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    return "jsonl" if path.suffix.lower() in (".jsonl", ".json") else "text"


def _decode_line(raw: bytes, path: Path, line_no: int) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ShardError(f"{path}:{line_no}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if line_no == 1 and text.startswith("\ufeff"):
        text = text[1:]
    return text


def iter_jsonl(path: Path, text_key: str = "text") -> Iterator[tuple[int, str]]:
    """Yield (line number, text) for each non-blank line of a JSONL file."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            line = _decode_line(raw, path, line_no)
            if not line.strip():
                continue
            try:
                obj: Any = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ShardError(f"{path}:{line_no}: bad JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise ShardError(f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}")
            text = obj.get(text_key)
            if not isinstance(text, str):
                got = "no such field" if text_key not in obj else f"a {type(text).__name__}"
                raise ShardError(f"{path}:{line_no}: field {text_key!r} must be a string ({got})")
            yield line_no, text


def iter_text(path: Path) -> Iterator[tuple[int, str]]:
    """Yield (first line number, text) for each blank-line-separated document of a plain-text file."""
    lines: list[str] = []
    start = 0
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            line = _decode_line(raw, path, line_no).rstrip("\r\n")
            if line.strip():
                if not lines:
                    start = line_no
                lines.append(line)
            elif lines:
                yield start, "\n".join(lines)
                lines = []
    if lines:
        yield start, "\n".join(lines)


def iter_documents(path: Path, fmt: str, text_key: str = "text") -> Iterator[tuple[int, str]]:
    return iter_jsonl(path, text_key) if detect_format(path, fmt) == "jsonl" else iter_text(path)


# ----------------------------------------------------------------------------------------------------------
# Writing shards


@dataclass
class SplitStats:
    documents: int = 0
    tokens: int = 0
    bytes: int = 0
    shards: list[str] = field(default_factory=list)

    def line(self, name: str) -> str:
        return (
            f"{name}: documents={self.documents} tokens={self.tokens} bytes={self.bytes} "
            f"shards={len(self.shards)}"
        )


class ShardWriter:
    """Packs a token stream into fixed-size shards of one split."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int, stats: SplitStats) -> None:
        self.out_dir = out_dir
        self.split = split
        self.stats = stats
        self.buf = np.empty(shard_tokens, dtype=np.uint16)
        self.fill = 0

    def add(self, ids: np.ndarray) -> None:
        pos = 0
        while pos < ids.size:
            take = min(self.buf.size - self.fill, ids.size - pos)
            self.buf[self.fill : self.fill + take] = ids[pos : pos + take]
            self.fill += take
            pos += take
            if self.fill == self.buf.size:
                self.flush()
        self.stats.tokens += int(ids.size)

    def flush(self) -> None:
        if self.fill == 0:
            return
        name = f"fineweb_{self.split}_{len(self.stats.shards):06d}.bin"
        write_shard(self.out_dir / name, self.buf[: self.fill])
        self.stats.shards.append(name)
        self.fill = 0


Encoder = Callable[[list[str]], list[list[int]]]


def build_shards(
    docs: Iterable[tuple[int, str]],
    encode: Encoder,
    bos_id: int,
    val_docs: int,
    shard_tokens: int,
    out_dir: Path,
    batch_docs: int = 256,
    progress: bool | None = None,
) -> dict[str, SplitStats]:
    """Encode `docs` ((line number, text) pairs) and write val then train shards into `out_dir`."""
    from tqdm import tqdm

    if not 0 <= bos_id <= MAX_TOKEN_ID:
        raise ShardError(f"BOS id {bos_id} does not fit in uint16")
    stats = {"val": SplitStats(), "train": SplitStats()}
    writers = {s: ShardWriter(out_dir, s, shard_tokens, stats[s]) for s in stats}
    bos = np.array([bos_id], dtype=np.int64)
    n_docs = 0

    def emit(batch: list[tuple[int, str]]) -> None:
        nonlocal n_docs
        encoded = encode([text for _, text in batch])
        if len(encoded) != len(batch):
            raise ShardError(f"tokenizer returned {len(encoded)} encodings for {len(batch)} documents")
        for (line_no, text), ids in zip(batch, encoded, strict=True):
            arr = np.concatenate([bos, np.asarray(ids, dtype=np.int64)])
            if arr.size > 1 and (arr.min() < 0 or arr.max() > MAX_TOKEN_ID):
                bad = int(arr.max()) if arr.max() > MAX_TOKEN_ID else int(arr.min())
                raise ShardError(
                    f"document at line {line_no}: token id {bad} does not fit in uint16 "
                    f"(ids must be in [0, {MAX_TOKEN_ID}]); use a tokenizer with at most 65536 pieces"
                )
            split = "val" if n_docs < val_docs else "train"
            if split == "train" and writers["val"].fill:
                writers["val"].flush()  # the split switch closes the last val shard
            writers[split].add(arr.astype(np.uint16))
            stats[split].documents += 1
            stats[split].bytes += len(text.encode("utf-8"))
            n_docs += 1

    batch: list[tuple[int, str]] = []
    with tqdm(desc="documents", unit="doc", disable=None if progress is None else not progress) as bar:
        for item in docs:
            batch.append(item)
            if len(batch) >= batch_docs:
                emit(batch)
                bar.update(len(batch))
                batch = []
        if batch:
            emit(batch)
            bar.update(len(batch))
    for w in writers.values():
        w.flush()
    return stats


# ----------------------------------------------------------------------------------------------------------
# CLI


class OneLineParser(argparse.ArgumentParser):
    """argparse, but usage errors are a single line on stderr (exit status 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def int_in(lo: int, hi: int) -> Callable[[str], int]:
    """argparse type: an integer in [lo, hi] (underscores allowed)."""
    def parse(text: str) -> int:
        try:
            value = int(text.replace("_", ""))
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be between {lo} and {hi}, got {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=PROG,
        description="Tokenise a JSONL or plain-text corpus with a SentencePiece model into challenge-format "
        "shards: BOS before every document, the first K documents as fineweb_val_*.bin, the rest as "
        "fineweb_train_*.bin.",
    )
    p.add_argument("corpus", type=Path, help="JSONL ({\"text\": ...} per line) or plain text (blank-line separated)")
    p.add_argument("--tokenizer", type=Path, required=True, metavar="MODEL", help="SentencePiece .model file")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder to write the shards into")
    p.add_argument(
        "--val-docs",
        type=int_in(0, 2**62),
        default=DEFAULT_VAL_DOCS,
        metavar="K",
        help="the first K documents form the validation split (default: %(default)s, as in the challenge); "
        "the corpus must hold more than K documents",
    )
    p.add_argument(
        "--shard-tokens",
        type=int_in(1, MAX_SHARD_TOKENS),
        default=DEFAULT_SHARD_TOKENS,
        metavar="N",
        help="tokens per shard; the last shard of each split may be shorter (default: %(default)s)",
    )
    p.add_argument("--format", choices=("auto", "jsonl", "text"), default="auto", help="input format (default: auto)")
    p.add_argument("--text-key", default="text", help="JSONL field holding the document (default: %(default)s)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace fineweb_train_*/fineweb_val_* shards already in --out (otherwise that is an error)",
    )
    p.add_argument("--threads", type=int_in(0, 1024), default=0, help="encoder threads (0: all cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def load_tokenizer(path: Path) -> Any:
    import sentencepiece as spm

    if not path.is_file():
        raise ShardError(f"tokenizer {path} does not exist")
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except Exception as exc:
        raise ShardError(f"tokenizer {path} is not a loadable SentencePiece model ({exc})") from None


def existing_shards(out: Path) -> list[Path]:
    if not out.is_dir():
        return []
    return sorted([*out.glob("fineweb_train_*.bin"), *out.glob("fineweb_val_*.bin")])


def run(args: argparse.Namespace) -> int:
    corpus: Path = args.corpus
    out: Path = args.out
    if not corpus.is_file():
        what = "is not a file" if corpus.exists() else "does not exist"
        raise ShardError(f"corpus {corpus} {what}")
    if out.exists() and not out.is_dir():
        raise ShardError(f"--out {out} exists and is not a folder")
    old = existing_shards(out)
    if old and not args.overwrite:
        raise ShardError(
            f"{out} already holds {len(old)} shards (e.g. {old[0].name}); pass --overwrite to replace them"
        )
    sp = load_tokenizer(args.tokenizer)
    vocab = int(sp.vocab_size())
    if vocab > MAX_TOKEN_ID + 1:
        raise ShardError(f"tokenizer {args.tokenizer} has {vocab} pieces; shard ids must be < 65536")
    bos_id = int(sp.bos_id())
    if bos_id < 0:
        raise ShardError(f"tokenizer {args.tokenizer} has no BOS piece (bos_id = -1); train it with bos_id >= 0")

    def encode(texts: list[str]) -> list[list[int]]:
        return sp.encode(texts, out_type=int, num_threads=args.threads or (os.cpu_count() or 1))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.make_shards-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; it may become --out itself
    try:
        docs = iter_documents(corpus, args.format, args.text_key)
        stats = build_shards(
            docs, encode, bos_id, args.val_docs, args.shard_tokens, tmp,
            progress=False if args.no_progress else None,
        )
        total = stats["val"].documents + stats["train"].documents
        if total == 0:
            raise ShardError(f"corpus {corpus} holds no documents")
        if stats["train"].documents == 0:
            fix = (f"pass --val-docs K with K < {total}, e.g. --val-docs {suggest_val_docs(total)}" if total > 1
                   else "a corpus needs at least 2 documents to fill both splits")
            raise ArgumentProblem(
                f"corpus {corpus} has {total} document{'s' if total != 1 else ''} and --val-docs is {args.val_docs}, "
                f"so all of them would be validation and no train shard would be written; {fix}"
            )
        if out.is_dir():
            for p in existing_shards(out):
                p.unlink()
            for name in stats["val"].shards + stats["train"].shards:
                os.replace(tmp / name, out / name)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(stats["val"].line("val"))
    print(stats["train"].line("train"))
    n_shards = len(stats["val"].shards) + len(stats["train"].shards)
    print(f"wrote {n_shards} shard{'' if n_shards == 1 else 's'} to {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, already printed as one line)
        return int(exc.code or 0)
    try:
        return run(args)
    except ShardError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except OSError as exc:
        print(f"{PROG}: error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
