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


def readme_blocks(heading: str) -> list[tuple[str, str]]:
    """(language, text) of every fenced block in the README section under `heading`."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(\w+)\n(.*?)```", section, flags=re.S)


def as_pattern(line: str) -> str:
    """A log line of the README as a regex: its numbers and hashes stand for any."""
    out = re.sub(r"[0-9a-f]{64}", "@HEX@", line)
    out = re.sub(r"\d+(\.\d+)?(e[+-]\d+)?", "@NUM@", out)
    return re.escape(out).replace("@HEX@", "[0-9a-f]{64}").replace("@NUM@", r"\d+(\.\d+)?(e[+-]\d+)?")


# What a fresh clone has that the first run needs (a stricter copy than a clone: nothing else may be needed).
CLONE_FILES = ("train_gpt.py", "requirements.txt", *make_toy.CORPUS, "data/make_toy.py", "data/make_shards.py",
               "data/caseops.py")


def test_the_readme_cpu_example_runs_as_written_on_a_fresh_copy(tmp_path):
    """The README's first-run block, copy-pasted into bash in a copy of the repository with no ../shared beside it,
    no OMP_NUM_THREADS and no data: it makes the toy data and runs to the end on one thread; every line of the
    README's excerpt of its output has a line of the real log of that shape (numbers aside)."""
    (lang, block), (out_lang, excerpt) = readme_blocks("## A first run on a CPU")[:2]
    assert lang == "bash" and out_lang == "text" and "python data/make_toy.py" in block
    clone = tmp_path / "clone"
    for name in CLONE_FILES:
        (clone / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, clone / name)
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "PG_SHARED_DATA") and not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_"))}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(["bash", "-c", block], cwd=clone, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    log = (clone / "logs" / "toy.txt").read_text(encoding="utf-8").splitlines()
    assert "cpu_threads:1 reason:one per process on CPU (set OMP_NUM_THREADS for more)" in log
    assert lines_starting(log, "final_int6_sliding_window_exact ") and (clone / "final_model.int6.ptz").is_file()
    assert not (clone / "data" / "datasets").exists() and not (clone / "data" / "tokenizers").exists()
    shown = excerpt.splitlines()
    assert shown[0] == "logs/toy.txt" and proc.stdout.splitlines()[4] == "logs/toy.txt"  # after make_toy's 4 lines
    missing = [line for line in shown[1:] if not any(re.fullmatch(as_pattern(line), got) for got in log)]
    assert not missing, f"README lines the toy run does not print: {missing}"
