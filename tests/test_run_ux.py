"""The run as a user lives it: every bad setting is one `error:` line naming the variable or file (exit 2, nothing
written), misspelt variables are named, a corrupt artifact is refused, Ctrl-C stops cleanly."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

import train_gpt as tg
from conftest import REPO, TORCHRUN, log_lines, run_in_process, script_env

# (env, what the one error line says); every setting the script refuses, at start-up, before anything is written
BAD = [
    ({"NUM_LAYERS": "eleven"}, "NUM_LAYERS='eleven' is not a valid int"),
    ({"LN_SCALE": "yes"}, "LN_SCALE='yes' is not a valid bool"),
    ({"MLP_NEG_SLOPE": "half"}, "MLP_NEG_SLOPE='half' is not a valid float"),
    ({"COMPILE": "1"}, "COMPILE=1 must be auto, 0, blocks or model"),
    ({"PRECISION": "fp16"}, "PRECISION=fp16 must be auto, bf16 or fp32"),
    ({"ATTENTION": "sdpa"}, "ATTENTION=sdpa must be auto, fa3, fa4, cudnn, flash, efficient or math"),
    ({"ATTENTION": "fa3"}, "ATTENTION=fa3: FlashAttention-3 is unusable here (flash_attn_interface is not installed)"),
    ({"ATTENTION": "fa4"}, "ATTENTION=fa4: FlashAttention-4 is unusable here (flash_attn.cute does not import ("),
    ({"ATTENTION": "cudnn"}, "ATTENTION=cudnn: cuDNN SDPA is unusable here (no CUDA device)"),
    ({"ATTENTION": "efficient"}, "ATTENTION=efficient: memory-efficient SDPA is unusable here (no CUDA device)"),
    ({"TRAIN_BATCH_TOKENS": "1000"}, "TRAIN_BATCH_TOKENS=1000 must split into 1 ranks x 8 micro-steps of whole "
                                     "TRAIN_SEQ_LEN=64 sequences (nearest valid: 512 or 1024)"),
    ({"TRAIN_BATCH_TOKENS": "100"}, "(nearest valid: 512)"),
    ({"NUM_KV_HEADS": "3"}, "NUM_HEADS=4 must be a multiple of NUM_KV_HEADS=3"),
    ({"MODEL_DIM": "66"}, "MODEL_DIM=66 must split into NUM_HEADS=4 heads of even size"),
    ({"XSA_LAST_N": "4"}, "XSA_LAST_N=4 must lie in [0, NUM_LAYERS]"),
    ({"EMA_DECAY": "1"}, "EMA_DECAY=1.0 must lie in [0, 1)"),
    ({"EMA_DECAY": "-0.1"}, "EMA_DECAY=-0.1 must lie in [0, 1)"),
    ({"ROPE_DIMS": "7"}, "ROPE_DIMS=7 must be 0 (whole head) or even in [2, head dim 16]"),
    ({"ROPE_DIMS": "18"}, "ROPE_DIMS=18 must be 0 (whole head) or even in [2, head dim 16]"),
    ({"SWA_EVERY": "0"}, "SWA_EVERY must be positive"),
    ({"QUANT_METHOD": "awq"}, "QUANT_METHOD=awq must be rowmax, clipsearch or gptq"),
    ({"QUANT_METHOD": "gptq", "MAX_WALLCLOCK_SECONDS": "5", "GPTQ_RESERVE_SECONDS": "5"},
     "GPTQ_RESERVE_SECONDS=5.0 must be below MAX_WALLCLOCK_SECONDS"),
    ({"GPTQ_CALIB_SEQS": "0"}, "GPTQ_CALIB_SEQS must be positive"),
    ({"QUANT_CLIP": "max"}, "QUANT_CLIP=max must be search or sigma"),
    ({"QUANT_CLIP": "sigma"}, "QUANT_CLIP=sigma sets the scales of QUANT_METHOD=clipsearch or gptq"),
    ({"QUANT_METHOD": "gptq", "CLIP_SIGMAS": "0"}, "CLIP_SIGMAS and EMBED_CLIP_SIGMAS must be positive"),
    ({"EMBED_BITS": "5"}, "EMBED_BITS=5 must be 6, 7 or 8"),
    ({"COMPRESSOR": "gzip"}, "COMPRESSOR=gzip must be zstd, brotli or lzma"),
    ({"SWA_ENABLED": "2"}, "SWA_ENABLED='2' is not a valid bool"),
    ({"TTT_CHUNK_TOKENS": "1000"}, "TTT_CHUNK_TOKENS=1000 must be a positive multiple of TRAIN_SEQ_LEN=64"),
    ({"TTT_FREEZE_BLOCKS": "4"}, "TTT_FREEZE_BLOCKS in [0, NUM_LAYERS]"),
    ({"LOOP_LAYERS": "1-3"}, "LOOP_LAYERS=1-3: the segment must lie within layers 0..2"),
    ({"LOOP_LAYERS": "2-1"}, "LOOP_LAYERS=2-1: the segment must lie within layers 0..2"),
    ({"LOOP_LAYERS": "one"}, "LOOP_LAYERS='one' must be 'a-b'"),
    ({"LOOP_LAYERS": "1-2", "LOOP_START": "1.0"}, "LOOP_START=1.0: fractions must lie in [0, 1), in increasing order"),
    ({"LOOP_LAYERS": "1-2", "LOOP_EXTRA": "2", "LOOP_START": "0.6,0.5"}, "fractions must lie in [0, 1), in incr"),
    ({"LOOP_LAYERS": "1-2", "LOOP_EXTRA": "3", "LOOP_START": "0.2,0.5"}, "LOOP_START one fraction or one per pass"),
    ({"LOOP_LAYERS": "1-2", "LOOP_EXTRA": "0"}, "LOOP_EXTRA=0 must be >= 1"),
    ({"LOOP_UNTIE_MLP": "1"}, "LOOP_UNTIE_MLP=1 needs LOOP_LAYERS"),
    ({"PARALLEL_START": "3"}, "PARALLEL_START=3 must lie in [0, NUM_LAYERS)"),
    ({"PARALLEL_START": "2", "PARALLEL_MODE": "gpt"}, "PARALLEL_MODE=gpt must be gptj or lanes"),
    ({"NUM_LAYERS": "4", "PARALLEL_START": "1", "PARALLEL_MODE": "lanes"},
     "PARALLEL_START=1 with PARALLEL_MODE=lanes must be a decoder layer (>= NUM_LAYERS // 2) after the loop segment"),
    ({"NUM_LAYERS": "4", "LOOP_LAYERS": "1-2", "PARALLEL_START": "2", "PARALLEL_MODE": "lanes"},
     "PARALLEL_START=2 with PARALLEL_MODE=lanes must be a decoder layer"),
    ({"MIN_LR": "1.5"}, "MIN_LR and WARMDOWN_FRAC must lie in [0, 1]"),
    ({"TOKENIZER_PATH": "nowhere.model"}, "TOKENIZER_PATH=nowhere.model: expected an existing SentencePiece .model"),
    ({"VOCAB_SIZE": "2048"}, "has vocab 1024 but VOCAB_SIZE=2048"),
    ({"TRAIN_FILES": "nothing_*.bin"}, "TRAIN_FILES=nothing_*.bin: no files match"),
    ({"VAL_FILES": "nothing_*.bin"}, "VAL_FILES=nothing_*.bin: no files match"),
    ({"EVAL_ONLY": "missing.ptz"}, "EVAL_ONLY=missing.ptz: no such file; expected an artifact a training run wrote "
                                   "(final_model.int6.ptz: zstd, lzma or brotli)"),
    ({"OMP_NUM_THREADS": "two"}, "OMP_NUM_THREADS='two': expected a positive whole number of CPU threads"),
    ({"OMP_NUM_THREADS": "0"}, "OMP_NUM_THREADS='0': expected a positive whole number of CPU threads"),
]


@pytest.mark.parametrize("env, message", BAD, ids=[",".join(env) for env, _ in BAD])
def test_bad_settings_are_one_error_before_anything_is_written(tmp_path, tiny_data, env, message):
    with pytest.raises(tg.InputError) as error:
        run_in_process(tmp_path, tiny_data, **env)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert list(tmp_path.iterdir()) == []  # no log, no artifact


def test_the_error_line_and_exit_status_of_a_process(tmp_path, tiny_data):
    """What a user sees: a warning for a misspelt variable, then the one error line, exit status 2."""
    proc = subprocess.run([sys.executable, str(REPO / "train_gpt.py")], cwd=tmp_path, capture_output=True, text=True,
                          env=script_env(tiny_data, NUM_LAYER="3", TOKENIZER_PATH="nowhere.model"), timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == ["warning: NUM_LAYER is not a hyperparameter; did you mean NUM_LAYERS?",
                                        "error: TOKENIZER_PATH=nowhere.model: expected an existing SentencePiece "
                                        ".model file"]
    assert list(tmp_path.iterdir()) == []
    assert tg.misspelt({"EMA_DECY": "1", "OMP_NUM_THREADS": "1", "PATH": "/bin", "NUM_LAYERS": "2"}) == [
        "warning: EMA_DECY is not a hyperparameter; did you mean EMA_DECAY?"]


EXPECTED = "expected an artifact a training run wrote (final_model.int6.ptz: zstd, lzma or brotli)"
# (what EVAL_ONLY names, the one error line: what it found and what was expected)
DAMAGED = {
    "empty": rf"EVAL_ONLY=art\.ptz: an empty file \(0 bytes\); {re.escape(EXPECTED)}",
    "folder": rf"EVAL_ONLY=art\.ptz: a folder; {re.escape(EXPECTED)}",
    "folder_of_a_run": rf"EVAL_ONLY=art\.ptz: a folder; {re.escape(EXPECTED)}, such as EVAL_ONLY=art\.ptz/final_model"
                       r"\.int6\.ptz",
    "truncated": r"EVAL_ONLY=art\.ptz: a zstd stream of \d+ bytes that does not unpack \(\w+: .*\); expected a "
                 r"complete artifact \(truncated or damaged\?\)",
    "garbage": rf"EVAL_ONLY=art\.ptz: 4000 bytes starting 00 01 02 03 04 05 06 07, not a zstd, lzma or brotli stream; "
               rf"{re.escape(EXPECTED)}",
    "not_a_checkpoint": r"EVAL_ONLY=art\.ptz: a zstd stream of 14 bytes that does not unpack \(\w+: .*\); expected a "
                        r"complete artifact \(truncated or damaged\?\)",
    "another_model": r"EVAL_ONLY=art\.ptz: artifact does not match the model configuration "
                     r"\(blocks\.0\.mlp\.fc\.weight is \(128, 64\), the model expects \(192, 64\)\); "
                     r"set the same model env vars as the training run",
}


@pytest.mark.parametrize("damage", DAMAGED)
def test_a_bad_artifact_is_refused_saying_what_it_is_before_anything_is_written(tmp_path, tiny_run, tiny_data,
                                                                                damage):
    good = (tiny_run / "final_model.int6.ptz").read_bytes()
    art = tmp_path / "art.ptz"
    if damage.startswith("folder"):
        art.mkdir()
        if damage == "folder_of_a_run":
            (art / "final_model.int6.ptz").write_bytes(good)
    else:
        art.write_bytes({"empty": b"", "truncated": good[: len(good) // 2], "another_model": good,
                         "garbage": bytes(range(256)) * 15 + bytes(160),
                         "not_a_checkpoint": __import__("zstandard").ZstdCompressor().compress(b"hello")}[damage])
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(tg.InputError) as error:
        run_in_process(tmp_path, tiny_data, EVAL_ONLY="art.ptz", **({"MLP_MULT": "3"} if damage == "another_model"
                                                                     else {}))
    assert re.fullmatch(DAMAGED[damage], str(error.value)), str(error.value)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written


EARLIER = b"an earlier run's artifact"
OTHER_TMP = "final_model.int6.ptz.99999-0123abcd.tmp"  # what a concurrent run in the same folder is writing


def test_ctrl_c_under_torchrun_is_one_line_exit_130_and_keeps_the_earlier_artifact(tmp_path, tiny_data):
    """A Ctrl-C in the terminal sends SIGINT to the whole process group; torchrun then adds its own report (and
    exits 1): our line comes first, once, in the log too; the earlier run's artifact is untouched, byte for byte, and
    so is a concurrent run's temporary file; nothing half-written."""
    (tmp_path / "final_model.int6.ptz").write_bytes(EARLIER)
    (tmp_path / OTHER_TMP).write_bytes(b"half")
    proc = subprocess.Popen([str(TORCHRUN), "--standalone", "--nproc_per_node=2", str(REPO / "train_gpt.py")],
                            cwd=tmp_path, env=script_env(tiny_data, ITERATIONS="100000", MAX_WALLCLOCK_SECONDS="600"),
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    log, deadline = tmp_path / "logs" / "tiny.txt", time.time() + 120
    while not (log.exists() and "step:3/" in log.read_text()):
        assert proc.poll() is None and time.time() < deadline, "training did not start"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    ours = [line for line in err.splitlines() if line.startswith("interrupted")]
    assert len(ours) == 1
    assert re.fullmatch(r"interrupted at step \d+ \(train_time \d+ ms\): no artifact written; the earlier "
                        r"final_model\.int6\.ptz is kept", ours[0])
    lines = log_lines(tmp_path)
    assert lines[-1] == ours[0]
    assert ("artifact:keeping the final_model.int6.ptz of an earlier run until this run's is written and verified"
            in lines)
    assert (tmp_path / "final_model.int6.ptz").read_bytes() == EARLIER
    assert [p.name for p in tmp_path.glob("*.tmp")] == [OTHER_TMP] and (tmp_path / OTHER_TMP).read_bytes() == b"half"
    train = [line for line in lines if re.match(r"step:\d+/\d+ train_loss", line)]  # under a cap: the time left
    assert train and all(re.search(r" lr_mul:1\.0000 time_left:\d+\.\ds$", line) for line in train)


def test_an_export_interrupted_or_failing_its_check_keeps_the_earlier_artifact(tmp_path, tiny_data, monkeypatch):
    """The new artifact is written under a name of its own and checked before it replaces the earlier one: a Ctrl-C
    while it is checked, or a check that fails, leaves the earlier artifact as it was and removes only this run's
    temporary file; a run that finishes replaces the artifact with its own."""
    (tmp_path / "final_model.int6.ptz").write_bytes(EARLIER)
    (tmp_path / OTHER_TMP).write_bytes(b"half")
    unpack, seen = tg.unpack_artifact, []

    def interrupted_check(blob, reference):
        (own,) = [p for p in tmp_path.glob("final_model.int6.ptz.*.tmp") if p.name != OTHER_TMP]
        seen.append((own.name, own.read_bytes() == blob))
        raise KeyboardInterrupt

    def corrupted(blob, reference):
        state = unpack(blob, reference)
        return dict(state, **{"tok_emb.weight": state["tok_emb.weight"] + 1})

    short = dict(ITERATIONS="2", TRAIN_BATCH_TOKENS="512", WARMUP_STEPS="0", VAL_LOSS_EVERY="0", EVAL_STRIDE="0",
                 VAL_MAX_TOKENS="1024", WARMDOWN_ITERS="1")
    for patch, outcome in ((interrupted_check, 130), (corrupted, RuntimeError)):
        monkeypatch.setattr(tg, "unpack_artifact", patch)
        if outcome == 130:
            assert run_in_process(tmp_path, tiny_data, **short) == 130
            assert re.fullmatch(r"interrupted at step 2 \(train_time \d+ ms\): no artifact written; the earlier "
                                r"final_model\.int6\.ptz is kept", log_lines(tmp_path)[-1])
        else:
            with pytest.raises(RuntimeError, match=r"final_model\.int6\.ptz\.\d+-[0-9a-f]{8}\.tmp: unpacks to other "
                                                   r"values than were packed \(tok_emb\.weight\)"):
                run_in_process(tmp_path, tiny_data, **short)
        assert (tmp_path / "final_model.int6.ptz").read_bytes() == EARLIER
        assert [p.name for p in tmp_path.glob("*.tmp")] == [OTHER_TMP]
    assert len(seen) == 1 and re.fullmatch(r"final_model\.int6\.ptz\.\d+-[0-9a-f]{8}\.tmp", seen[0][0]) and seen[0][1]
    monkeypatch.setattr(tg, "unpack_artifact", unpack)
    assert run_in_process(tmp_path, tiny_data, **short) == 0
    (line,) = [line for line in log_lines(tmp_path) if line.startswith("artifact:final_model.int6.ptz bytes:")]
    new = (tmp_path / "final_model.int6.ptz").read_bytes()
    assert new != EARLIER and line.endswith(f"sha256:{__import__('hashlib').sha256(new).hexdigest()}")
    assert [p.name for p in tmp_path.glob("*.tmp")] == [OTHER_TMP]
