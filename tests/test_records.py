"""Tests for records/package.py: log parsing, compliance checks, packaging and the significance test."""
from __future__ import annotations

import importlib.util
import hashlib
import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_PY = ROOT / "records" / "package.py"
REAL_SCRIPT = ROOT / "train_gpt.py"
SEP = "=" * 100
TOKENS = 62_021_632
BYTES = 151_080_633


def _load(path: Path, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


pkg = _load(PACKAGE_PY, "records_package_under_test")

STAND_IN = '''"""Stand-in for train_gpt.py (used only until the real script exists)."""
import os
from types import SimpleNamespace

HPARAM_NAMES = ["DATA_PATH", "RUN_ID", "SEED", "ITERATIONS", "NUM_LAYERS", "ROPE_BASE", "MATRIX_LR",
                "MAX_WALLCLOCK_SECONDS", "VAL_MAX_TOKENS", "EVAL_STRIDE", "VE_LAYERS"]


def read_hyperparameters(env=os.environ):
    return SimpleNamespace(
        data_path=env.get("DATA_PATH", "./data/datasets/fineweb10B_sp1024"),
        run_id=env.get("RUN_ID", "random"),
        seed=int(env.get("SEED", 1337)),
        iterations=int(env.get("ITERATIONS", 20000)),
        num_layers=int(env.get("NUM_LAYERS", 11)),
        rope_base=float(env.get("ROPE_BASE", 50000.0)),
        matrix_lr=float(env.get("MATRIX_LR", 0.025)),
        max_wallclock_seconds=float(env.get("MAX_WALLCLOCK_SECONDS", 600.0)),
        val_max_tokens=int(env.get("VAL_MAX_TOKENS", 0)),
        eval_stride=int(env.get("EVAL_STRIDE", 64)),
        ve_layers=env.get("VE_LAYERS", "9,10"),
    )
'''


@pytest.fixture(scope="session")
def script_info(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Bytes, hparam names and defaults of the script the fixture logs embed (real one if present)."""
    if REAL_SCRIPT.is_file():
        path = REAL_SCRIPT
    else:
        path = tmp_path_factory.mktemp("standin") / "train_gpt.py"
        path.write_text(STAND_IN)
    module = _load(path, "train_gpt_for_records_tests")
    defaults = module.read_hyperparameters({})
    names = list(module.HPARAM_NAMES)
    return {
        "path": path,
        "bytes": path.read_bytes(),
        "names": names,
        "defaults": {n: str(getattr(defaults, n.lower())) for n in names},
        "real": path == REAL_SCRIPT,
    }


def make_log(
    script: dict[str, Any],
    seed: int = 1337,
    *,
    sw_loss: float = 1.8900,
    sw_tokens: int = TOKENS,
    overrides: Optional[dict[str, str]] = None,
    world_size: int = 8,
    steps: int = 7000,
    train_time_ms: float = 599_950.0,
    step_avg_ms: float = 85.71,
    model_bytes: int = 15_500_000,
    post_training_ms: float = 150_000.0,
    omit: tuple[str, ...] = (),
    val_subset: bool = False,
    eval_only: bool = False,
    source: Optional[bytes] = None,
    size_exceeded: bool = False,
    new_format: bool = False,
    artifact: Optional[tuple[str, int, str]] = None,
    ttt_loss: Optional[float] = None,
    ttt_tokens: int = TOKENS,
    ttt_ms: float = 310_000.0,
    gptq: Optional[tuple[float, float, float]] = None,
    budget_exceeded: Optional[str] = None,
    subset_marker: bool = False,
) -> bytes:
    """A train_gpt.py-style log. `omit` drops every line starting with one of the given prefixes.

    new_format: step lines carry the appended ` lr_mul:... time_left:...s` fields and `summary:` lines appear;
    artifact: (path, bytes, sha256) for an `artifact:` line; ttt_loss: add the test-time-training lines;
    gptq: (train_ms, calib_ms, total_ms) for a `gptq:budget` line; budget_exceeded: the text of a
    `budget:exceeded` line; subset_marker: final lines end with ` subset`."""
    src = script["bytes"] if source is None else source
    hp = dict(script["defaults"])
    hp.update({"SEED": str(seed), "RUN_ID": f"run_{seed}"})
    hp.update(overrides or {})
    ratio = TOKENS / (BYTES * math.log(2))
    rt_loss = sw_loss + 0.04
    code = len(script["bytes"])
    lines = [
        SEP,
        "Running Python 3.12.3 (main, Jan 1 2025, 00:00:00) [GCC 13.2.0]",
        "Running PyTorch 2.9.1+cu128",
        "Tue Mar 24 10:00:00 2026",
        "+-----------------------------------------------------------------------------------------+",
        "| NVIDIA-SMI 570.124.06             Driver Version: 570.124.06     CUDA Version: 12.8     |",
    ]
    lines += [f"|   {i}  NVIDIA H100 80GB HBM3          On  |   00000000:{i:02d}:00.0 Off |                    0 |"
              for i in range(world_size)]
    lines += [SEP]
    lines += [f"hparam {k}={v}" for k, v in hp.items()]
    if val_subset:
        lines.append("val_subset:VAL_MAX_TOKENS=1048576 tokens:1048576")
    if eval_only:
        lines.append("eval_only:final_model.int6.ptz")
    lines += [
        f"val_loader:shards pattern=./data/datasets/fineweb10B_sp1024/fineweb_val_*.bin tokens:{TOKENS}",
        f"world_size:{world_size} grad_accum_steps:{8 // world_size if world_size <= 8 else 1}",
        "model_params:26829913",
        f"seed:{seed}",
        f"step:1/20000 train_loss:6.9300 train_time:{step_avg_ms:.0f}ms step_avg:{step_avg_ms:.2f}ms",
        f"step:{steps // 2}/20000 val_loss:2.0000 val_bpb:1.1845 train_time:{train_time_ms / 2:.0f}ms step_avg:{step_avg_ms:.2f}ms",
        f"step:{steps}/20000 val_loss:{sw_loss + 0.03:.4f} val_bpb:{(sw_loss + 0.03) * ratio:.4f} "
        f"train_time:{train_time_ms:.0f}ms step_avg:{step_avg_ms:.2f}ms",
        f"stopping_early: wallclock_cap train_time:{train_time_ms:.0f}ms step:{steps}/20000",
        "peak memory allocated: 13647 MiB reserved: 14000 MiB",
        "swa:applying averaged 7 checkpoints",
        f"Serialized model int6+zstd: {model_bytes} bytes",
        f"Code size: {code} bytes",
        f"Total submission size int6+zstd: {model_bytes + code} bytes",
    ]
    if size_exceeded:
        lines.append(f"size_limit:exceeded total:{model_bytes + code} limit:16000000 over_by:{model_bytes + code - 16_000_000}")
    if artifact is not None:
        lines.append(f"artifact:{artifact[0]} bytes:{artifact[1]} sha256:{artifact[2]}")
    if gptq is not None:
        lines.append(f"gptq:budget train_ms:{gptq[0]:.0f} calib_ms:{gptq[1]:.0f} total_ms:{gptq[2]:.0f} limit_ms:600000")
    if budget_exceeded is not None:
        lines.append(budget_exceeded)
    finals = [
        f"final_int6_roundtrip val_loss:{rt_loss:.4f} val_bpb:{rt_loss * ratio:.4f} eval_time:5800ms",
        f"final_int6_roundtrip_exact val_loss:{rt_loss:.8f} val_bpb:{rt_loss * ratio:.8f} tokens:{TOKENS - 1024} bytes:{BYTES - 2000}",
        f"final_int6_sliding_window val_loss:{sw_loss:.4f} val_bpb:{sw_loss * ratio:.4f} stride:64 eval_time:73100ms",
        f"final_int6_sliding_window_exact val_loss:{sw_loss:.8f} val_bpb:{sw_loss * ratio:.8f} tokens:{sw_tokens} bytes:{BYTES}",
    ]
    if ttt_loss is not None:
        finals += [
            f"final_int6_ttt val_loss:{ttt_loss:.4f} val_bpb:{ttt_loss * ratio:.4f} stride:64 chunk_tokens:32768 "
            f"eval_time:{ttt_ms - 1000:.0f}ms",
            f"final_int6_ttt_exact val_loss:{ttt_loss:.8f} val_bpb:{ttt_loss * ratio:.8f} tokens:{ttt_tokens} bytes:{BYTES}",
        ]
    if subset_marker:
        finals = [ln + " subset" for ln in finals]
    lines += finals
    if ttt_loss is not None:
        lines.append(f"ttt_time:{ttt_ms:.0f}ms")
    lines.append(f"post_training_time:{post_training_ms:.0f}ms")
    if new_format:
        lines = [ln + " lr_mul:0.0012 time_left:0.1s" if re.match(r"step:\d+/\d+ (train|val)_loss", ln) else ln
                 for ln in lines]
        lines.insert(lines.index(f"seed:{seed}") + 1, "summary: params:26829913 layers:11 dim:512")
        lines.append(f"summary: val_bpb:{sw_loss * ratio:.8f} bytes_total:{model_bytes + code}")
    lines = [ln for ln in lines if not any(ln.startswith(p) for p in omit)]
    return src + ("\n".join(lines) + "\n").encode()


def write_logs(tmp_path: Path, script: dict[str, Any], specs: list[dict[str, Any]]) -> list[Path]:
    paths = []
    (tmp_path / "logs").mkdir(parents=True, exist_ok=True)
    for i, spec in enumerate(specs):
        p = tmp_path / "logs" / f"run{i}.txt"
        p.write_bytes(make_log(script, **spec))
        paths.append(p)
    return paths


GOOD = [dict(seed=1337, sw_loss=1.8900), dict(seed=42, sw_loss=1.8910), dict(seed=2025, sw_loss=1.8920, model_bytes=15_600_000)]


def run_pkg(tmp_path: Path, script: dict[str, Any], logs: list[Path], *extra: str) -> int:
    argv = [str(p) for p in logs] + [
        "--name", "Test Record", "--author", "Jane Doe", "--github-id", "janedoe", "--blurb", "a test",
        "--date", "2026-03-24", "--script", str(script["path"]), "--out-root", str(tmp_path / "out"), *extra,
    ]
    return pkg.main(argv)


def out_files(tmp_path: Path) -> list[Path]:
    out = tmp_path / "out"
    return sorted(p for p in out.rglob("*")) if out.exists() else []


def record_dir(tmp_path: Path, track: str = "track_10min_16mb") -> Path:
    return tmp_path / "out" / track / "2026-03-24_Test_Record"


# --------------------------------------------------------------------------------------------------------------
# Significance


def _runs(losses: list[float]) -> list[Any]:
    return [pkg.RunLog(path=Path(f"r{i}"), seed=i, sw_loss=x, sw_tokens=TOKENS, sw_bytes=BYTES) for i, x in enumerate(losses)]


def test_significance_clear_pass_and_fail() -> None:
    sota = 1.9000
    good = pkg.significance_test(_runs([1.8800, 1.8810, 1.8790]), sota_loss=sota)
    assert good["computable"] and good["passed"] and good["p_value"] < 1e-3 and good["df"] == 2 and good["n"] == 3
    # improves on SOTA, but by less than the 0.005-nat margin
    small = pkg.significance_test(_runs([1.8970, 1.8960, 1.8980]), sota_loss=sota)
    assert small["computable"] and not small["passed"] and small["p_value"] > 0.5
    # noisy: mean clears the margin but the spread is too large for p < 0.01
    noisy = pkg.significance_test(_runs([1.880, 1.900, 1.870]), sota_loss=sota)
    assert not noisy["passed"] and 0.01 < noisy["p_value"] < 0.5


def test_significance_hand_computed_t() -> None:
    losses = [1.8900, 1.8910, 1.8920]  # threshold 1.895 -> d = -5e-3, -4e-3, -3e-3, mean -4e-3, sd 1e-3
    res = pkg.significance_test(_runs(losses), sota_loss=1.9000)
    t = -4e-3 / (1e-3 / math.sqrt(3))
    assert res["t"] == pytest.approx(t, rel=1e-6)
    # Student t with 2 degrees of freedom has the closed form P(T <= t) = 1/2 + t / (2 sqrt(t^2 + 2))
    assert res["p_value"] == pytest.approx(0.5 + t / (2 * math.sqrt(t * t + 2)), rel=1e-9)
    assert res["p_value"] == pytest.approx(0.0101021, abs=1e-6) and not res["passed"]  # just misses p < 0.01


def test_significance_two_seeds_cauchy_closed_form() -> None:
    """df = 1 is the Cauchy distribution: P(T <= t) = 1/2 + atan(t) / pi."""
    res = pkg.significance_test(_runs([1.8800, 1.8860]), sota_loss=1.9000)  # d = -0.015, -0.009
    t = -0.012 / (math.sqrt(0.000018) / math.sqrt(2))
    assert res["df"] == 1 and res["t"] == pytest.approx(t, rel=1e-6)
    assert res["p_value"] == pytest.approx(0.5 + math.atan(t) / math.pi, rel=1e-9)
    assert not res["passed"]  # t = -4, p = 0.078: two seeds rarely clear p < 0.01


def test_hand_written_student_t_is_gone() -> None:
    for name in ("student_t_cdf", "student_t_sf", "regularized_incomplete_beta", "_beta_continued_fraction"):
        assert not hasattr(pkg, name), name
    assert "continued fraction" not in PACKAGE_PY.read_text()


def test_significance_without_scipy_is_one_clear_error(tmp_path: Path, script_info: dict[str, Any],
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "scipy", None)  # import scipy now raises ImportError
    logs = write_logs(tmp_path, script_info, GOOD)
    assert run_pkg(tmp_path, script_info, logs, "--sota-loss", "1.91") == 2
    err = capsys.readouterr().err
    assert [ln for ln in err.splitlines() if ln.startswith("error:")] == [
        "error: scipy is not installed; the significance test needs it (pip install scipy, or pip install -r "
        "requirements.txt)"]
    assert out_files(tmp_path) == []


def test_significance_bpb_conversion_matches_loss() -> None:
    ratio = TOKENS / (BYTES * math.log(2))
    losses = [1.8800, 1.8810, 1.8790]
    a = pkg.significance_test(_runs(losses), sota_loss=1.9)
    b = pkg.significance_test(_runs(losses), sota_bpb=1.9 * ratio)
    assert b["p_value"] == pytest.approx(a["p_value"], rel=1e-9)
    assert "tokens" in b["conversion"] and "ln(2)" in b["conversion"]
    assert b["margin_bpb_per_seed"]["0"] == pytest.approx(0.005 * ratio, abs=1e-8)


def test_significance_one_seed_not_computable() -> None:
    res = pkg.significance_test(_runs([1.85]), sota_loss=1.9)
    assert res["computable"] is False and "at least 2" in res["reason"]
    assert any("cannot be computed" in ln for ln in pkg.format_significance(res))


# --------------------------------------------------------------------------------------------------------------
# Packaging


def test_good_three_seed_package(tmp_path: Path, script_info: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    logs = write_logs(tmp_path, script_info, GOOD)
    assert run_pkg(tmp_path, script_info, logs, "--sota-loss", "1.9100") == 0
    d = record_dir(tmp_path)
    assert sorted(p.name for p in d.iterdir()) == sorted(
        ["README.md", "curves.png", "submission.json", "train_gpt.py", "train_seed1337.log", "train_seed42.log",
         "train_seed2025.log"]
    )
    # nothing else (no temp dirs) beside the record folder
    assert [p.name for p in d.parent.iterdir()] == [d.name]
    assert (d / "train_gpt.py").read_bytes() == script_info["bytes"]
    for spec, log in zip(GOOD, logs):
        assert (d / f"train_seed{spec['seed']}.log").read_bytes() == log.read_bytes()
    sub = json.loads((d / "submission.json").read_text())
    ratio = TOKENS / (BYTES * math.log(2))
    bpbs = [float(f"{x * ratio:.8f}") for x in (1.8900, 1.8910, 1.8920)]
    assert sub["val_bpb"] == pytest.approx(sum(bpbs) / 3, abs=1e-8)
    assert sub["val_loss"] == pytest.approx(1.8910, abs=1e-8)
    assert sub["val_bpb_std"] == pytest.approx(0.001 * ratio, rel=1e-5)
    assert sub["int6_zstd_val_bpb"] == pytest.approx(1.9310 * ratio, abs=1e-7)
    assert sub["pre_quant_val_bpb"] == pytest.approx(sum(round((x + 0.03) * ratio, 4) for x in (1.89, 1.891, 1.892)) / 3, abs=1e-8)
    code = len(script_info["bytes"])
    assert sub["bytes_code"] == code
    assert sub["bytes_model_int6_zstd"] == 15_600_000
    assert sub["bytes_total"] == 15_600_000 + code
    assert sub["seeds"] == [1337, 42, 2025]
    sr = sub["seed_results"]["42"]
    assert sr["val_loss"] == pytest.approx(1.891) and sr["steps"] == 7000 and sr["train_time_ms"] == 599_950
    assert sr["eval_time_ms"] == 150_000 and sr["bytes_total"] == 15_500_000 + code
    assert set(sr) >= {"val_loss", "val_bpb", "roundtrip_val_bpb", "pre_quant_val_bpb", "bytes_total", "steps",
                       "train_time_ms", "eval_time_ms"}
    for key in ("author", "github_id", "name", "blurb", "date", "track", "hardware", "pytorch_version"):
        assert key in sub
    assert sub["author"] == "Jane Doe" and sub["name"] == "Test Record" and sub["date"] == "2026-03-24"
    assert sub["track"] == "track_10min_16mb"
    assert sub["hardware"] == "8x NVIDIA H100 80GB HBM3"
    assert sub["pytorch_version"] == "2.9.1+cu128"
    comp = sub["compliance"]
    for k in ("train_under_600s", "artifact_under_16mb", "eval_under_600s", "full_validation_set", "same_script_all_seeds"):
        assert comp[k] is True
    assert comp["failures"] == []
    sig = sub["significance"]
    assert sig["computable"] and sig["passed"] and sig["n"] == 3 and sig["df"] == 2
    readme = (d / "README.md").read_text()
    assert "| 1337 | 7000 |" in readme and "| **mean** |" in readme and "| **std** |" in readme
    assert f"{bpbs[0]:.8f}" in readme and "599.950" in readme and "150.0" in readme
    assert "for SEED in 1337 42 2025; do" in readme
    out = capsys.readouterr().out
    assert "one-sided" in out and "df=2" in out and "PASS" in out and "independent" in out


def test_single_seed_std_zero_and_no_significance(tmp_path: Path, script_info: dict[str, Any],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    logs = write_logs(tmp_path, script_info, GOOD[:1])
    assert run_pkg(tmp_path, script_info, logs, "--sota-bpb", "1.2") == 0
    sub = json.loads((record_dir(tmp_path) / "submission.json").read_text())
    assert sub["val_bpb_std"] == 0.0 and sub["seeds"] == [1337]
    assert sub["significance"]["computable"] is False
    assert "cannot be computed" in capsys.readouterr().out


def test_run_command_reconstructs_non_default_hparams(tmp_path: Path, script_info: dict[str, Any]) -> None:
    names = [n for n in script_info["names"] if n not in ("RUN_ID", "SEED")]
    defaults = script_info["defaults"]
    # pick two numeric hparams to change, one to set explicitly to its default
    changed = [n for n in names if defaults[n].replace(".", "", 1).isdigit()][:2]
    assert len(changed) == 2
    overrides = {changed[0]: str(int(float(defaults[changed[0]])) + 3), changed[1]: defaults[changed[1]] + "1"}
    specs = [dict(s, overrides=overrides, world_size=4) for s in GOOD]
    logs = write_logs(tmp_path, script_info, specs)
    assert run_pkg(tmp_path, script_info, logs) == 0
    readme = (record_dir(tmp_path) / "README.md").read_text()
    cmd = readme.split("```bash\n", 1)[1].split("```", 1)[0]
    assert cmd.splitlines()[0] == "for SEED in 1337 42 2025; do"
    body = cmd.splitlines()[1]
    for k, v in overrides.items():
        assert f"{k}={v} " in body
    assert "SEED=$SEED torchrun --standalone --nproc_per_node=4 train_gpt.py" in body
    assert "RUN_ID=" not in cmd
    for n in names:
        if n not in overrides:
            assert f" {n}=" not in " " + body, f"default hparam {n} should not be on the command line"
    assert "could not be loaded" not in readme


def test_run_command_one_line_per_seed_when_configs_differ() -> None:
    runs = [pkg.RunLog(path=Path("a"), seed=1, world_size=8, hparams={"A": "1", "RUN_ID": "x", "SEED": "1"}),
            pkg.RunLog(path=Path("b"), seed=2, world_size=8, hparams={"A": "2", "RUN_ID": "y", "SEED": "2"})]
    cmd = pkg.build_run_command(runs, None)
    assert cmd.splitlines() == ["A=1 SEED=1 torchrun --standalone --nproc_per_node=8 train_gpt.py",
                                "A=2 SEED=2 torchrun --standalone --nproc_per_node=8 train_gpt.py"]


FAILURES = [
    ("over_16mb", [dict(GOOD[0], model_bytes=16_100_000, size_exceeded=True), GOOD[1]], "size_limit:exceeded"),
    ("over_16mb_no_marker", [dict(GOOD[0], model_bytes=16_100_000), GOOD[1]], "> 16,000,000"),
    ("train_over_600s", [dict(GOOD[0], train_time_ms=601_000.0, step_avg_ms=85.0), GOOD[1]], "train_time 601000ms > 600000ms"),
    ("wallclock_cap_off", [dict(GOOD[0], overrides={"MAX_WALLCLOCK_SECONDS": "0.0"}), dict(GOOD[1], overrides={"MAX_WALLCLOCK_SECONDS": "0.0"})],
     "MAX_WALLCLOCK_SECONDS=0.0"),
    ("wallclock_cap_high", [dict(GOOD[0], overrides={"MAX_WALLCLOCK_SECONDS": "900.0"})], "MAX_WALLCLOCK_SECONDS=900.0"),
    ("eval_over_600s", [GOOD[0], dict(GOOD[1], post_training_ms=612_000.0)], "post_training_time 612000ms > 600000ms"),
    ("missing_final_line", [GOOD[0], dict(GOOD[1], omit=("final_int6_sliding_window_exact",))],
     "missing final line(s): final_int6_sliding_window_exact"),
    ("missing_post_training", [dict(GOOD[0], omit=("post_training_time",))], "missing final line(s): post_training_time"),
    ("script_differs_between_logs", [GOOD[0], dict(GOOD[1], source=b"print('other')\n")], "embedded script differs from"),
    ("val_subset", [dict(GOOD[0], val_subset=True)], "validation subset used"),
    ("val_max_tokens", [dict(GOOD[0], overrides={"VAL_MAX_TOKENS": "65536"})], "VAL_MAX_TOKENS=65536"),
    ("eval_only", [GOOD[0], dict(GOOD[1], eval_only=True)], "eval-only run"),
    ("eval_only_hparam", [dict(GOOD[0], overrides={"EVAL_ONLY": "final_model.int6.ptz"})], "eval-only run"),
    ("sliding_not_all_targets", [dict(GOOD[0], sw_tokens=TOKENS - 64)], f"validation set has {TOKENS} targets"),
    ("duplicate_seed", [GOOD[0], dict(GOOD[1], seed=1337)], "seed 1337 already used"),
]


@pytest.mark.parametrize("specs,message", [f[1:] for f in FAILURES], ids=[f[0] for f in FAILURES])
def test_failures_write_nothing(tmp_path: Path, script_info: dict[str, Any], capsys: pytest.CaptureFixture[str],
                                specs: list[dict[str, Any]], message: str) -> None:
    logs = write_logs(tmp_path, script_info, specs)
    assert run_pkg(tmp_path, script_info, logs) == 1
    err = capsys.readouterr().err
    fail_lines = [ln for ln in err.splitlines() if ln.startswith("FAIL ")]
    assert any(message in ln for ln in fail_lines), err
    # each failure line names the log it is about
    assert all(any(str(p) in ln for p in logs) for ln in fail_lines), err
    assert out_files(tmp_path) == []


def test_script_differs_from_script_file(tmp_path: Path, script_info: dict[str, Any],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    logs = write_logs(tmp_path, script_info, GOOD)
    other = tmp_path / "train_gpt.py"
    other.write_bytes(script_info["bytes"] + b"# edited\n")
    argv = [str(p) for p in logs] + ["--name", "X", "--author", "a", "--github-id", "g", "--date", "2026-03-24",
                                     "--script", str(other), "--out-root", str(tmp_path / "out")]
    assert pkg.main(argv) == 1
    err = capsys.readouterr().err
    assert "embedded script differs from the --script file" in err
    assert out_files(tmp_path) == []


def test_non_record_packages_anyway_and_lists_failures(tmp_path: Path, script_info: dict[str, Any]) -> None:
    specs = [GOOD[0], dict(GOOD[1], train_time_ms=700_000.0), dict(GOOD[2], omit=("final_int6_roundtrip_exact",))]
    logs = write_logs(tmp_path, script_info, specs)
    assert run_pkg(tmp_path, script_info, logs, "--non-record") == 0
    d = record_dir(tmp_path, "track_non_record_16mb")
    sub = json.loads((d / "submission.json").read_text())
    assert sub["track"] == "track_non_record_16mb"
    comp = sub["compliance"]
    assert comp["train_under_600s"] is False and comp["final_lines_present"] is False
    assert comp["artifact_under_16mb"] is True and len(comp["failures"]) == 2
    assert sub["seed_results"]["2025"]["roundtrip_val_bpb"] is None
    assert sub["int6_zstd_val_bpb"] == pytest.approx(1.9305 * TOKENS / (BYTES * math.log(2)), abs=1e-7)
    readme = (d / "README.md").read_text()
    assert "train_time 700000ms > 600000ms" in readme and "final_int6_roundtrip_exact" in readme
    assert "**NO**" in readme
    assert not (tmp_path / "out" / "track_10min_16mb").exists()


def test_refuses_existing_folder_unless_force(tmp_path: Path, script_info: dict[str, Any],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    logs = write_logs(tmp_path, script_info, GOOD)
    assert run_pkg(tmp_path, script_info, logs) == 0
    d = record_dir(tmp_path)
    (d / "README.md").write_text("hand edits")
    assert run_pkg(tmp_path, script_info, logs) == 2
    assert "already exists" in capsys.readouterr().err
    assert (d / "README.md").read_text() == "hand edits"
    assert run_pkg(tmp_path, script_info, logs, "--force") == 0
    assert (d / "README.md").read_text().startswith("# Test Record")
    assert [p.name for p in d.parent.iterdir()] == [d.name]


def test_bad_date_and_missing_log(tmp_path: Path, script_info: dict[str, Any]) -> None:
    logs = write_logs(tmp_path, script_info, GOOD[:1])
    assert run_pkg(tmp_path, script_info, logs, "--date", "24/03/2026") == 2
    assert run_pkg(tmp_path, script_info, [tmp_path / "nope.txt"]) == 2
    assert out_files(tmp_path) == []


def test_embedded_source_with_logger_newline(tmp_path: Path, script_info: dict[str, Any]) -> None:
    """A logger that writes source + '\\n' before the separator still matches the script byte-for-byte."""
    specs = [dict(GOOD[0], source=script_info["bytes"] + b"\n")]
    logs = write_logs(tmp_path, script_info, specs)
    assert run_pkg(tmp_path, script_info, logs) == 0
    assert (record_dir(tmp_path) / "train_gpt.py").read_bytes() == script_info["bytes"]


def test_cli_help() -> None:
    res = subprocess.run([sys.executable, str(PACKAGE_PY), "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0
    for opt in ("--name", "--author", "--github-id", "--blurb", "--date", "--script", "--non-record",
                "--sota-bpb", "--sota-loss", "--out-root", "--force", "--artifact"):
        assert opt in res.stdout


# --------------------------------------------------------------------------------------------------------------
# Real logs from a tiny CPU training run


def _tiny_training_helper() -> Any:
    try:
        import conftest  # tests/conftest.py, provided by the training script's author
    except ImportError:
        return None
    return getattr(conftest, "run_tiny_training", None)


def _tiny_log(workdir: Path, result: Any, run_id: str) -> Path:
    """run_tiny_training returns the log path or the finished process (log at workdir/logs/<RUN_ID>.txt)."""
    return Path(result) if isinstance(result, (str, Path)) else workdir / "logs" / f"{run_id}.txt"


@pytest.mark.skipif(not REAL_SCRIPT.is_file(), reason="train_gpt.py does not exist yet")
@pytest.mark.skipif(_tiny_training_helper() is None, reason="tests/conftest.py has no run_tiny_training helper yet")
def test_real_tiny_training_logs_package(tmp_path: Path, script_info: dict[str, Any], request: pytest.FixtureRequest) -> None:
    """Two real CPU runs of train_gpt.py (conftest's tiny settings) parse, check and package end to end."""
    run_tiny_training = _tiny_training_helper()
    data = request.getfixturevalue("tiny_data")  # skips when the shared tokenizer/documents are missing
    logs = []
    for seed in (1, 2):  # a handful of steps each: the test is about the log format, not the model
        workdir = tmp_path / f"s{seed}"
        result = run_tiny_training(workdir, data=data, SEED=str(seed), RUN_ID=f"seed{seed}", ITERATIONS="4",
                                   VAL_LOSS_EVERY="2")
        logs.append(_tiny_log(workdir, result, f"seed{seed}"))
    seeds = [1, 2]
    for log in logs:
        run = pkg.parse_log(log)
        assert run.source == script_info["bytes"]
        assert run.seed is not None and run.hparams and run.world_size == 1 and run.device == "cpu"
        assert run.sw_loss is not None and run.rt_loss is not None and run.post_training_ms is not None
        assert run.model_bytes + run.code_bytes == run.total_bytes and run.code_bytes == len(script_info["bytes"])
        assert run.steps and run.train_time_ms is not None and run.pre_quant_bpb is not None
    # as a record these must fail on the tiny settings' validation subset / disabled wall-clock cap
    runs = [pkg.parse_log(p) for p in logs]
    comp = pkg.check_runs(runs, script_info["bytes"])
    expect_subset = any(r.hparams.get("VAL_MAX_TOKENS", "0") != "0" for r in runs)
    assert comp.flags["full_validation_set"] is (not expect_subset)
    cap_ok = all(0 < float(r.hparams["MAX_WALLCLOCK_SECONDS"]) <= 600 for r in runs)
    assert comp.flags["train_under_600s"] is cap_ok
    assert comp.flags["same_script_all_seeds"] and comp.flags["final_lines_present"] and comp.flags["training_runs"]
    assert comp.flags["same_config_all_seeds"] and comp.flags["artifact_under_16mb"]
    rc = run_pkg(tmp_path, script_info, logs, "--non-record", "--sota-loss", "10.0")
    assert rc == 0
    d = record_dir(tmp_path, "track_non_record_16mb")
    sub = json.loads((d / "submission.json").read_text())
    assert sub["seeds"] == seeds
    assert sub["hardware"].startswith("CPU")
    assert (d / "train_gpt.py").read_bytes() == script_info["bytes"]
    assert (d / f"train_seed{seeds[0]}.log").read_bytes() == logs[0].read_bytes()
    assert sub["significance"]["computable"] and sub["significance"]["df"] == 1
    assert sub["val_bpb"] == pytest.approx((runs[0].sw_bpb + runs[1].sw_bpb) / 2, abs=1e-8)
    readme = (d / "README.md").read_text()
    assert "for SEED in 1 2; do" in readme
    assert "torchrun --standalone --nproc_per_node=1 train_gpt.py" in readme
    assert "NUM_LAYERS=3 " in readme and "RUN_ID=" not in readme
    assert "could not be loaded" not in readme
    # the command runs on the challenge's data; the tiny runs' private paths are listed apart
    cmd = readme_command(readme)
    assert "DATA_PATH=" not in cmd and "TOKENIZER_PATH=" not in cmd and str(tmp_path) not in cmd
    (line,) = [ln for ln in readme.splitlines() if ln.startswith("Local overrides used for these logs: ")]
    assert f"`DATA_PATH={runs[0].hparams['DATA_PATH']}`" in line and "`TOKENIZER_PATH=" in line
    # the picture of the two real runs
    assert (d / "curves.png").read_bytes().startswith(b"\x89PNG") and "![loss curves](curves.png)" in readme


def test_non_record_with_a_different_script_says_so(tmp_path: Path, script_info: dict[str, Any]) -> None:
    logs = write_logs(tmp_path, script_info, GOOD)
    other = tmp_path / "train_gpt.py"
    other.write_bytes(script_info["bytes"] + b"# edited\n")
    argv = [str(p) for p in logs] + ["--name", "Test Record", "--author", "a", "--github-id", "g", "--date", "2026-03-24",
                                     "--script", str(other), "--out-root", str(tmp_path / "out"), "--non-record"]
    assert pkg.main(argv) == 0
    readme = (record_dir(tmp_path, "track_non_record_16mb") / "README.md").read_text()
    assert "does NOT match every log's embedded script" in readme
    assert "the exact script embedded in every log" not in readme


# --------------------------------------------------------------------------------------------------------------
# Issue 11: run command paths, significance on failure, one FAIL line per cause, modes, artifact hash, TTT,
# budgets, subset marker, new log forms, the loss-curve picture


def fail_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("FAIL ")]


def readme_command(readme: str) -> str:
    return readme.split("```bash\n", 1)[1].split("```", 1)[0]


def test_run_command_uses_challenge_paths_and_lists_local_overrides(tmp_path: Path, script_info: dict[str, Any]) -> None:
    private = tmp_path / "private"
    local = {"DATA_PATH": str(private / "data"), "TOKENIZER_PATH": str(private / "tok.model"),
             "TRAIN_FILES": str(private / "train_*.bin"), "VAL_FILES": str(private / "val_*.bin")}
    names = [n for n in script_info["names"] if n not in ("RUN_ID", "SEED") and n not in local]
    other = next(n for n in names if script_info["defaults"][n].isdigit())
    overrides = dict(local, **{other: str(int(script_info["defaults"][other]) + 1)})
    logs = write_logs(tmp_path, script_info, [dict(s, overrides=overrides) for s in GOOD])
    assert run_pkg(tmp_path, script_info, logs) == 0
    readme = (record_dir(tmp_path) / "README.md").read_text()
    cmd = readme_command(readme)
    assert str(private) not in cmd
    for name in local:
        assert f"{name}=" not in cmd
    assert f"{other}={overrides[other]} SEED=$SEED torchrun" in cmd  # other settings stay on the command
    (line,) = [ln for ln in readme.splitlines() if ln.startswith("Local overrides used for these logs: ")]
    for name, value in local.items():
        assert f"`{name}={shlex.quote(value)}`" in line  # globs quoted, ready to paste into a shell
    assert "DATA_PATH=./data/datasets/fineweb10B_sp1024" in readme
    assert "TOKENIZER_PATH=./data/tokenizers/fineweb_1024_bpe.model" in readme


def test_run_command_without_local_overrides_has_no_overrides_line(tmp_path: Path, script_info: dict[str, Any]) -> None:
    logs = write_logs(tmp_path, script_info, GOOD)
    assert run_pkg(tmp_path, script_info, logs) == 0
    assert "Local overrides" not in (record_dir(tmp_path) / "README.md").read_text()


def test_run_command_without_script_defaults_still_leaves_data_paths_out() -> None:
    """When the script's defaults cannot be loaded, data paths equal to the challenge's are not overrides."""
    hp = {"DATA_PATH": "./data/datasets/fineweb10B_sp1024", "TOKENIZER_PATH": "/mine/tok.model", "TRAIN_FILES": "",
          "NUM_LAYERS": "11", "RUN_ID": "x", "SEED": "1"}
    runs = [pkg.RunLog(path=Path("a"), seed=1, world_size=8, hparams=hp)]
    assert pkg.build_run_command(runs, None) == "NUM_LAYERS=11 SEED=1 torchrun --standalone --nproc_per_node=8 train_gpt.py"
    assert pkg.local_overrides(runs, None) == [("TOKENIZER_PATH", "/mine/tok.model")]


def test_significance_printed_even_when_compliance_fails(tmp_path: Path, script_info: dict[str, Any],
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    logs = write_logs(tmp_path, script_info, [GOOD[0], dict(GOOD[1], train_time_ms=650_000.0), GOOD[2]])
    assert run_pkg(tmp_path, script_info, logs, "--sota-loss", "1.9100") == 1
    captured = capsys.readouterr()
    assert "Significance: one-sided" in captured.out and "result: PASS (p < 0.01)" in captured.out
    assert len(fail_lines(captured.err)) == 1 and "not written" in captured.err
    assert out_files(tmp_path) == []


ONE_LINE_CAUSES = [
    # (id, specs, index of the log at fault, expected text)
    ("val_subset", [dict(GOOD[0], val_subset=True, overrides={"VAL_MAX_TOKENS": "1048576"}, sw_tokens=1_048_576,
                         subset_marker=True), GOOD[1]], 0, "validation subset used"),
    ("script_differs", [GOOD[0], dict(GOOD[1], source=b"print('other')\n")], 1, "embedded script differs"),
    ("eval_only", [GOOD[0], dict(GOOD[1], eval_only=True, overrides={"EVAL_ONLY": "final_model.int6.ptz"},
                                 omit=("step:", "stopping_early"))], 1, "eval-only run"),
    ("wallclock_cap_high", [GOOD[0], dict(GOOD[1], overrides={"MAX_WALLCLOCK_SECONDS": "900.0"})], 1,
     "MAX_WALLCLOCK_SECONDS=900.0"),
    ("cap_off_and_over", [dict(GOOD[0], overrides={"MAX_WALLCLOCK_SECONDS": "0.0"}, train_time_ms=700_000.0)], 0,
     "MAX_WALLCLOCK_SECONDS=0.0"),
    ("budget_line_and_total_over", [dict(GOOD[0], gptq=(590_000.0, 15_000.0, 605_000.0),
                                         budget_exceeded="budget:exceeded gptq total_ms:605000 limit_ms:600000")], 0,
     "budget:exceeded gptq total_ms:605000"),
]


@pytest.mark.parametrize("specs,bad,message", [c[1:] for c in ONE_LINE_CAUSES], ids=[c[0] for c in ONE_LINE_CAUSES])
def test_one_fail_line_per_cause(tmp_path: Path, script_info: dict[str, Any], capsys: pytest.CaptureFixture[str],
                                 specs: list[dict[str, Any]], bad: int, message: str) -> None:
    logs = write_logs(tmp_path, script_info, specs)
    assert run_pkg(tmp_path, script_info, logs) == 1
    lines = fail_lines(capsys.readouterr().err)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"FAIL {logs[bad]}: ") and message in lines[0]
    assert out_files(tmp_path) == []


def test_one_line_per_check_lists_every_problem_of_that_log(tmp_path: Path, script_info: dict[str, Any],
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    logs = write_logs(tmp_path, script_info, [dict(GOOD[0], omit=("final_int6_roundtrip_exact", "seed:"),
                                                   overrides={"SEED": ""})])
    assert run_pkg(tmp_path, script_info, logs) == 1
    (line,) = fail_lines(capsys.readouterr().err)
    assert "missing final line(s): final_int6_roundtrip_exact" in line and "no 'seed:' line" in line


@pytest.mark.parametrize("umask", [0o077, 0o002])
def test_folder_and_file_modes_do_not_depend_on_umask(tmp_path: Path, script_info: dict[str, Any], umask: int) -> None:
    logs = write_logs(tmp_path, script_info, GOOD)
    old = os.umask(umask)
    try:
        assert run_pkg(tmp_path, script_info, logs) == 0
    finally:
        os.umask(old)
    d = record_dir(tmp_path)
    for folder in (tmp_path / "out", tmp_path / "out" / "track_10min_16mb", d):
        assert folder.stat().st_mode & 0o777 == 0o755, folder
    files = list(d.iterdir())
    assert len(files) == 7
    for f in files:
        assert f.stat().st_mode & 0o777 == 0o644, f


def _artifact(tmp_path: Path, name: str, data: bytes) -> tuple[Path, tuple[str, int, str]]:
    path = tmp_path / name
    path.write_bytes(data)
    return path, ("final_model.int6.ptz", len(data), hashlib.sha256(data).hexdigest())


def test_artifact_hash_matches_a_log(tmp_path: Path, script_info: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    blobs = [os.urandom(1000 + i) for i in range(3)]
    arts = [_artifact(tmp_path, f"seed{i}.ptz", b) for i, b in enumerate(blobs)]
    logs = write_logs(tmp_path, script_info, [dict(s, artifact=a[1], new_format=True) for s, a in zip(GOOD, arts)])
    assert run_pkg(tmp_path, script_info, logs, "--artifact", str(arts[2][0]), "--artifact", str(arts[0][0])) == 0
    out = capsys.readouterr().out
    assert f"sha256 {arts[2][1][2]} 1002 bytes = artifact: line of {logs[2]}" in out
    d = record_dir(tmp_path)
    assert not [p for p in d.iterdir() if p.suffix == ".ptz"], "the artifact is not copied"
    sub = json.loads((d / "submission.json").read_text())
    assert sub["compliance"]["artifact_matches_log"] is True
    assert [(a["file"], a["sha256"], a["bytes"]) for a in sub["artifacts_verified"]] == [
        ("seed2.ptz", arts[2][1][2], 1002), ("seed0.ptz", arts[0][1][2], 1000)]
    assert sub["seed_results"]["42"]["artifact_sha256"] == arts[1][1][2]
    assert arts[0][1][2] in (d / "README.md").read_text()


def test_artifact_hash_mismatch_names_file_and_both_hashes(tmp_path: Path, script_info: dict[str, Any],
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    path, logged = _artifact(tmp_path, "final_model.int6.ptz", b"the logged artifact")
    logs = write_logs(tmp_path, script_info, [dict(GOOD[0], artifact=logged)])
    path.write_bytes(b"a different artifact")  # e.g. overwritten by a later run
    actual = hashlib.sha256(b"a different artifact").hexdigest()
    assert run_pkg(tmp_path, script_info, logs, "--artifact", str(path)) == 1
    (line,) = fail_lines(capsys.readouterr().err)
    assert line.startswith(f"FAIL --artifact {path}: ") and actual in line and logged[2] in line
    assert out_files(tmp_path) == []


def test_artifact_with_old_logs_cannot_be_matched(tmp_path: Path, script_info: dict[str, Any],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = _artifact(tmp_path, "final_model.int6.ptz", b"blob")
    logs = write_logs(tmp_path, script_info, GOOD[:2])  # older logs: no artifact: line
    assert run_pkg(tmp_path, script_info, logs, "--artifact", str(path)) == 1
    captured = capsys.readouterr()
    (line,) = fail_lines(captured.err)
    assert str(path) in line and "cannot be matched" in line and "no log has an 'artifact:' line" in line
    notes = [ln for ln in captured.out.splitlines() if ln.startswith("note: ")]
    assert len(notes) == 2 and all("no 'artifact:' line" in n for n in notes)
    # --non-record packages it with the failure listed
    assert run_pkg(tmp_path, script_info, logs, "--artifact", str(path), "--non-record") == 0
    sub = json.loads((record_dir(tmp_path, "track_non_record_16mb") / "submission.json").read_text())
    assert sub["compliance"]["artifact_matches_log"] is False and "artifacts_verified" not in sub


def test_artifact_matches_while_another_log_is_old(tmp_path: Path, script_info: dict[str, Any],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    path, logged = _artifact(tmp_path, "a.ptz", b"blob-1337")
    logs = write_logs(tmp_path, script_info, [dict(GOOD[0], artifact=logged), GOOD[1]])
    assert run_pkg(tmp_path, script_info, logs, "--artifact", str(path)) == 0
    out = capsys.readouterr().out
    assert f"note: {logs[1]}: no 'artifact:' line" in out and f"note: {logs[0]}" not in out


def test_artifact_missing_file_is_usage_error(tmp_path: Path, script_info: dict[str, Any],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    logs = write_logs(tmp_path, script_info, GOOD[:1])
    assert run_pkg(tmp_path, script_info, logs, "--artifact", str(tmp_path / "nope.ptz")) == 2
    assert f"error: --artifact {tmp_path / 'nope.ptz'}: file not found" in capsys.readouterr().err
    assert out_files(tmp_path) == []


TTT = [dict(GOOD[0], ttt_loss=1.8700), dict(GOOD[1], ttt_loss=1.8720), dict(GOOD[2], ttt_loss=1.8710)]


def test_parse_ttt_budget_artifact_and_subset_lines(tmp_path: Path, script_info: dict[str, Any]) -> None:
    sha = "ab" * 32
    (log,) = write_logs(tmp_path, script_info, [dict(GOOD[0], ttt_loss=1.87, ttt_ms=312_345.0, new_format=True,
                                                     artifact=("final_model.int6.ptz", 15_500_000, sha),
                                                     gptq=(590_000.0, 9_000.0, 599_000.0), subset_marker=True,
                                                     budget_exceeded="budget:exceeded eval total_ms:601000")])
    run = pkg.parse_log(log)
    ratio = TOKENS / (BYTES * math.log(2))
    assert run.ttt_loss == pytest.approx(1.87) and run.ttt_bpb == pytest.approx(1.87 * ratio, abs=1e-8)
    assert (run.ttt_tokens, run.ttt_bytes) == (TOKENS, BYTES)
    assert (run.ttt_stride, run.ttt_chunk_tokens, run.ttt_eval_ms, run.ttt_ms) == (64, 32768, 311_345.0, 312_345.0)
    assert run.ttt_loss4 == pytest.approx(1.87)
    assert (run.artifact_name, run.artifact_bytes, run.artifact_sha256) == ("final_model.int6.ptz", 15_500_000, sha)
    assert (run.gptq_train_ms, run.gptq_calib_ms, run.gptq_total_ms, run.gptq_limit_ms) == (590_000, 9_000, 599_000, 600_000)
    assert run.budget_exceeded_lines == ["budget:exceeded eval total_ms:601000"]
    # ` subset` at the end of the final lines does not stop them from parsing, and is remembered
    assert run.sw_loss == pytest.approx(1.89) and run.sw_tokens == TOKENS and run.rt_tokens == TOKENS - 1024
    assert run.sw_stride == 64 and run.sw_eval_ms == 73_100
    assert len(run.subset_lines) == 6 and all(ln.endswith(" subset") for ln in run.subset_lines)
    # the new step-line form (lr_mul/time_left appended) parses like the old one; summary lines are ignored
    assert run.steps == 7000 and run.train_time_ms == 599_950 and run.pre_quant_loss == pytest.approx(1.92)


def test_ttt_line_is_the_score(tmp_path: Path, script_info: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    logs = write_logs(tmp_path, script_info, TTT)
    assert run_pkg(tmp_path, script_info, logs, "--sota-bpb", "1.1194") == 0
    d = record_dir(tmp_path)
    sub = json.loads((d / "submission.json").read_text())
    ratio = TOKENS / (BYTES * math.log(2))
    ttt_bpbs = [float(f"{x * ratio:.8f}") for x in (1.87, 1.872, 1.871)]
    sw_bpbs = [float(f"{x * ratio:.8f}") for x in (1.89, 1.891, 1.892)]
    assert sub["val_loss"] == pytest.approx(1.871, abs=1e-8)
    assert sub["val_bpb"] == pytest.approx(sum(ttt_bpbs) / 3, abs=1e-8)
    assert sub["sliding_val_bpb"] == pytest.approx(sum(sw_bpbs) / 3, abs=1e-8)
    assert sub["score_line"] == "final_int6_ttt_exact"
    sr = sub["seed_results"]["42"]
    assert sr["val_loss"] == pytest.approx(1.872) and sr["sliding_val_loss"] == pytest.approx(1.891)
    assert sr["ttt_time_ms"] == 310_000 and sr["ttt_chunk_tokens"] == 32768
    sig = sub["significance"]
    assert sig["score"] == "ttt" and sig["mean_val_loss"] == pytest.approx(1.871, abs=1e-8)
    assert "final_int6_ttt_exact" in sig["conversion"]
    readme = (d / "README.md").read_text()
    header = next(ln for ln in readme.splitlines() if ln.startswith("| Seed |"))
    assert "| Sliding bpb | TTT bpb |" in header
    row = next(ln for ln in readme.splitlines() if ln.startswith("| 1337 |"))
    assert f"| {sw_bpbs[0]:.8f} | {ttt_bpbs[0]:.8f} |" in row and "| 310.0 |" in row
    assert "score-first test-time training, mean of 3 seeds" in readme
    assert "ttt val_bpb" in capsys.readouterr().out


def test_sliding_score_without_ttt_lines(tmp_path: Path, script_info: dict[str, Any]) -> None:
    logs = write_logs(tmp_path, script_info, GOOD)
    assert run_pkg(tmp_path, script_info, logs) == 0
    d = record_dir(tmp_path)
    sub = json.loads((d / "submission.json").read_text())
    assert sub["score_line"] == "final_int6_sliding_window_exact" and sub["val_loss"] == pytest.approx(1.891)
    assert "ttt_val_bpb" not in sub["seed_results"]["42"] and "TTT bpb" not in (d / "README.md").read_text()


TTT_FAILURES = [
    ("ttt_missing_in_one_log", [TTT[0], GOOD[1]], 1, "missing final line(s): final_int6_ttt, final_int6_ttt_exact, ttt_time"),
    ("ttt_not_all_targets", [TTT[0], dict(TTT[1], ttt_tokens=TOKENS - 64)], 1,
     f"ttt eval scored {TOKENS - 64} tokens but the validation set has {TOKENS} targets"),
    ("ttt_over_600s", [dict(TTT[0], ttt_ms=640_000.0)], 0, "ttt_time 640000ms > 600000ms"),
    ("gptq_total_over", [dict(GOOD[0], train_time_ms=590_000.0, gptq=(590_000.0, 15_000.0, 605_000.0))], 0,
     "gptq:budget total_ms 605000ms (train 590000ms + GPTQ calibration 15000ms) > 600000ms"),
    ("budget_exceeded_line", [GOOD[0], dict(GOOD[1], budget_exceeded="budget:exceeded ttt eval_ms:612000 limit_ms:600000")],
     1, "log reports budget:exceeded ttt eval_ms:612000 limit_ms:600000"),
    ("subset_marker_only", [dict(GOOD[0], subset_marker=True)], 0, "final line(s) marked subset: final_int6_roundtrip,"),
]


@pytest.mark.parametrize("specs,bad,message", [c[1:] for c in TTT_FAILURES], ids=[c[0] for c in TTT_FAILURES])
def test_ttt_budget_and_subset_failures(tmp_path: Path, script_info: dict[str, Any], capsys: pytest.CaptureFixture[str],
                                        specs: list[dict[str, Any]], bad: int, message: str) -> None:
    logs = write_logs(tmp_path, script_info, specs)
    assert run_pkg(tmp_path, script_info, logs) == 1
    lines = fail_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith(f"FAIL {logs[bad]}: ") and message in lines[0], lines
    assert out_files(tmp_path) == []


@pytest.mark.parametrize("line,flag", [
    ("budget:exceeded training total_ms:607000 limit_ms:600000 (raise GPTQ_RESERVE_SECONDS)", "train_under_600s"),
    ("budget:exceeded evaluation total_ms:601000 limit_ms:600000", "eval_under_600s"),
    ("budget:exceeded ttt total_ms:601000", "eval_under_600s"),
    ("budget:exceeded gptq calib_ms:9000 post-check", "train_under_600s"),
])
def test_budget_exceeded_line_goes_to_its_budget(line: str, flag: str) -> None:
    assert pkg._budget_flag(line) == flag


def test_ttt_line_without_stride(tmp_path: Path, script_info: dict[str, Any]) -> None:
    """With non-overlapping windows train_gpt.py writes no stride: on the TTT line."""
    (log,) = write_logs(tmp_path, script_info, [TTT[0]])
    text = log.read_text()
    assert text.count(" stride:64 chunk_tokens:32768") == 1
    log.write_text(text.replace(" stride:64 chunk_tokens:32768", " chunk_tokens:32768"))
    run = pkg.parse_log(log)
    assert run.ttt_stride is None and run.ttt_chunk_tokens == 32768 and run.ttt_eval_ms == 309_000


def test_budget_exceeded_flags(tmp_path: Path, script_info: dict[str, Any]) -> None:
    logs = write_logs(tmp_path, script_info, [
        dict(GOOD[0], budget_exceeded="budget:exceeded gptq train_ms:598000 calib_ms:9000 total_ms:607000"),
        dict(GOOD[1], budget_exceeded="budget:exceeded eval post_training_ms:601000")])
    comp = pkg.check_runs([pkg.parse_log(p) for p in logs], script_info["bytes"])
    assert comp.flags["train_under_600s"] is False and comp.flags["eval_under_600s"] is False
    assert len(comp.failures) == 2


def test_gptq_budget_total_is_the_training_time(tmp_path: Path, script_info: dict[str, Any]) -> None:
    logs = write_logs(tmp_path, script_info, [dict(s, train_time_ms=588_000.0, gptq=(588_000.0, 11_000.0, 599_000.0))
                                              for s in GOOD])
    assert run_pkg(tmp_path, script_info, logs) == 0
    d = record_dir(tmp_path)
    sub = json.loads((d / "submission.json").read_text())
    assert sub["seed_results"]["42"]["train_budget_ms"] == 599_000 and sub["seed_results"]["42"]["gptq_calib_ms"] == 11_000
    readme = (d / "README.md").read_text()
    assert "Train time (s)‡" in readme and "| 599.000 |" in readme and "GPTQ calibration" in readme


def test_new_log_forms_package_like_old_ones(tmp_path: Path, script_info: dict[str, Any]) -> None:
    old = write_logs(tmp_path / "old", script_info, GOOD)
    new = write_logs(tmp_path / "new", script_info, [dict(s, new_format=True) for s in GOOD])
    for a, b in zip(old, new):
        ra, rb = pkg.parse_log(a), pkg.parse_log(b)
        for attr in ("steps", "iterations", "train_time_ms", "step_avg_ms", "pre_quant_loss", "pre_quant_bpb", "sw_loss",
                     "total_bytes", "post_training_ms", "seed"):
            assert getattr(ra, attr) == getattr(rb, attr), attr
    assert run_pkg(tmp_path, script_info, new) == 0


def test_package_draws_the_loss_curves(tmp_path: Path, script_info: dict[str, Any]) -> None:
    logs = write_logs(tmp_path, script_info, [dict(s, new_format=True) for s in GOOD])
    assert run_pkg(tmp_path, script_info, logs) == 0
    d = record_dir(tmp_path)
    png = (d / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    from matplotlib.image import imread

    pixels = imread(d / "curves.png")
    assert pixels.shape[0] > 300 and pixels.shape[1] > 600
    readme = (d / "README.md").read_text()
    assert "![loss curves](curves.png)" in readme and "- `curves.png`" in readme


def test_package_without_matplotlib_is_one_clear_error(tmp_path: Path, script_info: dict[str, Any],
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    logs = write_logs(tmp_path, script_info, GOOD)
    assert run_pkg(tmp_path, script_info, logs) == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "matplotlib is not installed" in errors[0] and "pip install matplotlib" in errors[0]
    assert out_files(tmp_path) == []


def test_non_record_without_step_lines_says_there_is_no_picture(tmp_path: Path, script_info: dict[str, Any],
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    logs = write_logs(tmp_path, script_info, [dict(GOOD[0], omit=("step:", "stopping_early"))])
    assert run_pkg(tmp_path, script_info, logs, "--non-record") == 0
    assert "note: no curves.png: no log has training step lines" in capsys.readouterr().out
    d = record_dir(tmp_path, "track_non_record_16mb")
    assert not (d / "curves.png").exists() and "curves.png" not in (d / "README.md").read_text()
