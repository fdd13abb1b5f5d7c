"""Package finished train_gpt.py runs into a Parameter Golf submission folder.

Usage (from the repository root):

    python records/package.py logs/a.txt logs/b.txt logs/c.txt \
        --name 11L_XSA3_Seed --author "Jane Doe" --github-id janedoe \
        --blurb "legal seed, sliding s64" --sota-loss 1.90915845

It writes ``records/track_10min_16mb/<YYYY-MM-DD>_<Name>/`` (``track_non_record_16mb`` with
``--non-record``) holding ``train_gpt.py``, one ``train_seed<S>.log`` per run, ``submission.json`` and a
``README.md`` skeleton with the results table and the run command rebuilt from the logged hyperparameters.

Every log is checked before anything is written: artifact <= 16,000,000 bytes, training <= 600 s, post-training
evaluation <= 600 s, all final lines present, the same script in every log and equal to ``--script``, the full
validation set, and a training run (not an EVAL_ONLY re-score). A failed check aborts a record folder (exit 1,
nothing written); with ``--non-record`` the folder is written anyway and the failures are listed.

With ``--sota-loss``/``--sota-bpb`` a one-sided one-sample t-test checks the challenge's significance rule
(improve on SOTA by >= 0.005 nats with p < 0.01); its result is printed and stored, it never blocks packaging.

Exit status: 0 written, 1 a compliance check failed (record track), 2 usage / input error.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import importlib.util
import json
import math
import re
import shlex
import shutil
import statistics
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

SEPARATOR = b"=" * 100
SIZE_LIMIT_BYTES = 16_000_000
TRAIN_LIMIT_MS = 600_000.0
EVAL_LIMIT_MS = 600_000.0
SIGNIFICANCE_MARGIN_NATS = 0.005
SIGNIFICANCE_ALPHA = 0.01
RECORD_TRACK = "track_10min_16mb"
NON_RECORD_TRACK = "track_non_record_16mb"
# Hyperparameters that never go on the shared command line (RUN_ID is per-run noise, SEED is per seed).
COMMAND_SKIP = ("RUN_ID", "SEED")

_FLOAT = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf|-inf)"
_INT = r"(\d+)"

RE_HPARAM = re.compile(r"^hparam ([A-Za-z_][A-Za-z0-9_]*)=(.*)$")
RE_WORLD = re.compile(r"^world_size:" + _INT + r" grad_accum_steps:" + _INT)
RE_SEED = re.compile(r"^seed:" + _INT + r"\s*$")
RE_STEP_TRAIN = re.compile(
    r"^step:" + _INT + r"/" + _INT + r" train_loss:" + _FLOAT + r" train_time:" + _FLOAT + r"ms step_avg:" + _FLOAT + r"ms"
)
RE_STEP_VAL = re.compile(
    r"^step:" + _INT + r"/" + _INT + r" val_loss:" + _FLOAT + r" val_bpb:" + _FLOAT
    + r" train_time:" + _FLOAT + r"ms step_avg:" + _FLOAT + r"ms"
)
RE_STOP = re.compile(r"^stopping_early: wallclock_cap train_time:" + _FLOAT + r"ms step:" + _INT + r"/" + _INT)
RE_MODEL_BYTES = re.compile(r"^Serialized model int6\+zstd: " + _INT + r" bytes")
RE_CODE_BYTES = re.compile(r"^Code size: " + _INT + r" bytes")
RE_TOTAL_BYTES = re.compile(r"^Total submission size int6\+zstd: " + _INT + r" bytes")
RE_SIZE_EXCEEDED = re.compile(r"^size_limit:exceeded")
RE_RT = re.compile(r"^final_int6_roundtrip val_loss:" + _FLOAT + r" val_bpb:" + _FLOAT + r" eval_time:" + _FLOAT + r"ms")
RE_RT_EXACT = re.compile(
    r"^final_int6_roundtrip_exact val_loss:" + _FLOAT + r" val_bpb:" + _FLOAT + r"(?: tokens:" + _INT + r" bytes:" + _INT + r")?"
)
RE_SW = re.compile(
    r"^final_int6_sliding_window val_loss:" + _FLOAT + r" val_bpb:" + _FLOAT + r" stride:" + _INT + r" eval_time:" + _FLOAT + r"ms"
)
RE_SW_EXACT = re.compile(
    r"^final_int6_sliding_window_exact val_loss:" + _FLOAT + r" val_bpb:" + _FLOAT + r"(?: tokens:" + _INT + r" bytes:" + _INT + r")?"
)
RE_POST = re.compile(r"^post_training_time:" + _FLOAT + r"ms")
RE_PEAK = re.compile(r"^peak memory allocated: " + _INT + r" MiB reserved: " + _INT + r" MiB")
RE_VAL_LOADER = re.compile(r"^val_loader:.* tokens:" + _INT + r"\s*$")
RE_BACKEND = re.compile(r"^attention_backend:(\S+)(?: .*)? device:(\w+)")
RE_PY = re.compile(r"^Running Python (.+)$")
RE_TORCH = re.compile(r"^Running PyTorch (.+)$")
RE_GPU = re.compile(r"^\|\s+(\d+)\s+(\S.*?)\s+(?:On|Off)\s+\|")

# (label shown in messages, attribute that must be set)
FINAL_LINES = (
    ("Serialized model int6+zstd", "model_bytes"),
    ("Code size", "code_bytes"),
    ("Total submission size int6+zstd", "total_bytes"),
    ("final_int6_roundtrip", "rt_eval_ms"),
    ("final_int6_roundtrip_exact", "rt_loss"),
    ("final_int6_sliding_window", "sw_eval_ms"),
    ("final_int6_sliding_window_exact", "sw_loss"),
    ("post_training_time", "post_training_ms"),
)


# ----------------------------------------------------------------------------------------------------------------
# Student-t distribution (no scipy): regularized incomplete beta via a continued fraction.


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Continued-fraction part of I_x(a, b), evaluated with the modified Lentz method."""
    tiny = 1e-300
    eps = 1e-15
    c = 1.0
    d = 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 1000):
        # even term d_{2m}
        num = m * (b - m) * x / ((a + 2 * m - 1.0) * (a + 2 * m))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        result *= d * c
        # odd term d_{2m+1}
        num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1.0))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        step = d * c
        result *= step
        if abs(step - 1.0) < eps:
            return result
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if a <= 0 or b <= 0:
        raise ValueError(f"incomplete beta needs a, b > 0, got a={a}, b={b}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"incomplete beta needs 0 <= x <= 1, got x={x}")
    if x == 0.0 or x == 1.0:
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(log_front)
    # The fraction converges fast for x < (a+1)/(a+b+2); otherwise use the symmetry I_x(a,b) = 1 - I_{1-x}(b,a).
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_continued_fraction(a, b, x) / a
    return 1.0 - front * _beta_continued_fraction(b, a, 1.0 - x) / b


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df > 0 degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t > 0 else tail


def student_t_sf(t: float, df: float) -> float:
    """P(T > t) (the one-sided upper-tail p-value)."""
    return student_t_cdf(-t, df)


# ----------------------------------------------------------------------------------------------------------------
# Log parsing


@dataclass
class RunLog:
    path: Path
    source: Optional[bytes] = None
    python_version: Optional[str] = None
    torch_version: Optional[str] = None
    gpus: list[str] = field(default_factory=list)
    nvidia_smi_available: bool = False
    hparams: dict[str, str] = field(default_factory=dict)
    val_subset: Optional[str] = None
    eval_only: Optional[str] = None
    world_size: Optional[int] = None
    val_loader_tokens: Optional[int] = None
    attention_backend: Optional[str] = None
    device: Optional[str] = None
    grad_accum_steps: Optional[int] = None
    seed: Optional[int] = None
    steps: Optional[int] = None
    iterations: Optional[int] = None
    train_time_ms: Optional[float] = None
    step_avg_ms: Optional[float] = None
    stopped_early: bool = False
    pre_quant_loss: Optional[float] = None
    pre_quant_bpb: Optional[float] = None
    peak_alloc_mib: Optional[int] = None
    model_bytes: Optional[int] = None
    code_bytes: Optional[int] = None
    total_bytes: Optional[int] = None
    size_exceeded_line: Optional[str] = None
    rt_loss4: Optional[float] = None
    rt_bpb4: Optional[float] = None
    rt_eval_ms: Optional[float] = None
    rt_loss: Optional[float] = None
    rt_bpb: Optional[float] = None
    rt_tokens: Optional[int] = None
    rt_bytes: Optional[int] = None
    sw_loss4: Optional[float] = None
    sw_bpb4: Optional[float] = None
    sw_stride: Optional[int] = None
    sw_eval_ms: Optional[float] = None
    sw_loss: Optional[float] = None
    sw_bpb: Optional[float] = None
    sw_tokens: Optional[int] = None
    sw_bytes: Optional[int] = None
    post_training_ms: Optional[float] = None

    @property
    def name(self) -> str:
        return str(self.path)

    @property
    def hardware(self) -> Optional[str]:
        if not self.gpus:
            if self.device == "cpu":
                return f"CPU ({self.world_size or 1} process{'es' if (self.world_size or 1) > 1 else ''}, no CUDA device)"
            return None
        names = sorted(set(self.gpus))
        if len(names) == 1:
            return f"{len(self.gpus)}x {names[0]}"
        return ", ".join(f"{self.gpus.count(n)}x {n}" for n in names)


def _split_preamble(data: bytes) -> tuple[Optional[bytes], bytes, bytes]:
    """Return (embedded source or None, environment block, body) of a log file's bytes."""
    lines = data.splitlines(keepends=True)
    offset = 0
    seps: list[tuple[int, int]] = []  # (start, end) byte offsets of separator lines
    for line in lines:
        if line.rstrip(b"\r\n") == SEPARATOR:
            seps.append((offset, offset + len(line)))
            if len(seps) == 2:
                break
        offset += len(line)
    if not seps:
        return None, b"", data
    source = data[: seps[0][0]]
    if len(seps) == 1:
        return source, b"", data[seps[0][1]:]
    return source, data[seps[0][1]: seps[1][0]], data[seps[1][1]:]


def parse_log(path: Path) -> RunLog:
    """Parse one train_gpt.py log file (see the module docstring for what is read)."""
    data = path.read_bytes()
    run = RunLog(path=path)
    run.source, env_block, body = _split_preamble(data)
    for line in env_block.decode("utf-8", errors="replace").splitlines():
        if m := RE_PY.match(line):
            run.python_version = m.group(1).strip()
        elif m := RE_TORCH.match(line):
            run.torch_version = m.group(1).strip()
        elif m := RE_GPU.match(line):
            run.gpus.append(m.group(2).strip())
        if line.startswith("NVIDIA-SMI") or "NVIDIA-SMI" in line:
            run.nvidia_smi_available = True
    for line in body.decode("utf-8", errors="replace").splitlines():
        line = line.rstrip("\r")
        if m := RE_HPARAM.match(line):
            run.hparams[m.group(1)] = m.group(2)
        elif line.startswith("val_subset:"):
            run.val_subset = line
        elif line.startswith("eval_only:"):
            run.eval_only = line[len("eval_only:"):].strip()
        elif m := RE_VAL_LOADER.match(line):
            run.val_loader_tokens = int(m.group(1))
        elif m := RE_BACKEND.match(line):
            run.attention_backend, run.device = m.group(1), m.group(2)
        elif m := RE_WORLD.match(line):
            run.world_size, run.grad_accum_steps = int(m.group(1)), int(m.group(2))
        elif m := RE_SEED.match(line):
            run.seed = int(m.group(1))
        elif m := RE_STEP_VAL.match(line):
            run.steps = max(run.steps or 0, int(m.group(1)))
            run.iterations = int(m.group(2))
            run.pre_quant_loss, run.pre_quant_bpb = float(m.group(3)), float(m.group(4))
            run.train_time_ms = max(run.train_time_ms or 0.0, float(m.group(5)))
            run.step_avg_ms = float(m.group(6))
        elif m := RE_STEP_TRAIN.match(line):
            run.steps = max(run.steps or 0, int(m.group(1)))
            run.iterations = int(m.group(2))
            run.train_time_ms = max(run.train_time_ms or 0.0, float(m.group(4)))
            run.step_avg_ms = float(m.group(5))
        elif m := RE_STOP.match(line):
            run.stopped_early = True
            run.train_time_ms = max(run.train_time_ms or 0.0, float(m.group(1)))
            run.steps = max(run.steps or 0, int(m.group(2)))
        elif m := RE_PEAK.match(line):
            run.peak_alloc_mib = int(m.group(1))
        elif m := RE_MODEL_BYTES.match(line):
            run.model_bytes = int(m.group(1))
        elif m := RE_CODE_BYTES.match(line):
            run.code_bytes = int(m.group(1))
        elif m := RE_TOTAL_BYTES.match(line):
            run.total_bytes = int(m.group(1))
        elif RE_SIZE_EXCEEDED.match(line):
            run.size_exceeded_line = line
        elif m := RE_RT_EXACT.match(line):
            run.rt_loss, run.rt_bpb = float(m.group(1)), float(m.group(2))
            if m.group(3) is not None:
                run.rt_tokens, run.rt_bytes = int(m.group(3)), int(m.group(4))
        elif m := RE_RT.match(line):
            run.rt_loss4, run.rt_bpb4, run.rt_eval_ms = float(m.group(1)), float(m.group(2)), float(m.group(3))
        elif m := RE_SW_EXACT.match(line):
            run.sw_loss, run.sw_bpb = float(m.group(1)), float(m.group(2))
            if m.group(3) is not None:
                run.sw_tokens, run.sw_bytes = int(m.group(3)), int(m.group(4))
        elif m := RE_SW.match(line):
            run.sw_loss4, run.sw_bpb4 = float(m.group(1)), float(m.group(2))
            run.sw_stride, run.sw_eval_ms = int(m.group(3)), float(m.group(4))
        elif m := RE_POST.match(line):
            run.post_training_ms = float(m.group(1))
    if run.seed is None and "SEED" in run.hparams:
        try:
            run.seed = int(run.hparams["SEED"])
        except ValueError:
            pass
    return run


# ----------------------------------------------------------------------------------------------------------------
# Compliance


@dataclass
class Compliance:
    failures: list[str] = field(default_factory=list)
    flags: dict[str, bool] = field(default_factory=dict)

    def fail(self, flag: str, message: str) -> None:
        self.failures.append(message)
        self.flags[flag] = False


COMPLIANCE_FLAGS = (
    "train_under_600s",
    "artifact_under_16mb",
    "eval_under_600s",
    "full_validation_set",
    "same_script_all_seeds",
    "final_lines_present",
    "training_runs",
    "same_config_all_seeds",
)


def _same_source(embedded: bytes, script: bytes) -> bool:
    # A logger that writes the source followed by "\n" before the separator adds one newline; accept that only.
    return embedded == script or embedded == script + b"\n"


def check_runs(runs: Sequence[RunLog], script: bytes) -> Compliance:
    """Run every compliance check; each failure is one line that names the log."""
    comp = Compliance(flags={k: True for k in COMPLIANCE_FLAGS})
    for run in runs:
        n = run.name
        if run.eval_only is not None:
            comp.fail("training_runs", f"{n}: eval-only run (eval_only:{run.eval_only}), not a training log")
        elif run.hparams.get("EVAL_ONLY", "").strip():
            comp.fail("training_runs", f"{n}: eval-only run (hparam EVAL_ONLY={run.hparams['EVAL_ONLY']}), not a training log")
        missing = [label for label, attr in FINAL_LINES if getattr(run, attr) is None]
        if missing:
            comp.fail("final_lines_present", f"{n}: missing final line(s): {', '.join(missing)}")
        if run.seed is None:
            comp.fail("final_lines_present", f"{n}: no 'seed:' line (and no hparam SEED)")
        # size
        if run.size_exceeded_line is not None:
            comp.fail("artifact_under_16mb", f"{n}: log reports {run.size_exceeded_line}")
        elif run.total_bytes is not None and run.total_bytes > SIZE_LIMIT_BYTES:
            comp.fail("artifact_under_16mb", f"{n}: total submission size {run.total_bytes:,} bytes > {SIZE_LIMIT_BYTES:,}")
        if None not in (run.model_bytes, run.code_bytes, run.total_bytes):
            if run.model_bytes + run.code_bytes != run.total_bytes:
                comp.fail("artifact_under_16mb", f"{n}: model {run.model_bytes} + code {run.code_bytes} bytes != total {run.total_bytes}")
        # training time
        cap = run.hparams.get("MAX_WALLCLOCK_SECONDS")
        if cap is None:
            comp.fail("train_under_600s", f"{n}: hparam MAX_WALLCLOCK_SECONDS not logged; cannot show training <= 600 s")
        else:
            try:
                cap_s = float(cap)
            except ValueError:
                cap_s = math.nan
            if not (0 < cap_s <= 600):
                comp.fail("train_under_600s", f"{n}: MAX_WALLCLOCK_SECONDS={cap} (must be > 0 and <= 600)")
        if run.train_time_ms is None:
            comp.fail("train_under_600s", f"{n}: no 'step:' line with train_time; cannot show training <= 600 s")
        else:
            allowance = TRAIN_LIMIT_MS + (run.step_avg_ms or 0.0)
            if run.train_time_ms > allowance:
                comp.fail(
                    "train_under_600s",
                    f"{n}: train_time {run.train_time_ms:.0f}ms > 600000ms + one step_avg ({run.step_avg_ms or 0.0:.2f}ms)",
                )
        # evaluation time
        if run.post_training_ms is not None and run.post_training_ms > EVAL_LIMIT_MS:
            comp.fail("eval_under_600s", f"{n}: post_training_time {run.post_training_ms:.0f}ms > 600000ms")
        # validation set
        if run.val_subset is not None:
            comp.fail("full_validation_set", f"{n}: validation subset used ({run.val_subset})")
        vmt = run.hparams.get("VAL_MAX_TOKENS")
        if vmt is not None and vmt.strip() not in ("0", "0.0", ""):
            comp.fail("full_validation_set", f"{n}: hparam VAL_MAX_TOKENS={vmt} (must be 0: full validation set)")
        if run.val_loader_tokens is not None and run.sw_tokens is not None and run.sw_tokens != run.val_loader_tokens:
            comp.fail(
                "full_validation_set",
                f"{n}: sliding eval scored {run.sw_tokens} tokens but the validation set has {run.val_loader_tokens} targets",
            )
        # script
        if run.source is None:
            comp.fail("same_script_all_seeds", f"{n}: no embedded script (no line of 100 '=')")
        elif not _same_source(run.source, script):
            comp.fail("same_script_all_seeds", f"{n}: embedded script differs from the --script file")
        if run.code_bytes is not None and run.code_bytes != len(script):
            comp.fail("same_script_all_seeds", f"{n}: Code size {run.code_bytes} bytes != --script file size {len(script)}")
    if runs:
        first = runs[0]
        for run in runs[1:]:
            if run.source is not None and first.source is not None and run.source != first.source:
                comp.fail("same_script_all_seeds", f"{run.name}: embedded script differs from {first.name}")
            a = {k: v for k, v in first.hparams.items() if k not in COMMAND_SKIP}
            b = {k: v for k, v in run.hparams.items() if k not in COMMAND_SKIP}
            if a != b:
                diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                comp.fail("same_config_all_seeds", f"{run.name}: hyperparameters differ from {first.name}: {', '.join(diff)}")
            if run.world_size != first.world_size:
                comp.fail("same_config_all_seeds", f"{run.name}: world_size {run.world_size} != {first.world_size} in {first.name}")
            if run.sw_tokens is not None and first.sw_tokens is not None and (run.sw_tokens, run.sw_bytes) != (first.sw_tokens, first.sw_bytes):
                comp.fail(
                    "full_validation_set",
                    f"{run.name}: sliding eval scored tokens:{run.sw_tokens} bytes:{run.sw_bytes}, "
                    f"{first.name} scored tokens:{first.sw_tokens} bytes:{first.sw_bytes}",
                )
        seen: dict[int, str] = {}
        for run in runs:
            if run.seed is None:
                continue
            if run.seed in seen:
                comp.fail("same_config_all_seeds", f"{run.name}: seed {run.seed} already used by {seen[run.seed]}")
            else:
                seen[run.seed] = run.name
    return comp


# ----------------------------------------------------------------------------------------------------------------
# Significance


def significance_test(
    runs: Sequence[RunLog], sota_loss: Optional[float] = None, sota_bpb: Optional[float] = None
) -> dict[str, Any]:
    """One-sided one-sample t-test: does the mean val_loss beat SOTA by >= 0.005 nats with p < 0.01?

    Per seed i the improvement short-fall is d_i = loss_i - (sota_loss_i - 0.005) and H0: mean(d) >= 0 is tested
    against H1: mean(d) < 0 with t = mean(d) / (s_d / sqrt(n)), df = n - 1, p = P(T_df <= t).
    With --sota-bpb the SOTA is converted to nats per run with that run's own sliding `_exact` tokens/bytes:
    sota_loss_i = sota_bpb * ln 2 * bytes_i / tokens_i (so the 0.005-nat margin is 0.005 * tokens_i/(bytes_i ln 2) bpb).
    """
    if (sota_loss is None) == (sota_bpb is None):
        raise ValueError("give exactly one of sota_loss / sota_bpb")
    res: dict[str, Any] = {
        "test": "one-sided one-sample Student t-test on per-seed sliding-window val_loss (nats)",
        "h0": f"mean val_loss >= SOTA val_loss - {SIGNIFICANCE_MARGIN_NATS}",
        "h1": f"mean val_loss < SOTA val_loss - {SIGNIFICANCE_MARGIN_NATS}",
        "margin_nats": SIGNIFICANCE_MARGIN_NATS,
        "alpha": SIGNIFICANCE_ALPHA,
        "assumptions": "seeds are independent runs; per-seed val_loss roughly normally distributed",
        "sota_val_loss": sota_loss,
        "sota_val_bpb": sota_bpb,
    }
    usable = [r for r in runs if r.sw_loss is not None]
    diffs: list[float] = []
    if sota_loss is not None:
        res["conversion"] = "none: SOTA given as val_loss (nats)"
        diffs = [r.sw_loss - (sota_loss - SIGNIFICANCE_MARGIN_NATS) for r in usable]
    else:
        res["conversion"] = (
            "SOTA val_bpb converted to nats per run: sota_loss_i = sota_bpb * ln(2) * bytes_i / tokens_i, "
            "bytes_i/tokens_i from that run's final_int6_sliding_window_exact line"
        )
        missing = [r.name for r in usable if not r.sw_tokens or not r.sw_bytes]
        if missing:
            res.update(computable=False, passed=False, n=len(usable),
                       reason=f"no tokens:/bytes: on the sliding _exact line of {', '.join(missing)}; use --sota-loss")
            return res
        per_run = []
        for r in usable:
            sl = sota_bpb * math.log(2) * r.sw_bytes / r.sw_tokens
            per_run.append(sl)
            diffs.append(r.sw_loss - (sl - SIGNIFICANCE_MARGIN_NATS))
        res["sota_val_loss_per_seed"] = {str(r.seed): round(v, 8) for r, v in zip(usable, per_run)}
        res["margin_bpb_per_seed"] = {
            str(r.seed): round(SIGNIFICANCE_MARGIN_NATS * r.sw_tokens / (r.sw_bytes * math.log(2)), 8) for r in usable
        }
    n = len(diffs)
    res["n"] = n
    if n < 2:
        res.update(computable=False, passed=False, reason=f"needs at least 2 seeds with a sliding score, have {n}")
        return res
    df = n - 1
    mean_d = statistics.fmean(diffs)
    sd = statistics.stdev(diffs)
    res.update(df=df, mean_val_loss=round(statistics.fmean(r.sw_loss for r in usable), 8),
               mean_diff_to_threshold=round(mean_d, 8), std=round(sd, 8))
    if sd == 0.0:
        t = -math.inf if mean_d < 0 else (math.inf if mean_d > 0 else 0.0)
        p = 0.0 if mean_d < 0 else (1.0 if mean_d > 0 else 0.5)
        res["note"] = "zero spread between seeds; p-value is degenerate"
    else:
        t = mean_d / (sd / math.sqrt(n))
        p = student_t_cdf(t, df)
    res.update(computable=True, t=None if math.isinf(t) else round(t, 6), p_value=p, passed=bool(p < SIGNIFICANCE_ALPHA))
    return res


def format_significance(sig: dict[str, Any]) -> list[str]:
    sota = f"val_loss {sig['sota_val_loss']}" if sig.get("sota_val_loss") is not None else f"val_bpb {sig['sota_val_bpb']}"
    out = [
        f"Significance: {sig['test']}",
        f"  SOTA {sota}; H0: {sig['h0']}; H1: {sig['h1']}; alpha {sig['alpha']}",
        f"  conversion: {sig['conversion']}",
        f"  assumptions: {sig['assumptions']}; n={sig.get('n')}, df={sig.get('df', '-')}",
    ]
    if not sig.get("computable"):
        out.append(f"  result: cannot be computed ({sig.get('reason')})")
        return out
    t = sig["t"]
    out.append(
        f"  mean val_loss {sig['mean_val_loss']:.8f}, mean(loss - (SOTA - {sig['margin_nats']})) = "
        f"{sig['mean_diff_to_threshold']:+.8f}, sd {sig['std']:.8f}, t = {t if t is not None else 'inf'}, "
        f"one-sided p = {sig['p_value']:.3g}"
    )
    if "note" in sig:
        out.append(f"  note: {sig['note']}")
    verdict = "PASS" if sig["passed"] else "FAIL"
    out.append(f"  result: {verdict} (p {'<' if sig['passed'] else '>='} {sig['alpha']})")
    return out


# ----------------------------------------------------------------------------------------------------------------
# Run command


_DEFAULTS_CACHE: dict[str, Any] = {}


def load_defaults(script_path: Path, script: bytes) -> tuple[Optional[Any], Optional[str]]:
    """Import the script under a private module name and return (read_hyperparameters({}), error)."""
    key = hashlib.sha256(script).hexdigest()
    if key in _DEFAULTS_CACHE:
        return _DEFAULTS_CACHE[key]
    result: tuple[Optional[Any], Optional[str]]
    try:
        name = f"_pg_train_gpt_{key[:16]}"
        spec = importlib.util.spec_from_file_location(name, script_path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot import {script_path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        finally:
            sys.modules.pop(name, None)
        result = (module.read_hyperparameters({}), None)
    except (Exception, SystemExit) as exc:  # the script may be unimportable here (e.g. no torch); degrade visibly
        result = (None, f"{type(exc).__name__}: {exc}")
    _DEFAULTS_CACHE[key] = result
    return result


def non_default_hparams(hparams: dict[str, str], defaults: Optional[Any]) -> list[tuple[str, str]]:
    out = []
    for name, value in hparams.items():
        if name in COMMAND_SKIP:
            continue
        if defaults is not None and hasattr(defaults, name.lower()) and str(getattr(defaults, name.lower())) == value:
            continue
        out.append((name, value))
    return out


def build_run_command(runs: Sequence[RunLog], defaults: Optional[Any]) -> str:
    """Shell command that reproduces the runs: non-default hparams, SEED per seed, torchrun."""

    def env_prefix(run: RunLog) -> str:
        return " ".join(f"{k}={shlex.quote(v)}" for k, v in non_default_hparams(run.hparams, defaults))

    def launcher(run: RunLog) -> str:
        return f"torchrun --standalone --nproc_per_node={run.world_size or 1} train_gpt.py"

    first = runs[0]
    same = all(env_prefix(r) == env_prefix(first) and r.world_size == first.world_size for r in runs)
    seeds = [r.seed for r in runs]
    if same and len(runs) > 1 and all(s is not None for s in seeds):
        prefix = env_prefix(first)
        parts = [f"for SEED in {' '.join(str(s) for s in seeds)}; do"]
        line = "  " + (prefix + " " if prefix else "") + "SEED=$SEED " + launcher(first)
        parts.append(line)
        parts.append("done")
        return "\n".join(parts)
    lines = []
    for r in runs:
        prefix = env_prefix(r)
        seed = f"SEED={r.seed} " if r.seed is not None else ""
        lines.append((prefix + " " if prefix else "") + seed + launcher(r))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Outputs


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return round(statistics.fmean(vals), 8) if vals else None


def _max(values: Sequence[Optional[int]]) -> Optional[int]:
    vals = [v for v in values if v is not None]
    return max(vals) if vals else None


def _std(values: Sequence[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return round(statistics.stdev(vals), 8) if len(vals) > 1 else 0.0


def _finite(obj: Any) -> Any:
    """Replace NaN/inf (not valid JSON) by None, recursively."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _one_or_list(values: Sequence[Optional[str]]) -> Any:
    vals = list(dict.fromkeys(v for v in values if v))
    if not vals:
        return None
    return vals[0] if len(vals) == 1 else vals


def build_submission(
    runs: Sequence[RunLog], comp: Compliance, args: argparse.Namespace, track: str, script: bytes,
    significance: Optional[dict[str, Any]],
) -> dict[str, Any]:
    seed_results: dict[str, Any] = {}
    for i, r in enumerate(runs):
        key = str(r.seed) if r.seed is not None else f"unknown_{i}"
        seed_results[key] = {
            "val_loss": r.sw_loss,
            "val_bpb": r.sw_bpb,
            "roundtrip_val_loss": r.rt_loss,
            "roundtrip_val_bpb": r.rt_bpb,
            "pre_quant_val_loss": r.pre_quant_loss,
            "pre_quant_val_bpb": r.pre_quant_bpb,
            "bytes_total": r.total_bytes,
            "bytes_model_int6_zstd": r.model_bytes,
            "steps": r.steps,
            "step_avg_ms": r.step_avg_ms,
            "train_time_ms": r.train_time_ms,
            "eval_time_ms": r.post_training_ms,
            "roundtrip_eval_time_ms": r.rt_eval_ms,
            "sliding_eval_time_ms": r.sw_eval_ms,
            "sliding_stride": r.sw_stride,
            "val_tokens": r.sw_tokens,
            "val_bytes": r.sw_bytes,
            "log": _log_name(r, i, runs),
        }
    hardware = _one_or_list([r.hardware for r in runs])
    if hardware is None:
        hardware = "unknown (nvidia-smi output not in log)"
    compliance: dict[str, Any] = dict(comp.flags)
    compliance["failures"] = list(comp.failures)
    sub: dict[str, Any] = {
        "author": args.author,
        "github_id": args.github_id,
        "name": args.name,
        "blurb": args.blurb,
        "date": args.date,
        "val_bpb": _mean([r.sw_bpb for r in runs]),
        "val_loss": _mean([r.sw_loss for r in runs]),
        "bytes_total": _max([r.total_bytes for r in runs]),
        "bytes_code": len(script),
        "bytes_model_int6_zstd": _max([r.model_bytes for r in runs]),
        "pre_quant_val_loss": _mean([r.pre_quant_loss for r in runs]),
        "pre_quant_val_bpb": _mean([r.pre_quant_bpb for r in runs]),
        "int6_zstd_val_loss": _mean([r.rt_loss for r in runs]),
        "int6_zstd_val_bpb": _mean([r.rt_bpb for r in runs]),
        "seeds": [r.seed for r in runs],
        "seed_results": seed_results,
        "val_bpb_std": _std([r.sw_bpb for r in runs]),
        "track": track,
        "hardware": hardware,
        "pytorch_version": _one_or_list([r.torch_version for r in runs]),
        "python_version": _one_or_list([r.python_version for r in runs]),
        "attention_backend": _one_or_list([r.attention_backend for r in runs]),
        "world_size": _one_or_list([str(r.world_size) if r.world_size is not None else None for r in runs]),
        "compliance": compliance,
    }
    if significance is not None:
        sub["significance"] = significance
    return sub


def _log_name(run: RunLog, index: int, runs: Sequence[RunLog]) -> str:
    seeds = [r.seed for r in runs]
    if run.seed is not None and seeds.count(run.seed) == 1:
        return f"train_seed{run.seed}.log"
    return f"train_log{index + 1}" + (f"_seed{run.seed}" if run.seed is not None else "") + ".log"


def _fmt(v: Optional[float], spec: str) -> str:
    return "—" if v is None else format(v, spec)


def build_readme(
    runs: Sequence[RunLog], sub: dict[str, Any], comp: Compliance, command: str, defaults_error: Optional[str],
    significance: Optional[dict[str, Any]],
) -> str:
    L: list[str] = []
    L.append(f"# {sub['name']}")
    L.append("")
    L.append(f"**Author:** {sub['author']} (@{sub['github_id']})  ")
    L.append(f"**Date:** {sub['date']}  ")
    L.append(f"**Track:** `{sub['track']}`  ")
    L.append(f"**Hardware:** {sub['hardware']}; PyTorch {sub['pytorch_version']}")
    L.append("")
    if sub["blurb"]:
        L.append(sub["blurb"])
        L.append("")
    vb = sub["val_bpb"]
    std = sub["val_bpb_std"]
    total = "—" if sub["bytes_total"] is None else f"{sub['bytes_total']:,}"
    L.append(
        f"**val_bpb (sliding window, mean of {len(runs)} seed{'s' if len(runs) != 1 else ''}): "
        f"{_fmt(vb, '.8f')}** (std {_fmt(std, '.8f')}), val_loss {_fmt(sub['val_loss'], '.8f')}, "
        f"max total size {total} bytes"
    )
    L.append("")
    L.append("## Method")
    L.append("")
    L.append("TODO: describe what changed relative to the current record and why it helps.")
    L.append("")
    L.append("## Results")
    L.append("")
    L.append("| Seed | Steps | Pre-quant bpb | Roundtrip bpb | Sliding bpb | Total bytes | Train time (s) | Eval time (s)† |")
    L.append("|---|---|---|---|---|---|---|---|")
    for r in runs:
        L.append(
            f"| {r.seed if r.seed is not None else '?'} | {r.steps if r.steps is not None else '—'} | "
            f"{_fmt(r.pre_quant_bpb, '.4f')} | {_fmt(r.rt_bpb, '.8f')} | {_fmt(r.sw_bpb, '.8f')} | "
            f"{'—' if r.total_bytes is None else format(r.total_bytes, ',')} | "
            f"{_fmt(None if r.train_time_ms is None else r.train_time_ms / 1000, '.3f')} | "
            f"{_fmt(None if r.post_training_ms is None else r.post_training_ms / 1000, '.1f')} |"
        )
    steps = [r.steps for r in runs if r.steps is not None]
    tt = [r.train_time_ms / 1000 for r in runs if r.train_time_ms is not None]
    et = [r.post_training_ms / 1000 for r in runs if r.post_training_ms is not None]
    L.append(
        f"| **mean** | {_fmt(statistics.fmean(steps) if steps else None, '.0f')} | {_fmt(sub['pre_quant_val_bpb'], '.4f')} | "
        f"{_fmt(sub['int6_zstd_val_bpb'], '.8f')} | {_fmt(sub['val_bpb'], '.8f')} | "
        f"{'—' if sub['bytes_total'] is None else 'max ' + format(sub['bytes_total'], ',')} | "
        f"{_fmt(statistics.fmean(tt) if tt else None, '.3f')} | {_fmt(statistics.fmean(et) if et else None, '.1f')} |"
    )
    L.append(
        f"| **std** | | {_fmt(_std([r.pre_quant_bpb for r in runs]), '.4f')} | {_fmt(_std([r.rt_bpb for r in runs]), '.8f')} | "
        f"{_fmt(std, '.8f')} | | | |"
    )
    L.append("")
    L.append("Pre-quant = last periodic validation on the live weights; roundtrip = int6+zstd artifact, "
             "non-overlapping eval; sliding = int6+zstd artifact, sliding-window eval "
             f"(stride {_one_or_list([str(r.sw_stride) for r in runs if r.sw_stride is not None]) or '?'}), the submission score. "
             "† post_training_time: serialization, round trip and evaluations after training.")
    L.append("")
    L.append(f"Code: {sub['bytes_code']:,} bytes; model int6+zstd: "
             f"{'—' if sub['bytes_model_int6_zstd'] is None else format(sub['bytes_model_int6_zstd'], ',')} bytes (max over seeds).")
    L.append("")
    L.append("## Compliance")
    L.append("")
    for k, v in comp.flags.items():
        L.append(f"- {k}: {'yes' if v else '**NO**'}")
    if comp.failures:
        L.append("")
        L.append("Failed checks (this is why it is a non-record submission):")
        L.append("")
        for f in comp.failures:
            L.append(f"- {f}")
    L.append("")
    if significance is not None:
        L.append("## Significance")
        L.append("")
        L.append("```")
        L.extend(format_significance(significance))
        L.append("```")
        L.append("")
    L.append("## Run command")
    L.append("")
    L.append("Rebuilt from the logged hyperparameters (only values that differ from the script defaults):")
    if defaults_error:
        L.append("")
        L.append(f"(script defaults could not be loaded — {defaults_error} — so every logged hyperparameter is listed)")
    L.append("")
    L.append("```bash")
    L.append(command)
    L.append("```")
    L.append("")
    L.append("## Files")
    L.append("")
    if comp.flags.get("same_script_all_seeds", True):
        L.append("- `train_gpt.py`: the exact script embedded in every log")
    else:
        L.append("- `train_gpt.py`: the --script file; it does NOT match every log's embedded script (see Compliance)")
    for i, r in enumerate(runs):
        L.append(f"- `{_log_name(r, i, runs)}`: log of seed {r.seed}")
    L.append("- `submission.json`: metadata and per-seed results")
    L.append("")
    return "\n".join(L)


# ----------------------------------------------------------------------------------------------------------------
# CLI


class UsageError(Exception):
    pass


def _slug(name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("._")
    if not slug:
        raise UsageError(f"--name {name!r} leaves nothing usable for a folder name")
    return slug


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="records/package.py",
        description="Package train_gpt.py run logs into a records/<track>/<date>_<Name>/ submission folder.",
        epilog="Exit status: 0 written; 1 a compliance check failed (record track; nothing written); 2 usage/input error.",
    )
    p.add_argument("logs", nargs="+", type=Path, metavar="LOG", help="training log(s), one per seed (logs/<RUN_ID>.txt)")
    p.add_argument("--name", required=True, help="submission name (also the folder suffix, sanitized)")
    p.add_argument("--author", required=True, help="author's name")
    p.add_argument("--github-id", required=True, help="author's GitHub id")
    p.add_argument("--blurb", default="", help="one-paragraph summary for submission.json and README")
    p.add_argument("--date", default=None, help="YYYY-MM-DD (default: today)")
    p.add_argument("--script", type=Path, default=None,
                   help="the train_gpt.py every log must embed (default: ./train_gpt.py, else the repo's)")
    p.add_argument("--non-record", action="store_true",
                   help=f"write to {NON_RECORD_TRACK}/ and package even if compliance checks fail (failures are listed)")
    sota = p.add_mutually_exclusive_group()
    sota.add_argument("--sota-bpb", type=float, default=None, help="current SOTA val_bpb for the significance test")
    sota.add_argument("--sota-loss", type=float, default=None, help="current SOTA val_loss (nats) for the significance test")
    p.add_argument("--out-root", type=Path, default=Path("records"), help="records root (default: records)")
    p.add_argument("--force", action="store_true", help="replace an existing submission folder")
    return p


def _resolve_script(arg: Optional[Path]) -> Path:
    if arg is not None:
        return arg
    here = Path("train_gpt.py")
    if here.is_file():
        return here
    return Path(__file__).resolve().parent.parent / "train_gpt.py"


def _write_folder(dest: Path, files: dict[str, bytes], force: bool) -> None:
    """Build the folder in a temp dir next to dest and rename it into place (never half-written)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    backup: Optional[Path] = None
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        if dest.exists():
            if not force:
                raise UsageError(f"{dest} already exists (use --force to replace it)")
            backup = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
            dest.rename(backup)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if backup is not None and not dest.exists():
            backup.rename(dest)
            backup = None
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def package(args: argparse.Namespace) -> int:
    date = args.date or _dt.date.today().isoformat()
    try:
        if _dt.date.fromisoformat(date).isoformat() != date:
            raise ValueError
    except ValueError:
        raise UsageError(f"--date {date!r} is not YYYY-MM-DD")
    args.date = date
    slug = _slug(args.name)
    for log in args.logs:
        if not log.is_file():
            raise UsageError(f"{log}: log file not found")
    if len({p.resolve() for p in args.logs}) != len(args.logs):
        raise UsageError("the same log file is given more than once")
    script_path = _resolve_script(args.script)
    if not script_path.is_file():
        raise UsageError(f"{script_path}: script not found (give --script)")
    script = script_path.read_bytes()
    track = NON_RECORD_TRACK if args.non_record else RECORD_TRACK
    dest = args.out_root / track / f"{date}_{slug}"
    if dest.exists() and not args.force:
        raise UsageError(f"{dest} already exists (use --force to replace it)")

    runs = [parse_log(p) for p in args.logs]
    comp = check_runs(runs, script)
    for r in runs:
        print(
            f"{r.name}: seed {r.seed} steps {r.steps} sliding val_bpb {_fmt(r.sw_bpb, '.8f')} "
            f"total {r.total_bytes} bytes train {_fmt(r.train_time_ms, '.0f')}ms post-train {_fmt(r.post_training_ms, '.0f')}ms"
        )
    if comp.failures:
        for f in comp.failures:
            print(f"FAIL {f}", file=sys.stderr)
        if not args.non_record:
            print(f"not written: {len(comp.failures)} compliance check(s) failed "
                  "(fix them, or use --non-record for the non-record track)", file=sys.stderr)
            return 1
        print(f"--non-record: packaging anyway; {len(comp.failures)} failure(s) listed in README and submission.json",
              file=sys.stderr)

    significance = None
    if args.sota_loss is not None or args.sota_bpb is not None:
        significance = significance_test(runs, sota_loss=args.sota_loss, sota_bpb=args.sota_bpb)
        for line in format_significance(significance):
            print(line)

    defaults, defaults_error = load_defaults(script_path, script)
    command = build_run_command(runs, defaults)
    sub = build_submission(runs, comp, args, track, script, significance)
    readme = build_readme(runs, sub, comp, command, defaults_error, significance)
    files: dict[str, bytes] = {"train_gpt.py": script}
    for i, r in enumerate(runs):
        files[_log_name(r, i, runs)] = r.path.read_bytes()
    files["submission.json"] = (json.dumps(_finite(sub), indent=2, allow_nan=False) + "\n").encode()
    files["README.md"] = readme.encode()
    _write_folder(dest, files, args.force)
    print(f"wrote {dest}")
    print(f"val_bpb {_fmt(sub['val_bpb'], '.8f')} (std {_fmt(sub['val_bpb_std'], '.8f')}) over seeds {sub['seeds']}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return package(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
