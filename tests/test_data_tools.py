"""data/make_shards.py and data/cached_challenge_fineweb.py, on CPU and offline: a SentencePiece model trained here
(or the real one from ../shared/data), a fake hub in place of snapshot_download, and the real huggingface_hub client
against a loopback server that speaks enough of the hub's protocol."""
from __future__ import annotations

import glob
import hashlib
import http.server
import io
import json
import os
import random
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np
import pytest

import train_gpt as tg
from conftest import DOCS, REPO, TOKENIZER, needs_shared

sys.path.insert(0, str(REPO / "data"))
import cached_challenge_fineweb as ccf  # noqa: E402
import make_shards as ms  # noqa: E402

DOWNLOADER = REPO / "data" / "cached_challenge_fineweb.py"


def read_shard(path: Path) -> np.ndarray:
    """An independent reader of the format: header checks, then the uint16 body."""
    raw = path.read_bytes()
    header = np.frombuffer(raw[:1024], dtype="<i4")
    assert header.size == 256 and header[0] == 20240520 and header[1] == 1 and not header[3:].any(), path
    assert len(raw) == 1024 + 2 * int(header[2]), path
    return np.frombuffer(raw[1024:], dtype="<u2")


WORDS = "the of and golf ball par green tee club swing putt eagle birdie café naïve 東京 😀 1234 x-ray".split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 25))) for _ in range(rng.randint(1, 4)))
            for _ in range(n)]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A ~300-piece byte-fallback BPE model laid out like the challenge's (pad 0, bos 1, eos 2, unk 3)."""
    import sentencepiece as spm

    path, buf = tmp_path_factory.mktemp("tok") / "tiny_bpe.model", io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(make_docs(400, seed=123)), model_writer=buf,
                                   model_type="bpe", vocab_size=300, byte_fallback=True, character_coverage=1.0,
                                   add_dummy_prefix=False, hard_vocab_limit=False, pad_id=0, bos_id=1, eos_id=2,
                                   unk_id=3, minloglevel=2)
    path.write_bytes(buf.getvalue())
    return path


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return path


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def check_corpus_shards(out: Path, model: Path, docs: list[str], val_docs: int, shard_tokens: int, stdout: str):
    """The shards hold each document's encoding after one BOS, val then train, full shards but the last."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model))
    counts = {}
    for split, texts in (("val", docs[:val_docs]), ("train", docs[val_docs:])):
        files = sorted(out.glob(f"fineweb_{split}_*.bin"))
        assert [p.name for p in files] == [f"fineweb_{split}_{i:06d}.bin" for i in range(len(files))]
        shards = [read_shard(p) for p in files]
        assert all(s.size == shard_tokens for s in shards[:-1]) and all(0 < s.size <= shard_tokens for s in shards)
        stream = np.concatenate(shards)
        starts = np.flatnonzero(stream == sp.bos_id())
        assert starts[0] == 0 and len(starts) == len(texts) and sp.eos_id() not in stream  # one BOS each, no EOS
        for text, ids in zip(texts, np.split(stream, starts[1:])):
            assert ids[1:].tolist() == sp.encode(text)
        counts[split] = (f"{split}: documents={len(texts)} tokens={stream.size} "
                         f"bytes={sum(len(t.encode()) for t in texts)} shards={len(files)}")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in out.glob("fineweb_*.bin"))
    assert stdout.splitlines()[:2] == [counts["val"], counts["train"]]


def no_leftovers(folder: Path) -> None:
    left = [p for p in folder.rglob("*") if p.name.startswith(".") or p.name.endswith((".tmp", ".part"))]
    assert not left, f"temporary files left behind: {left}"


def shards_cli(corpus: Path, model: Path, out: Path, *extra: str) -> int:
    return ms.main([str(corpus), "--tokenizer", str(model), "--out", str(out), "--no-progress", *extra])


# ----------------------------------------------------------------------------------------------------------
# make_shards


def test_write_shard_is_what_train_gpt_reads(tmp_path):
    ids = np.array([1, 0, 65535, 7, 1023], dtype=np.int64)
    ms.write_shard(tmp_path / "fineweb_val_000000.bin", ids)
    assert read_shard(tmp_path / "fineweb_val_000000.bin").tolist() == ids.tolist()
    assert tg.load_data_shard(str(tmp_path / "fineweb_val_000000.bin")).tolist() == ids.tolist()
    assert ms.shard_problem(tmp_path / "fineweb_val_000000.bin") is None
    with pytest.raises(ValueError):
        ms.write_shard(tmp_path / "bad.bin", np.array([65536]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fineweb_val_000000.bin"]


def test_jsonl_corpus_into_several_shards_per_split(tmp_path, tiny_model, capsys):
    docs = make_docs(60, seed=7)
    docs[5] = ""  # an empty document still gets its BOS
    assert shards_cli(write_jsonl(tmp_path / "c.jsonl", docs), tiny_model, tmp_path / "out", "--val-docs", "9",
                      "--shard-tokens", "300") == 0
    out = capsys.readouterr().out
    check_corpus_shards(tmp_path / "out", tiny_model, docs, 9, 300, out)
    assert len(list((tmp_path / "out").glob("fineweb_val_*"))) >= 2 and len(list((tmp_path / "out").glob("*"))) >= 5
    for path in (tmp_path / "out").glob("*.bin"):  # the script reads them; one token short, it refuses
        assert np.array_equal(tg.load_data_shard(str(path)), read_shard(path))
    victim = tmp_path / "out" / "fineweb_train_000000.bin"
    victim.write_bytes(victim.read_bytes()[:-2])
    with pytest.raises(tg.InputError, match="fineweb_train_000000.bin"):
        tg.load_data_shard(str(victim))
    no_leftovers(tmp_path)


def test_plain_text_corpus(tmp_path, tiny_model, capsys):
    docs = make_docs(12, seed=11)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n" + "\n\n\n".join(docs) + "\n", encoding="utf-8")  # blank lines separate documents
    assert shards_cli(corpus, tiny_model, tmp_path / "out", "--val-docs", "4") == 0
    check_corpus_shards(tmp_path / "out", tiny_model, docs, 4, 100_000_000, capsys.readouterr().out)


@needs_shared
def test_real_tokenizer_on_real_documents(tmp_path, capsys):
    docs = [json.loads(line)["text"] for line in DOCS.read_text(encoding="utf-8").splitlines()]
    assert shards_cli(DOCS, TOKENIZER, tmp_path / "out", "--val-docs", "20", "--shard-tokens", "100000") == 0
    check_corpus_shards(tmp_path / "out", TOKENIZER, docs, 20, 100_000, capsys.readouterr().out)


@pytest.mark.parametrize("val_args,n_docs,advice", [([], 5, "--val-docs 1"), (["--val-docs", "5"], 5, "--val-docs 1"),
                                                    (["--val-docs", "3"], 1, "at least 2 documents")],
                         ids=["default-50000", "equal-to-corpus", "single-document"])
def test_all_validation_is_an_error(tmp_path, tiny_model, capsys, val_args, n_docs, advice):
    out = tmp_path / "out"
    assert shards_cli(write_jsonl(tmp_path / "c.jsonl", make_docs(n_docs)), tiny_model, out, *val_args) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"has {n_docs} document(s)" in line and "no train shard" in line and advice in line
    assert not out.exists()
    no_leftovers(tmp_path)


def test_overwrite_replaces_every_old_shard_and_a_failure_keeps_them(tmp_path, tiny_model, capsys):
    out, corpus = tmp_path / "out", write_jsonl(tmp_path / "c.jsonl", make_docs(40))
    assert shards_cli(corpus, tiny_model, out, "--val-docs", "4", "--shard-tokens", "100") == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert shards_cli(corpus, tiny_model, out, "--val-docs", "4") == 2  # refused: it would mix with old shards
    assert "--overwrite" in one_error_line(capsys.readouterr().err)
    small = write_jsonl(tmp_path / "small.jsonl", make_docs(3))
    assert shards_cli(small, tiny_model, out, "--overwrite") == 2  # all validation: nothing changes
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and len(before) > 2
    capsys.readouterr()
    assert shards_cli(corpus, tiny_model, out, "--val-docs", "4", "--overwrite") == 0
    assert sorted(p.name for p in out.iterdir()) == ["fineweb_train_000000.bin", "fineweb_val_000000.bin"]
    no_leftovers(tmp_path)


def bad_json(tmp):
    (tmp / "bad.jsonl").write_text('{"text": "fine"}\n\n{"text": "also fine"}\n{"text": broken}\n')
    return tmp / "bad.jsonl"


def text_file(name: str, data: bytes):
    def make(tmp):
        (tmp / name).write_bytes(data)
        return tmp / name
    return make


@pytest.mark.parametrize("make_corpus,expected", [
    (lambda tmp: tmp / "nope.jsonl", ["nope.jsonl", "no such corpus"]),
    (bad_json, ["bad.jsonl:4:", "bad JSON"]),
    (text_file("empty.jsonl", b"\n  \n"), ["no documents"]),
    (text_file("nokey.jsonl", b'{"text": "ok"}\n{"body": "no text"}\n'), ["nokey.jsonl:2:", "'text'"]),
    (text_file("latin1.txt", b"first doc\n\ncaf\xe9\n"), ["latin1.txt:3:", "UTF-8"]),
], ids=["missing", "bad-json", "empty", "missing-key", "not-utf8"])
def test_corpus_errors_are_one_line_and_write_nothing(tmp_path, tiny_model, capsys, make_corpus, expected):
    assert shards_cli(make_corpus(tmp_path), tiny_model, tmp_path / "out", "--val-docs", "1") == 1
    line = one_error_line(capsys.readouterr().err)
    assert all(piece in line for piece in expected), line
    assert not (tmp_path / "out").exists()
    no_leftovers(tmp_path)


def test_a_token_id_beyond_uint16_writes_nothing(tmp_path, tiny_model, capsys, monkeypatch):
    class HugeVocab:
        def bos_id(self) -> int:
            return 1

        def encode(self, texts: list[str], **_: Any) -> list[list[int]]:
            return [[70000 if "boom" in t else 5] for t in texts]

    monkeypatch.setattr(ms, "load_tokenizer", lambda path, is_caseops: HugeVocab())
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("unrelated")
    corpus = write_jsonl(tmp_path / "c.jsonl", ["a", "b", "boom", "c"])
    assert shards_cli(corpus, tiny_model, out, "--val-docs", "1", "--shard-tokens", "1") == 1
    line = one_error_line(capsys.readouterr().err)
    assert "70000" in line and "line 3" in line and sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    no_leftovers(tmp_path)


@pytest.mark.parametrize("bad", [["--shard-tokens", "0"], ["--val-docs", "-1"], ["--shard-tokens", "many"]])
def test_bad_arguments(tmp_path, tiny_model, capsys, bad):
    with pytest.raises(SystemExit) as exc:
        shards_cli(tmp_path / "c.jsonl", tiny_model, tmp_path / "o", *bad)
    assert exc.value.code == 2 and bad[0] in capsys.readouterr().err.splitlines()[-1]


def test_missing_tokenizer(tmp_path, capsys):
    assert shards_cli(write_jsonl(tmp_path / "c.jsonl", ["x", "y"]), tmp_path / "no.model", tmp_path / "o") == 2
    assert "no.model" in one_error_line(capsys.readouterr().err) and not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------------------------
# cached_challenge_fineweb with a fake hub


def publish(root: Path, variants: dict[str, int], tokenizer: Path, seed: int = 0) -> Path:
    """A dataset repository's files: for each variant 1 val and N train shards, a tokenizer, the manifest."""
    rng, datasets, tokenizers = np.random.default_rng(seed), [], []
    for variant, n_train in variants.items():
        shards = root / "datasets" / "datasets" / f"fineweb10B_{variant}"
        shards.mkdir(parents=True)
        ms.write_shard(shards / "fineweb_val_000000.bin", rng.integers(0, 1024, 333))
        for i in range(n_train):
            ms.write_shard(shards / f"fineweb_train_{i:06d}.bin", rng.integers(0, 1024, 1000 + i))
        name = f"fineweb_{variant[2:]}_bpe"
        (root / "datasets" / "tokenizers").mkdir(exist_ok=True)
        shutil.copyfile(tokenizer, root / "datasets" / "tokenizers" / f"{name}.model")
        (root / "datasets" / "tokenizers" / f"{name}.vocab").write_text("<pad>\t0\n<s>\t0\n")
        datasets.append({"name": f"fineweb10B_{variant}", "tokenizer_name": name,
                         "stats": {"files_train": n_train, "files_val": 1}})
        tokenizers.append({"name": name, "model_path": f"tokenizers/{name}.model",
                           "vocab_path": f"tokenizers/{name}.vocab"})
    (root / "datasets" / "manifest.json").write_text(json.dumps({"datasets": datasets, "tokenizers": tokenizers}))
    return root


