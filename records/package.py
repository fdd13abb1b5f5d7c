"""Package finished train_gpt.py runs into a Parameter Golf submission folder.

Usage (from the repository root):

    python records/package.py logs/a.txt logs/b.txt logs/c.txt \
        --name 11L_XSA3_Seed --author "Jane Doe" --github-id janedoe \
        --blurb "legal seed, sliding s64" --sota-loss 1.90915845 [--artifact final_model.int6.ptz]

It writes ``records/track_10min_16mb/<YYYY-MM-DD>_<Name>/`` (``track_non_record_16mb`` with
``--non-record``) holding ``train_gpt.py``, one ``train_seed<S>.log`` per run, ``submission.json``,
``curves.png`` (train/val loss and val_bpb against training time, drawn by ``records/plot_curves.py``; needs
matplotlib) and a ``README.md`` skeleton with the results table and the run command rebuilt from the logged
hyperparameters. The run command uses the challenge's data layout (``DATA_PATH``, ``TOKENIZER_PATH`` at the
script's defaults, no ``TRAIN_FILES``/``VAL_FILES``); data paths the logs used locally are listed separately.
Folders are created with mode 0755 and files 0644, whatever the umask.

Every log is checked before anything is written: artifact <= 16,000,000 bytes, training <= 600 s (the
``gptq:budget`` total, training plus GPTQ calibration, when the log has that line), post-training evaluation
<= 600 s, no ``budget:exceeded`` line, all final lines present, the same script in every log and equal to
``--script``, the full validation set (no ``val_subset:`` line, ``VAL_MAX_TOKENS=0``, no final line marked
``subset``, every target scored), and a training run (not an EVAL_ONLY re-score). Each problem is one ``FAIL``
line naming the log (a log gets at most one line per check). A failed check aborts a record folder (exit 1,
nothing written); with ``--non-record`` the folder is written anyway and the failures are listed.

Score: the sliding-window line ``final_int6_sliding_window_exact``; when the logs have a legal score-first
test-time-training line ``final_int6_ttt_exact``, that line is the score (val_bpb, val_loss, significance) and the
README table shows both.

``--artifact PATH`` (repeatable, e.g. one per seed): the file's sha256 and byte size must equal the
``artifact:<path> bytes:<N> sha256:<hex>`` line of one of the logs; otherwise a FAIL line names the file and both
hashes. Logs from an older train_gpt.py have no ``artifact:`` line and cannot be matched (said so). The artifact
itself is not copied.

With ``--sota-loss``/``--sota-bpb`` a one-sided one-sample t-test (scipy.stats) checks the challenge's significance
rule (improve on SOTA by >= 0.005 nats with p < 0.01); its result is printed (also when a compliance check fails)
and stored, it never blocks packaging.

Exit status: 0 written, 1 a compliance check failed (record track), 2 usage / input error (also: scipy or
matplotlib not installed).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import statistics
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Optional, Sequence


def _load_sibling(name: str) -> ModuleType:
    """Import records/<name>.py under a private module name (records/ is not a package)."""
    mod_name = f"_pg_records_{name}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, Path(__file__).resolve().with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


plot_curves = _load_sibling("plot_curves")

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



class UsageError(Exception):
    """Bad input or a missing tool; reported as one line, exit 2, nothing written."""


_FLOAT = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf|-inf)"
_INT = r"(\d+)"

RE_HPARAM = re.compile(r"^hparam ([A-Za-z_][A-Za-z0-9_]*)=(.*)$")
RE_WORLD = re.compile(r"^world_size:" + _INT + r" grad_accum_steps:" + _INT)
RE_SEED = re.compile(r"^seed:" + _INT + r"\s*$")
RE_STEP_TRAIN = plot_curves.RE_TRAIN  # old and new forms (fields appended after step_avg)
RE_STEP_VAL = plot_curves.RE_VAL
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
RE_TTT = re.compile(  # stride: only when the windows overlap
    r"^final_int6_ttt val_loss:" + _FLOAT + r" val_bpb:" + _FLOAT + r"(?: stride:" + _INT + r")? chunk_tokens:" + _INT
    + r" eval_time:" + _FLOAT + r"ms"
)
RE_TTT_EXACT = re.compile(
    r"^final_int6_ttt_exact val_loss:" + _FLOAT + r" val_bpb:" + _FLOAT + r"(?: tokens:" + _INT + r" bytes:" + _INT + r")?"
)
RE_TTT_TIME = re.compile(r"^ttt_time:" + _FLOAT + r"ms")
RE_SUBSET_MARK = re.compile(r"^final_\S+ .*\ssubset\s*$")  # a final line scored on a validation subset
RE_ARTIFACT = re.compile(r"^artifact:(.+?) bytes:" + _INT + r" sha256:([0-9a-f]{64})\s*$")
RE_GPTQ_BUDGET = re.compile(
    r"^gptq:budget train_ms:" + _FLOAT + r" calib_ms:" + _FLOAT + r" total_ms:" + _FLOAT + r" limit_ms:" + _FLOAT
)
RE_BUDGET_EXCEEDED = re.compile(r"^budget:exceeded\b")
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
# required as well when the score is the test-time-training line (any log has one)
TTT_FINAL_LINES = (
    ("final_int6_ttt", "ttt_eval_ms"),
    ("final_int6_ttt_exact", "ttt_loss"),
    ("ttt_time", "ttt_ms"),
)
SCORE_LINES = {"sliding": "final_int6_sliding_window_exact", "ttt": "final_int6_ttt_exact"}
SCORE_NAMES = {"sliding": "sliding window", "ttt": "score-first test-time training"}
# Data and tokenizer locations: never on the shared run command (the challenge's paths are the script's defaults);
# values the logs used locally are listed beside it.
DATA_VARS = ("DATA_PATH", "TOKENIZER_PATH", "TRAIN_FILES", "VAL_FILES")
CHALLENGE_DATA_DEFAULTS = {
    "DATA_PATH": "./data/datasets/fineweb10B_sp1024",
    "TOKENIZER_PATH": "./data/tokenizers/fineweb_1024_bpe.model",
    "TRAIN_FILES": "",
    "VAL_FILES": "",
}


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
    ttt_loss4: Optional[float] = None
    ttt_bpb4: Optional[float] = None
    ttt_stride: Optional[int] = None
    ttt_chunk_tokens: Optional[int] = None
    ttt_eval_ms: Optional[float] = None
    ttt_loss: Optional[float] = None
    ttt_bpb: Optional[float] = None
    ttt_tokens: Optional[int] = None
    ttt_bytes: Optional[int] = None
    ttt_ms: Optional[float] = None
    subset_lines: list[str] = field(default_factory=list)  # final lines ending in " subset"
    artifact_name: Optional[str] = None
    artifact_bytes: Optional[int] = None
    artifact_sha256: Optional[str] = None
    gptq_train_ms: Optional[float] = None
    gptq_calib_ms: Optional[float] = None
    gptq_total_ms: Optional[float] = None
    gptq_limit_ms: Optional[float] = None
    budget_exceeded_lines: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return str(self.path)

    @property
    def has_ttt(self) -> bool:
        return self.ttt_loss is not None or self.ttt_loss4 is not None

    @property
    def train_budget_ms(self) -> Optional[float]:
        """The time counted against the 600 s training budget: the gptq:budget total when logged, else train_time."""
        return self.gptq_total_ms if self.gptq_total_ms is not None else self.train_time_ms

    def score(self, kind: str) -> tuple[Optional[float], Optional[float], Optional[int], Optional[int]]:
        """(val_loss, val_bpb, tokens, bytes) of the score line of `kind` ("sliding" or "ttt")."""
        if kind == "ttt":
            return self.ttt_loss, self.ttt_bpb, self.ttt_tokens, self.ttt_bytes
        return self.sw_loss, self.sw_bpb, self.sw_tokens, self.sw_bytes

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
        elif m := RE_TTT_EXACT.match(line):
            run.ttt_loss, run.ttt_bpb = float(m.group(1)), float(m.group(2))
            if m.group(3) is not None:
                run.ttt_tokens, run.ttt_bytes = int(m.group(3)), int(m.group(4))
        elif m := RE_TTT.match(line):
            run.ttt_loss4, run.ttt_bpb4 = float(m.group(1)), float(m.group(2))
            run.ttt_stride = int(m.group(3)) if m.group(3) is not None else None
            run.ttt_chunk_tokens, run.ttt_eval_ms = int(m.group(4)), float(m.group(5))
        elif m := RE_TTT_TIME.match(line):
            run.ttt_ms = float(m.group(1))
        elif m := RE_POST.match(line):
            run.post_training_ms = float(m.group(1))
        elif m := RE_ARTIFACT.match(line):
            run.artifact_name, run.artifact_bytes, run.artifact_sha256 = m.group(1), int(m.group(2)), m.group(3)
        elif m := RE_GPTQ_BUDGET.match(line):
            run.gptq_train_ms, run.gptq_calib_ms = float(m.group(1)), float(m.group(2))
            run.gptq_total_ms, run.gptq_limit_ms = float(m.group(3)), float(m.group(4))
        elif RE_BUDGET_EXCEEDED.match(line):
            run.budget_exceeded_lines.append(line.strip())
        if RE_SUBSET_MARK.match(line):
            run.subset_lines.append(line.strip())
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
    """Check results: one failure line per (subject, check), listing every problem found for it."""

    flags: dict[str, bool] = field(default_factory=dict)
    problems: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    artifacts: list[dict[str, Any]] = field(default_factory=list)  # --artifact files matched to a log line

    def fail(self, flag: str, subject: str, problem: str) -> None:
        """Record `problem` of `subject` (a log or an --artifact file) under the check `flag`."""
        self.flags[flag] = False
        found = self.problems.setdefault((subject, flag), [])
        if problem not in found:
            found.append(problem)

    @property
    def failures(self) -> list[str]:
        return [f"{subject}: {'; '.join(found)}" for (subject, _), found in self.problems.items()]


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
ARTIFACT_FLAG = "artifact_matches_log"  # present only when --artifact is given


def _same_source(embedded: bytes, script: bytes) -> bool:
    # A logger that writes the source followed by "\n" before the separator adds one newline; accept that only.
    return embedded == script or embedded == script + b"\n"


def score_kind(runs: Sequence[RunLog]) -> str:
    """'ttt' when any log has a test-time-training final line (then it is the score of every log), else 'sliding'."""
    return "ttt" if any(r.has_ttt for r in runs) else "sliding"


def _budget_flag(line: str) -> str:
    """Which budget a `budget:exceeded <what> ...` line is about: training (`training`, `gptq`, `train...`) or
    evaluation (`evaluation`, `eval...`, `ttt`, `post...`); by the first word, else by any of those words."""
    what = line[len("budget:exceeded"):].split()
    for text in ([what[0]] if what else []) + [line]:
        if re.search(r"eval|ttt|post", text):
            return "eval_under_600s"
        if re.search(r"train|gptq|calib", text):
            return "train_under_600s"
    return "train_under_600s"


def sha256_file(path: Path) -> tuple[str, int]:
    """(lowercase hex sha256, size in bytes) of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def check_artifacts(runs: Sequence[RunLog], artifacts: Sequence[tuple[Path, str, int]], comp: Compliance) -> None:
    """Each --artifact file (path, sha256, bytes) must equal the artifact: line of one of the logs."""
    comp.flags[ARTIFACT_FLAG] = True
    logged = [r for r in runs if r.artifact_sha256 is not None]
    for r in runs:
        if r.artifact_sha256 is None:
            comp.notes.append(f"{r.name}: no 'artifact:' line (written by an older train_gpt.py), "
                              "so no --artifact file can be matched to this log")
    for path, sha, size in artifacts:
        subject = f"--artifact {path}"
        if not logged:
            comp.fail(ARTIFACT_FLAG, subject,
                      f"sha256 {sha} ({size} bytes) cannot be matched: no log has an 'artifact:' line "
                      "(logs written by an older train_gpt.py)")
            continue
        same = [r for r in logged if r.artifact_sha256 == sha]
        if not same:
            listed = ", ".join(f"{r.name} has sha256 {r.artifact_sha256} ({r.artifact_bytes} bytes)" for r in logged)
            comp.fail(ARTIFACT_FLAG, subject, f"sha256 {sha} ({size} bytes) matches no log's 'artifact:' line: {listed}")
            continue
        run = same[0]
        if run.artifact_bytes != size:
            comp.fail(ARTIFACT_FLAG, subject,
                      f"sha256 {sha} equals {run.name}'s 'artifact:' line but the file has {size} bytes, "
                      f"the log says {run.artifact_bytes}")
            continue
        comp.artifacts.append({"file": path.name, "sha256": sha, "bytes": size, "log": run.name,
                               "logged_path": run.artifact_name})


