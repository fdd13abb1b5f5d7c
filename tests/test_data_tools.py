"""Tests for data/make_shards.py and data/cached_challenge_fineweb.py (CPU, offline, a few seconds).

The real-tokenizer tests read ../shared/data (override with PG_SHARED_DATA) and skip when it is absent;
everything else trains a tiny SentencePiece model in the test and fakes the Hugging Face hub.
"""
from __future__ import annotations

import importlib.util
import io
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("PG_SHARED_DATA", REPO.parent / "shared" / "data"))
REAL_MODEL = SHARED / "fineweb_1024_bpe.model"
REAL_DOCS = SHARED / "fineweb_docs_200.jsonl"


def _load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"data_{name}", REPO / "data" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


ms = _load_script("make_shards")
ccf = _load_script("cached_challenge_fineweb")


# ----------------------------------------------------------------------------------------------------------
# helpers and fixtures


def read_shard(path: Path) -> np.ndarray:
    """Independent reader: header checks of SPEC B1.2, then the uint16 body."""
    raw = path.read_bytes()
    header = np.frombuffer(raw[:1024], dtype="<i4")
    assert header.size == 256, path
    assert int(header[0]) == 20240520 and int(header[1]) == 1, path
    assert not header[3:].any(), path
    n = int(header[2])
    assert len(raw) == 1024 + 2 * n, path
    return np.frombuffer(raw[1024:], dtype="<u2")


@pytest.fixture(scope="session")
def train_gpt() -> ModuleType:
    if not (REPO / "train_gpt.py").is_file():
        pytest.skip("train_gpt.py is not in this checkout yet; its shard reader cannot be checked")
    import train_gpt as module

    return module


def shard_read_error(train_gpt: ModuleType) -> tuple[type[BaseException], ...]:
    return tuple({ValueError, getattr(train_gpt, "InputError", ValueError)})


