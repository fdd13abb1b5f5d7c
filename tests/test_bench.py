"""bench/bench.py summarises a real train_gpt.py log into throughput figures."""
import sys

import pytest

import train_gpt as tg
from conftest import REPO, field, log_lines

sys.path.insert(0, str(REPO / "bench"))
import bench  # noqa: E402


def test_flops_per_token_at_the_defaults():
    matmul_weights = 11 * (512 * 512 * 2 + 2 * 512 * 256 + 2 * 512 * 1536) + 128 * 512 + 1024 * 512
    assert matmul_weights == 26_829_913 - 2048 * 128 - 91_225 + 65_536  # all params but tables and small tensors
    expected = 6 * matmul_weights + 6 * 11 * 2048 * 512
    assert bench.model_flops_per_token(tg.read_hyperparameters({})) == expected


def test_summary_of_the_tiny_run(tiny_run):
    summary = bench.summarise(tiny_run / "logs" / "tiny.txt")
    last_val = [l for l in log_lines(tiny_run) if l.startswith("step:30/30 val_loss")][0]
    assert summary["steps"] == 30 and summary["ms_per_step"] == float(field(last_val, "step_avg")[:-2])
    assert summary["tokens_per_s"] == pytest.approx(1024 / (summary["ms_per_step"] / 1000))
    assert summary["attention"] == "sdpa" and summary["device"] == "cpu" and summary["world_size"] == 1
    assert summary["warmup_compile_s"] > 0 and "peak_allocated_mib" not in summary  # CPU: no CUDA memory stats
    assert summary["sliding_windows"] == len(tg.sliding_windows(4096, 64, 16)) == 253
    sliding = [l for l in log_lines(tiny_run) if l.startswith("final_int6_sliding_window val_loss")][0]
    seconds = int(field(sliding, "eval_time")[:-2]) / 1000
    assert summary["sliding_windows_per_s_per_gpu"] == pytest.approx(253 / seconds)
    full = len(tg.sliding_windows(62_021_632, 64, 16))
    assert summary["sliding_full_val_8gpu_s"] == pytest.approx(full / (8 * 253 / seconds))


def test_rejects_unknown_settings(capsys):
    with pytest.raises(SystemExit):
        bench.main(["NOT_A_SETTING=1"])
    assert "NOT_A_SETTING=1" in capsys.readouterr().err


def test_prints_the_summary_of_a_good_log(tiny_run, capsys):
    log = tiny_run / "logs" / "tiny.txt"
    assert bench.main(["--log", str(log)]) == 0
    expected = [f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}" for k, v in bench.summarise(log).items()]
    out = capsys.readouterr().out.splitlines()
    assert out == expected
    assert out[:2] == ["world_size: 1", "attention: sdpa"] and "steps: 30" in out


def test_missing_log_is_one_line(tmp_path, capsys):
    assert bench.main(["--log", str(tmp_path / "nope.txt")]) == 2
    err = capsys.readouterr().err
    assert err == f"bench.py: error: {tmp_path / 'nope.txt'}: log file not found\n"


def test_log_without_step_lines_is_one_line(tiny_run, tmp_path, capsys):
    lines = (tiny_run / "logs" / "tiny.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    stripped = tmp_path / "no_steps.txt"
    stripped.write_text("".join(l for l in lines if not l.startswith("step:")), encoding="utf-8")
    assert bench.main(["--log", str(stripped)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"bench.py: error: {stripped}: no training step lines")


def test_not_a_train_gpt_log_is_one_line(tmp_path, capsys):
    other = tmp_path / "other.txt"
    other.write_text("hello\n")
    assert bench.main(["--log", str(other)]) == 2
    assert capsys.readouterr().err == f"bench.py: error: {other}: no 'hparam' lines; is it a train_gpt.py log?\n"


def test_missing_log_from_the_command_line(tmp_path):
    import subprocess

    res = subprocess.run([sys.executable, str(REPO / "bench" / "bench.py"), "--log", str(tmp_path / "x.txt")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr == f"bench.py: error: {tmp_path / 'x.txt'}: log file not found\n"  # no traceback
