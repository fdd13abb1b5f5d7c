"""Tokenise a text corpus into challenge-format shards (data/README.md has the details).

    python data/make_shards.py CORPUS --tokenizer path/to/tokenizer.model --out DIR [--val-docs K]
    python data/make_shards.py CORPUS --caseops --train-tokenizer 8192 --out DIR [--val-docs K]

CORPUS is JSONL (a string field `text` per line) or plain text (documents separated by blank lines), UTF-8. Every
document is encoded with BOS first (no EOS), as in the published export; the first K documents are the validation
split (fineweb_val_*.bin), the rest the training split (fineweb_train_*.bin); the splits never share a shard, and no
training document may have the text of a held-out one (checked by hash). The shards are built beside --out and moved
in only at the end: a failed run writes nothing.

--caseops tokenises the CaseOps form of every document (data/caseops.py) and writes, beside each validation shard, a
byte sidecar fineweb_val_bytes_*.bin (--byte-sidecar alone writes one for plain text): the same header, one uint16
per token = the bytes of the original document that token stands for, from SentencePiece's own alignment of each
piece to the text it came from (BOS, the case operators and ESC 0; a letter 1 whatever its case; any other character
its UTF-8 length; whitespace SentencePiece drops at a document's two ends is counted with the nearest token that
stands for text). Every document's counts sum to its UTF-8 byte length, exactly, checked as it is written: the
original bytes are those of the document as read here (a JSONL string, or a text block's lines joined by "\n").
--train-tokenizer V trains the SentencePiece BPE model first, on the training documents only, with the challenge's
settings (and the four operators as user-defined pieces, ids 4-7, under --caseops).

The shard format, the tools' one copy of it (train_gpt.py keeps its own): 256 little-endian int32 (magic 20240520,
version 1, token count, zeros), then the tokens as little-endian uint16.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

import caseops  # data/ is on sys.path when this runs as a script

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
    """Packs one split's token stream into shards of exactly `shard_tokens` (the last may be shorter), and with
    `sidecar` each token's byte count into fineweb_<split>_bytes_* files cut the same way."""

    def __init__(self, out: Path, split: str, shard_tokens: int, sidecar: bool = False) -> None:
        self.out, self.split = out, split
        self.buf, self.fill = np.empty(shard_tokens, dtype=np.uint16), 0
        self.counts = np.empty(shard_tokens, dtype=np.uint16) if sidecar else None
        self.shards: list[str] = []
        self.sidecars: list[str] = []
        self.documents = self.tokens = self.bytes = self.sidecar_bytes = 0

    def add(self, ids: np.ndarray, text: str, counts: np.ndarray | None = None) -> None:
        self.documents += 1
        self.tokens += ids.size
        self.bytes += len(text.encode("utf-8"))
        if self.counts is not None:
            self.sidecar_bytes += int(counts.sum())
        while ids.size:
            take = min(self.buf.size - self.fill, ids.size)
            self.buf[self.fill : self.fill + take] = ids[:take]
            if self.counts is not None:
                self.counts[self.fill : self.fill + take], counts = counts[:take], counts[take:]
            self.fill, ids = self.fill + take, ids[take:]
            if self.fill == self.buf.size:
                self.flush()

    def flush(self) -> None:
        if self.fill:
            index = len(self.shards)
            self.shards.append(f"fineweb_{self.split}_{index:06d}.bin")
            write_shard(self.out / self.shards[-1], self.buf[: self.fill])
            if self.counts is not None:
                self.sidecars.append(f"fineweb_{self.split}_bytes_{index:06d}.bin")
                write_shard(self.out / self.sidecars[-1], self.counts[: self.fill])
            self.fill = 0

    def files(self) -> list[str]:
        return self.shards + self.sidecars


# ---------------------------------------------------------------------------------------------------------------
# Byte sidecars: what each token stands for in the original document

def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _skip(buf: bytes, i: int, wire: int) -> int:
    if wire == 0:
        return _varint(buf, i)[1]
    if wire == 2:
        n, i = _varint(buf, i)
        return i + n
    if wire in (1, 5):
        return i + (8 if wire == 1 else 4)
    raise ValueError(f"not a serialized SentencePieceText (wire type {wire} at byte {i})")