WORDS = "the of and golf ball par green tee club swing putt eagle birdie café naïve 東京 😀 1234 x-ray".split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 25))) for _ in range(rng.randint(1, 4))]
        docs.append("\n".join(lines))
    return docs


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ~300-piece byte-fallback BPE model shaped like the challenge tokenizer (pad 0, bos 1, eos 2, unk 3)."""
    import sentencepiece as spm

    path = tmp_path_factory.mktemp("tok") / "tiny_bpe.model"
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(make_docs(400, seed=123)),
        model_writer=buf,
        model_type="bpe",
        vocab_size=300,
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        add_dummy_prefix=False,
        hard_vocab_limit=False,
        pad_id=0,
        bos_id=1,
        eos_id=2,
        unk_id=3,
        minloglevel=2,
    )
    path.write_bytes(buf.getvalue())
    return path


def sp_load(path: Path) -> Any:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(path))


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return path


def split_docs(stream: np.ndarray, bos: int) -> list[np.ndarray]:
    starts = np.flatnonzero(stream == bos)
    assert starts.size and starts[0] == 0, "the stream must open with a BOS"
    return np.split(stream, starts[1:])


def parse_counts(out: str) -> dict[str, dict[str, int]]:
    counts = {}
    for line in out.splitlines():
        split, sep, rest = line.partition(": ")
        if split in ("val", "train") and sep:
            counts[split] = {k: int(v) for k, v in (kv.split("=") for kv in rest.split())}
    return counts


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected exactly one line on stderr, got {lines!r}"
    return lines[0]


def check_corpus_shards(out: Path, model: Path, docs: list[str], val_docs: int, shard_tokens: int, stdout: str) -> None:
    sp = sp_load(model)
    bos = sp.bos_id()
    val_files = sorted(out.glob("fineweb_val_*.bin"))
    train_files = sorted(out.glob("fineweb_train_*.bin"))
    assert {p.name for p in out.iterdir()} == {p.name for p in val_files + train_files}, "stray files in --out"
    expected_counts = {}
    for split, files, texts in (("val", val_files, docs[:val_docs]), ("train", train_files, docs[val_docs:])):
        shards = [read_shard(p) for p in files]
        assert [p.name for p in files] == [f"fineweb_{split}_{i:06d}.bin" for i in range(len(files))]
        assert all(s.size == shard_tokens for s in shards[:-1]), "every shard but the last is full"
        assert all(0 < s.size <= shard_tokens for s in shards)
        stream = np.concatenate(shards) if shards else np.zeros(0, np.uint16)
        if texts:
            assert stream[0] == bos, f"{split} split must start with a BOS (no shard sharing across splits)"
        assert int((stream == bos).sum()) == len(texts), "one BOS per document"
        assert sp.eos_id() not in set(stream.tolist()), "no EOS is appended"
        pieces = split_docs(stream, bos) if texts else []
        assert len(pieces) == len(texts)
        for text, ids in zip(texts, pieces, strict=True):
            assert ids[1:].tolist() == sp.encode(text), "shard ids are the document's encoding"
            assert sp.decode(ids[1:].tolist()) == sp.normalize(text).replace("\u2581", " ")
        expected_counts[split] = {
            "documents": len(texts),
            "tokens": int(stream.size),
            "bytes": sum(len(t.encode("utf-8")) for t in texts),
            "shards": len(files),
        }
    assert parse_counts(stdout) == expected_counts


def no_temp_leftovers(folder: Path) -> None:
    if folder.is_dir():
        left = [p.name for p in folder.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]
        assert not left, f"temporary files left behind: {left}"


# ----------------------------------------------------------------------------------------------------------
# make_shards


def test_write_shard_roundtrip_and_reader(tmp_path: Path, train_gpt: ModuleType) -> None:
    ids = np.array([1, 0, 65535, 7, 1023], dtype=np.int64)
    path = tmp_path / "fineweb_val_000000.bin"
    ms.write_shard(path, ids)
    assert path.stat().st_size == 1024 + 2 * ids.size
    assert read_shard(path).tolist() == ids.tolist()
    got = train_gpt.load_data_shard(str(path))
    assert got.dtype == np.uint16 and got.tolist() == ids.tolist()
    with pytest.raises(ValueError):
        ms.write_shard(tmp_path / "bad.bin", np.array([65536]))
    assert not (tmp_path / "bad.bin").exists() and not list(tmp_path.glob("*.tmp"))


def test_make_shards_tiny_tokenizer(tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture) -> None:
    docs = make_docs(60, seed=7)
    docs[5] = ""  # an empty document still gets its BOS
    corpus = write_jsonl(tmp_path / "corpus.jsonl", docs)
    out = tmp_path / "shards"
    rc = ms.main([str(corpus), "--tokenizer", str(tiny_model), "--out", str(out), "--val-docs", "9",
                  "--shard-tokens", "300", "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    check_corpus_shards(out, tiny_model, docs, 9, 300, captured.out)
    assert len(list(out.glob("fineweb_val_*.bin"))) >= 2 and len(list(out.glob("fineweb_train_*.bin"))) >= 2
    no_temp_leftovers(tmp_path)


def test_make_shards_read_by_train_gpt(tmp_path: Path, tiny_model: Path, train_gpt: ModuleType,
                                       capsys: pytest.CaptureFixture) -> None:
    corpus = write_jsonl(tmp_path / "c.jsonl", make_docs(30, seed=3))
    out = tmp_path / "shards"
    assert ms.main([str(corpus), "--tokenizer", str(tiny_model), "--out", str(out), "--val-docs", "5",
                    "--shard-tokens", "500", "--no-progress"]) == 0
    capsys.readouterr()
    for path in sorted(out.glob("*.bin")):
        got = train_gpt.load_data_shard(str(path))
        assert got.dtype == np.uint16
        assert np.array_equal(got, read_shard(path))
    victim = sorted(out.glob("fineweb_train_*.bin"))[0]
    victim.write_bytes(victim.read_bytes()[:-2])  # one token short
    with pytest.raises(shard_read_error(train_gpt)) as info:
        train_gpt.load_data_shard(str(victim))
    assert victim.name in str(info.value)


def test_make_shards_plain_text(tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture) -> None:
    docs = make_docs(12, seed=11)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n" + "\n\n\n".join(docs) + "\n", encoding="utf-8")  # blank lines separate documents
    out = tmp_path / "out"
    rc = ms.main([str(corpus), "--tokenizer", str(tiny_model), "--out", str(out), "--val-docs", "4",
                  "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    check_corpus_shards(out, tiny_model, docs, 4, ms.DEFAULT_SHARD_TOKENS, captured.out)


@pytest.mark.parametrize("val_args, n_docs", [([], 5), (["--val-docs", "5"], 5), (["--val-docs", "3"], 1)],
                         ids=["default-50000", "equal-to-corpus", "single-document"])
def test_make_shards_all_validation_is_an_error(tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture,
                                                val_args: list[str], n_docs: int) -> None:
    corpus = write_jsonl(tmp_path / "c.jsonl", make_docs(n_docs))
    out = tmp_path / "out"
    rc = ms.main([str(corpus), "--tokenizer", str(tiny_model), "--out", str(out), *val_args, "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == ""
    line = one_error_line(captured.err)
    val_docs = val_args[1] if val_args else "50000"
    assert f"has {n_docs} document" in line and f"--val-docs is {val_docs}" in line and "no train shard" in line
    if n_docs == 5:
        assert line.endswith("pass --val-docs K with K < 5, e.g. --val-docs 1")
    else:
        assert "at least 2 documents" in line
    assert not out.exists(), "nothing may be written"
    no_temp_leftovers(tmp_path)


def test_make_shards_all_validation_keeps_old_shards(tmp_path: Path, tiny_model: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    big = write_jsonl(tmp_path / "big.jsonl", make_docs(40))
    assert ms.main([str(big), "--tokenizer", str(tiny_model), "--out", str(out), "--val-docs", "4",
                    "--no-progress"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    small = write_jsonl(tmp_path / "small.jsonl", make_docs(20))
    capsys.readouterr()
    assert ms.main([str(small), "--tokenizer", str(tiny_model), "--out", str(out), "--overwrite",
                    "--no-progress"]) == 2
    assert "e.g. --val-docs 2" in one_error_line(capsys.readouterr().err)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    no_temp_leftovers(tmp_path)


@pytest.mark.parametrize("val_docs, shard_tokens, expected", [("0", "100000000", "wrote 1 shard to"),
                                                               ("2", "100000000", "wrote 2 shards to")])
def test_make_shards_counts_shards_in_words(tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture,
                                           val_docs: str, shard_tokens: str, expected: str) -> None:
    corpus = write_jsonl(tmp_path / "c.jsonl", make_docs(8))
    out = tmp_path / "out"
    assert ms.main([str(corpus), "--tokenizer", str(tiny_model), "--out", str(out), "--val-docs", val_docs,
                    "--shard-tokens", shard_tokens, "--no-progress"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == f"{expected} {out}"
    assert len(list(out.iterdir())) == int(expected.split()[1])


@pytest.mark.skipif(not (REAL_MODEL.is_file() and REAL_DOCS.is_file()),
                    reason=f"real tokenizer/docs not found under {SHARED} (set PG_SHARED_DATA)")
def test_make_shards_real_tokenizer(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    docs = [json.loads(line)["text"] for line in REAL_DOCS.read_text(encoding="utf-8").splitlines() if line.strip()]
    out = tmp_path / "fineweb10B_sp1024"
    rc = ms.main([str(REAL_DOCS), "--tokenizer", str(REAL_MODEL), "--out", str(out), "--val-docs", "20",
                  "--shard-tokens", "100000", "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert sp_load(REAL_MODEL).bos_id() == 1
    check_corpus_shards(out, REAL_MODEL, docs, 20, 100_000, captured.out)
    counts = parse_counts(captured.out)
    assert counts["val"]["documents"] + counts["train"]["documents"] == len(docs) == 200


@pytest.mark.skipif(not (REAL_MODEL.is_file() and REAL_DOCS.is_file()),
                    reason=f"real tokenizer/docs not found under {SHARED} (set PG_SHARED_DATA)")
def test_make_shards_real_corpus_with_default_val_docs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "fineweb10B_sp1024"
    rc = ms.main([str(REAL_DOCS), "--tokenizer", str(REAL_MODEL), "--out", str(out), "--no-progress"])
    assert rc == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == (f"make_shards.py: error: corpus {REAL_DOCS} has 200 documents and --val-docs is 50000, so all of "
                    "them would be validation and no train shard would be written; pass --val-docs K with K < 200, "
                    "e.g. --val-docs 20")
    assert not out.exists()
    no_temp_leftovers(tmp_path)


def _bad_json(tmp: Path) -> Path:
    p = tmp / "bad.jsonl"
    p.write_text('{"text": "fine"}\n\n{"text": "also fine"}\n{"text": broken}\n', encoding="utf-8")
    return p


def _empty(tmp: Path) -> Path:
    p = tmp / "empty.jsonl"
    p.write_text("\n  \n", encoding="utf-8")
    return p


def _missing_key(tmp: Path) -> Path:
    p = tmp / "nokey.jsonl"
    p.write_text('{"text": "ok"}\n{"body": "no text"}\n', encoding="utf-8")
    return p


def _not_utf8(tmp: Path) -> Path:
    p = tmp / "latin1.txt"
    p.write_bytes(b"first doc\n\ncaf\xe9\n")
    return p


@pytest.mark.parametrize(
    "make_corpus, expected",
    [
        (lambda tmp: tmp / "nope.jsonl", ["nope.jsonl", "does not exist"]),
        (_bad_json, ["bad.jsonl:4:", "bad JSON"]),
        (_empty, ["no documents"]),
        (_missing_key, ["nokey.jsonl:2:", "'text'"]),
        (_not_utf8, ["latin1.txt:3:", "UTF-8"]),
    ],
    ids=["missing", "bad-json", "empty", "missing-key", "not-utf8"],
)
def test_make_shards_corpus_errors(tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture,
                                   make_corpus: Any, expected: list[str]) -> None:
    corpus = make_corpus(tmp_path)
    out = tmp_path / "out"
    rc = ms.main([str(corpus), "--tokenizer", str(tiny_model), "--out", str(out), "--val-docs", "1",
                  "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 1
    line = one_error_line(captured.err)
    for piece in expected:
        assert piece in line, line
    assert not out.exists(), "nothing may be written on failure"
    no_temp_leftovers(tmp_path)


def test_make_shards_token_id_too_large(tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    class HugeVocab:
        def vocab_size(self) -> int:
            return 1024

        def bos_id(self) -> int:
            return 1

        def encode(self, texts: list[str], **_: Any) -> list[list[int]]:
            return [[70000 if "boom" in t else 5] for t in texts]

    monkeypatch.setattr(ms, "load_tokenizer", lambda path: HugeVocab())
    corpus = write_jsonl(tmp_path / "c.jsonl", ["a", "b", "boom", "c"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("unrelated")
    rc = ms.main([str(corpus), "--tokenizer", str(tiny_model), "--out", str(out), "--val-docs", "1",
                  "--shard-tokens", "1", "--no-progress"])
    line = one_error_line(capsys.readouterr().err)
    assert rc == 1 and "70000" in line and "line 3" in line
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"], "no shard may appear on failure"
    no_temp_leftovers(tmp_path)


def test_make_shards_refuses_to_mix_with_old_shards(tmp_path: Path, tiny_model: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    args = [str(write_jsonl(tmp_path / "c.jsonl", make_docs(10))), "--tokenizer", str(tiny_model), "--out", str(out),
            "--val-docs", "2", "--shard-tokens", "100", "--no-progress"]
    assert ms.main(args) == 0
    before = sorted(p.name for p in out.iterdir())
    capsys.readouterr()
    assert ms.main(args) == 1
    assert "--overwrite" in one_error_line(capsys.readouterr().err)
    # --overwrite with a bigger shard size leaves no stale shards of the earlier run
    assert ms.main([*args[:-2], "1000000", "--overwrite", "--no-progress"]) == 0
    after = sorted(p.name for p in out.iterdir())
    assert len(before) > 2 and after == ["fineweb_train_000000.bin", "fineweb_val_000000.bin"]


@pytest.mark.parametrize("bad", [["--shard-tokens", "0"], ["--val-docs", "-1"], ["--shard-tokens", "many"]])
def test_make_shards_bad_arguments(tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture,
                                   bad: list[str]) -> None:
    rc = ms.main([str(tmp_path / "c.jsonl"), "--tokenizer", str(tiny_model), "--out", str(tmp_path / "o"), *bad])
    assert rc == 2
    assert bad[0] in one_error_line(capsys.readouterr().err)


def test_make_shards_missing_tokenizer(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    corpus = write_jsonl(tmp_path / "c.jsonl", ["x"])
    assert ms.main([str(corpus), "--tokenizer", str(tmp_path / "no.model"), "--out", str(tmp_path / "o")]) == 1
    assert "no.model" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("script", ["make_shards.py", "cached_challenge_fineweb.py"])
def test_cli_help(script: str) -> None:
    res = subprocess.run([sys.executable, str(REPO / "data" / script), "--help"], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0 and "usage:" in res.stdout, res.stderr


# ----------------------------------------------------------------------------------------------------------
# cached_challenge_fineweb with a fake hub


class FakeHub:
    """Serves files from a local copy of the dataset repo in place of huggingface_hub.hf_hub_download."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.calls: list[str] = []
        self.fail: BaseException | None = None

    def __call__(self, repo_id: str, filename: str, *, subfolder: str | None = None, repo_type: str | None = None,
                 revision: str | None = None, local_dir: str | Path | None = None, **_: Any) -> str:
        assert repo_id == ccf.DEFAULT_REPO_ID and repo_type == "dataset" and local_dir is not None
        rel = f"{subfolder}/{filename}" if subfolder else filename
        self.calls.append(rel)
        if self.fail is not None:
            raise self.fail
        src = self.root / rel
        if not src.is_file():
            from huggingface_hub.errors import EntryNotFoundError

            raise EntryNotFoundError(f"404 {rel}")
        dest = Path(local_dir) / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        return str(dest)


