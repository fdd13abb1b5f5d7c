"""Throughput benchmark: run the real train_gpt.py for a short, capped time (the submitted code, not a copy of its
loop) and summarise its log: ms/step, tokens/s, MFU, peak memory, compile (warmup, and the evaluations' priming),
GPTQ calibration and export time, the artifact's bytes, the attention backend and the sliding eval's rate
(extrapolated to 8 GPUs with --full-val-targets N), the model's shape read from the log's hparam lines. Exit
status: 0; 2 bad input (one `error:` line); else train_gpt.py's.
    python bench/bench.py --seconds 120 --nproc 1 -- TRAIN_FILES='d/blogs_*.bin' VAL_FILES='d/fineweb_val_*.bin'
    python bench/bench.py --log logs/<RUN_ID>.txt           # summarise a finished run instead
"""
import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "records"))
import runlog  # noqa: E402
from hparams import SettingError, hparam_settings  # noqa: E402

H100_BF16_DENSE_FLOPS = 989.4e12  # H100 SXM, bf16 tensor cores without sparsity (NVIDIA datasheet)


def flops_per_token(hp: dict[str, str]) -> float:
    """Training FLOPs per token: 6 x the weights used in matmuls (tied head included) + causal attention,
    6 x layers x seq_len x model_dim (QK^T and AV at 2 x T x d on average under the mask, x3 with the backward)."""
    d, layers, t = int(hp["MODEL_DIM"]), int(hp["NUM_LAYERS"]), int(hp["TRAIN_SEQ_LEN"])
    kv = d // int(hp["NUM_HEADS"]) * int(hp["NUM_KV_HEADS"])
    block = 2 * d * d + 2 * d * kv + 2 * d * int(float(hp["MLP_MULT"]) * d)
    bigram = int(hp["BIGRAM_DIM"]) * d if int(hp["BIGRAM_VOCAB_SIZE"]) else 0
    head = d * int(hp["VOCAB_SIZE"])
    return 6 * (layers * block + bigram + head) + 6 * layers * t * d


def window_count(targets: int, window: int, stride: int) -> int:
    """Windows of the sliding eval (as train_gpt.sliding_windows: every `stride`, the last one aligned to the end)."""
    return 1 if targets <= window else -(-(targets - window) // stride) + 1


def summarise(path: Path, full_val_targets: int | None = None) -> dict[str, float | str]:
    """The benchmark figures of one train_gpt.py log; LogError (naming the file) when it has nothing to time."""
    run = runlog.read(path)
    step = run.last("step")  # the last one: the final validation, whose train_time and step_avg are the run's
    if not run.hparams or step is None or not step.num("step"):
        raise runlog.LogError(f"{path}: no hparam or training step lines: not a training log (EVAL_ONLY?)")
    hp, world, ms = run.hparams, int(run.num("world_size") or 1), step.num("step_avg")
    tps = int(hp["TRAIN_BATCH_TOKENS"]) / (ms / 1000)  # tokens/s: the batch is global, every rank's tokens
    backend = run.last("attention_backend")
    out: dict[str, float | str] = {"world_size": world, "attention": backend.fields["attention_backend"],
                                   "device": backend.fields["device"]} if backend else {"world_size": world}
    out.update(steps=int(step.num("step")), ms_per_step=ms, tokens_per_s=tps, tokens_per_s_per_gpu=tps / world,
               mfu_vs_h100_bf16=flops_per_token(hp) * tps / (H100_BF16_DENSE_FLOPS * world))
    budget, priming = run.last("gptq", "budget"), run.last("eval", "compiled")
    times = {"warmup_compile_s": run.num("warmup_time"), "eval_compile_s": priming and priming.num("compile_ms"),
             "calibration_s": budget and budget.num("calib_ms"), "export_s": run.num("export_time")}
    out.update({key: value / 1000 for key, value in times.items() if value is not None})
    for key, label in (("docs_eval_s", "final_int6_docs"), ("lora_ttt_s", "final_int6_lora_ttt")):
        if final := run.last(label):  # the document modes' time on the run's validation slice
            out[key] = final.num("eval_time") / 1000
    if artifact := run.last("artifact"):
        out["artifact_bytes"] = int(artifact.num("bytes"))
    if peak := run.last("peak memory allocated"):  # CUDA only
        out.update(peak_allocated_mib=int(peak.num()), peak_reserved_mib=int(peak.num("reserved")))
    sliding, targets = run.last("final_int6_sliding_window"), run.num("val_loader", "tokens")
    if sliding and targets:
        window, stride = int(hp["EVAL_SEQ_LEN"]) or int(hp["TRAIN_SEQ_LEN"]), int(sliding.num("stride"))
        windows = window_count(int(targets), window, stride)
        per_gpu = windows / (sliding.num("eval_time") / 1000) / world
        out.update(sliding_windows=windows, sliding_windows_per_s_per_gpu=per_gpu)
        if full_val_targets:
            out["sliding_full_val_8gpu_s"] = window_count(full_val_targets, window, stride) / (8 * per_gpu)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--seconds", type=float, default=120, help="training wall-clock cap (default 120)")
    add("--nproc", type=int, default=1, help="processes (GPUs) for torchrun (default 1)")
    add("--run-id", default="bench", help="RUN_ID of the benchmark run (default bench)")
    add("--log", type=Path, help="summarise this existing log instead of running")
    add("--full-val-targets", type=int, metavar="N", help="targets of the full validation set of the data's variant")
    add("env", nargs="*", metavar="NAME=VALUE", help="hyperparameters for train_gpt.py")
    args = parser.parse_args(argv)
    if args.log is None:
        env = dict(os.environ, MAX_WALLCLOCK_SECONDS=str(args.seconds), VAL_LOSS_EVERY="0", RUN_ID=args.run_id)
        names = runlog.script_defaults((REPO / "train_gpt.py").read_bytes())
        try:
            env.update(hparam_settings(args.env, names))
        except SettingError as e:
            parser.error(str(e))
        cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", f"--nproc_per_node={args.nproc}",
               str(REPO / "train_gpt.py")]
        if (code := subprocess.run(cmd, env=env).returncode) not in (0, 1):  # 1: over a limit, no matter here
            print(f"error: train_gpt.py exited {code}", file=sys.stderr)
            return code
        args.log = Path("logs") / f"{args.run_id}.txt"
    try:
        summary = summarise(args.log, args.full_val_targets)
    except runlog.LogError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for key, value in summary.items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
