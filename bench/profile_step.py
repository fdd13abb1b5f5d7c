"""Where one training step's time goes: train_gpt.py's own start-up and training loop (its main() and train(), so
its model, optimizers, data, compile and attention probe) for a few steps, the last of them under torch.profiler,
as a table of time per step by category: attention forward and backward, matmuls, norms/elementwise, optimizer
(grad clipping included), communication, other (copies, allocation), and host gaps, the part of the step in which
the device runs nothing (on a CPU: no op runs). The categories sum the device's kernels (CUDA) or the ops' self
time (CPU); categories + host gaps - overlap (kernels running at the same time, e.g. all-reduce beside compute) =
the profiled step. Exit status: 0; 2 bad input (one `error:` line); else train_gpt.py's.

    python bench/profile_step.py -- TRAIN_FILES='d/*train_*.bin' VAL_FILES='d/*val_*.bin' TOKENIZER_PATH=d/x.model
    torchrun --standalone --nproc_per_node=8 bench/profile_step.py -- ...      (communication too)

The loop's first 10 steps print their loss (a device sync each) and are skipped; then --steps steps are timed
without the profiler, then --steps more under it. The table goes to stdout (rank 0); --trace keeps the Chrome trace
(.json.gz: open it in Perfetto or chrome://tracing).
"""
from __future__ import annotations

import argparse
import gzip
import inspect
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import train_gpt as tg  # noqa: E402
from hparams import SettingError, hparam_settings  # noqa: E402

WINDOW = "profile_step:window"  # the user annotation that spans the profiled steps
CATEGORIES = ("attention fwd", "attention bwd", "matmul", "norm/elementwise", "optimizer", "communication", "other")
# By name, lower-cased, first match wins (optimizer is decided first, by the range the work was launched from).
OPTIMIZER = ("optimizer.step#", "_foreach_", "multi_tensor_apply", "fused_adam")
COMMUNICATION = ("nccl", "gloo", "all_reduce", "allreduce", "all_gather", "allgather", "reduce_scatter",
                 "broadcast", "c10d::", "record_param_comms")
ATTENTION = ("attention", "attn", "flash", "fmha", "sdpa", "scaled_dot_product")
ATTENTION_BACKWARD = ("bwd", "backward", "bprop", "cutlassb", "dq_dk_dv", "dkdv", "dot_do_o", "convert_dq")
MATMUL = ("gemm", "matmul", "aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::_addmm", "mmbackward",
          "nvjet", "cutlass", "xmma", "cublas", "tem_fused", "extern_kernels.mm", "extern_kernels.bmm",
          "extern_kernels.addmm")
OTHER = ("memcpy", "memset", "aten::copy_", "aten::to", "aten::_to_copy", "aten::empty", "aten::empty_strided",
         "aten::empty_like", "aten::item", "aten::_local_scalar_dense", "aten::clone", "aten::contiguous")
DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


class InputError(Exception):
    pass


def category(name: str) -> str | None:
    """The category a kernel or op name says, or None (then: an enclosing op's, else norm/elementwise)."""
    n = name.lower()
    if any(p in n for p in OPTIMIZER):
        return "optimizer"
    if any(p in n for p in COMMUNICATION):
        return "communication"
    if any(p in n for p in ATTENTION):
        return "attention bwd" if any(p in n for p in ATTENTION_BACKWARD) else "attention fwd"
    if any(p in n for p in MATMUL):
        return "matmul"
    if n in OTHER or any(p in n for p in OTHER[:2]):
        return "other"
    return None


def clip(start: float, end: float, window: tuple[float, float]) -> float:
    return max(0.0, min(end, window[1]) - max(start, window[0]))


def union_length(intervals: list[tuple[float, float]], window: tuple[float, float]) -> float:
    """Length of the union of intervals inside the window."""
    total, reach = 0.0, window[0]
    for start, end in sorted(intervals):
        start, end = max(start, reach), min(end, window[1])
        if end > start:
            total, reach = total + end - start, end
    return total


