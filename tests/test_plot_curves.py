"""records/plot_curves.py: the step lines of train_gpt.py logs -> a two-panel loss-curve PNG."""
import sys

import pytest

from conftest import REPO, field, log_lines

sys.path.insert(0, str(REPO / "records"))
import plot_curves as pc  # noqa: E402
import runlog  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def test_points_of_a_real_tiny_run(tiny_run):
    lines = log_lines(tiny_run)
    train = [ln for ln in lines if ln.startswith("step:") and " train_loss:" in ln]
    val = [ln for ln in lines if ln.startswith("step:") and " val_loss:" in ln]
    got_train, got_val = pc.points(runlog.read(tiny_run / "logs" / "tiny.txt"))
    assert len(got_train) == len(train) > 0 and len(got_val) == len(val) == 3
    assert got_train[-1] == (int(field(train[-1], "train_time")[:-2]) / 1000, float(field(train[-1], "train_loss")))
    assert [v[2] for v in got_val] == [float(field(ln, "val_bpb")) for ln in val]


def test_every_log_is_drawn_in_its_own_colour(tiny_run):
    """Three logs (the tiny run's, and two copies with other seeds and losses): each colour's lines are its log's."""
    text = (tiny_run / "logs" / "tiny.txt").read_bytes()
    runs = [runlog.parse(text.replace(b"\nseed:1337\n", f"\nseed:{seed}\n".encode())
                         .replace(b" train_loss:", f" train_loss:{shift}".encode()), REPO / f"s{seed}.txt")
            for seed, shift in ((1337, ""), (42, "1"), (7, "2"))]  # '6.93' -> '16.93', '26.93'
    fig = pc.figure(runs, "three seeds")
    ax_loss, ax_bpb = fig.axes[:2]
    for i, run in enumerate(runs):
        train, val = pc.points(run)
        mine = [line for line in ax_loss.get_lines() if line.get_color() == f"C{i}"]
        assert [list(line.get_xdata()) for line in mine] == [[t for t, _ in train], [t for t, _, _ in val]]
        assert list(mine[0].get_ydata()) == [y for _, y in train] and train[0][1] > 10 * i
        (bpb,) = [line for line in ax_bpb.get_lines() if line.get_color() == f"C{i}"]
        assert list(bpb.get_ydata()) == [b for _, _, b in val]
    legend = [t.get_text() for t in ax_loss.get_legend().get_texts()]
    assert legend == ["seed 1337", "seed 42", "seed 7", "train loss", "val loss"]
    assert ax_loss.get_xlabel() == "training time (s)" and "bits per byte" in ax_bpb.get_ylabel()


def synthetic(seed):
    return runlog.parse(f"seed:{seed}\n".encode() if seed is not None else b"", REPO / f"logs/s{seed}.txt")


def test_labels_are_seeds_when_distinct_else_file_names():
    a, b, c, none = synthetic(1337), synthetic(42), synthetic(42), synthetic(None)
    assert pc.labels([a, b]) == ["seed 1337", "seed 42"]
    assert pc.labels([b, c]) == [str(REPO / "logs/s42.txt")] * 2  # clashing names: the full paths
    assert pc.labels([a, none]) == ["s1337.txt", "sNone.txt"]


def test_y_axis_ignores_the_initial_drop():
    lo, hi = pc.focus_limits([(0.0, 6.9), (1.0, 5.0), (100.0, 2.5), (300.0, 2.1), (600.0, 2.0)], 600.0)
    assert 2.0 - 0.1 < lo < 2.0 and 2.5 < hi < 2.6
    assert pc.focus_limits([(0.0, 6.9), (10.0, 3.0)], 10.0) == pytest.approx((3.0 - 0.195, 6.9 + 0.195))
    assert pc.focus_limits([(0.0, float("nan"))], 1.0) is None


def test_cli_writes_the_png(tiny_run, tmp_path, capsys):
    out = tmp_path / "curves.png"
    assert pc.main([str(tiny_run / "logs" / "tiny.txt"), "-o", str(out), "--title", "tiny"]) == 0
    assert out.read_bytes().startswith(PNG) and [p.name for p in tmp_path.iterdir()] == ["curves.png"]
    assert capsys.readouterr().out == f"wrote {out} (seed 1337)\n"
    from matplotlib.image import imread

    assert imread(out).shape[:2] == (480, 1200)


def no_steps(tiny_run, tmp_path):
    lines = (tiny_run / "logs" / "tiny.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    path = tmp_path / "eval_only.txt"
    path.write_text("".join(ln for ln in lines if not ln.startswith("step:")), encoding="utf-8")
    return path


@pytest.mark.parametrize("make_log,out_name,expected", [
    (lambda run, tmp: tmp / "missing.txt", "curves.png", "missing.txt: log file not found"),
    (no_steps, "curves.png", "eval_only.txt: no step lines"),
    (lambda run, tmp: run / "logs" / "tiny.txt", "no_such_dir/curves.png", "no_such_dir does not exist"),
], ids=["missing-log", "no-step-lines", "no-out-folder"])
def test_bad_input_is_one_line_and_writes_nothing(tiny_run, tmp_path, capsys, make_log, out_name, expected):
    log = make_log(tiny_run, tmp_path)
    before = sorted(tmp_path.iterdir())
    assert pc.main([str(log), "-o", str(tmp_path / out_name)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
    assert sorted(tmp_path.iterdir()) == before


def test_without_matplotlib(tiny_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert pc.main([str(tiny_run / "logs" / "tiny.txt"), "-o", str(tmp_path / "c.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "matplotlib is not installed" in err and not (tmp_path / "c.png").exists()
