"""Tests for records/package.py: log parsing, compliance checks, packaging, Student-t and significance."""
from __future__ import annotations

import importlib.util
import json
import math
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
) -> bytes:
    """A train_gpt.py-style log. `omit` drops every line starting with one of the given prefixes."""
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
    lines += [
        f"final_int6_roundtrip val_loss:{rt_loss:.4f} val_bpb:{rt_loss * ratio:.4f} eval_time:5800ms",
        f"final_int6_roundtrip_exact val_loss:{rt_loss:.8f} val_bpb:{rt_loss * ratio:.8f} tokens:{TOKENS - 1024} bytes:{BYTES - 2000}",
        f"final_int6_sliding_window val_loss:{sw_loss:.4f} val_bpb:{sw_loss * ratio:.4f} stride:64 eval_time:73100ms",
        f"final_int6_sliding_window_exact val_loss:{sw_loss:.8f} val_bpb:{sw_loss * ratio:.8f} tokens:{sw_tokens} bytes:{BYTES}",
        f"post_training_time:{post_training_ms:.0f}ms",
    ]
    lines = [ln for ln in lines if not any(ln.startswith(p) for p in omit)]
    return src + ("\n".join(lines) + "\n").encode()


def write_logs(tmp_path: Path, script: dict[str, Any], specs: list[dict[str, Any]]) -> list[Path]:
    paths = []
    (tmp_path / "logs").mkdir(exist_ok=True)
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
# Student t


@pytest.mark.parametrize(
    "t,df,upper",
    [
        (2.0, 2, 0.09175171),  # closed form 1/2 - t/(2 sqrt(t^2+2))
        (3.747, 4, 0.01),  # t_{0.99,4}
        (6.965, 2, 0.01),  # t_{0.99,2}
        (2.015, 5, 0.05),  # t_{0.95,5}
        (1.0, 1, 0.25),  # Cauchy: 1/2 - atan(1)/pi
        (0.0, 7, 0.5),
        (1.959964, 1e7, 0.025),  # normal limit
    ],
)
def test_student_t_known_values(t: float, df: float, upper: float) -> None:
    assert pkg.student_t_sf(t, df) == pytest.approx(upper, abs=2e-5)
    assert pkg.student_t_cdf(-t, df) == pytest.approx(upper, abs=2e-5)
    assert pkg.student_t_cdf(t, df) + pkg.student_t_sf(t, df) == pytest.approx(1.0, abs=1e-12)


def test_student_t_closed_forms_on_grid() -> None:
    for t in (-5.0, -1.3, -0.2, 0.4, 2.7, 9.0):
        assert pkg.student_t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
        assert pkg.student_t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(t * t + 2)), abs=1e-12)
    assert pkg.regularized_incomplete_beta(2.0, 3.0, 0.4) == pytest.approx(0.5248, abs=1e-12)


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
    assert res["t"] == pytest.approx(-4e-3 / (1e-3 / math.sqrt(3)), rel=1e-6)
    assert res["p_value"] == pytest.approx(pkg.student_t_cdf(-6.92820323, 2), rel=1e-6)


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
        ["README.md", "submission.json", "train_gpt.py", "train_seed1337.log", "train_seed42.log", "train_seed2025.log"]
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
                "--sota-bpb", "--sota-loss", "--out-root", "--force"):
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
