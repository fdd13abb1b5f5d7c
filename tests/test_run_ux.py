"""The run as a user lives it: warnings for misspelt variables, a clean Ctrl-C, a refused corrupt artifact, the
artifact's hash, progress fields, subset markers and the summary block at the end of the log."""
from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import train_gpt as tg
from conftest import REPO, TINY_ENV, TOKENIZER, TORCHRUN, field, log_lines


def script_env(tiny_data, **env):
    full = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    full.update({**TINY_ENV, "DATA_PATH": str(tiny_data), "TOKENIZER_PATH": str(TOKENIZER), "RUN_ID": "ux",
                 "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", **env})
    return full


def run_script(tmp_path, tiny_data, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "train_gpt.py")], cwd=tmp_path, env=script_env(tiny_data, **env),
                          capture_output=True, text=True, timeout=300)


def test_misspelt_variables_are_named_before_anything_runs(tmp_path, tiny_data):
    assert tg.misspelt({"NUM_LAYER": "3", "OMP_NUM_THREADS": "1", "PATH": "/bin", "NUM_LAYERS": "2", "EMA_DECY": "1"}) == [
        "warning: EMA_DECY is not a hyperparameter; did you mean EMA_DECAY?",
        "warning: NUM_LAYER is not a hyperparameter; did you mean NUM_LAYERS?"]
    proc = run_script(tmp_path, tiny_data, NUM_LAYER="3", TOKENIZER_PATH="nowhere.model")
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["warning: NUM_LAYER is not a hyperparameter; did you mean NUM_LAYERS?",
                                        "error: TOKENIZER_PATH=nowhere.model: expected an existing SentencePiece "
                                        ".model file"]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not_a_checkpoint"])