def piece_spans(serialized: bytes) -> list[list[int]]:
    """[id, begin, end] of every piece of a serialized SentencePieceText (what sentencepiece's
    encode(..., out_type="serialized_proto") returns, in every version): begin and end are the byte offsets of the
    piece's surface, the text it came from, in the encoded string. (Read here from the protobuf wire format: field 2
    = pieces; in a piece, 2 = id, 4 = begin, 5 = end; the protobuf package is not needed.)"""
    out, i = [], 0
    while i < len(serialized):
        key, i = _varint(serialized, i)
        if key != 0x12:  # not a piece (the text, the score)
            i = _skip(serialized, i, key & 7)
            continue
        size, i = _varint(serialized, i)
        end, piece = i + size, [0, 0, 0]
        while i < end:
            key, i = _varint(serialized, i)
            if key in (0x10, 0x20, 0x28):
                piece[{0x10: 0, 0x20: 1, 0x28: 2}[key]], i = _varint(serialized, i)
            else:
                i = _skip(serialized, i, key & 7)
        out.append(piece)
    return out


_CASEOPS_BYTES = re.compile(rb"\xee\x80\x84(\xee\x80[\x81-\x84])|\xee\x80[\x81-\x84]")  # ESC + literal | operator


def byte_counts(text: str, encoded: str, spans: list[list[int]], is_caseops: bool) -> np.ndarray:
    """The bytes of `text` that each piece of `encoded` (text itself, or its CaseOps form) stands for; they sum to
    len(text.encode()). Every byte of `encoded` counts 1 (so a letter 1 whatever its case, any other character its
    UTF-8 length) except, under CaseOps, the bytes of the operators and of ESC, which count 0 (the character after
    ESC counts in full). A piece counts the bytes its surface spans; the surfaces must tile the text, except for
    what SentencePiece drops at the two ends (whitespace), which counts with the first and last piece that stand for
    any byte. ValueError when that cannot make the sum exact (a gap inside, or a blank document)."""
    raw = encoded.encode("utf-8")
    weight = np.ones(len(raw), dtype=np.int64)
    if is_caseops:
        for m in _CASEOPS_BYTES.finditer(raw):
            weight[m.start() : m.end()] = 0
            if m.group(1):
                weight[m.start(1) : m.end(1)] = 1
    cum = np.concatenate([[0], np.cumsum(weight)])
    span = np.array(spans, dtype=np.int64).reshape(-1, 3)
    begin, end = span[:, 1], span[:, 2]
    bad = np.flatnonzero((end < begin) | (end > len(raw)) | np.r_[False, begin[1:] != end[:-1]])
    if len(bad):
        raise ValueError(f"SentencePiece's pieces do not tile its text: piece {bad[0]} spans bytes "
                         f"{begin[bad[0]]}..{end[bad[0]]} of {len(raw)}, after one that ended at "
                         f"{end[bad[0] - 1] if bad[0] else 0}")
    counts = cum[end] - cum[begin]
    edges = int(cum[begin[0]] + cum[-1] - cum[end[-1]]) if len(span) else int(cum[-1])
    if edges:
        real = np.flatnonzero(counts)
        if not len(real):
            raise ValueError(f"it is blank: {edges} bytes of whitespace SentencePiece drops, and no token to count "
                             "them with; remove blank documents from the corpus")
        counts[real[0]] += cum[begin[0]]
        counts[real[-1]] += cum[-1] - cum[end[-1]]
    if int(counts.sum()) != len(text.encode("utf-8")):
        raise ValueError(f"its byte counts sum to {int(counts.sum())}, not to its {len(text.encode('utf-8'))} bytes")
    return counts


def caseops_pieces(sp) -> list[str]:
    """The CaseOps operators the model has as pieces of their own."""
    return [op for op in caseops.OPERATORS if sp.id_to_piece(sp.piece_to_id(op)) == op]


def load_tokenizer(path: Path, is_caseops: bool):  # -> sentencepiece.SentencePieceProcessor
    import sentencepiece as spm

    if not path.is_file():
        raise ShardError(f"--tokenizer {path}: no such file", code=2)
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except Exception as exc:
        raise ShardError(f"--tokenizer {path}: not a loadable SentencePiece model ({exc})", code=2) from None
    if sp.bos_id() < 0:
        raise ShardError(f"--tokenizer {path}: the model has no BOS piece (bos_id -1)", code=2)
    ops = caseops_pieces(sp)
    if is_caseops and len(ops) < 4:
        raise ShardError(f"--tokenizer {path}: not a CaseOps tokenizer (it has {len(ops)} of the 4 operator pieces "
                         "U+E001-U+E004); --caseops needs one trained on CaseOps text with them as user-defined "
                         "symbols (--train-tokenizer V makes one)", code=2)
    if ops and not is_caseops:
        raise ShardError(f"--tokenizer {path} is a CaseOps tokenizer (it has the operator pieces U+E001-U+E004): "
                         "pass --caseops", code=2)
    return sp


