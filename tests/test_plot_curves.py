"""records/plot_curves.py: step lines of train_gpt.py logs -> a two-panel loss-curve PNG."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
PLOT_PY = ROOT / "records" / "plot_curves.py"
SEP = "=" * 100


def _load() -> Any:
    spec = importlib.util.spec_from_file_location("plot_curves_under_test", PLOT_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


pc = _load()


def synth_log(path: Path, seed: int | None, *, new_format: bool = False, shift: float = 0.0, steps: int = 2000,
              every: int = 100, val_every: int = 500, ms_per_step: float = 250.0) -> Path:
    """A log with an embedded 'script' whose own lines look like step lines (they must not be read)."""
    extra = " lr_mul:0.5000 time_left:12.3s" if new_format else ""
    lines = ["step:1/2 train_loss:99.0 train_time:1ms step_avg:1.00ms", SEP, "Running PyTorch 2.9.1", SEP]
    if seed is not None:
        lines += [f"hparam SEED={seed}", f"seed:{seed}"]
    for step in range(0, steps + 1, every):
        t = step * ms_per_step
        loss = 2.0 + shift + 4.0 * np.exp(-step / 300)
        if step % val_every == 0:
            lines.append(f"step:{step}/{steps} val_loss:{loss - 0.05:.4f} val_bpb:{(loss - 0.05) * 0.6:.4f} "
                         f"train_time:{t:.0f}ms step_avg:{ms_per_step:.2f}ms{extra}")
        if step:
            lines.append(f"step:{step}/{steps} train_loss:{loss:.4f} train_time:{t:.0f}ms step_avg:{ms_per_step:.2f}ms{extra}")
            if step % 1000 == 0:
                lines.append(f"summary: step:{step} train_loss:{loss:.4f}")
    lines.append("final_int6_sliding_window_exact val_loss:2.0 val_bpb:1.2 tokens:1 bytes:2 subset")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_reads_old_and_new_step_lines_of_the_body_only(tmp_path: Path) -> None:
    for new_format in (False, True):
        c = pc.read_curve(synth_log(tmp_path / f"{new_format}.txt", 7, new_format=new_format))
        assert c.seed == 7
        assert len(c.train) == 20 and len(c.val) == 5  # not the step line inside the embedded script
        assert c.train[0] == (25.0, pytest.approx(2.0 + 4 * np.exp(-1 / 3), abs=1e-4))
        assert [t for t, _, _ in c.val] == [0.0, 125.0, 250.0, 375.0, 500.0]
        assert c.val[-1][2] == pytest.approx(round((2.0 + 4 * np.exp(-2000 / 300) - 0.05) * 0.6, 4))


def test_labels_are_seeds_when_distinct_else_file_names(tmp_path: Path) -> None:
    a = pc.read_curve(synth_log(tmp_path / "a.txt", 1337))
    b = pc.read_curve(synth_log(tmp_path / "b.txt", 42))
    c = pc.read_curve(synth_log(tmp_path / "c.txt", 42))
    d = pc.read_curve(synth_log(tmp_path / "d.txt", None))
    assert pc.labels([a, b]) == ["seed 1337", "seed 42"]
    assert pc.labels([a, b, c]) == ["a.txt", "b.txt", "c.txt"]
    assert pc.labels([a, d]) == ["a.txt", "d.txt"]


def test_overlay_draws_every_log_in_its_own_colour(tmp_path: Path) -> None:
    curves = [pc.read_curve(synth_log(tmp_path / f"s{i}.txt", seed, shift=0.1 * i))
              for i, seed in enumerate((1337, 42, 2025))]
    fig = pc.build_figure(curves, "three seeds")
    ax_loss, ax_bpb = fig.axes[:2]
    for i, curve in enumerate(curves):
        colour = f"C{i}"
        mine = [ln for ln in ax_loss.get_lines() if ln.get_color() == colour]
        assert [list(ln.get_xdata()) for ln in mine] == [[t for t, _ in curve.train], [t for t, _, _ in curve.val]]
        (bpb,) = [ln for ln in ax_bpb.get_lines() if ln.get_color() == colour]
        assert list(bpb.get_ydata()) == [b for _, _, b in curve.val]
    legend = [t.get_text() for t in ax_loss.get_legend().get_texts()]
    assert legend == ["seed 1337", "seed 42", "seed 2025", "train loss", "val loss"]
    assert ax_loss.get_xlabel() == "training time (s)" and "bpb" in ax_bpb.get_ylabel()
    # the PNG: each colour covers far more pixels than its legend sample alone would
    from matplotlib.image import imread

    png = tmp_path / "c.png"
    png.write_bytes(pc.render_png(curves, "three seeds"))
    rgb = imread(png)[..., :3]
    for hex_colour in ("#1f77b4", "#ff7f0e", "#2ca02c"):  # C0, C1, C2
        target = np.array([int(hex_colour[k:k + 2], 16) / 255 for k in (1, 3, 5)])
        assert (np.abs(rgb - target).max(axis=-1) < 0.03).sum() > 300, hex_colour  # legend samples: < 120


def test_y_axis_ignores_the_initial_drop() -> None:
    points = [(0.0, 6.9), (1.0, 5.0), (100.0, 2.5), (300.0, 2.1), (600.0, 2.0)]
    lo, hi = pc._focus_limits(points, 600.0)
    assert 2.0 - 0.1 < lo < 2.0 and 2.5 < hi < 2.6
    assert pc._focus_limits([(0.0, 6.9), (10.0, 3.0)], 10.0) == pytest.approx((3.0 - 0.195, 6.9 + 0.195))


def test_cli_writes_the_png(tmp_path: Path) -> None:
    logs = [synth_log(tmp_path / f"s{i}.txt", seed) for i, seed in enumerate((1, 2, 3))]
    out = tmp_path / "curves.png"
    res = subprocess.run([sys.executable, str(PLOT_PY), *map(str, logs), "-o", str(out), "--title", "x"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and out.stat().st_mode & 0o777 == 0o644
    assert res.stdout.strip() == f"wrote {out} (3 logs: seed 1, seed 2, seed 3)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "s0.txt", "s1.txt", "s2.txt"]


def test_cli_help() -> None:
    res = subprocess.run([sys.executable, str(PLOT_PY), "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "--out" in res.stdout and "--title" in res.stdout and "LOG" in res.stdout


def _no_steps(tmp: Path) -> Path:
    p = tmp / "eval_only.txt"
    p.write_text(f"source\n{SEP}\nenv\n{SEP}\nhparam SEED=1\neval_only:final_model.int6.ptz\n"
                 "final_int6_sliding_window_exact val_loss:2.0 val_bpb:1.2 tokens:1 bytes:2\n")
    return p


@pytest.mark.parametrize("make_log,out_name,expected", [
    (lambda tmp: tmp / "missing.txt", "curves.png", "missing.txt: log file not found"),
    (_no_steps, "curves.png", "eval_only.txt: no training step lines"),
    (lambda tmp: synth_log(tmp / "ok.txt", 1), "no_such_dir/curves.png", "no_such_dir does not exist"),
], ids=["missing-log", "no-step-lines", "no-out-folder"])
def test_cli_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], make_log: Any, out_name: str,
                                   expected: str) -> None:
    log = make_log(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert pc.main([str(log), "-o", str(tmp_path / out_name)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("plot_curves.py: error: ") and expected in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "nothing written"


def test_cli_without_matplotlib(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    log = synth_log(tmp_path / "a.txt", 1)
    assert pc.main([str(log), "-o", str(tmp_path / "c.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "matplotlib is not installed" in err and "pip install matplotlib" in err
    assert not (tmp_path / "c.png").exists()


def test_curve_of_a_real_tiny_run(tiny_run: Path) -> None:
    from conftest import field, log_lines

    lines = log_lines(tiny_run)
    curve = pc.read_curve(tiny_run / "logs" / "tiny.txt")
    train = [ln for ln in lines if ln.startswith("step:") and " train_loss:" in ln]
    val = [ln for ln in lines if ln.startswith("step:") and " val_loss:" in ln]
    assert len(curve.train) == len(train) > 0 and len(curve.val) == len(val) == 3
    assert curve.train[-1] == (int(field(train[-1], "train_time")[:-2]) / 1000, float(field(train[-1], "train_loss")))
    assert [v[2] for v in curve.val] == [float(field(ln, "val_bpb")) for ln in val]
    assert curve.seed == 1337
    assert pc.render_png([curve]).startswith(b"\x89PNG")
