"""Check finished train_gpt.py runs and package them as a Parameter Golf submission folder.

    python records/package.py logs/s1337.txt logs/s42.txt logs/s2025.txt --name MyIdea --author "Jane Doe" \
        --github-id jane [--blurb TEXT] [--sota-loss NATS | --sota-bpb BPB] [--non-record] [--date YYYY-MM-DD]

writes records/track_10min_16mb/<date>_<name>/ (track_non_record_16mb/ with --non-record):
  train_gpt.py         the counted code: the self-extracting form (raw LZMA2 + base85) of the script every log
                       embeds, made by that script's own self_extracting() and checked to decompress to its
                       counted source (the program without docstrings, comments and annotations)
  train_gpt_source.py  the readable source (not counted)
  train_seed<S>.log, submission.json, README.md (a skeleton: results, compliance, significance, run command),
  curves.png (records/plot_curves.py), requirements.txt

Checks, each problem one FAIL line naming the log: model + code = total <= 16,000,000 bytes (code = the shipped
wrapper); training (GPTQ calibration included, plus the one step in flight at the cap) and evaluation <= 600 s each,
and no `budget:exceeded` line; the full validation set (no `val_subset:` line, no final line ending in `subset`); a
training run, not an EVAL_ONLY re-score; one and the same script embedded in every log; the same hyperparameters
and distinct seeds; at least 3 seeds for a record. A record with a failure is not written (exit 1); --non-record
writes it anyway and lists the failures. The score is the most adapted legal score the logs have:
`final_int6_lora_ttt_exact` (phased LoRA TTT), else `final_int6_ttt_exact`, else `final_int6_sliding_window_exact`.
With --sota-loss/--sota-bpb, the challenge's significance test (beat SOTA by >= 0.005 nats at p < 0.01, scipy's
one-sided one-sample t-test) is printed and stored; it never blocks. Bad input: one `error:` line, exit 2, nothing
written.
"""
from __future__ import annotations

import argparse
import base64
import datetime
import json
import lzma
import math
import os
import shlex
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import plot_curves  # noqa: E402
import runlog  # noqa: E402

SIZE_LIMIT = 16_000_000
BUDGET_MS = 600_000.0
MARGIN_NATS, ALPHA = 0.005, 0.01
CODE = "Code size"


def size_lines(run: runlog.RunLog) -> tuple[str, str]:
    """The names of the model and total size lines, which name the run's COMPRESSOR (zstd by default)."""
    method = run.hparams.get("COMPRESSOR", "zstd")
    return f"Serialized model int6+{method}", f"Total submission size int6+{method}"
SLIDING, TTT, ROUNDTRIP = "final_int6_sliding_window_exact", "final_int6_ttt_exact", "final_int6_roundtrip_exact"
LORA_TTT = "final_int6_lora_ttt_exact"
SCORES = {LORA_TTT: ("LoRA TTT val_bpb", "lora_ttt_val_bpb", "phased per-document LoRA TTT"),  # by precedence
          TTT: ("TTT val_bpb", "ttt_val_bpb", "legal score-first TTT")}
PER_RUN = ("RUN_ID", "SEED")  # never on the shared run command
DATA_VARS = ("DATA_PATH", "TOKENIZER_PATH", "TRAIN_FILES", "VAL_FILES")
REQUIREMENTS = """\
# What train_gpt.py imports; zstandard (and brotli for COMPRESSOR=brotli) are beyond the challenge's own list.
# FlashAttention-3 (flash_attn_interface) is optional: used when it passes the script's start-up probe.
numpy
sentencepiece
torch
zstandard>=0.22
"""


class UsageError(Exception):
    """Bad input: one `error:` line, exit 2, nothing written."""


def shipped_form(source: bytes) -> bytes:
    """The counted train_gpt.py: the logged script's own self_extracting() of its source (the recipe that counted the
    logs' code ships with them), checked to decompress to that script's counted source."""
    script = {"__name__": "logged_train_gpt"}
    try:
        exec(compile(source, "train_gpt.py", "exec"), script)
        wrapper = script["self_extracting"](source)
        counted = script["counted_source"](source) if "counted_source" in script else source
    except Exception as exc:  # the logged script itself: any failure is a reason to stop here
        raise UsageError(f"the logged script cannot make its self-extracting form ({type(exc).__name__}: {exc})")
    head, tail = script["WRAPPER_HEAD"], script["WRAPPER_TAIL"]
    packed = wrapper[len(head) : -len(tail)]
    if not (wrapper.startswith(head) and wrapper.endswith(tail) and lzma.decompress(
            base64.b85decode(packed), lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}]) == counted):
        raise UsageError("the self-extracting train_gpt.py does not decompress to the logged script's counted source")
    return wrapper