def tokenizer_settings(args: argparse.Namespace, longest: int) -> dict:
    """The challenge's SentencePiece trainer settings (SPEC B1.1; the CaseOps records add the operators)."""
    settings = dict(model_type="bpe", vocab_size=args.train_tokenizer, character_coverage=0.999, byte_fallback=True,
                    split_digits=True, normalization_rule_name="nmt_nfkc", add_dummy_prefix=False, pad_id=0, bos_id=1,
                    eos_id=2, unk_id=3, hard_vocab_limit=False, max_sentence_length=max(4192, longest),
                    num_threads=args.threads or os.cpu_count() or 1, minloglevel=2)
    if args.caseops:
        settings["user_defined_symbols"] = list(caseops.OPERATORS)  # ids 4-7, never merged with text
    return settings


def train_tokenizer(args: argparse.Namespace, tmp: Path) -> tuple[Path, int]:
    """A SentencePiece BPE model of --train-tokenizer pieces, trained on (the CaseOps form of) the first
    --tokenizer-docs training documents (never a held-out one), written as tmp/tokenizer.{model,vocab}."""
    import sentencepiece as spm

    docs = read_documents(args.corpus, args.format, args.text_key)
    texts = [caseops.encode(text) if args.caseops else text
             for _, text in itertools.islice(docs, args.train_from, args.train_from + args.tokenizer_docs)]
    if not any(texts):
        raise ShardError(f"--train-tokenizer: {args.corpus} has no training document (after the first "
                         f"{args.train_from}) to train the tokenizer on", code=2)
    try:  # every document whole: SentencePiece would skip the ones over 4192 bytes
        spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(tmp / "tokenizer"),
                                       **tokenizer_settings(args, max(len(t.encode("utf-8")) for t in texts)))
    except (RuntimeError, OSError) as exc:
        raise ShardError(f"--train-tokenizer {args.train_tokenizer}: SentencePiece could not train on "
                         f"{len(texts)} documents ({' '.join(str(exc).split())[:200]})", code=2) from None
    size = spm.SentencePieceProcessor(model_file=str(tmp / "tokenizer.model")).vocab_size()
    if size != args.train_tokenizer:
        raise ShardError(f"--train-tokenizer {args.train_tokenizer}: the {len(texts)} training documents give only "
                         f"{size} pieces; ask for at most {size}, or give it more text", code=2)
    return tmp / "tokenizer.model", len(texts)


def doc_key(text: str) -> bytes:
    """A document's identity for the overlap check: its text with runs of whitespace as one space, hashed."""
    return hashlib.blake2b(" ".join(text.split()).encode("utf-8"), digest_size=16).digest()


def encode_batch(sp, docs: list[tuple[int, str]], with_counts: bool, args: argparse.Namespace) -> list[tuple]:
    """(ids, per-token original bytes or None) of each (line, text); under --caseops its CaseOps form is encoded
    (and checked to decode back to the text)."""
    threads = args.threads or os.cpu_count() or 1
    forms = [caseops.encode(text) for _, text in docs] if args.caseops else [text for _, text in docs]
    if not with_counts:
        return [(ids, None) for ids in sp.encode(forms, out_type=int, num_threads=threads)]
    out = []
    for (line_no, text), form, proto in zip(docs, forms, sp.encode(forms, out_type="serialized_proto",
                                                                    num_threads=threads)):
        spans = piece_spans(proto)
        try:
            if args.caseops and caseops.decode(form) != text:
                raise ValueError("its CaseOps form does not decode back to it")
            out.append(([s[0] for s in spans], byte_counts(text, form, spans, args.caseops)))
        except ValueError as exc:
            raise ShardError(f"{args.corpus}: document at line {line_no}: {exc}") from None
    return out


