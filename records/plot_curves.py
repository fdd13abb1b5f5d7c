"""Draw the loss curves of train_gpt.py logs into one PNG.

    python records/plot_curves.py logs/seed1337.txt logs/seed42.txt logs/seed2025.txt -o curves.png

Left panel: train loss (line) and validation loss (dots on a dashed line) against training time in seconds
(the ``train_time:`` of each ``step:`` line; periodic validation does not count against it). Right panel:
validation bits per byte against the same time axis. One colour per log; the legend names each log by its
seed (``seed:`` line or ``hparam SEED``) when every log has a different one, else by file name. The y axes
are scaled to the curves after the first 5% of training time, so the initial drop does not flatten the rest
(earlier points are still drawn; they leave the frame at the top).

Both line forms are read: ``step:1200/9000 train_loss:2.0911 train_time:80496ms step_avg:67.08ms`` and the same
with fields appended (``lr_mul:... time_left:...s``); likewise for ``val_loss:... val_bpb:...`` lines. Only the
log body is read (after the embedded script and the environment block).

Needs matplotlib. Exit status: 0 written; 2 bad input (a missing log, a log without step lines, matplotlib not
installed, an output folder that does not exist) with one line on stderr and nothing written.
"""
from __future__ import annotations

import argparse
import io
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

SEPARATOR = b"=" * 100
PROG = "plot_curves.py"
FOCUS_FRACTION = 0.05  # y limits ignore points in the first 5% of the longest run's training time

_FLOAT = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf|-inf)"
_INT = r"(\d+)"
RE_TRAIN = re.compile(
    r"^step:" + _INT + r"/" + _INT + r" train_loss:" + _FLOAT + r" train_time:" + _FLOAT + r"ms step_avg:" + _FLOAT + r"ms"
)
RE_VAL = re.compile(
    r"^step:" + _INT + r"/" + _INT + r" val_loss:" + _FLOAT + r" val_bpb:" + _FLOAT
    + r" train_time:" + _FLOAT + r"ms step_avg:" + _FLOAT + r"ms"
)
RE_SEED = re.compile(r"^seed:" + _INT + r"\s*$")
RE_HPARAM_SEED = re.compile(r"^hparam SEED=" + _INT + r"\s*$")


class CurveError(Exception):
    """Bad input, reported as one line."""