def score_line(runs: list[runlog.RunLog]) -> str:
    """The line that scores every log: the first of SCORES (LoRA TTT, then TTT) that any log has, else the sliding
    window. A fixed precedence (the run's declared mode), never the lowest of the scores a run printed: picking among
    scores after seeing them would be a selection."""
    return next((line for line in SCORES if any(r.last(line) for r in runs)), SLIDING)


def train_ms(run: runlog.RunLog) -> float | None:
    """Time counted against the training budget: the gptq:budget total (training + calibration), else train_time."""
    gptq = run.last("gptq", "budget")
    return gptq.num("total_ms") if gptq else run.num("step", "train_time")


def total_bytes(run: runlog.RunLog, wrapper: bytes) -> int | None:
    model = run.num(size_lines(run)[0])
    return None if model is None else int(model) + len(wrapper)


class Compliance:
    FLAGS = ("artifact_under_16mb", "train_under_600s", "eval_under_600s", "full_validation_set", "training_runs",
             "same_script_all_seeds", "same_config_all_seeds", "final_lines_present", "three_seeds")

    def __init__(self) -> None:
        self.flags = dict.fromkeys(self.FLAGS, True)
        self.problems: dict[tuple[str, str], list[str]] = {}  # (logs, flag) -> problems: one FAIL line each
        self.notes: list[str] = []

    def fail(self, flag: str, where: object, problem: str) -> None:
        self.flags[flag] = False
        self.problems.setdefault((str(where), flag), []).append(problem)

    @property
    def failures(self) -> list[str]:
        return [f"{where}: {'; '.join(found)}" for (where, _), found in self.problems.items()]


def config(run: runlog.RunLog) -> dict[str, str]:
    """What must be equal across seeds: the hyperparameters but seed, run id and data locations, and the GPUs used.
    VAL_MAX_TOKENS and EVAL_ONLY are left to their own checks (a subset, an eval-only log), which name the log."""
    hp = {k: v for k, v in run.hparams.items() if k not in PER_RUN + DATA_VARS + ("VAL_MAX_TOKENS", "EVAL_ONLY")}
    return dict(hp, world_size=str(run.num("world_size")))


def check(runs: list[runlog.RunLog], wrapper: bytes, record: bool) -> Compliance:
    comp, first, score = Compliance(), runs[0], score_line(runs)
    counted: dict[str, float] = {}  # logs whose counted wrapper is not the shipped one (another liblzma, say)
    for run in runs:
        where = run.path
        if run.source is None:
            comp.fail("same_script_all_seeds", where, "no embedded script (no line of 100 '=')")
        elif run.source != first.source:
            comp.fail("same_script_all_seeds", where, f"embedded script differs from {first.path}'s")
        if run.last("eval_only") or run.hparams.get("EVAL_ONLY"):
            comp.fail("training_runs", where, "an EVAL_ONLY re-score, not a training run")
            continue  # it trained nothing: its missing training lines are the same cause
        model_line, total_line = size_lines(run)
        missing = [n for n in ("step", "code", model_line, CODE, total_line, score, "post_training_time")
                   if not run.last(n)]
        if missing:
            comp.fail("final_lines_present", where, "missing line(s): " + ", ".join(missing))
        model, code, total = run.num(model_line), run.num(CODE), run.num(total_line)
        if None not in (model, code, total) and model + code != total:
            comp.fail("artifact_under_16mb", where, f"model {model:.0f} + code {code:.0f} != total {total:.0f} bytes")
        if (logged := run.num("code", "wrapper_bytes")) is not None and logged != len(wrapper):
            counted[str(where)] = logged
        shipped = total_bytes(run, wrapper)
        if shipped is not None and shipped > SIZE_LIMIT:
            comp.fail("artifact_under_16mb", where, f"total {shipped:,} bytes > {SIZE_LIMIT:,}")
        for line in run.all("budget", "exceeded"):
            flag = "train_under_600s" if line.words[:1] == ["training"] else "eval_under_600s"
            comp.fail(flag, where, f"the log says '{line.text}'")
        trained, step_avg = train_ms(run), run.num("step", "step_avg") or 0.0
        if trained is not None and trained > BUDGET_MS + step_avg:
            comp.fail("train_under_600s", where, f"training {trained:.0f} ms > 600000 ms + the step in flight "
                                                 f"({step_avg:.0f} ms)")
        post = run.num("post_training_time")
        if post is not None and post > BUDGET_MS:
            comp.fail("eval_under_600s", where, f"evaluation (post_training_time) {post:.0f} ms > 600000 ms")
        subset = [ln.name for ln in run.subset_lines] + (["val_subset:"] if run.last("val_subset") else [])
        if subset:
            comp.fail("full_validation_set", where, f"scored a validation subset ({', '.join(subset)})")
        mine, theirs = config(run), config(first)
        if differ := sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k)):
            comp.fail("same_config_all_seeds", where, f"settings differ from {first.path}: {', '.join(differ)}")
    if counted:
        comp.notes.append(f"the shipped train_gpt.py is {len(wrapper):,} bytes; the logs counted " + ", ".join(
            f"{n:,.0f} ({log})" for log, n in counted.items()) + f": the size check uses model + {len(wrapper):,}")
    seen: dict[int | None, runlog.RunLog] = {}
    for run in runs:
        if run.seed in seen:
            comp.fail("same_config_all_seeds", run.path, f"seed {run.seed} is also {seen[run.seed].path}'s")
        seen.setdefault(run.seed, run)
    comp.flags["three_seeds"] = len([s for s in seen if s is not None]) >= 3
    if record and len(runs) < 3:  # (fewer distinct seeds than logs: the duplicate's line says so)
        comp.fail("three_seeds", ", ".join(str(r.path) for r in runs),
                  f"{len(runs)} seed(s); a record needs at least 3 (or pass --non-record)")
    return comp