def make_shards(args: argparse.Namespace, sp, tmp: Path) -> tuple[SplitWriter, SplitWriter, int]:
    """Encode the corpus into val then train shards in `tmp`, in batches of 256 documents. The documents from
    --val-docs to --train-from are in neither split; no training document may have the text of one before it.
    Returns the two splits and the number of documents in neither."""
    from tqdm import tqdm

    sidecar = args.caseops or args.byte_sidecar
    val, train = SplitWriter(tmp, "val", args.shard_tokens, sidecar), SplitWriter(tmp, "train", args.shard_tokens)
    held_out: dict[bytes, tuple[int, str]] = {}  # every document before --train-from: key -> (line, which)
    index = skipped = 0
    docs = read_documents(args.corpus, args.format, args.text_key)
    bar = tqdm(desc="documents", unit="doc", disable=True if args.no_progress else None)
    while batch := list(itertools.islice(docs, 256)):
        roles = ["val" if i < args.val_docs else "held" if i < args.train_from else "train"
                 for i in range(index, index + len(batch))]
        index += len(batch)
        for (line_no, text), role in zip(batch, roles):
            key = doc_key(text)
            if role != "train":
                held_out.setdefault(key, (line_no, "validation" if role == "val" else "before --train-from"))
            elif key in held_out:
                raise ShardError(f"{args.corpus}: training document at line {line_no} has the text of the document "
                                 f"at line {held_out[key][0]} ({held_out[key][1]}): a held-out document would be "
                                 "trained on; remove the duplicate from the corpus")
        encoded = {}
        for role in ("val", "train"):
            picked = [i for i, r in enumerate(roles) if r == role]
            encoded.update(zip(picked, encode_batch(sp, [batch[i] for i in picked], sidecar and role == "val", args)))
        for i, ((line_no, text), role) in enumerate(zip(batch, roles)):
            if role == "held":
                skipped += 1
                continue
            ids, counts = encoded[i]
            ids = np.array([sp.bos_id(), *ids], dtype=np.int64)
            if ids.max() > MAX_TOKEN_ID:
                raise ShardError(f"{args.corpus}: document at line {line_no}: token id {ids.max()} does not fit in "
                                 f"uint16 (a tokenizer of at most 65536 pieces is needed)")
            if counts is not None and counts.max(initial=0) > MAX_TOKEN_ID:
                raise ShardError(f"{args.corpus}: document at line {line_no}: one token stands for "
                                 f"{counts.max()} bytes, more than a uint16 sidecar holds")
            writer = val if role == "val" else train
            if writer is train and val.fill:
                val.flush()  # the split switch closes the last validation shard
            writer.add(ids.astype(np.uint16), text, None if counts is None else np.r_[0, counts].astype(np.uint16))
        bar.update(len(batch))
    bar.close()
    val.flush()
    train.flush()
    return val, train, skipped


TOKENIZER_FILES = ("tokenizer.model", "tokenizer.vocab")  # what --train-tokenizer writes into --out


