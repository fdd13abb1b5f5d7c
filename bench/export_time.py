"""How long the artifact's compression takes, by compressor and number of worker threads, and what it weighs.

    python bench/export_time.py                            # trained-like weights of the default model (below)
    python bench/export_time.py --artifact final_model.int6.ptz --workers 1 4 16
    python bench/export_time.py --single-stream            # also brotli 11 over the whole stream (slow: minutes)

Trained-like weights: every matrix Student-t(5) rows at log-normal row scales, SDClip-quantised (QUANT_CLIP=sigma,
round to nearest) as the stacks' GPTQ + SDClip exports store them; the artifact of a real run (--artifact) is
re-packed from its stored tensors. Settings after `--` are train_gpt.py hyperparameters (the model's shape).
"""
from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import train_gpt as tg  # noqa: E402
from hparams import SettingError, hparam_settings  # noqa: E402


def trained_like(settings: dict[str, str]) -> tuple[dict, dict]:
    hp = tg.read_hyperparameters({"QUANT_METHOD": "clipsearch", "QUANT_CLIP": "sigma", **settings})
    torch.manual_seed(0)
    reference, gen = tg.build_model(hp, torch.device("cpu")).state_dict(), torch.Generator().manual_seed(1)
    student = torch.distributions.StudentT(5.0)
    state = {k: (student.sample(v.shape) * torch.exp(torch.randn(v.shape[0], 1, generator=gen) * 0.5) * 0.02
                 if v.ndim == 2 else v.float() + 0.01 * torch.randn(v.shape, generator=gen)).to(v.dtype)
             for k, v in reference.items()}
    tensors, meta, _, _ = tg.quantize_state_dict(state, hp)
    return tensors, meta


def frame_cpu_seconds(part: bytes, method: str) -> float:
    t0 = time.thread_time()
    tg.compress_frame(part, method)
    return time.thread_time() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", type=Path, help="re-pack this artifact's stored tensors")
    parser.add_argument("--compressors", nargs="+", default=["zstd", "brotli", "lzma"])
    parser.add_argument("--workers", nargs="+", type=int, default=sorted({1, tg.usable_cpus()}))
    parser.add_argument("--single-stream", action="store_true", help="also brotli 11 over the whole stream")
    parser.add_argument("settings", nargs="*", help="NAME=VALUE hyperparameters after --")
    args = parser.parse_args(argv)
    try:
        settings = hparam_settings(args.settings, tg.HPARAMS)
    except SettingError as e:
        parser.error(str(e))
    tensors, meta = tg.artifact_payload(args.artifact.read_bytes()) if args.artifact else trained_like(settings)
    buf = io.BytesIO()
    torch.save({"w": tensors, "m": meta}, buf)
    raw = buf.getvalue()
    parts = [raw[a:b] for a, b in tg.frames(raw)]
    print(f"stream {len(raw):,} bytes, {len(parts)} frames, {tg.usable_cpus()} usable CPUs")
    print("| compressor | workers | seconds | bytes |\n|---|---|---|---|")
    cpu = {}
    for method in args.compressors:
        sizes = set()
        for workers in args.workers:
            t0 = time.perf_counter()
            blob = tg.pack_artifact(tensors, meta, method, workers)
            print(f"| {method} | {workers} | {time.perf_counter() - t0:.2f} | {len(blob):,} |", flush=True)
            sizes.add(blob)
        assert len(sizes) == 1, "the artifact depends on the number of workers"
        cpu[method] = [frame_cpu_seconds(part, method) for part in parts]
    if args.single_stream:
        t0 = time.perf_counter()
        single = len(tg.brotli_module().compress(raw, quality=11)) + len(tg.BROTLI_TAG)
        print(f"| brotli, one stream | 1 | {time.perf_counter() - t0:.2f} | {single:,} |")
    print("\nCPU time of the frames, one by one (this thread's, so other load hardly counts): no number of workers "
          "finishes sooner than the largest frame, nor than the total over the workers")
    print("| compressor | total CPU s | largest frame CPU s |\n|---|---|---|")
    for method, seconds in cpu.items():
        print(f"| {method} | {sum(seconds):.2f} | {max(seconds):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