def significance(runs: list[runlog.RunLog], score: str, sota_loss: float | None, sota_bpb: float | None) -> dict:
    """The challenge's rule: mean val_loss below SOTA - 0.005 nats at p < 0.01. Per seed d_i = loss_i - (SOTA_i -
    0.005), tested with scipy.stats.ttest_1samp(d, 0, alternative='less'); a SOTA given in bpb is converted with each
    run's own tokens/bytes (loss = bpb * ln 2 * bytes / tokens)."""
    try:
        from scipy import stats
    except ImportError:
        raise UsageError("scipy is not installed; the significance test needs it (pip install scipy)") from None
    lines = [ln for r in runs if (ln := r.last(score))]
    if sota_bpb is not None and any(ln.num("tokens") is None or ln.num("bytes") is None for ln in lines):
        raise UsageError(f"--sota-bpb: a {score} line has no tokens:/bytes: to convert with; give --sota-loss")
    sotas = [sota_loss if sota_loss is not None else sota_bpb * math.log(2) * ln.num("bytes") / ln.num("tokens")
             for ln in lines]
    diffs = [ln.num("val_loss") - (sota - MARGIN_NATS) for ln, sota in zip(lines, sotas)]
    res = {"test": "scipy.stats.ttest_1samp(d, 0, alternative='less'), d_i = val_loss_i - (sota_val_loss_i - 0.005)",
           "score_line": score, "sota_val_loss": sota_loss, "sota_val_bpb": sota_bpb, "margin_nats": MARGIN_NATS,
           "alpha": ALPHA, "n": len(diffs), "sota_val_loss_per_seed": [round(s, 8) for s in sotas]}
    if len(diffs) < 2:
        return dict(res, t=None, p_value=None, passed=False, note="needs at least 2 seeds")
    t, p = stats.ttest_1samp(diffs, 0.0, alternative="less")
    finite = lambda x: float(x) if math.isfinite(x) else None  # noqa: E731  (JSON has no inf/nan)
    return dict(res, mean_val_loss=round(statistics.fmean(ln.num("val_loss") for ln in lines), 8),
                mean_d=round(statistics.fmean(diffs), 8), t=finite(t), p_value=finite(p), passed=bool(p < ALPHA))


def describe_significance(sig: dict) -> str:
    sota = f"val_loss {sig['sota_val_loss']}" if sig["sota_val_loss"] is not None else f"val_bpb {sig['sota_val_bpb']}"
    if sig["p_value"] is None:
        return f"significance vs SOTA {sota}: not computable (n={sig['n']}; {sig.get('note', 'degenerate spread')})"
    verdict = "significant" if sig["passed"] else "not significant"
    return (f"significance vs SOTA {sota} - {MARGIN_NATS} nats: n={sig['n']} mean d {sig['mean_d']:+.6f} "
            f"t={fmt(sig['t'], '.3f')} one-sided p={sig['p_value']:.4g}: {verdict} (p < {ALPHA} needed)")