def run(args: argparse.Namespace) -> None:
    if not args.corpus.is_file():
        raise ShardError(f"{args.corpus}: no such corpus file")
    if args.out.exists() and not args.out.is_dir():
        raise ShardError(f"--out {args.out} exists and is not a folder", code=2)
    old = sorted(p for split in ("train", "val") for p in args.out.glob(f"fineweb_{split}_*.bin"))
    if args.train_tokenizer:
        old += [args.out / name for name in TOKENIZER_FILES if (args.out / name).exists()]
    if old and not args.overwrite:
        raise ShardError(f"--out {args.out} already holds {len(old)} shards or tokenizer files ({old[0].name}, ...); "
                         "pass --overwrite to replace them", code=2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.make_shards{os.getpid()}")
    tmp.mkdir()
    try:
        if args.train_tokenizer:
            model, tokenizer_docs = train_tokenizer(args, tmp)
        sp = load_tokenizer(model if args.train_tokenizer else args.tokenizer, args.caseops)
        val, train, skipped = make_shards(args, sp, tmp)
        total = val.documents + train.documents + skipped
        if not total:
            raise ShardError(f"{args.corpus}: no documents")
        if not train.documents:
            fix = f"e.g. --val-docs {max(1, round(total / 10))}" if total > 1 else "it needs at least 2 documents"
            raise ShardError(f"{args.corpus} has {total} document(s) and --val-docs is {args.val_docs}"
                             f"{f', --train-from {args.train_from}' if args.train_from != args.val_docs else ''}: "
                             f"no training document, no train shard; pass --val-docs below {total}, {fix}", code=2)
        written = val.files() + train.files() + (list(TOKENIZER_FILES) if args.train_tokenizer else [])
        if args.out.is_dir():
            for path in old:
                path.unlink()
            for name in written:
                os.replace(tmp / name, args.out / name)
        else:
            os.replace(tmp, args.out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for w in (val, train):
        print(f"{w.split}: documents={w.documents} tokens={w.tokens} bytes={w.bytes} shards={len(w.shards)}")
    if skipped:
        print(f"held out: documents={skipped} (between --val-docs and --train-from: in no shard, and no training "
              "document has the text of one)")
    if val.sidecars:
        print(f"val byte sidecars: files={len(val.sidecars)} bytes={val.sidecar_bytes} (each document's original "
              f"UTF-8 bytes, checked one by one{'; CaseOps operators 0' if args.caseops else ''})")
    if args.train_tokenizer:
        print(f"tokenizer: {args.out / TOKENIZER_FILES[0]} vocab={args.train_tokenizer} trained on {tokenizer_docs} "
              f"training documents{' (CaseOps text; operators at ids 4-7)' if args.caseops else ''}")
    print(f"wrote {len(val.shards) + len(train.shards)} shards to {args.out}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Tokenise a JSONL or plain-text corpus with a SentencePiece model into "
                                "challenge-format shards (the first K documents: validation); optionally in CaseOps "
                                "form with byte sidecars, and with a tokenizer trained here on the training documents.")
    p.add_argument("corpus", type=Path, help='JSONL ({"text": ...} per line) or plain text (blank-line separated)')
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer", type=Path, metavar="MODEL", help="SentencePiece .model file")
    tok.add_argument("--train-tokenizer", type=int, metavar="V",
                     help="train a SentencePiece BPE model of V pieces on the training documents (the challenge's "
                     "settings) and write it as DIR/tokenizer.model")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for the shards")
    p.add_argument("--val-docs", type=int, default=50_000, metavar="K",
                   help="the first K documents form the validation split (default: %(default)s, as the challenge)")
    p.add_argument("--train-from", type=int, metavar="J",
                   help="training documents start at document J >= K; those in between are in no shard, e.g. "
                   "--val-docs 10000 --train-from 50000 keeps all of the challenge's 50,000 validation documents "
                   "out of training (default: K)")
    p.add_argument("--caseops", action="store_true",
                   help="tokenise the CaseOps form of each document (data/caseops.py) and write byte sidecars "
                   "fineweb_val_bytes_*.bin; the tokenizer must have the four operator pieces")
    p.add_argument("--byte-sidecar", action="store_true",
                   help="write the byte sidecars for plain text too (each token's bytes of the original document)")
    p.add_argument("--tokenizer-docs", type=int, default=100_000, metavar="N",
                   help="--train-tokenizer trains on the first N training documents (default: %(default)s)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, metavar="N",
                   help="tokens per shard; the last of each split may be shorter (default: %(default)s)")
    p.add_argument("--format", choices=("auto", "jsonl", "text"), default="auto", help="input format (default: auto)")
    p.add_argument("--text-key", default="text", help="JSONL field holding the document (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace the shards (and tokenizer) already in --out")
    p.add_argument("--threads", type=int, default=0, help="encoder and trainer threads (default: 0, all cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.val_docs < 0 or not 1 <= args.shard_tokens < 2**31 or args.threads < 0:
        p.error("--val-docs and --threads must be >= 0, --shard-tokens in [1, 2**31)")
    args.train_from = args.val_docs if args.train_from is None else args.train_from
    if args.train_from < args.val_docs:
        p.error(f"--train-from {args.train_from} must be >= --val-docs {args.val_docs}: a validation document "
                "would be trained on")
    if args.train_tokenizer is not None and not 260 <= args.train_tokenizer <= MAX_TOKEN_ID + 1:
        p.error(f"--train-tokenizer {args.train_tokenizer}: expected a vocabulary size in [260, 65536] (4 special "
                "pieces, 256 byte pieces, the operators, then merges)")
    if args.tokenizer_docs < 1:
        p.error(f"--tokenizer-docs {args.tokenizer_docs}: expected a count >= 1")
    try:
        run(args)
    except ShardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