def check_runs(runs: Sequence[RunLog], script: bytes,
               artifacts: Sequence[tuple[Path, str, int]] = ()) -> Compliance:
    """Run every compliance check. A log gets at most one failure line per check; a cause that touches several
    checks (an eval-only log, a validation subset, a hyperparameter already reported) is reported once."""
    comp = Compliance(flags={k: True for k in COMPLIANCE_FLAGS})
    kind = score_kind(runs)
    required = FINAL_LINES + (TTT_FINAL_LINES if kind == "ttt" else ())
    reported_hparams: dict[str, set[str]] = {r.name: set() for r in runs}  # hparams already named in a failure
    token_problem: set[str] = set()  # logs whose scored token counts are already reported
    for run in runs:
        n = run.name
        reported = reported_hparams[n]
        # a training run?
        eval_only = run.eval_only is not None or bool(run.hparams.get("EVAL_ONLY", "").strip())
        if run.eval_only is not None:
            comp.fail("training_runs", n, f"eval-only run (eval_only:{run.eval_only}), not a training log")
        elif eval_only:
            comp.fail("training_runs", n, f"eval-only run (hparam EVAL_ONLY={run.hparams['EVAL_ONLY']}), not a training log")
        if eval_only:
            reported.add("EVAL_ONLY")
        # final lines
        missing = [label for label, attr in required if getattr(run, attr) is None]
        if missing:
            comp.fail("final_lines_present", n, f"missing final line(s): {', '.join(missing)}")
        if run.seed is None:
            comp.fail("final_lines_present", n, "no 'seed:' line (and no hparam SEED)")
        # size
        if run.size_exceeded_line is not None:
            comp.fail("artifact_under_16mb", n, f"log reports {run.size_exceeded_line}")
        elif run.total_bytes is not None and run.total_bytes > SIZE_LIMIT_BYTES:
            comp.fail("artifact_under_16mb", n, f"total submission size {run.total_bytes:,} bytes > {SIZE_LIMIT_BYTES:,}")
        if None not in (run.model_bytes, run.code_bytes, run.total_bytes):
            if run.model_bytes + run.code_bytes != run.total_bytes:
                comp.fail("artifact_under_16mb", n,
                          f"model {run.model_bytes} + code {run.code_bytes} bytes != total {run.total_bytes}")
        # budgets reported by the script itself
        for line in run.budget_exceeded_lines:
            comp.fail(_budget_flag(line), n, f"log reports {line}")
        # training time (an eval-only log trained nothing: that is its one failure)
        if not eval_only:
            cap = run.hparams.get("MAX_WALLCLOCK_SECONDS")
            if cap is None:
                comp.fail("train_under_600s", n, "hparam MAX_WALLCLOCK_SECONDS not logged; cannot show training <= 600 s")
            else:
                try:
                    cap_s = float(cap)
                except ValueError:
                    cap_s = math.nan
                if not (0 < cap_s <= 600):
                    comp.fail("train_under_600s", n, f"MAX_WALLCLOCK_SECONDS={cap} (must be > 0 and <= 600)")
                    reported.add("MAX_WALLCLOCK_SECONDS")
            allowance = TRAIN_LIMIT_MS + (run.step_avg_ms or 0.0)
            over = f"> 600000ms + one step_avg ({run.step_avg_ms or 0.0:.2f}ms)"
            if run.gptq_total_ms is not None:
                if run.gptq_total_ms > allowance:
                    comp.fail("train_under_600s", n,
                              f"gptq:budget total_ms {run.gptq_total_ms:.0f}ms (train {run.gptq_train_ms:.0f}ms + "
                              f"GPTQ calibration {run.gptq_calib_ms:.0f}ms) {over}")
            elif run.train_time_ms is None:
                comp.fail("train_under_600s", n, "no 'step:' line with train_time; cannot show training <= 600 s")
            elif run.train_time_ms > allowance:
                comp.fail("train_under_600s", n, f"train_time {run.train_time_ms:.0f}ms {over}")
        # evaluation time
        if run.post_training_ms is not None and run.post_training_ms > EVAL_LIMIT_MS:
            comp.fail("eval_under_600s", n, f"post_training_time {run.post_training_ms:.0f}ms > 600000ms")
        if run.ttt_ms is not None and run.ttt_ms > EVAL_LIMIT_MS:
            comp.fail("eval_under_600s", n, f"ttt_time {run.ttt_ms:.0f}ms > 600000ms")
        # validation set: every sign of a subset is one cause
        evidence = []
        if run.val_subset is not None:
            evidence.append(run.val_subset)
        vmt = run.hparams.get("VAL_MAX_TOKENS")
        if vmt is not None and vmt.strip() not in ("0", "0.0", ""):
            evidence.append(f"hparam VAL_MAX_TOKENS={vmt}, must be 0 for the full validation set")
        if run.subset_lines:
            evidence.append(f"final line(s) marked subset: {', '.join(ln.split()[0] for ln in run.subset_lines)}")
        if evidence:
            comp.fail("full_validation_set", n, f"validation subset used ({'; '.join(evidence)})")
            reported.add("VAL_MAX_TOKENS")
            token_problem.add(n)
        elif run.val_loader_tokens is not None:
            for label, tokens in (("sliding", run.sw_tokens), ("ttt", run.ttt_tokens)):
                if tokens is not None and tokens != run.val_loader_tokens:
                    comp.fail("full_validation_set", n, f"{label} eval scored {tokens} tokens but the validation set "
                                                        f"has {run.val_loader_tokens} targets")
                    token_problem.add(n)
        # script (every log is compared with the same --script, so that also covers logs differing from each other)
        if run.source is None:
            comp.fail("same_script_all_seeds", n, "no embedded script (no line of 100 '=')")
        elif not _same_source(run.source, script):
            comp.fail("same_script_all_seeds", n, "embedded script differs from the --script file")
        elif run.code_bytes is not None and run.code_bytes != len(script):
            comp.fail("same_script_all_seeds", n, f"Code size {run.code_bytes} bytes != --script file size {len(script)}")
    if runs:
        first = runs[0]
        for run in runs[1:]:
            skip = set(COMMAND_SKIP) | reported_hparams[first.name] | reported_hparams[run.name]
            a = {k: v for k, v in first.hparams.items() if k not in skip}
            b = {k: v for k, v in run.hparams.items() if k not in skip}
            if a != b:
                diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                comp.fail("same_config_all_seeds", run.name, f"hyperparameters differ from {first.name}: {', '.join(diff)}")
            if run.world_size != first.world_size:
                comp.fail("same_config_all_seeds", run.name, f"world_size {run.world_size} != {first.world_size} in {first.name}")
            if run.name in token_problem or first.name in token_problem:
                continue
            for label, mine, theirs in (("sliding", (run.sw_tokens, run.sw_bytes), (first.sw_tokens, first.sw_bytes)),
                                        ("ttt", (run.ttt_tokens, run.ttt_bytes), (first.ttt_tokens, first.ttt_bytes))):
                if mine[0] is not None and theirs[0] is not None and mine != theirs:
                    comp.fail(
                        "full_validation_set", run.name,
                        f"{label} eval scored tokens:{mine[0]} bytes:{mine[1]}, "
                        f"{first.name} scored tokens:{theirs[0]} bytes:{theirs[1]}",
                    )
        seen: dict[int, str] = {}
        for run in runs:
            if run.seed is None:
                continue
            if run.seed in seen:
                comp.fail("same_config_all_seeds", run.name, f"seed {run.seed} already used by {seen[run.seed]}")
            else:
                seen[run.seed] = run.name
    if artifacts:
        check_artifacts(runs, artifacts, comp)
    return comp