class FakeHub:
    """snapshot_download over local copies of dataset repositories: the requested files of one call are copied into
    a fresh 'snapshot' folder (no cache)."""

    def __init__(self, repos: dict[str, Path], scratch: Path) -> None:
        self.repos, self.scratch = repos, scratch
        self.calls: list[tuple[str, list[str], bool]] = []
        self.fail: BaseException | None = None

    def __call__(self, repo_id: str, *, repo_type=None, allow_patterns=(), force_download=False, **_: Any) -> str:
        assert repo_type == "dataset"
        self.calls.append((repo_id, list(allow_patterns), force_download))
        if self.fail is not None:
            raise self.fail
        snapshot = self.scratch / f"snapshot{len(self.calls)}"
        for rel in allow_patterns:
            if (self.repos[repo_id] / rel).is_file():
                (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(self.repos[repo_id] / rel, snapshot / rel)
        return str(snapshot)

    def fetched(self) -> list[str]:
        return [rel for _, rels, _ in self.calls for rel in rels]


@pytest.fixture
def hub(tmp_path, tiny_model, monkeypatch) -> FakeHub:
    repos = {ccf.DEFAULT_REPO: publish(tmp_path / "hub_a", {"sp1024": 5}, tiny_model),
             "kevclark/parameter-golf": publish(tmp_path / "hub_b", {"sp1024": 2, "sp8192": 3}, tiny_model, seed=1)}
    fake = FakeHub(repos, tmp_path / "snapshots")
    monkeypatch.setattr(ccf, "snapshot_download", fake)
    monkeypatch.delenv("MATCHED_FINEWEB_REPO_ID", raising=False)
    return fake


def download(out: Path, *extra: str) -> int:
    return ccf.main(["--out", str(out), "--no-progress", *extra])


def expected_files(n_train: int, variant: str = "sp1024") -> list[str]:
    d = f"datasets/fineweb10B_{variant}"
    name = f"fineweb_{variant[2:]}_bpe"
    return sorted(["manifest.json", f"{d}/fineweb_val_000000.bin", f"tokenizers/{name}.model",
                   f"tokenizers/{name}.vocab", *(f"{d}/fineweb_train_{i:06d}.bin" for i in range(n_train))])


def local_files(out: Path) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())