@dataclass
class Curve:
    """The step lines of one log: train points (seconds, train_loss), val points (seconds, val_loss, val_bpb)."""

    path: Path
    seed: Optional[int] = None
    train: list[tuple[float, float]] = field(default_factory=list)
    val: list[tuple[float, float, float]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.train and not self.val


def log_body(data: bytes) -> bytes:
    """The part of a log after its embedded script and environment block (two lines of 100 '=')."""
    offset = 0
    seen = 0
    body_start = 0
    for line in data.splitlines(keepends=True):
        offset += len(line)
        if line.rstrip(b"\r\n") == SEPARATOR:
            seen += 1
            body_start = offset
            if seen == 2:
                break
    return data[body_start:]


def parse_curve(data: bytes, path: Path) -> Curve:
    """The curve points of a log's bytes (no check that there are any)."""
    curve = Curve(path=path)
    hparam_seed = None
    for line in log_body(data).decode("utf-8", errors="replace").splitlines():
        line = line.rstrip("\r")
        if m := RE_VAL.match(line):
            curve.val.append((float(m.group(5)) / 1000.0, float(m.group(3)), float(m.group(4))))
        elif m := RE_TRAIN.match(line):
            curve.train.append((float(m.group(4)) / 1000.0, float(m.group(3))))
        elif m := RE_SEED.match(line):
            curve.seed = int(m.group(1))
        elif m := RE_HPARAM_SEED.match(line):
            hparam_seed = int(m.group(1))
    if curve.seed is None:
        curve.seed = hparam_seed
    return curve


def read_curve(path: Path) -> Curve:
    """Read one log; a missing file or a log without step lines is a CurveError naming the file."""
    if not path.is_file():
        raise CurveError(f"{path}: log file not found" if not path.exists() else f"{path}: not a file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CurveError(f"{path}: cannot read the log ({exc.strerror or exc})") from None
    curve = parse_curve(data, path)
    if curve.empty:
        raise CurveError(
            f"{path}: no training step lines ('step:N/M train_loss:... train_time:...ms' or "
            "'step:N/M val_loss:... val_bpb:... train_time:...ms'); is it a train_gpt.py training log?"
        )
    return curve


def labels(curves: Sequence[Curve]) -> list[str]:
    """Legend names: 'seed S' when every log has its own seed, else the file names (full paths if those clash)."""
    seeds = [c.seed for c in curves]
    if None not in seeds and len(set(seeds)) == len(seeds):
        return [f"seed {s}" for s in seeds]
    names = [c.path.name for c in curves]
    if len(set(names)) == len(names):
        return names
    return [str(c.path) for c in curves]


def _focus_limits(points: Sequence[tuple[float, float]], t_max: float) -> Optional[tuple[float, float]]:
    """y limits covering the points after the first FOCUS_FRACTION of training time (all points if too few)."""
    finite = [(t, y) for t, y in points if y == y and abs(y) != float("inf")]
    late = [y for t, y in finite if t >= FOCUS_FRACTION * t_max]
    ys = late if len(late) >= 2 else [y for _, y in finite]
    if not ys:
        return None
    lo, hi = min(ys), max(ys)
    pad = 0.05 * (hi - lo) if hi > lo else max(0.01, 0.01 * abs(hi))
    return lo - pad, hi + pad


def _import_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError:
        raise CurveError(
            "matplotlib is not installed; it draws the loss curves (pip install matplotlib, "
            "or pip install -r requirements.txt)"
        ) from None


def build_figure(curves: Sequence[Curve], title: Optional[str] = None) -> Any:
    """The two-panel matplotlib Figure (loss, val_bpb against training seconds) of `curves`, one colour each."""
    if not curves:
        raise CurveError("no curves to draw")
    _import_matplotlib()
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(12, 4.8), dpi=100, layout="constrained")
    ax_loss, ax_bpb = fig.subplots(1, 2)
    names = labels(curves)
    t_max = max([t for c in curves for t, _ in c.train] + [t for c in curves for t, _, _ in c.val] + [0.0])
    loss_points: list[tuple[float, float]] = []
    bpb_points: list[tuple[float, float]] = []
    handles = []
    for i, (curve, name) in enumerate(zip(curves, names)):
        color = f"C{i % 10}"
        if curve.train:
            ts, ys = zip(*curve.train)
            ax_loss.plot(ts, ys, color=color, linewidth=1.2, alpha=0.85)
            loss_points += curve.train
        if curve.val:
            ts, losses, bpbs = zip(*curve.val)
            ax_loss.plot(ts, losses, color=color, linestyle="--", marker="o", markersize=4, linewidth=1.0)
            ax_bpb.plot(ts, bpbs, color=color, linestyle="--", marker="o", markersize=4, linewidth=1.0)
            loss_points += list(zip(ts, losses))
            bpb_points += list(zip(ts, bpbs))
        handles.append(Line2D([], [], color=color, linewidth=2, label=name))
    style = [
        Line2D([], [], color="0.4", linewidth=1.2, label="train loss"),
        Line2D([], [], color="0.4", linestyle="--", marker="o", markersize=4, linewidth=1.0, label="val loss"),
    ]
    for ax, points, ylabel, heading in (
        (ax_loss, loss_points, "loss (nats per token)", "train and validation loss"),
        (ax_bpb, bpb_points, "val_bpb (bits per byte)", "validation bits per byte"),
    ):
        ax.set_xlabel("training time (s)")
        ax.set_ylabel(ylabel)
        ax.set_title(heading)
        ax.grid(True, alpha=0.3)
        limits = _focus_limits(points, t_max)
        if limits is not None:
            ax.set_ylim(*limits)
    ax_loss.legend(handles=handles + style, fontsize="small")
    if bpb_points:
        ax_bpb.legend(handles=handles, fontsize="small")
    else:
        ax_bpb.text(0.5, 0.5, "no validation lines", ha="center", va="center", transform=ax_bpb.transAxes)
    if title:
        fig.suptitle(title)
    return fig


def render_png(curves: Sequence[Curve], title: Optional[str] = None) -> bytes:
    """The PNG bytes of build_figure(curves, title)."""
    buf = io.BytesIO()
    build_figure(curves, title).savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def write_atomically(path: Path, data: bytes) -> None:
    """Write `path` (mode 0644) through a temporary file beside it, so it is never half-written."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(
        prog=PROG,
        description="Draw train/val loss and val_bpb against training time for one or more train_gpt.py logs "
        "(overlaid, one colour per log) into a PNG.",
        epilog="Exit status: 0 written; 2 bad input (one line on stderr, nothing written).",
    )
    p.add_argument("logs", nargs="+", type=Path, metavar="LOG", help="train_gpt.py log(s), e.g. one per seed")
    p.add_argument("-o", "--out", type=Path, default=Path("curves.png"), metavar="PNG",
                   help="output picture (default: %(default)s)")
    p.add_argument("--title", default=None, help="title above the two panels (default: none)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, already printed as one line)
        return int(exc.code or 0)
    try:
        out: Path = args.out
        if not out.parent.is_dir():
            raise CurveError(f"--out {out}: folder {out.parent} does not exist")
        if out.is_dir():
            raise CurveError(f"--out {out} is a folder; give a file name such as {out / 'curves.png'}")
        curves = [read_curve(p) for p in args.logs]
        png = render_png(curves, args.title)
        write_atomically(out, png)
    except CurveError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except OSError as exc:
        print(f"{PROG}: error: {exc.filename or args.out}: {exc.strerror or exc}", file=sys.stderr, flush=True)
        return 2
    print(f"wrote {out} ({len(curves)} log{'s' if len(curves) != 1 else ''}: {', '.join(labels(curves))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