# ----------------------------------------------------------------------------------------------------------------
# Significance


def student_t_lower_tail(t: float, df: int) -> float:
    """P(T_df <= t) from scipy.stats (a clear error when scipy is missing)."""
    try:
        from scipy import stats
    except ImportError:
        raise UsageError("scipy is not installed; the significance test needs it "
                         "(pip install scipy, or pip install -r requirements.txt)") from None
    return float(stats.t.cdf(t, df))


def significance_test(
    runs: Sequence[RunLog], sota_loss: Optional[float] = None, sota_bpb: Optional[float] = None,
    kind: Optional[str] = None,
) -> dict[str, Any]:
    """One-sided one-sample t-test: does the mean val_loss beat SOTA by >= 0.005 nats with p < 0.01?

    The per-seed val_loss is that of the score line (`kind`, default score_kind(runs)): the sliding-window
    `_exact` line, or the test-time-training `final_int6_ttt_exact` line when the logs have one.
    Per seed i the improvement short-fall is d_i = loss_i - (sota_loss_i - 0.005) and H0: mean(d) >= 0 is tested
    against H1: mean(d) < 0 with t = mean(d) / (s_d / sqrt(n)), df = n - 1, p = P(T_df <= t) (scipy.stats.t).
    With --sota-bpb the SOTA is converted to nats per run with that run's own score-line tokens/bytes:
    sota_loss_i = sota_bpb * ln 2 * bytes_i / tokens_i (so the 0.005-nat margin is 0.005 * tokens_i/(bytes_i ln 2) bpb).
    """
    if (sota_loss is None) == (sota_bpb is None):
        raise ValueError("give exactly one of sota_loss / sota_bpb")
    kind = kind or score_kind(runs)
    line = SCORE_LINES[kind]
    res: dict[str, Any] = {
        "test": f"one-sided one-sample Student t-test on per-seed {SCORE_NAMES[kind]} val_loss (nats, {line})",
        "h0": f"mean val_loss >= SOTA val_loss - {SIGNIFICANCE_MARGIN_NATS}",
        "h1": f"mean val_loss < SOTA val_loss - {SIGNIFICANCE_MARGIN_NATS}",
        "margin_nats": SIGNIFICANCE_MARGIN_NATS,
        "alpha": SIGNIFICANCE_ALPHA,
        "assumptions": "seeds are independent runs; per-seed val_loss roughly normally distributed",
        "score": kind,
        "sota_val_loss": sota_loss,
        "sota_val_bpb": sota_bpb,
    }
    usable = [r for r in runs if r.score(kind)[0] is not None]
    losses = [r.score(kind)[0] for r in usable]
    diffs: list[float] = []
    if sota_loss is not None:
        res["conversion"] = "none: SOTA given as val_loss (nats)"
        diffs = [x - (sota_loss - SIGNIFICANCE_MARGIN_NATS) for x in losses]
    else:
        res["conversion"] = (
            "SOTA val_bpb converted to nats per run: sota_loss_i = sota_bpb * ln(2) * bytes_i / tokens_i, "
            f"bytes_i/tokens_i from that run's {line} line"
        )
        missing = [r.name for r in usable if not r.score(kind)[2] or not r.score(kind)[3]]
        if missing:
            res.update(computable=False, passed=False, n=len(usable),
                       reason=f"no tokens:/bytes: on the {line} line of {', '.join(missing)}; use --sota-loss")
            return res
        per_run = []
        for r, x in zip(usable, losses):
            _, _, tokens, nbytes = r.score(kind)
            sl = sota_bpb * math.log(2) * nbytes / tokens
            per_run.append(sl)
            diffs.append(x - (sl - SIGNIFICANCE_MARGIN_NATS))
        res["sota_val_loss_per_seed"] = {str(r.seed): round(v, 8) for r, v in zip(usable, per_run)}
        res["margin_bpb_per_seed"] = {
            str(r.seed): round(SIGNIFICANCE_MARGIN_NATS * r.score(kind)[2] / (r.score(kind)[3] * math.log(2)), 8)
            for r in usable
        }
    n = len(diffs)
    res["n"] = n
    if n < 2:
        res.update(computable=False, passed=False,
                   reason=f"needs at least 2 seeds with a {SCORE_NAMES[kind]} score, have {n}")
        return res
    df = n - 1
    mean_d = statistics.fmean(diffs)
    sd = statistics.stdev(diffs)
    res.update(df=df, mean_val_loss=round(statistics.fmean(losses), 8),
               mean_diff_to_threshold=round(mean_d, 8), std=round(sd, 8))
    if sd == 0.0:
        t = -math.inf if mean_d < 0 else (math.inf if mean_d > 0 else 0.0)
        p = 0.0 if mean_d < 0 else (1.0 if mean_d > 0 else 0.5)
        res["note"] = "zero spread between seeds; p-value is degenerate"
    else:
        t = mean_d / (sd / math.sqrt(n))
        p = student_t_lower_tail(t, df)
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
    """Logged hyperparameters whose value differs from the script's default (all of them without defaults;
    the data variables are then compared with the challenge's paths)."""
    out = []
    for name, value in hparams.items():
        if name in COMMAND_SKIP:
            continue
        if defaults is not None and hasattr(defaults, name.lower()):
            if str(getattr(defaults, name.lower())) == value:
                continue
        elif name in CHALLENGE_DATA_DEFAULTS and CHALLENGE_DATA_DEFAULTS[name] == value:
            continue
        out.append((name, value))
    return out