def test_corrupt_eval_only_artifact_is_one_line_and_writes_nothing(tmp_path, tiny_run, tiny_data, damage):
    good = (tiny_run / "final_model.int6.ptz").read_bytes()
    bad = {"truncated": good[: len(good) // 2], "garbage": os.urandom(4000),
           "not_a_checkpoint": __import__("zstandard").ZstdCompressor().compress(b"hello")}[damage]
    (tmp_path / "art.ptz").write_bytes(bad)
    proc = run_script(tmp_path, tiny_data, EVAL_ONLY="art.ptz")
    assert proc.returncode == 2 and proc.stdout == ""
    (line,) = proc.stderr.splitlines()
    assert line.startswith("error: EVAL_ONLY=art.ptz: not a valid int6+zstd artifact (")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art.ptz"]  # no log, nothing else


def start_training(tmp_path, tiny_data, launcher: list[str], **env) -> subprocess.Popen:
    (tmp_path / "final_model.int6.ptz").write_bytes(b"an earlier run's artifact")
    return subprocess.Popen(launcher + [str(REPO / "train_gpt.py")], cwd=tmp_path, text=True,
                            env=script_env(tiny_data, ITERATIONS="100000", MAX_WALLCLOCK_SECONDS="600", **env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def interrupt_after_step(proc: subprocess.Popen, log, step: int) -> tuple[str, str]:
    deadline = time.time() + 120
    while not (log.exists() and f"step:{step}/" in log.read_text()):
        assert proc.poll() is None and time.time() < deadline, "training did not start"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)  # what a Ctrl-C in the terminal does: the whole process group gets SIGINT
    return proc.communicate(timeout=120)


def test_ctrl_c_is_one_line_exit_130_and_no_artifact(tmp_path, tiny_data):
    proc = start_training(tmp_path, tiny_data, [sys.executable])
    out, err = interrupt_after_step(proc, tmp_path / "logs" / "ux.txt", 3)
    assert proc.returncode == 130
    (line,) = err.splitlines()
    assert re.fullmatch(r"interrupted at step \d+ \(train_time \d+ ms\): no artifact written", line)
    lines = log_lines(tmp_path, "ux")
    assert lines[-1] == line and "artifact:removed the final_model.int6.ptz of an earlier run" in lines
    assert not (tmp_path / "final_model.int6.ptz").exists() and not list(tmp_path.glob("*.tmp"))
    # under a wall-clock cap the progress fields include the time left
    train = [l for l in lines if re.match(r"step:\d+/\d+ train_loss", l)]
    assert train and all(re.search(r" lr_mul:1\.0000 time_left:\d+\.\ds$", l) for l in train)


def test_ctrl_c_under_torchrun_two_ranks(tmp_path, tiny_data):
    """torchrun adds its own report after ours (and exits 1): our line comes first, once, and nothing is left."""
    proc = start_training(tmp_path, tiny_data, [str(TORCHRUN), "--standalone", "--nproc_per_node=2"])
    out, err = interrupt_after_step(proc, tmp_path / "logs" / "ux.txt", 3)
    ours = [l for l in err.splitlines() if l.startswith("interrupted at step")]
    assert len(ours) == 1 and log_lines(tmp_path, "ux")[-1] == ours[0]
    assert not (tmp_path / "final_model.int6.ptz").exists() and not list(tmp_path.glob("*.tmp"))


def test_the_log_names_the_artifact_and_ends_with_a_summary(tiny_run):
    lines = log_lines(tiny_run)
    blob = (tiny_run / "final_model.int6.ptz").read_bytes()
    assert f"artifact:final_model.int6.ptz bytes:{len(blob)} sha256:{hashlib.sha256(blob).hexdigest()}" in lines
    code = len(tg.self_extracting((REPO / "train_gpt.py").read_bytes()))
    summary = [l for l in lines if l.startswith("summary: ")]
    assert summary[0] == "summary: steps:30 train_time:" + field(summary[0], "train_time") + " stop:iterations"
    bpb = dict(kv.split(":") for kv in summary[1].split()[2:-1])
    assert summary[1].endswith(" subset") and set(bpb) == {"pre_quant", "averaged", "roundtrip", "sliding"}
    assert bpb["sliding"] == field([l for l in lines if l.startswith("final_int6_sliding_window ")][0], "val_bpb")
    assert summary[2] == f"summary: bytes model:{len(blob)} code:{code} total:{len(blob) + code} limit:16000000 ok"
    assert re.fullmatch(r"summary: budget evaluation:\d+ms = averaged \d+ \+ export \d+ \+ roundtrip \d+ \+ sliding \d+, "
                        r"limit:600000ms on 8 GPUs unchecked \(this run: 1x cpu\)", summary[3])
    # final lines carry the subset marker; train lines the LR multiplier (no cap: no time left)
    assert all(l.endswith(" subset") for l in lines if l.startswith("final_int6_"))
    train = [l for l in lines if re.match(r"step:\d+/\d+ train_loss", l)]
    assert [field(l, "lr_mul") for l in train[-2:]] == ["1.0000", "0.1000"] and "time_left" not in train[-1]
    assert [l for l in lines if l.startswith("warmup_time:")][0].endswith("ms")  # compile off: no compilation


def test_short_runs_warn_about_warmdown_and_full_validation_has_no_subset_marker(tmp_path, tiny_run, tiny_data):
    proc = run_script(tmp_path, tiny_data, ITERATIONS="4", WARMUP_STEPS="0", VAL_LOSS_EVERY="0", EVAL_STRIDE="0",
                      VAL_MAX_TOKENS="0")
    assert proc.returncode == 0, proc.stderr
    lines = log_lines(tmp_path, "ux")
    assert "warning: WARMDOWN_ITERS=10 > ITERATIONS=4: the learning rate starts at 0.400 of its value and only " \
           "decays" in lines
    finals = [l for l in lines if l.startswith("final_int6_")]
    assert len(finals) == 2 and not any("subset" in l for l in finals)
    assert int(field(finals[1], "tokens")) > 4096  # the whole (tiny) validation set


def test_batch_error_names_the_nearest_valid_sizes():
    hp = tg.read_hyperparameters({"TRAIN_BATCH_TOKENS": "1000", "TRAIN_SEQ_LEN": "64"})
    with pytest.raises(tg.InputError, match=r"\(nearest valid: 512 or 1024\)"):
        tg.runtime(hp)
    with pytest.raises(tg.InputError, match=r"\(nearest valid: 16384\)$"):
        tg.runtime(tg.read_hyperparameters({"TRAIN_BATCH_TOKENS": "100"}))