def same_as(out: Path, repo: Path) -> bool:
    return all((out / rel).read_bytes() == (repo / "datasets" / rel).read_bytes()
               for rel in local_files(out) if rel != "manifest.json")


def test_download_then_skip_then_more(tmp_path, hub, capsys):
    out = tmp_path / "data"
    assert download(out, "--train-shards", "3") == 0, capsys.readouterr().err
    assert local_files(out) == expected_files(3) and same_as(out, hub.repos[ccf.DEFAULT_REPO])
    assert hub.fetched()[0] == "datasets/manifest.json" and len(hub.calls) == 2  # the manifest, then one batch
    assert "datasets/datasets/fineweb10B_sp1024/fineweb_train_000003.bin" not in hub.fetched()
    for shard in (out / "datasets" / "fineweb10B_sp1024").glob("*.bin"):
        assert tg.load_data_shard(str(shard)).size in (333, 1000, 1001, 1002)
    no_leftovers(out)
    hub.calls.clear()
    assert download(out, "--train-shards", "3") == 0 and hub.calls == []  # complete: the hub is not asked
    assert download(out, "--train-shards", "5") == 0  # more: only the new ones
    assert hub.fetched() == [f"datasets/datasets/fineweb10B_sp1024/fineweb_train_{i:06d}.bin" for i in (3, 4)]
    assert local_files(out) == expected_files(5)