def local_overrides(runs: Sequence[RunLog], defaults: Optional[Any]) -> list[tuple[str, str]]:
    """Data/tokenizer variables the logs set away from the script's defaults (each distinct value once)."""
    pairs = (kv for r in runs for kv in non_default_hparams(r.hparams, defaults) if kv[0] in DATA_VARS)
    return list(dict.fromkeys(pairs))


def build_run_command(runs: Sequence[RunLog], defaults: Optional[Any]) -> str:
    """Shell command that reproduces the runs on the challenge's data: non-default hparams except the data and
    tokenizer paths (left at the script's defaults, the challenge layout), SEED per seed, torchrun."""

    def env_prefix(run: RunLog) -> str:
        return " ".join(f"{k}={shlex.quote(v)}" for k, v in non_default_hparams(run.hparams, defaults)
                        if k not in DATA_VARS)

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
    kind = score_kind(runs)
    seed_results: dict[str, Any] = {}
    for i, r in enumerate(runs):
        key = str(r.seed) if r.seed is not None else f"unknown_{i}"
        loss, bpb, tokens, nbytes = r.score(kind)
        result: dict[str, Any] = {
            "val_loss": loss,
            "val_bpb": bpb,
            "sliding_val_loss": r.sw_loss,
            "sliding_val_bpb": r.sw_bpb,
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
            "val_tokens": tokens,
            "val_bytes": nbytes,
            "log": _log_name(r, i, runs),
        }
        if kind == "ttt":
            result.update(ttt_val_loss=r.ttt_loss, ttt_val_bpb=r.ttt_bpb, ttt_time_ms=r.ttt_ms,
                          ttt_eval_time_ms=r.ttt_eval_ms, ttt_stride=r.ttt_stride, ttt_chunk_tokens=r.ttt_chunk_tokens)
        if r.gptq_total_ms is not None:
            result.update(gptq_calib_ms=r.gptq_calib_ms, train_budget_ms=r.gptq_total_ms)
        if r.artifact_sha256 is not None:
            result.update(artifact_sha256=r.artifact_sha256, artifact_bytes=r.artifact_bytes)
        seed_results[key] = result
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
        "val_bpb": _mean([r.score(kind)[1] for r in runs]),
        "val_loss": _mean([r.score(kind)[0] for r in runs]),
        "score_line": SCORE_LINES[kind],
        "bytes_total": _max([r.total_bytes for r in runs]),
        "bytes_code": len(script),
        "bytes_model_int6_zstd": _max([r.model_bytes for r in runs]),
        "pre_quant_val_loss": _mean([r.pre_quant_loss for r in runs]),
        "pre_quant_val_bpb": _mean([r.pre_quant_bpb for r in runs]),
        "int6_zstd_val_loss": _mean([r.rt_loss for r in runs]),
        "int6_zstd_val_bpb": _mean([r.rt_bpb for r in runs]),
        "sliding_val_loss": _mean([r.sw_loss for r in runs]),
        "sliding_val_bpb": _mean([r.sw_bpb for r in runs]),
        "seeds": [r.seed for r in runs],
        "seed_results": seed_results,
        "val_bpb_std": _std([r.score(kind)[1] for r in runs]),
        "track": track,
        "hardware": hardware,
        "pytorch_version": _one_or_list([r.torch_version for r in runs]),
        "python_version": _one_or_list([r.python_version for r in runs]),
        "attention_backend": _one_or_list([r.attention_backend for r in runs]),
        "world_size": _one_or_list([str(r.world_size) if r.world_size is not None else None for r in runs]),
        "compliance": compliance,
    }
    if comp.artifacts:
        sub["artifacts_verified"] = list(comp.artifacts)
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