def shell_settings(run: runlog.RunLog, defaults: dict[str, object]) -> tuple[list[str], list[str]]:
    """(shared, local) NAME=value settings of a log that differ from the script's defaults. Data locations outside
    the challenge layout (./data/...) are local: listed apart, never on the shared command."""
    shared, local = [], []
    for name, value in run.hparams.items():
        if name in PER_RUN or str(defaults.get(name)) == value:
            continue
        is_local = name in DATA_VARS and not value.startswith(("./data/", "data/"))
        (local if is_local else shared).append(f"{name}={shlex.quote(value)}")
    return shared, local


def run_command(runs: list[runlog.RunLog], defaults: dict[str, object]) -> str:
    def launch(run: runlog.RunLog) -> str:
        return f"torchrun --standalone --nproc_per_node={int(run.num('world_size') or 1)} train_gpt.py"

    prefixes = [" ".join(shell_settings(r, defaults)[0] + ["SEED=$SEED"]) for r in runs]
    if len(set(prefixes)) == 1 and len({launch(r) for r in runs}) == 1:
        return f"for SEED in {' '.join(str(r.seed) for r in runs)}; do\n  {prefixes[0]} {launch(runs[0])}\ndone"
    return "\n".join(f"{p.replace('$SEED', str(r.seed))} {launch(r)}" for p, r in zip(prefixes, runs))


def mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return round(statistics.fmean(vals), 8) if vals else None


