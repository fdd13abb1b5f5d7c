"""Draw the loss curves of train_gpt.py logs into one PNG (matplotlib).

    python records/plot_curves.py logs/seed1337.txt logs/seed42.txt logs/seed2025.txt -o curves.png

Left: train loss (line) and validation loss (dots) against training time (the step lines' train_time; periodic
validation does not count against it). Right: val_bpb against the same axis. One colour per log, named by its seed
when every log has its own, else by file name. The y axes fit the points after the first 5% of training time, so
the initial drop does not flatten the rest. Bad input: one `error:` line, exit 2, nothing written.
"""
import argparse
import io
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import runlog  # noqa: E402

FOCUS_FRACTION = 0.05


class CurveError(Exception):  # bad input, reported as one line
    pass


def points(run: runlog.RunLog) -> tuple[list[tuple[float, float]], list[tuple[float, float, float]]]:
    """(seconds, train_loss) of the train step lines and (seconds, val_loss, val_bpb) of the validation ones."""
    train = [(ln.num("train_time") / 1000, ln.num("train_loss")) for ln in run.train]
    val = [(ln.num("train_time") / 1000, ln.num("val_loss"), ln.num("val_bpb")) for ln in run.val]
    return train, val


def labels(runs: list[runlog.RunLog]) -> list[str]:
    seeds = [r.seed for r in runs]
    if None not in seeds and len(set(seeds)) == len(seeds):
        return [f"seed {s}" for s in seeds]
    names = [r.path.name for r in runs]
    return names if len(set(names)) == len(names) else [str(r.path) for r in runs]


def focus_limits(pts: list[tuple[float, float]], t_max: float) -> tuple[float, float] | None:
    """y limits of the finite points after FOCUS_FRACTION of the training time (all of them if fewer than 2)."""
    finite = [(t, y) for t, y in pts if abs(y) < float("inf")]
    late = [y for t, y in finite if t >= FOCUS_FRACTION * t_max]
    ys = late if len(late) >= 2 else [y for _, y in finite]
    if not ys:
        return None
    lo, hi = min(ys), max(ys)
    pad = 0.05 * (hi - lo) if hi > lo else max(0.01, 0.01 * abs(hi))
    return lo - pad, hi + pad


def figure(runs: list[runlog.RunLog], title: str | None = None):  # -> matplotlib.figure.Figure
    """The two-panel picture of the runs' step lines, one colour per run (C0, C1, ...)."""
    try:
        import matplotlib  # noqa: F401  (first: a cached submodule would hide a missing package)
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
    except ImportError:
        raise CurveError("matplotlib is not installed; it draws the curves (pip install matplotlib)") from None
    fig = Figure(figsize=(12, 4.8), dpi=100, layout="constrained")
    ax_loss, ax_bpb = fig.subplots(1, 2)
    curves = [points(r) for r in runs]
    t_max = max([t for train, val in curves for t, *_ in train + val] + [0.0])
    loss_pts, bpb_pts, handles = [], [], []
    for i, ((train, val), name) in enumerate(zip(curves, labels(runs))):
        colour = f"C{i % 10}"
        if train:
            ax_loss.plot(*zip(*train), color=colour, linewidth=1.2, alpha=0.85)
        if val:
            ts, losses, bpbs = zip(*val)
            ax_loss.plot(ts, losses, color=colour, linestyle="--", marker="o", markersize=4, linewidth=1.0)
            ax_bpb.plot(ts, bpbs, color=colour, linestyle="--", marker="o", markersize=4, linewidth=1.0)
            bpb_pts += list(zip(ts, bpbs))
        loss_pts += train + [(t, loss) for t, loss, _ in val]
        handles.append(Line2D([], [], color=colour, linewidth=2, label=name))
    handles += [Line2D([], [], color="0.4", linewidth=1.2, label="train loss"),
                Line2D([], [], color="0.4", linestyle="--", marker="o", markersize=4, label="val loss")]
    for ax, pts, ylabel, heading in ((ax_loss, loss_pts, "loss (nats per token)", "train and validation loss"),
                                     (ax_bpb, bpb_pts, "val_bpb (bits per byte)", "validation bits per byte")):
        ax.set(xlabel="training time (s)", ylabel=ylabel, title=heading)
        ax.grid(True, alpha=0.3)
        if limits := focus_limits(pts, t_max):
            ax.set_ylim(*limits)
    ax_loss.legend(handles=handles, fontsize="small")
    ax_bpb.legend(handles=handles[:-2], fontsize="small")
    if title:
        fig.suptitle(title)
    return fig


def render_png(runs: list[runlog.RunLog], title: str | None = None) -> bytes:
    buf = io.BytesIO()
    figure(runs, title).savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def read_curves(path: Path) -> runlog.RunLog:  # LogError naming the file when it has nothing to draw
    run = runlog.read(path)
    if not run.train and not run.val:
        raise runlog.LogError(f"{path}: no step lines with train_loss or val_loss; is it a train_gpt.py training log?")
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Draw train/val loss and val_bpb against training time for "
                                     "train_gpt.py logs into one PNG.")
    parser.add_argument("logs", nargs="+", type=Path, metavar="LOG", help="train_gpt.py log(s), e.g. one per seed")
    parser.add_argument("-o", "--out", type=Path, default=Path("curves.png"), help="the PNG (default: %(default)s)")
    parser.add_argument("--title", help="title above the two panels")
    args = parser.parse_args(argv)
    try:
        if not args.out.parent.is_dir():
            raise CurveError(f"--out {args.out}: folder {args.out.parent} does not exist")
        runs = [read_curves(p) for p in args.logs]
        png = render_png(runs, args.title)
    except (CurveError, runlog.LogError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    tmp = args.out.with_name(f".{args.out.name}.tmp")  # written beside it, then renamed: never half a PNG
    tmp.write_bytes(png)
    os.replace(tmp, args.out)
    print(f"wrote {args.out} ({', '.join(labels(runs))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