def _seconds(ms: Optional[float], spec: str) -> str:
    return _fmt(None if ms is None else ms / 1000, spec)


def _mean_of(values: Sequence[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


CURVES_FILE = "curves.png"


def build_readme(
    runs: Sequence[RunLog], sub: dict[str, Any], comp: Compliance, command: str, defaults_error: Optional[str],
    significance: Optional[dict[str, Any]], overrides: Sequence[tuple[str, str]] = (), curves: Optional[str] = None,
) -> str:
    kind = score_kind(runs)
    ttt = kind == "ttt"
    gptq = any(r.gptq_total_ms is not None for r in runs)
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
    what = "score-first test-time training" if ttt else "sliding window"
    L.append(
        f"**val_bpb ({what}, mean of {len(runs)} seed{'s' if len(runs) != 1 else ''}): "
        f"{_fmt(vb, '.8f')}** (std {_fmt(std, '.8f')}), val_loss {_fmt(sub['val_loss'], '.8f')}, "
        f"max total size {total} bytes"
    )
    if ttt:
        L.append("")
        L.append(f"Without test-time training (sliding window): val_bpb {_fmt(sub['sliding_val_bpb'], '.8f')}, "
                 f"val_loss {_fmt(sub['sliding_val_loss'], '.8f')}.")
    L.append("")
    L.append("## Method")
    L.append("")
    L.append("TODO: describe what changed relative to the current record and why it helps.")
    L.append("")
    L.append("## Results")
    L.append("")
    head = ["Seed", "Steps", "Pre-quant bpb", "Roundtrip bpb", "Sliding bpb"]
    if ttt:
        head += ["TTT bpb"]
    head += ["Total bytes", "Train time (s)" + ("‡" if gptq else ""), "Eval time (s)†"]
    if ttt:
        head += ["TTT time (s)"]
    L.append("| " + " | ".join(head) + " |")
    L.append("|" + "---|" * len(head))
    for r in runs:
        row = [str(r.seed) if r.seed is not None else "?", str(r.steps) if r.steps is not None else "—",
               _fmt(r.pre_quant_bpb, ".4f"), _fmt(r.rt_bpb, ".8f"), _fmt(r.sw_bpb, ".8f")]
        if ttt:
            row += [_fmt(r.ttt_bpb, ".8f")]
        row += ["—" if r.total_bytes is None else format(r.total_bytes, ","), _seconds(r.train_budget_ms, ".3f"),
                _seconds(r.post_training_ms, ".1f")]
        if ttt:
            row += [_seconds(r.ttt_ms, ".1f")]
        L.append("| " + " | ".join(row) + " |")
    steps = [r.steps for r in runs if r.steps is not None]
    mean = ["**mean**", _fmt(statistics.fmean(steps) if steps else None, ".0f"), _fmt(sub["pre_quant_val_bpb"], ".4f"),
            _fmt(sub["int6_zstd_val_bpb"], ".8f"), _fmt(sub["sliding_val_bpb"], ".8f")]
    sd = ["**std**", "", _fmt(_std([r.pre_quant_bpb for r in runs]), ".4f"), _fmt(_std([r.rt_bpb for r in runs]), ".8f"),
          _fmt(_std([r.sw_bpb for r in runs]), ".8f")]
    if ttt:
        mean += [_fmt(_mean([r.ttt_bpb for r in runs]), ".8f")]
        sd += [_fmt(_std([r.ttt_bpb for r in runs]), ".8f")]
    mean += ["—" if sub["bytes_total"] is None else "max " + format(sub["bytes_total"], ","),
             _seconds(_mean_of([r.train_budget_ms for r in runs]), ".3f"),
             _seconds(_mean_of([r.post_training_ms for r in runs]), ".1f")]
    sd += ["", "", ""]
    if ttt:
        mean += [_seconds(_mean_of([r.ttt_ms for r in runs]), ".1f")]
        sd += [""]
    L.append("| " + " | ".join(mean) + " |")
    L.append("| " + " | ".join(sd) + " |")
    L.append("")
    stride = _one_or_list([str(r.sw_stride) for r in runs if r.sw_stride is not None]) or "?"
    notes = ("Pre-quant = last periodic validation on the live weights; roundtrip = int6+zstd artifact, "
             "non-overlapping eval; sliding = int6+zstd artifact, sliding-window eval "
             f"(stride {stride})")
    if ttt:
        notes += ("; TTT = int6+zstd artifact, legal score-first test-time training (every chunk scored before "
                  "the model adapts on it), the submission score.")
    else:
        notes += ", the submission score."
    notes += " † post_training_time: serialization, round trip and evaluations after training."
    if gptq:
        notes += " ‡ training plus GPTQ calibration (gptq:budget total_ms), the time counted against 600 s."
    L.append(notes)
    L.append("")
    L.append(f"Code: {sub['bytes_code']:,} bytes; model int6+zstd: "
             f"{'—' if sub['bytes_model_int6_zstd'] is None else format(sub['bytes_model_int6_zstd'], ',')} bytes (max over seeds).")
    L.append("")
    if curves:
        L.append(f"![loss curves]({curves})")
        L.append("")
        L.append(f"`{curves}`: train loss, validation loss and val_bpb against training time, one colour per seed "
                 "(drawn by `records/plot_curves.py`).")
        L.append("")
    L.append("## Compliance")
    L.append("")
    for k, v in comp.flags.items():
        L.append(f"- {k}: {'yes' if v else '**NO**'}")
    if comp.artifacts:
        L.append("")
        for a in comp.artifacts:
            L.append(f"Artifact `{a['file']}`: sha256 `{a['sha256']}`, {a['bytes']:,} bytes, equals the `artifact:` line "
                     f"of {a['log']}.")
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
    L.append("Rebuilt from the logged hyperparameters (only values that differ from the script defaults). Data and "
             "tokenizer are the challenge's, at the script's defaults (`DATA_PATH=./data/datasets/fineweb10B_sp1024`, "
             "`TOKENIZER_PATH=./data/tokenizers/fineweb_1024_bpe.model`; fetch them with "
             "`python data/cached_challenge_fineweb.py --variant sp1024`):")
    if defaults_error:
        L.append("")
        L.append(f"(script defaults could not be loaded — {defaults_error} — so every logged hyperparameter is listed)")
    L.append("")
    L.append("```bash")
    L.append(command)
    L.append("```")
    L.append("")
    if overrides:
        L.append("Local overrides used for these logs: " + " ".join(f"`{k}={shlex.quote(v)}`" for k, v in overrides))
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
    if curves:
        L.append(f"- `{curves}`: loss curves of the logs")
    L.append("")
    return "\n".join(L)


# ----------------------------------------------------------------------------------------------------------------
# CLI


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
    p.add_argument("--artifact", type=Path, action="append", default=[], metavar="PATH",
                   help="a final_model.int6.ptz to verify: its sha256 and byte size must equal the "
                        "'artifact:<path> bytes:<N> sha256:<hex>' line of one of the logs (repeatable, e.g. one per "
                        "seed; the file is not copied)")
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


DIR_MODE = 0o755
FILE_MODE = 0o644


def _make_dirs(path: Path) -> None:
    """Create `path` and its missing parents with mode 0755 (set explicitly, whatever the umask)."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue
        os.chmod(d, DIR_MODE)


def _write_folder(dest: Path, files: dict[str, bytes], force: bool) -> None:
    """Build the folder (0755, files 0644) in a temp dir next to dest and rename it into place (never half-written)."""
    _make_dirs(dest.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    backup: Optional[Path] = None
    try:
        os.chmod(tmp, DIR_MODE)
        for name, data in files.items():
            (tmp / name).write_bytes(data)
            os.chmod(tmp / name, FILE_MODE)
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


def draw_curves(runs: Sequence[RunLog], title: str) -> tuple[Optional[bytes], Optional[str]]:
    """(PNG bytes, None) of the logs' loss curves, or (None, why not) when no log has step lines.
    matplotlib missing is a UsageError (never a silent skip)."""
    curves = [plot_curves.parse_curve(r.path.read_bytes(), r.path) for r in runs]
    drawable = [c for c in curves if not c.empty]
    if not drawable:
        return None, "no log has training step lines"
    try:
        return plot_curves.render_png(drawable, title), None
    except plot_curves.CurveError as exc:
        raise UsageError(str(exc)) from None


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
    artifacts: list[tuple[Path, str, int]] = []
    for path in args.artifact:
        if not path.is_file():
            raise UsageError(f"--artifact {path}: file not found (expected the final_model.int6.ptz a log describes)")
        artifacts.append((path, *sha256_file(path)))
    script_path = _resolve_script(args.script)
    if not script_path.is_file():
        raise UsageError(f"{script_path}: script not found (give --script)")
    script = script_path.read_bytes()
    track = NON_RECORD_TRACK if args.non_record else RECORD_TRACK
    dest = args.out_root / track / f"{date}_{slug}"
    if dest.exists() and not args.force:
        raise UsageError(f"{dest} already exists (use --force to replace it)")

    runs = [parse_log(p) for p in args.logs]
    comp = check_runs(runs, script, artifacts)
    kind = score_kind(runs)
    for r in runs:
        loss, bpb, _, _ = r.score(kind)
        score = f"ttt val_bpb {_fmt(bpb, '.8f')} (sliding {_fmt(r.sw_bpb, '.8f')})" if kind == "ttt" \
            else f"sliding val_bpb {_fmt(bpb, '.8f')}"
        print(
            f"{r.name}: seed {r.seed} steps {r.steps} {score} "
            f"total {r.total_bytes} bytes train {_fmt(r.train_budget_ms, '.0f')}ms post-train {_fmt(r.post_training_ms, '.0f')}ms"
        )
    for a in comp.artifacts:
        print(f"artifact {a['file']}: sha256 {a['sha256']} {a['bytes']} bytes = artifact: line of {a['log']}")
    for note in comp.notes:
        print(f"note: {note}")
    for f in comp.failures:
        print(f"FAIL {f}", file=sys.stderr)

    significance = None
    if args.sota_loss is not None or args.sota_bpb is not None:  # printed whether or not the checks pass
        significance = significance_test(runs, sota_loss=args.sota_loss, sota_bpb=args.sota_bpb, kind=kind)
        for line in format_significance(significance):
            print(line)

    if comp.failures:
        if not args.non_record:
            print(f"not written: {len(comp.failures)} compliance check(s) failed "
                  "(fix them, or use --non-record for the non-record track)", file=sys.stderr)
            return 1
        print(f"--non-record: packaging anyway; {len(comp.failures)} failure(s) listed in README and submission.json",
              file=sys.stderr)

    png, no_png = draw_curves(runs, args.name)
    if no_png:
        print(f"note: no {CURVES_FILE}: {no_png}")
    defaults, defaults_error = load_defaults(script_path, script)
    command = build_run_command(runs, defaults)
    overrides = local_overrides(runs, defaults)
    sub = build_submission(runs, comp, args, track, script, significance)
    readme = build_readme(runs, sub, comp, command, defaults_error, significance, overrides,
                          CURVES_FILE if png is not None else None)
    files: dict[str, bytes] = {"train_gpt.py": script}
    for i, r in enumerate(runs):
        files[_log_name(r, i, runs)] = r.path.read_bytes()
    files["submission.json"] = (json.dumps(_finite(sub), indent=2, allow_nan=False) + "\n").encode()
    files["README.md"] = readme.encode()
    if png is not None:
        files[CURVES_FILE] = png
    _write_folder(dest, files, args.force)
    print(f"wrote {dest}")
    print(f"val_bpb {_fmt(sub['val_bpb'], '.8f')} (std {_fmt(sub['val_bpb_std'], '.8f')}) over seeds {sub['seeds']}"
          + (" (score-first test-time training)" if kind == "ttt" else ""))
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