def test_download_replaces_damaged_files(tmp_path, hub):
    out = tmp_path / "data"
    assert download(out, "--train-shards", "3") == 0
    shards = out / "datasets" / "fineweb10B_sp1024"
    (shards / "fineweb_train_000001.bin").write_bytes((shards / "fineweb_train_000001.bin").read_bytes()[:1500])
    raw = bytearray((shards / "fineweb_val_000000.bin").read_bytes())
    raw[0:4] = (123).to_bytes(4, "little")  # bad magic
    (shards / "fineweb_val_000000.bin").write_bytes(bytes(raw))
    (out / "tokenizers" / "fineweb_1024_bpe.model").write_bytes(b"")
    hub.calls.clear()
    assert download(out, "--train-shards", "3") == 0
    assert sorted(hub.fetched()) == ["datasets/datasets/fineweb10B_sp1024/fineweb_train_000001.bin",
                                     "datasets/datasets/fineweb10B_sp1024/fineweb_val_000000.bin",
                                     "datasets/tokenizers/fineweb_1024_bpe.model"]
    assert local_files(out) == expected_files(3) and same_as(out, hub.repos[ccf.DEFAULT_REPO])


@pytest.mark.parametrize("damage", ["magic", "truncated"])
def test_a_bad_shard_from_the_hub_is_fetched_again_then_refused(tmp_path, hub, capsys, damage):
    bad = hub.repos[ccf.DEFAULT_REPO] / "datasets/datasets/fineweb10B_sp1024/fineweb_train_000001.bin"
    raw = bytearray(bad.read_bytes())
    if damage == "magic":
        raw[0:4] = (20240519).to_bytes(4, "little")
    bad.write_bytes(bytes(raw if damage == "magic" else raw[:-10]))
    out = tmp_path / "data"
    assert download(out, "--train-shards", "3") == 1
    line = one_error_line(capsys.readouterr().err)
    assert "fineweb_train_000001.bin" in line and ("magic" if damage == "magic" else "bytes") in line
    assert hub.calls[-1] == (ccf.DEFAULT_REPO, [bad.relative_to(bad.parents[3]).as_posix()], True)
    assert not list((out / "datasets").glob("*/*.bin")), "no shard is placed when one of the batch is bad"
    no_leftovers(out)