def std(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return round(statistics.stdev(vals), 8) if len(vals) > 1 else None


def hardware(run: runlog.RunLog) -> str:
    gpus = run.gpus
    if not gpus:
        return f"CPU, {int(run.num('world_size') or 1)} process(es), no CUDA device"
    return ", ".join(f"{gpus.count(name)}x {name}" for name in dict.fromkeys(gpus))


def keys(runs: list[runlog.RunLog]) -> list[str]:
    """One name per log: its seed, with its position when two logs share a seed (never one overwriting another)."""
    seeds = [r.seed for r in runs]
    return [str(s) if seeds.count(s) == 1 else f"{s}_{i + 1}" for i, s in enumerate(seeds)]


def seed_result(run: runlog.RunLog, score: str, wrapper: bytes) -> dict:
    num, whole = run.num, (lambda x: None if x is None else int(x))  # noqa: E731
    secs = lambda ms: None if ms is None else round(ms / 1000, 3)  # noqa: E731
    result = {"val_loss": num(score, "val_loss"), "val_bpb": num(score, "val_bpb"),
              "artifact_bytes": total_bytes(run, wrapper), "model_bytes": whole(num(size_lines(run)[0])),
              "steps": whole(num("step", "step")), "train_time_s": secs(train_ms(run)),
              "eval_time_s": secs(num("post_training_time")),
              "pre_quant_val_bpb": run.val[-1].num("val_bpb") if run.val else None,
              "roundtrip_val_bpb": num(ROUNDTRIP, "val_bpb"), "sliding_val_bpb": num(SLIDING, "val_bpb")}
    if score in SCORES:
        result[SCORES[score][1]] = num(score, "val_bpb")
    return result


def submission(args: argparse.Namespace, runs: list[runlog.RunLog], comp: Compliance, wrapper: bytes,
               sig: dict | None) -> dict:
    score = score_line(runs)
    results = {key: seed_result(r, score, wrapper) for key, r in zip(keys(runs), runs)}
    totals = [v["artifact_bytes"] for v in results.values() if v["artifact_bytes"] is not None]
    sub = {"author": args.author, "github_id": args.github_id, "name": args.name, "blurb": args.blurb,
           "date": args.date, "track": "non_record_16mb" if args.non_record else "10min_16mb",
           "val_loss": mean([v["val_loss"] for v in results.values()]),
           "val_bpb": mean([v["val_bpb"] for v in results.values()]),
           "val_loss_std": std([v["val_loss"] for v in results.values()]),
           "val_bpb_std": std([v["val_bpb"] for v in results.values()]),
           "seeds": [r.seed for r in runs], "seed_results": results, "score_line": score,
           "bytes_total": max(totals) if totals else None, "bytes_code": len(wrapper),
           "hardware": " / ".join(dict.fromkeys(hardware(r) for r in runs)),
           "pytorch_version": " / ".join(dict.fromkeys(r.torch_version or "unknown" for r in runs)),
           "compliance": dict(comp.flags, failures=comp.failures)}
    if sig is not None:
        sub["significance"] = sig
    return sub


def fmt(value: float | None, spec: str = ".8f") -> str:
    return "—" if value is None else format(value, spec)


def readme(sub: dict, comp: Compliance, command: str, local: list[str], variant: str, sig_text: str | None,
           curves: bool) -> str:
    column, key, what = SCORES.get(sub["score_line"], (None, None, "sliding window"))
    results = sub["seed_results"]
    head = ["Seed", "Steps", "Train (s)", "Pre-quant val_bpb", "Roundtrip val_bpb", "Sliding val_bpb"]
    head += [column] * bool(column) + ["Total bytes", "Eval (s)"]
    rows = [[seed, fmt(v["steps"], ".0f"), fmt(v["train_time_s"], ".3f"), fmt(v["pre_quant_val_bpb"], ".4f"),
             fmt(v["roundtrip_val_bpb"]), fmt(v["sliding_val_bpb"])] + [fmt(v.get(key))] * bool(column)
            + [fmt(v["artifact_bytes"], ",d"), fmt(v["eval_time_s"], ".1f")] for seed, v in results.items()]
    out = [f"# {sub['name']}", "", f"**Author:** {sub['author']} (@{sub['github_id']})  ", f"**Date:** {sub['date']}  ",
           f"**Track:** `{sub['track']}`  ", f"**Hardware:** {sub['hardware']}; PyTorch {sub['pytorch_version']}", "",
           sub["blurb"], "",
           f"**val_bpb {fmt(sub['val_bpb'])}** ({what}, mean of {len(results)} seeds, std {fmt(sub['val_bpb_std'])}); "
           f"val_loss {fmt(sub['val_loss'])}; largest total size {fmt(sub['bytes_total'], ',d')} bytes "
           f"(code {sub['bytes_code']:,} bytes: the self-extracting `train_gpt.py`).", "",
           "## Method", "", "TODO: what changed relative to the current record, and why it helps.", "",
           "## Results", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    out += ["", f"Score line: `{sub['score_line']}`. Pre-quant: the last periodic validation of the live weights; "
            "roundtrip and sliding: the quantised, compressed artifact read back. Train: training plus GPTQ "
            "calibration. Eval: everything after training (export, round trip, evaluations).", ""]
    if curves:
        out += ["![loss curves](curves.png)", ""]
    out += ["## Compliance", ""] + [f"- {k}: {'yes' if v else '**NO**'}" for k, v in comp.flags.items()]
    if comp.failures:
        out += ["", "Failed checks:", ""] + [f"- {f}" for f in comp.failures]
    if sig_text:
        out += ["", "## Significance", "", "```", sig_text, "```"]
    repo = "" if variant == "sp1024" else "MATCHED_FINEWEB_REPO_ID=kevclark/parameter-golf "  # where SP4096/8192 are
    out += ["", "## Run command", "", f"Data: `{repo}python data/cached_challenge_fineweb.py --variant {variant}`. "
            "Settings that differ from the script's defaults:", "",
            "```bash", "pip install -r requirements.txt", command, "```", ""]
    if local:
        out += ["Local data paths of these logs (not part of the command): " + " ".join(f"`{s}`" for s in local), ""]
    embedded = "which every log embeds" if comp.flags["same_script_all_seeds"] else \
        "which the first log embeds; **not every log embeds it** (see Compliance)"
    out += ["## Files", "", "- `train_gpt.py`: the counted code, self-extracting (raw LZMA2 + base85); it runs the "
            f"readable `train_gpt_source.py` (not counted), {embedded}",
            "- `train_seed<S>.log`: the logs; `submission.json`: metadata and per-seed results; `requirements.txt`"]
    out += ["- `curves.png`: train/val loss and val_bpb against training time"] if curves else []
    return "\n".join(out) + "\n"


def write_folder(dest: Path, files: dict[str, bytes]) -> None:
    """Write every file into a temporary folder beside `dest`, then rename it into place: never half a folder."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    try:
        tmp.mkdir()
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def package(args: argparse.Namespace) -> int:
    try:
        datetime.date.fromisoformat(args.date)
    except ValueError:
        raise UsageError(f"--date {args.date!r}: expected YYYY-MM-DD") from None
    slug = "".join(c if c.isalnum() or c in "._+-" else "_" for c in args.name).strip("._")
    if not slug:
        raise UsageError(f"--name {args.name!r}: expected letters or digits for the folder name")
    track = "track_non_record_16mb" if args.non_record else "track_10min_16mb"
    dest = args.out_root / track / f"{args.date}_{slug}"
    if dest.exists():
        raise UsageError(f"{dest} already exists; remove it or choose another --name")
    try:
        runs = [runlog.read(p) for p in args.logs]
    except runlog.LogError as exc:
        raise UsageError(str(exc)) from None
    if len({r.path.resolve() for r in runs}) < len(runs):
        raise UsageError("a log is given twice")
    source = runs[0].source
    if source is None:
        raise UsageError(f"{runs[0].path}: no embedded script (no line of 100 '='); is it a train_gpt.py log?")
    wrapper = shipped_form(source)
    try:
        defaults = runlog.script_defaults(source)
    except (runlog.LogError, SyntaxError, ValueError) as exc:
        raise UsageError(f"{runs[0].path}: cannot read the embedded script's defaults ({exc})") from None

    comp = check(runs, wrapper, record=not args.non_record)
    score = score_line(runs)
    for run in runs:
        print(f"{run.path}: seed {run.seed}, {score} val_bpb {fmt(run.num(score, 'val_bpb'))}, total "
              f"{fmt(total_bytes(run, wrapper), ',d')} bytes, train {fmt(train_ms(run), '.0f')} ms, "
              f"eval {fmt(run.num('post_training_time'), '.0f')} ms")
    for note in comp.notes:
        print(f"note: {note}")
    for failure in comp.failures:
        print(f"FAIL {failure}", file=sys.stderr)
    sig = None
    if args.sota_loss is not None or args.sota_bpb is not None:
        sig = significance(runs, score, args.sota_loss, args.sota_bpb)
        print(describe_significance(sig))
    if comp.failures and not args.non_record:
        print(f"not written: {len(comp.failures)} failed check(s); fix them, or pass --non-record", file=sys.stderr)
        return 1

    drawable = [r for r in runs if r.train or r.val]
    try:
        png = plot_curves.render_png(drawable, args.name) if drawable else None
    except plot_curves.CurveError as exc:
        raise UsageError(str(exc)) from None
    if png is None:
        print("note: no curves.png: no log has step lines")
    shared_local = [shell_settings(r, defaults) for r in runs]
    local = list(dict.fromkeys(s for _, loc in shared_local for s in loc))
    sub = submission(args, runs, comp, wrapper, sig)
    variant = f"sp{runs[0].hparams.get('VOCAB_SIZE', defaults.get('VOCAB_SIZE'))}"
    text = readme(sub, comp, run_command(runs, defaults), local, variant, sig and describe_significance(sig),
                  png is not None)
    files = {"train_gpt.py": wrapper, "train_gpt_source.py": source, "README.md": text.encode(),
             "submission.json": (json.dumps(sub, indent=2, ensure_ascii=False) + "\n").encode(),
             "requirements.txt": (REQUIREMENTS + "brotli\n" * (runs[0].hparams.get("COMPRESSOR") == "brotli"))
             .encode()}
    files.update({f"train_seed{key}.log": r.path.read_bytes() for key, r in zip(keys(runs), runs)})
    if png is not None:
        files["curves.png"] = png
    write_folder(dest, files)
    print(f"wrote {dest}: val_bpb {fmt(sub['val_bpb'])} over seeds {sub['seeds']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Check train_gpt.py logs and package them as a submission folder.")
    p.add_argument("logs", nargs="+", type=Path, metavar="LOG", help="one training log per seed (logs/<RUN_ID>.txt)")
    p.add_argument("--name", required=True, help="submission name (also the folder's name)")
    p.add_argument("--author", required=True)
    p.add_argument("--github-id", required=True)
    p.add_argument("--blurb", default="", help="one-paragraph summary")
    p.add_argument("--date", default=datetime.date.today().isoformat(), help="YYYY-MM-DD (default: today)")
    p.add_argument("--non-record", action="store_true", help="the non-record track: written even when checks fail")
    sota = p.add_mutually_exclusive_group()
    sota.add_argument("--sota-loss", type=float, help="current record's val_loss (nats) for the significance test")
    sota.add_argument("--sota-bpb", type=float, help="current record's val_bpb, converted with each log's tokens/bytes")
    p.add_argument("--out-root", type=Path, default=Path("records"), help="where the tracks are (default: records)")
    try:
        return package(p.parse_args(argv))
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