N_TRAIN_PUBLISHED = 5


@pytest.fixture
def hub(tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    root = tmp_path / "hub"
    shard_dir = root / "datasets" / "datasets" / "fineweb10B_sp1024"
    shard_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    ms.write_shard(shard_dir / "fineweb_val_000000.bin", rng.integers(0, 1024, 333))
    for i in range(N_TRAIN_PUBLISHED):
        ms.write_shard(shard_dir / f"fineweb_train_{i:06d}.bin", rng.integers(0, 1024, 1000 + i))
    tok_dir = root / "datasets" / "tokenizers"
    tok_dir.mkdir()
    shutil.copyfile(tiny_model, tok_dir / "fineweb_1024_bpe.model")
    (tok_dir / "fineweb_1024_bpe.vocab").write_text("<pad>\t0\n<s>\t0\n", encoding="utf-8")
    manifest = {
        "version": "test",
        "datasets": [
            {"name": "fineweb10B_sp1024", "tokenizer_name": "fineweb_1024_bpe",
             "stats": {"files_train": N_TRAIN_PUBLISHED, "files_val": 1, "tokens_val": 333}},
            {"name": "fineweb10B_sp4096", "tokenizer_name": "fineweb_4096_bpe",
             "stats": {"files_train": 3, "files_val": 1}},
        ],
        "tokenizers": [
            {"name": "fineweb_1024_bpe", "model_path": "tokenizers/fineweb_1024_bpe.model",
             "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"},
            {"name": "fineweb_4096_bpe", "model_path": "tokenizers/fineweb_4096_bpe.model"},
        ],
    }
    (root / "datasets" / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    fake = FakeHub(root)
    monkeypatch.setattr(ccf, "hf_hub_download", fake)
    return fake


def download(out: Path, *extra: str) -> int:
    return ccf.main(["--variant", "sp1024", "--out", str(out), "--no-progress", *extra])


def expected_files(n_train: int) -> list[str]:
    d = "datasets/fineweb10B_sp1024"
    return sorted([
        "manifest.json", f"{d}/fineweb_val_000000.bin",
        *(f"{d}/fineweb_train_{i:06d}.bin" for i in range(n_train)),
        "tokenizers/fineweb_1024_bpe.model", "tokenizers/fineweb_1024_bpe.vocab",
    ])


def local_files(out: Path) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())


def assert_same_as_hub(out: Path, hub: FakeHub) -> None:
    for rel in local_files(out):
        assert (out / rel).read_bytes() == (hub.root / "datasets" / rel).read_bytes(), rel


def test_download_fresh_then_skip(tmp_path: Path, hub: FakeHub, capsys: pytest.CaptureFixture,
                                  train_gpt: ModuleType) -> None:
    out = tmp_path / "data"
    assert download(out, "--train-shards", "3") == 0, capsys.readouterr().err
    assert local_files(out) == expected_files(3)
    assert_same_as_hub(out, hub)
    assert len(hub.calls) == 7 and hub.calls[0] == "datasets/manifest.json"
    assert "datasets/datasets/fineweb10B_sp1024/fineweb_train_000003.bin" not in hub.calls
    no_temp_leftovers(out)
    for shard in (out / "datasets" / "fineweb10B_sp1024").glob("*.bin"):
        assert train_gpt.load_data_shard(str(shard)).size in (333, 1000, 1001, 1002)

    hub.calls.clear()
    assert download(out, "--train-shards", "3") == 0
    assert hub.calls == [], "complete files are not fetched again"
    assert "0 to download" in capsys.readouterr().out

    assert download(out, "--train-shards", "5") == 0  # asking for more fetches only the new ones
    assert hub.calls == [f"datasets/datasets/fineweb10B_sp1024/fineweb_train_{i:06d}.bin" for i in (3, 4)]
    assert local_files(out) == expected_files(5)


def test_download_replaces_damaged_files(tmp_path: Path, hub: FakeHub, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "data"
    assert download(out, "--train-shards", "3") == 0
    shard_dir = out / "datasets" / "fineweb10B_sp1024"
    train1 = shard_dir / "fineweb_train_000001.bin"
    train1.write_bytes(train1.read_bytes()[:1500])  # an interrupted copy
    val = shard_dir / "fineweb_val_000000.bin"
    raw = bytearray(val.read_bytes())
    raw[0:4] = (123).to_bytes(4, "little")  # bad magic
    val.write_bytes(bytes(raw))
    (out / "tokenizers" / "fineweb_1024_bpe.model").write_bytes(b"")
    hub.calls.clear()
    assert download(out, "--train-shards", "3") == 0, capsys.readouterr().err
    assert sorted(hub.calls) == sorted([
        "datasets/datasets/fineweb10B_sp1024/fineweb_val_000000.bin",
        "datasets/datasets/fineweb10B_sp1024/fineweb_train_000001.bin",
        "datasets/tokenizers/fineweb_1024_bpe.model",
    ])
    assert local_files(out) == expected_files(3)
    assert_same_as_hub(out, hub)
    no_temp_leftovers(out)


@pytest.mark.parametrize("damage", ["magic", "truncated"])
def test_download_rejects_bad_shard_from_hub(tmp_path: Path, hub: FakeHub, capsys: pytest.CaptureFixture,
                                             damage: str) -> None:
    bad = hub.root / "datasets" / "datasets" / "fineweb10B_sp1024" / "fineweb_train_000001.bin"
    raw = bytearray(bad.read_bytes())
    if damage == "magic":
        raw[0:4] = (20240519).to_bytes(4, "little")
    else:
        raw = raw[:-10]
    bad.write_bytes(bytes(raw))
    out = tmp_path / "data"
    assert download(out, "--train-shards", "3") == 1
    line = one_error_line(capsys.readouterr().err)
    assert "fineweb_train_000001.bin" in line and ("magic" in line if damage == "magic" else "bytes" in line)
    assert not (out / "datasets" / "fineweb10B_sp1024" / "fineweb_train_000001.bin").exists()
    assert not (out / "datasets" / "fineweb10B_sp1024" / "fineweb_train_000002.bin").exists()
    no_temp_leftovers(out)
    no_temp_leftovers(out / "datasets" / "fineweb10B_sp1024")


def _offline_error() -> BaseException:
    from huggingface_hub.errors import LocalEntryNotFoundError

    return LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub ...")


@pytest.mark.parametrize(
    "error, expected",
    [(_offline_error, "cannot reach the Hugging Face hub"),
     (lambda: ConnectionError("[Errno -2] Name or service not known"), "Name or service not known")],
    ids=["hub-offline", "connection-error"],
)
def test_download_unreachable_hub(tmp_path: Path, hub: FakeHub, capsys: pytest.CaptureFixture,
                                  error: Any, expected: str) -> None:
    hub.fail = error()
    out = tmp_path / "data"
    assert download(out) == 1
    line = one_error_line(capsys.readouterr().err)
    assert expected in line and "manifest.json" in line
    assert not out.exists(), "a failed first run leaves nothing behind"


def test_download_offline_with_complete_local_copy(tmp_path: Path, hub: FakeHub) -> None:
    out = tmp_path / "data"
    assert download(out, "--train-shards", "2") == 0
    hub.fail = _offline_error()
    hub.calls.clear()
    assert download(out, "--train-shards", "2") == 0, "nothing to fetch: no need for the network"
    assert hub.calls == []


def test_download_unknown_variant(tmp_path: Path, hub: FakeHub, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "data"
    assert ccf.main(["--variant", "sp999", "--out", str(out), "--no-progress"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "unknown variant 'sp999'" in line and "sp1024" in line and "sp4096" in line
    assert not (out / "datasets").exists()
    hub.calls.clear()
    assert ccf.main(["--variant", "../etc", "--out", str(out), "--no-progress"]) == 1
    assert "unknown variant" in one_error_line(capsys.readouterr().err)
    assert hub.calls == []


@pytest.mark.parametrize("value, rc, expected", [("-1", 2, "--train-shards"), ("lots", 2, "--train-shards"),
                                                 ("6", 1, "5 training shards")])
def test_download_bad_train_shards(tmp_path: Path, hub: FakeHub, capsys: pytest.CaptureFixture,
                                   value: str, rc: int, expected: str) -> None:
    out = tmp_path / "data"
    assert download(out, "--train-shards", value) == rc
    assert expected in one_error_line(capsys.readouterr().err)
    assert not (out / "datasets").exists()


def test_download_manifest_layout_errors(tmp_path: Path, hub: FakeHub, capsys: pytest.CaptureFixture) -> None:
    path = hub.root / "datasets" / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["tokenizers"]
    path.write_text(json.dumps(manifest))
    assert download(tmp_path / "data") == 1
    assert "'tokenizers' list" in one_error_line(capsys.readouterr().err)

    with pytest.raises(ccf.DownloadError, match="stats.files_train"):
        ccf.parse_manifest({"datasets": [{"name": "fineweb10B_sp1024", "tokenizer_name": "t",
                                          "stats": {"files_val": 1}}], "tokenizers": []}, "sp1024")
    with pytest.raises(ccf.DownloadError, match="relative path"):
        ccf.parse_manifest({"datasets": [{"name": "fineweb10B_sp1024", "tokenizer_name": "t",
                                          "stats": {"files_val": 1, "files_train": 1}}],
                            "tokenizers": [{"name": "t", "model_path": "../../etc/passwd"}]}, "sp1024")


# ----------------------------------------------------------------------------------------------------------
# the real huggingface_hub client against a loopback server that speaks enough of the hub's protocol


def _serve_repo(root: Path) -> tuple[Any, str]:
    import hashlib
    import http.server
    import threading
    from urllib.parse import unquote

    prefix = f"/datasets/{ccf.DEFAULT_REPO_ID}/resolve/main/"

    class Handler(http.server.BaseHTTPRequestHandler):
        def _reply(self, with_body: bool) -> None:
            path = unquote(self.path.split("?", 1)[0])
            target = root / path[len(prefix):] if path.startswith(prefix) else None
            self.send_response(200 if target is not None and target.is_file() else 404)
            self.send_header("X-Repo-Commit", "0" * 40)
            if target is None or not target.is_file():
                self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            data = target.read_bytes()
            self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if with_body:
                self.wfile.write(data)

        def do_HEAD(self) -> None:  # noqa: N802
            self._reply(False)

        def do_GET(self) -> None:  # noqa: N802
            self._reply(True)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def test_download_through_real_client(tmp_path: Path, hub: FakeHub) -> None:
    server, endpoint = _serve_repo(hub.root)
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and "proxy" not in k.lower()}
        env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf_home"), NO_PROXY="127.0.0.1,localhost",
                   HF_HUB_DISABLE_TELEMETRY="1")
        out = tmp_path / "data"
        cmd = [sys.executable, str(REPO / "data" / "cached_challenge_fineweb.py"), "--train-shards", "2",
               "--out", str(out), "--no-progress"]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
        assert res.returncode == 0, res.stderr
        assert local_files(out) == expected_files(2)
        assert_same_as_hub(out, hub)
        no_temp_leftovers(out)
        missing = hub.root / "datasets" / "datasets" / "fineweb10B_sp1024" / "fineweb_train_000002.bin"
        missing.unlink()
        res = subprocess.run([*cmd[:3], "3", *cmd[4:]], capture_output=True, text=True, timeout=120, env=env)
        assert res.returncode == 1
        line = one_error_line(res.stderr)
        assert "fineweb_train_000002.bin" in line and "not in" in line
    finally:
        server.shutdown()
        server.server_close()


# ----------------------------------------------------------------------------------------------------------
# cached_challenge_fineweb: the endpoint is announced before the first request; local folder problems are named


@pytest.mark.parametrize("endpoint", [None, "http://hub-mirror.internal:8080"], ids=["default", "HF_ENDPOINT"])
def test_download_announces_the_endpoint_before_connecting(tmp_path: Path, hub: FakeHub, capsys: pytest.CaptureFixture,
                                                           monkeypatch: pytest.MonkeyPatch, endpoint: str | None) -> None:
    if endpoint is None:
        monkeypatch.delenv("HF_ENDPOINT", raising=False)
        from huggingface_hub import constants

        expected = constants.ENDPOINT
    else:
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        expected = endpoint
    printed_before_first_request: list[str] = []
    real_call = hub.__call__

    def watching(*args: Any, **kwargs: Any) -> str:
        if not printed_before_first_request:
            printed_before_first_request.append(capsys.readouterr().out)
        return real_call(*args, **kwargs)

    monkeypatch.setattr(ccf, "hf_hub_download", watching)
    assert download(tmp_path / "data", "--train-shards", "1") == 0
    (before,) = printed_before_first_request
    assert before == f"connecting to {expected} for dataset {ccf.DEFAULT_REPO_ID}@main " \
                     "(if the hub is unreachable this waits for the connection to time out)\n"
    assert "connecting to" not in capsys.readouterr().out, "announced once per run"


def test_download_nothing_to_fetch_does_not_announce(tmp_path: Path, hub: FakeHub, capsys: pytest.CaptureFixture) -> None:
    assert download(tmp_path / "data", "--train-shards", "1") == 0
    capsys.readouterr()
    assert download(tmp_path / "data", "--train-shards", "1") == 0
    assert "connecting to" not in capsys.readouterr().out


@pytest.mark.parametrize("layout, expected", [
    ("file", "--out {out} exists and is not a folder"),
    ("under-file", "--out {out} cannot be created: {blocker} is not a folder"),
], ids=["out-is-a-file", "out-under-a-file"])
def test_download_out_not_a_folder(tmp_path: Path, hub: FakeHub, capsys: pytest.CaptureFixture,
                                   layout: str, expected: str) -> None:
    blocker = tmp_path / "data"
    blocker.write_text("not a folder")
    out = blocker if layout == "file" else blocker / "sub"
    assert download(out) == 2
    captured = capsys.readouterr()
    assert one_error_line(captured.err) == f"{ccf.PROG}: error: " + expected.format(out=out, blocker=blocker)
    assert hub.calls == [] and "connecting" not in captured.out
    assert blocker.read_text() == "not a folder"


def test_download_out_not_writable_is_named_before_the_hub(tmp_path: Path, hub: FakeHub, capsys: pytest.CaptureFixture,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "data"
    assert download(out, "--train-shards", "1") == 0
    capsys.readouterr()
    real_access = os.access
    monkeypatch.setattr(ccf.os, "access", lambda p, mode: False if Path(p) == out else real_access(p, mode))
    hub.calls.clear()
    assert download(out, "--train-shards", "1") == 0, "a complete read-only copy needs no writing"
    assert download(out, "--train-shards", "2") == 2
    captured = capsys.readouterr()
    assert one_error_line(captured.err) == f"{ccf.PROG}: error: --out {out} is not writable (no write permission)"
    assert hub.calls == [] and "connecting" not in captured.out
    assert local_files(out) == expected_files(1)


def _without_permission_override() -> None:
    """preexec_fn: drop CAP_DAC_OVERRIDE from the bounding set, so even root obeys the permission bits after exec."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(24, 1, 0, 0, 0) != 0:  # PR_CAPBSET_DROP, CAP_DAC_OVERRIDE
        raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP, CAP_DAC_OVERRIDE) failed")


def test_download_out_not_writable_real_permissions(tmp_path: Path) -> None:
    """The real check in a separate process that has no write permission on --out (as root: without the
    capability that lets root ignore permission bits)."""
    out = tmp_path / "data"
    out.mkdir()
    out.chmod(0o555)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_ENDPOINT="http://127.0.0.1:9")
    cmd = [sys.executable, str(REPO / "data" / "cached_challenge_fineweb.py"), "--out", str(out), "--no-progress"]
    extra: dict[str, Any] = {"preexec_fn": _without_permission_override} if os.geteuid() == 0 else {}
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, **extra)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot start a process without CAP_DAC_OVERRIDE here ({exc})")
    finally:
        out.chmod(0o755)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert one_error_line(res.stderr) == f"{ccf.PROG}: error: --out {out} is not writable (no write permission)"
    assert "connecting" not in res.stdout and list(out.iterdir()) == []