def test_unreachable_hub_is_one_line(tmp_path, hub, capsys):
    from huggingface_hub.errors import LocalEntryNotFoundError

    for error, expected in ((LocalEntryNotFoundError("offline"), "cannot reach the Hugging Face hub"),
                            (ConnectionError("[Errno -2] Name or service not known"), "Name or service not known")):
        hub.fail = error
        assert download(tmp_path / "data") == 1
        assert expected in one_error_line(capsys.readouterr().err)
        assert local_files(tmp_path / "data") == []


def test_offline_with_a_complete_copy(tmp_path, hub):
    assert download(tmp_path / "data", "--train-shards", "2") == 0
    hub.fail, hub.calls = ConnectionError("offline"), []
    assert download(tmp_path / "data", "--train-shards", "2") == 0 and hub.calls == []


def test_the_repository_is_an_option_and_an_env_var_and_its_manifest_its_own(tmp_path, hub, capsys, monkeypatch):
    """The records' SP8192 recipe (MATCHED_FINEWEB_REPO_ID=kevclark/parameter-golf) without removing the manifest
    that an earlier download from the default repository left."""
    out = tmp_path / "data"
    assert download(out, "--train-shards", "1") == 0  # default repository, sp1024
    monkeypatch.setenv("MATCHED_FINEWEB_REPO_ID", "kevclark/parameter-golf")
    hub.calls.clear()
    assert download(out, "--variant", "sp8192", "--train-shards", "3") == 0
    assert hub.calls[0] == ("kevclark/parameter-golf", ["datasets/manifest.json"], False)
    assert set(expected_files(3, "sp8192")) <= set(local_files(out))
    assert json.loads((out / "manifest.json").read_text())[ccf.SOURCE_KEY] == "kevclark/parameter-golf"
    hub.calls.clear()  # the same variant in another repository: its own manifest and counts, not the saved one's
    assert download(out, "--repo-id", ccf.DEFAULT_REPO, "--train-shards", "4") == 0
    assert hub.calls[0] == (ccf.DEFAULT_REPO, ["datasets/manifest.json"], False)
    capsys.readouterr()
    assert download(out, "--repo-id", ccf.DEFAULT_REPO, "--variant", "sp8192") == 1
    assert one_error_line(capsys.readouterr().err) == \
        f"error: {ccf.DEFAULT_REPO} has no variant 'sp8192'; it offers: sp1024"
    assert download(out, "--variant", "sp999") == 1  # the env var's repository
    assert "kevclark/parameter-golf has no variant 'sp999'; it offers: sp1024, sp8192" in capsys.readouterr().err