def nesting(ops: list[dict]) -> list[tuple[dict, list[dict]]]:
    """Each op of one thread with its enclosing ops, outermost first (ops sorted by start, longest first)."""
    out, stack = [], []
    for op in sorted(ops, key=lambda e: (e["ts"], -e["dur"])):
        while stack and stack[-1]["ts"] + stack[-1]["dur"] <= op["ts"]:
            stack.pop()
        out.append((op, list(stack)))
        stack.append(op)
    return out


def first_category(chain: list[dict]) -> str:
    """The category of an op or kernel given its chain of names, outermost first: the first that names one."""
    for e in chain:
        if (c := category(e["name"])) is not None:
            return c
    return "norm/elementwise"


def summarise_trace(trace: dict) -> dict:
    """Microseconds per category inside the WINDOW annotation of a Chrome trace, the window's length, the time covered
    by the device (the union of kernels, or of CPU ops when there are no kernels) and the overlap."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    windows = [e for e in events if e["name"] == WINDOW and e.get("cat") == "user_annotation"]
    if len(windows) != 1:
        raise ValueError(f"the trace has {len(windows)} '{WINDOW}' annotations, expected 1")
    window = (windows[0]["ts"], windows[0]["ts"] + windows[0]["dur"])
    host = [e for e in events if e.get("cat") in ("cpu_op", "user_annotation") and e["name"] != WINDOW]
    device = [e for e in events if e.get("cat") in DEVICE_CATS]
    totals = dict.fromkeys(CATEGORIES, 0.0)
    if device:  # CUDA: each kernel by the ops it was launched from (outermost first), then by its own name
        chains = {}
        for tid in {e["tid"] for e in host}:
            for op, outer in nesting([e for e in host if e["tid"] == tid]):
                if (ext := op.get("args", {}).get("External id")) is not None:
                    chains[ext] = outer + [op]
        for k in device:
            launched_from = chains.get(k.get("args", {}).get("External id"), [])
            chain = [e for e in launched_from if category(e["name"]) == "optimizer"][:1] or [k] + launched_from
            c = "other" if k["cat"] != "kernel" else first_category(chain)
            totals[c] += clip(k["ts"], k["ts"] + k["dur"], window)
        covered = union_length([(k["ts"], k["ts"] + k["dur"]) for k in device], window)
    else:  # CPU: each op's self time (its time minus its children's), by its enclosing ops, outermost first
        ops, tops = [e for e in host if e.get("cat") == "cpu_op"], []
        annotations = [e for e in host if e.get("cat") == "user_annotation"]
        for tid in {e["tid"] for e in ops}:
            mine = nesting([e for e in ops if e["tid"] == tid])
            children = {}
            for op, outer in mine:
                if outer:
                    children[id(outer[-1])] = children.get(id(outer[-1]), 0.0) + clip(op["ts"], op["ts"] + op["dur"],
                                                                                      window)
                else:
                    tops.append((op["ts"], op["ts"] + op["dur"]))
            for op, outer in mine:
                self_time = clip(op["ts"], op["ts"] + op["dur"], window) - children.get(id(op), 0.0)
                ranges = [a for a in annotations if a["tid"] == tid and a["ts"] <= op["ts"] < a["ts"] + a["dur"]]
                totals[first_category(sorted(ranges, key=lambda a: a["ts"]) + outer + [op])] += max(self_time, 0.0)
        covered = union_length(tops, window)
    return dict(window_us=window[1] - window[0], covered_us=covered, totals_us=totals,
                overlap_us=sum(totals.values()) - covered, device="cuda" if device else "cpu")


def table(summary: dict, steps: int, measured_ms: float, plain_ms: float) -> list[str]:
    """The printed table: ms per step and share of the profiled step, rows summing to it."""
    per = 1 / (1000 * steps)
    step = summary["window_us"] * per
    gaps = (summary["window_us"] - summary["covered_us"]) * per
    rows = [(c, summary["totals_us"][c] * per) for c in CATEGORIES]
    rows += [("host gaps", gaps), ("overlap", -summary["overlap_us"] * per)]
    lines = [f"{'category':24}{'ms/step':>12}{'% of step':>12}"]
    lines += [f"{name:24}{ms:12.3f}{100 * ms / step:12.1f}" for name, ms in rows]
    lines.append(f"{'step (profiled)':24}{step:12.3f}{100.0:12.1f}")
    lines.append(f"wall per step, synced: {measured_ms:.3f} ms under the profiler, {plain_ms:.3f} ms without it")
    return lines


class StepWatch:
    """train()'s progress record: each assignment to `step` ends a step (train_gpt.train sets it once per step),
    so the steps can be timed and profiled from outside the loop."""

    def __init__(self, on_step):
        object.__setattr__(self, "on_step", on_step)
        self.step, self.train_ms, self.artifact, self.reported = 0, 0.0, None, False

    def __setattr__(self, name, value):
        object.__setattr__(self, name, value)
        if name == "step" and value:
            self.on_step(value)


def profiled_run(args, result: dict):
    """A stand-in for train_gpt.run: train() only, with the profiler switched on around the last steps."""
    signature = inspect.signature(tg.run)

    def run(*a, **kw):
        given = signature.bind(*a, **kw).arguments
        hp, rt = given["hp"], given["rt"]
        plain, profiled, end = args.skip + args.steps, args.skip + 2 * args.steps, {}
        activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * rt.cuda
        prof = profile(activities=activities)

        def on_step(step: int):
            if step in (args.skip, plain, profiled):
                tg.sync(rt)
                end[step] = time.perf_counter()
            if step == plain:
                prof.start()
                end["window"] = record_function(WINDOW)
                end["window"].__enter__()
                tg.sync(rt)
                end["start"] = time.perf_counter()
            if step == profiled:
                end["window"].__exit__(None, None, None)
                prof.stop()

        tg.train(hp, rt, given["log"], given["val"], given["val_bytes"], given["train_files"], StepWatch(on_step))
        result.update(prof=prof, rt=rt, hp=hp, plain_ms=1000 * (end[plain] - end[args.skip]) / args.steps,
                      measured_ms=1000 * (end[profiled] - end["start"]) / args.steps)
        return 0

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--steps", type=int, default=3, help="steps timed without the profiler, then as many under it (default 3)")
    add("--skip", type=int, default=10, help="first steps left out: the loop prints their losses (default 10)")
    add("--trace", type=Path, help="keep the Chrome trace here (.json.gz)")
    add("env", nargs="*", metavar="NAME=VALUE", help="hyperparameters for train_gpt.py")
    args = parser.parse_args(argv)
    try:
        if args.steps < 1 or args.skip < 1:
            raise InputError(f"--steps={args.steps} and --skip={args.skip} must be at least 1")
        if args.trace and not args.trace.name.endswith(".json.gz"):
            raise InputError(f"--trace={args.trace}: expected a path ending in .json.gz")
        os.environ.update(hparam_settings(args.env, tg.HPARAMS))
        if os.environ.get("EVAL_ONLY"):
            raise InputError("EVAL_ONLY: there is no training to profile")
    except (InputError, SettingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.environ.update(ITERATIONS=str(args.skip + 2 * args.steps), VAL_LOSS_EVERY="0", MAX_WALLCLOCK_SECONDS="0")
    os.environ.setdefault("VAL_MAX_TOKENS", str(8 * int(os.environ.get("TRAIN_SEQ_LEN", tg.HPARAMS["TRAIN_SEQ_LEN"]))))
    result: dict = {}
    tg.run = profiled_run(args, result)
    try:
        status = tg.main()
    except tg.InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if status or result["rt"].rank:
        return status
    with tempfile.TemporaryDirectory() as tmp:
        path = args.trace or Path(tmp) / "trace.json.gz"
        result["prof"].export_chrome_trace(str(path))
        with gzip.open(path, "rt") as f:
            summary = summarise_trace(json.load(f))
    hp, rt = result["hp"], result["rt"]
    print(f"profile_step: {args.steps} steps of {hp.train_batch_tokens} tokens on {rt.world_size}x {rt.device.type} "
          f"({summary['device']} timeline), torch {torch.__version__}, attention {tg.ATTENTION}, "
          f"compile {rt.compile or 0}, precision {'bf16' if rt.precision == torch.bfloat16 else 'fp32'}")
    print("\n".join(table(summary, args.steps, result["measured_ms"], result["plain_ms"])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
