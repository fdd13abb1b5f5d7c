"""Throughput benchmark: run the real train_gpt.py for a short, capped time and summarise its log.

Measuring through the script itself (not a copy of its training loop) means the numbers are those of the code that
is submitted. The summary gives ms/step, tokens/s, model FLOPs utilisation, peak memory, compile (warmup) time, the
attention backend, and the sliding-window eval rate extrapolated to the full validation set on 8 GPUs.

    python bench/bench.py --seconds 120 --nproc 1 -- TRAIN_FILES='d/blogs_*.bin' VAL_FILES='d/fineweb_val_*.bin'
    python bench/bench.py --log logs/<RUN_ID>.txt           # summarise a finished run instead

Settings after `--` are NAME=VALUE env vars for train_gpt.py (any of its hyperparameters).

Exit status: 0 summarised; 2 bad input (a --log that does not exist, a log that is not a train_gpt.py training log
or has no training step lines), one line on stderr; otherwise train_gpt.py's own non-zero status.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import train_gpt as tg  # noqa: E402

PROG = "bench.py"
H100_BF16_DENSE_FLOPS = 989.4e12  # H100 SXM, bf16 tensor cores without sparsity (NVIDIA datasheet)
FULL_VAL_TARGETS = 62_021_632  # the challenge validation set (SPEC B§1.5)


def model_flops_per_token(hp) -> float:
    """Training FLOPs per token: 6 x (weights used in matmuls, the tied head included) + causal attention
    6 x layers x seq_len x model_dim (QK^T and AV, forward 2 x T x d on average under the causal mask, x3 with
    the backward pass). Embedding lookups cost no matmul FLOPs."""
    d, layers, t = hp.model_dim, hp.num_layers, hp.train_seq_len
    kv = d // hp.num_heads * hp.num_kv_heads
    block = d * d + 2 * d * kv + d * d + 2 * d * int(hp.mlp_mult * d)
    bigram = hp.bigram_dim * d if hp.bigram_vocab_size else 0
    head = d * hp.vocab_size * (1 + hp.mtp_num_heads)
    return 6 * (layers * block + bigram + head) + 6 * layers * t * d


class BenchError(Exception):
    """Bad input, reported as one line on stderr (exit status 2)."""


def last_match(lines: list[str], pattern: str) -> re.Match | None:
    matches = [m for m in (re.search(pattern, line) for line in lines) if m]
    return matches[-1] if matches else None


def summarise(log: Path) -> dict[str, float | str]:
    """The benchmark figures of one train_gpt.py log (BenchError when it has nothing to summarise)."""
    if not log.is_file():
        raise BenchError(f"{log}: log file not found" if not log.exists() else f"{log}: not a file")
    lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    hparams = dict(m.groups() for m in (re.match(r"hparam (\w+)=(.*)", line) for line in lines) if m)
    if not hparams:
        raise BenchError(f"{log}: no 'hparam' lines; is it a train_gpt.py log?")
    step = last_match(lines, r"^step:(\d+)/\d+ .*train_time:(\d+)ms step_avg:([\d.]+)ms")
    if step is None or int(step.group(1)) == 0:
        raise BenchError(f"{log}: no training step lines ('step:N/M ... train_time:...ms step_avg:...ms' with N > 0); "
                         "nothing to time (an EVAL_ONLY run, or training did not start)")
    world_line = last_match(lines, r"^world_size:(\d+)")
    if world_line is None:
        raise BenchError(f"{log}: no 'world_size:' line; is it a train_gpt.py log?")
    try:
        hp = tg.read_hyperparameters(hparams)
    except Exception as exc:  # e.g. a log of another train_gpt.py version whose settings this one rejects
        raise BenchError(f"{log}: its hparam lines do not fit this train_gpt.py ({type(exc).__name__}: {exc})") from None
    world = int(world_line.group(1))
    out: dict[str, float | str] = {"world_size": world}
    backend = last_match(lines, r"^attention_backend:(\S+) compile:(\d) device:(\S+)")
    if backend:
        out.update(attention=backend.group(1), compile=int(backend.group(2)), device=backend.group(3))
    ms = float(step.group(3))
    tokens_per_s = hp.train_batch_tokens / (ms / 1000)
    out.update(steps=int(step.group(1)), ms_per_step=ms, tokens_per_s=tokens_per_s,
               tokens_per_s_per_gpu=tokens_per_s / world,
               mfu_vs_h100_bf16=model_flops_per_token(hp) * tokens_per_s / (H100_BF16_DENSE_FLOPS * world))
    warmup = last_match(lines, r"^warmup_time:(\d+)ms")
    if warmup:
        out["warmup_compile_s"] = int(warmup.group(1)) / 1000
    peak = last_match(lines, r"^peak memory allocated: (\d+) MiB reserved: (\d+) MiB")
    if peak:
        out.update(peak_allocated_mib=int(peak.group(1)), peak_reserved_mib=int(peak.group(2)))
    targets = last_match(lines, r"^val_loader:.* tokens:(\d+)")
    sliding = last_match(lines, r"^final_int6_sliding_window val_loss:\S+ val_bpb:\S+ stride:(\d+) eval_time:(\d+)ms")
    if targets and sliding:
        stride, seconds = int(sliding.group(1)), int(sliding.group(2)) / 1000
        windows = len(tg.sliding_windows(int(targets.group(1)), hp.eval_len, stride))
        per_gpu = windows / seconds / world
        full = len(tg.sliding_windows(FULL_VAL_TARGETS, hp.eval_len, stride))
        out.update(sliding_windows=windows, sliding_windows_per_s_per_gpu=per_gpu,
                   sliding_full_val_8gpu_s=full / (8 * per_gpu))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=120, help="training wall-clock cap (default 120)")
    parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs) for torchrun (default 1)")
    parser.add_argument("--run-id", default="bench", help="RUN_ID of the benchmark run (default bench)")
    parser.add_argument("--log", type=Path, help="summarise this existing log instead of running")
    parser.add_argument("env", nargs="*", metavar="NAME=VALUE", help="extra env vars for train_gpt.py")
    args = parser.parse_args(argv)
    if args.log is None:
        env = dict(os.environ, MAX_WALLCLOCK_SECONDS=str(args.seconds), VAL_LOSS_EVERY="0", RUN_ID=args.run_id)
        for item in args.env:
            name, sep, value = item.partition("=")
            if not sep or name not in tg.HPARAM_NAMES:
                parser.error(f"{item!r}: expected NAME=VALUE with NAME one of train_gpt.py's hyperparameters")
            env[name] = value
        torchrun = Path(sys.executable).with_name("torchrun")
        cmd = [str(torchrun), "--standalone", f"--nproc_per_node={args.nproc}", str(REPO / "train_gpt.py")]
        code = subprocess.run(cmd, env=env).returncode
        if code not in (0, 1):  # 1 = over the size limit, which does not matter here
            print(f"bench: train_gpt.py exited {code}", file=sys.stderr)
            return code
        args.log = Path("logs") / f"{args.run_id}.txt"
    try:
        summary = summarise(args.log)
    except BenchError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
        return 2
    for key, value in summary.items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