@pytest.mark.parametrize("value,code,expected", [("-1", 2, "--train-shards"), ("lots", 2, "--train-shards"),
                                                 ("6", 1, "has 5 train shards")])
def test_bad_train_shards(tmp_path, hub, capsys, value, code, expected):
    if code == 2:
        with pytest.raises(SystemExit) as exc:
            download(tmp_path / "data", "--train-shards", value)
        assert exc.value.code == 2 and expected in capsys.readouterr().err.splitlines()[-1]
    else:
        assert download(tmp_path / "data", "--train-shards", value) == 1
        assert expected in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "data" / "datasets").exists()


@pytest.mark.parametrize("edit,expected", [
    (lambda m: m["datasets"][0].pop("stats"), "lacks 'stats'"),
    (lambda m: m["tokenizers"][0].update(model_path="../../etc/passwd"), "no tokenizer file inside the export"),
    (lambda m: m["tokenizers"].clear(), "no tokenizer file"),
], ids=["no-stats", "path-outside", "no-tokenizer"])
def test_manifest_layout_errors(tmp_path, hub, capsys, edit, expected):
    path = hub.repos[ccf.DEFAULT_REPO] / "datasets" / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    assert download(tmp_path / "data", "--train-shards", "1") == 1
    assert expected in one_error_line(capsys.readouterr().err)


def test_out_that_is_a_file_or_under_one_is_refused_before_the_hub(tmp_path, hub, capsys):
    (tmp_path / "data").write_text("not a folder")
    with pytest.raises(SystemExit) as exc:
        download(tmp_path / "data")
    assert exc.value.code == 2 and "exists and is not a folder" in capsys.readouterr().err
    assert download(tmp_path / "data" / "sub") == 2
    assert one_error_line(capsys.readouterr().err).startswith(f"error: --out {tmp_path / 'data' / 'sub'}: Not a dir")
    assert hub.calls == [] and (tmp_path / "data").read_text() == "not a folder"


def _without_permission_override() -> None:
    """preexec_fn: drop CAP_DAC_OVERRIDE from the bounding set, so even root obeys the permission bits after exec."""
    import ctypes

    if ctypes.CDLL(None, use_errno=True).prctl(24, 1, 0, 0, 0) != 0:  # PR_CAPBSET_DROP, CAP_DAC_OVERRIDE
        raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP, CAP_DAC_OVERRIDE) failed")


def test_out_not_writable_is_named_before_the_hub(tmp_path):
    """In a process without write permission on --out (as root: without the capability to ignore it); the hub
    endpoint is a closed port, so reaching it would be a different error."""
    out = tmp_path / "data"
    out.mkdir()
    out.chmod(0o555)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9")
    extra: dict[str, Any] = {"preexec_fn": _without_permission_override} if os.geteuid() == 0 else {}
    try:
        res = subprocess.run([sys.executable, str(DOWNLOADER), "--out", str(out), "--no-progress"], env=env,
                             capture_output=True, text=True, timeout=120, **extra)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot start a process without CAP_DAC_OVERRIDE here ({exc})")
    finally:
        out.chmod(0o755)
    assert res.returncode == 2 and list(out.iterdir()) == []
    assert one_error_line(res.stderr).startswith(f"error: --out {out}: Permission denied")


# ----------------------------------------------------------------------------------------------------------
# the real huggingface_hub client against a loopback server


def serve(repo_id: str, root: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    """Enough of the hub's protocol for snapshot_download: revision info, the file tree, and file downloads."""
    commit = "c" * 40

    class Handler(http.server.BaseHTTPRequestHandler):
        def reply(self, with_body: bool) -> None:
            path = unquote(urlparse(self.path).path)
            files = {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file()}
            data, headers, code = b"", {"X-Repo-Commit": commit}, 200
            resolve = f"/datasets/{repo_id}/resolve/{commit}/"
            if path == f"/api/datasets/{repo_id}/revision/main":
                data = json.dumps({"id": repo_id, "sha": commit}).encode()
            elif path.startswith(f"/api/datasets/{repo_id}/tree/{commit}"):
                tree = [{"type": "file", "path": f, "size": p.stat().st_size,
                         "oid": hashlib.sha1(p.read_bytes()).hexdigest()} for f, p in files.items()]
                data = json.dumps(tree).encode()
            elif path.startswith(resolve) and path[len(resolve):] in files:
                data = files[path[len(resolve):]].read_bytes()
                headers["ETag"] = f'"{hashlib.sha1(data).hexdigest()}"'
            else:
                code, headers["X-Error-Code"] = 404, ("EntryNotFound" if repo_id in path else "RepoNotFound")
            self.send_response(code)
            for key, value in {**headers, "Content-Length": str(len(data))}.items():
                self.send_header(key, value)
            self.end_headers()
            if with_body:
                self.wfile.write(data)

        def do_HEAD(self) -> None:  # noqa: N802
            self.reply(False)

        def do_GET(self) -> None:  # noqa: N802
            self.reply(True)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def test_download_through_the_real_client(tmp_path, tiny_model):
    repo = publish(tmp_path / "hub", {"sp1024": 4}, tiny_model)
    manifest = json.loads((repo / "datasets" / "manifest.json").read_text())
    manifest["datasets"][0]["stats"]["files_train"] = 5  # one more than the repository holds
    (repo / "datasets" / "manifest.json").write_text(json.dumps(manifest))
    server, endpoint = serve("me/golf", repo)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and "proxy" not in k.lower()}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf"), NO_PROXY="127.0.0.1", HF_HUB_DISABLE_TELEMETRY="1")
    out = tmp_path / "data"

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(DOWNLOADER), "--out", str(out), "--no-progress", *args],
                              capture_output=True, text=True, timeout=120, env=env)

    try:
        res = run("--repo-id", "me/golf", "--train-shards", "3")
        assert res.returncode == 0, res.stderr
        assert local_files(out) == expected_files(3) and same_as(out, repo)
        shard = out / "datasets" / "fineweb10B_sp1024" / "fineweb_train_000001.bin"
        with open(shard, "r+b") as f:  # damaged in place: the hub cache's copy too, since the file is a hard link
            f.truncate(1500)
        res = run("--repo-id", "me/golf", "--train-shards", "3")
        assert res.returncode == 0, res.stderr
        assert same_as(out, repo) and ms.shard_problem(shard) is None
        res = run("--repo-id", "me/golf", "--train-shards", "5")
        assert res.returncode == 1 and "me/golf has no datasets/datasets/fineweb10B_sp1024/fineweb_train_000004.bin" \
            in one_error_line(res.stderr)
        res = run("--repo-id", "nobody/nothing")
        assert res.returncode == 1 and "dataset repository nobody/nothing not found" in one_error_line(res.stderr)
        no_leftovers(out)
    finally:
        server.shutdown()
        server.server_close()


# ----------------------------------------------------------------------------------------------------------
# the CaseOps export (romeerp/parameter-golf-caseops-v1): a byte sidecar beside every validation shard

CASEOPS_REPO, CASEOPS_VARIANT = "romeerp/parameter-golf-caseops-v1", "sp8192_lossless_caps_caseops_v1_reserved"
CASEOPS_TOKENIZER = "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved"


def publish_caseops(root: Path, tokenizer: Path, n_train: int = 3, sidecar_tokens: int = 444) -> Path:
    """The CaseOps export's layout (LINEAGE_TTT_CASEOPS §3.5): its tokenizer, one val shard with its byte sidecar
    (the manifest's entry names val_bytes_glob), N train shards."""
    rng = np.random.default_rng(2)
    shards = root / "datasets" / "datasets" / f"fineweb10B_{CASEOPS_VARIANT}"
    shards.mkdir(parents=True)
    ms.write_shard(shards / "fineweb_val_000000.bin", rng.integers(0, 8192, 444))
    ms.write_shard(shards / "fineweb_val_bytes_000000.bin", rng.integers(0, 5, sidecar_tokens))
    for i in range(n_train):
        ms.write_shard(shards / f"fineweb_train_{i:06d}.bin", rng.integers(0, 8192, 900 + i))
    (root / "datasets" / "tokenizers").mkdir()
    shutil.copyfile(tokenizer, root / "datasets" / "tokenizers" / f"{CASEOPS_TOKENIZER}.model")
    (root / "datasets" / "tokenizers" / f"{CASEOPS_TOKENIZER}.vocab").write_text("<pad>\t0\n")
    manifest = {"datasets": [{"name": f"fineweb10B_{CASEOPS_VARIANT}", "tokenizer_name": CASEOPS_TOKENIZER,
                              "stats": {"docs_val": 50000, "files_val": 1, "files_train": n_train},
                              "val_bytes_glob": f"datasets/fineweb10B_{CASEOPS_VARIANT}/fineweb_val_bytes_*.bin"}],
                "tokenizers": [{"name": CASEOPS_TOKENIZER, "model_path": f"tokenizers/{CASEOPS_TOKENIZER}.model",
                                "vocab_path": f"tokenizers/{CASEOPS_TOKENIZER}.vocab"}]}
    (root / "datasets" / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_caseops_variant_with_its_sidecars(tmp_path, hub, capsys):
    hub.repos[CASEOPS_REPO] = publish_caseops(tmp_path / "hub_caseops", hub.repos[ccf.DEFAULT_REPO] / "datasets" /
                                              "tokenizers" / "fineweb_1024_bpe.model")
    out = tmp_path / "data"
    assert download(out, "--repo-id", CASEOPS_REPO, "--variant", CASEOPS_VARIANT, "--train-shards", "2") == 0
    d = f"datasets/fineweb10B_{CASEOPS_VARIANT}"
    assert local_files(out) == sorted([
        "manifest.json", f"{d}/fineweb_val_000000.bin", f"{d}/fineweb_val_bytes_000000.bin",
        f"{d}/fineweb_train_000000.bin", f"{d}/fineweb_train_000001.bin",
        f"tokenizers/{CASEOPS_TOKENIZER}.model", f"tokenizers/{CASEOPS_TOKENIZER}.vocab"])
    assert same_as(out, hub.repos[CASEOPS_REPO]) and "and 1 byte sidecars in" in capsys.readouterr().out
    hp = tg.read_hyperparameters({"DATA_PATH": str(out / d)})  # the script's default globs on that folder
    assert tg.resolve_files(hp.val_glob, "VAL_FILES") == [str(out / d / "fineweb_val_000000.bin")]
    assert sorted(glob.glob(tg.sidecar_pattern(hp))) == [str(out / d / "fineweb_val_bytes_000000.bin")]
    hub.calls.clear()
    assert download(out, "--repo-id", CASEOPS_REPO, "--variant", CASEOPS_VARIANT, "--train-shards", "2") == 0
    assert hub.calls == []
    (out / d / "fineweb_val_bytes_000000.bin").unlink()  # a lost sidecar is fetched again, alone
    assert download(out, "--repo-id", CASEOPS_REPO, "--variant", CASEOPS_VARIANT, "--train-shards", "2") == 0
    assert hub.fetched() == [f"datasets/{d}/fineweb_val_bytes_000000.bin"] and same_as(out, hub.repos[CASEOPS_REPO])


def test_a_sidecar_that_does_not_match_its_shard_is_refused(tmp_path, hub, capsys):
    hub.repos[CASEOPS_REPO] = publish_caseops(tmp_path / "hub_caseops", hub.repos[ccf.DEFAULT_REPO] / "datasets" /
                                              "tokenizers" / "fineweb_1024_bpe.model", sidecar_tokens=443)
    out = tmp_path / "data"
    assert download(out, "--repo-id", CASEOPS_REPO, "--variant", CASEOPS_VARIANT, "--train-shards", "1") == 1
    line = one_error_line(capsys.readouterr().err)
    assert "fineweb_val_bytes_000000.bin holds 443 byte counts but its shard" in line and "444 tokens" in line
    assert not list(out.glob("datasets/*/*.bin")) and not (out / "tokenizers").exists()
    no_leftovers(out)
