"""Times the two parts of a training step that issue 27's flags replace, each against the form it replaces, on this
machine, at the model shape train_gpt.py's hyperparameters give (NAME=VALUE arguments, the defaults otherwise):

  muon: the clip and the Muon step on the model's matrices with random gradients: round-robin Muon (what runs by
        default), the all-reduce of those gradients that DDP does before it during the backward (timed apart: in
        training it overlaps the backward), and ShardedMuon (MUON_SHARDED=1: reduce-scatter, clip, step, all-gather).
  loss: the training loss's forward and backward from the final hidden states: GPT.loss (autograd) and
        SoftcappedCrossEntropy (FUSED_CE=1), and the bytes each keeps for its backward (CUDA: the peak memory too).

Each timing is the median of --repeat runs, the two forms interleaved, after one untimed run of each. Several ranks:
torchrun (gloo on the CPU, NCCL on CUDA); rank 0 prints. Exit status 0; 2 bad input (one `error:` line).

    python bench/parts_time.py --part loss --tokens 65536                  # the loss of one H100's micro-step
    torchrun --standalone --nproc_per_node=8 bench/parts_time.py --part muon
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import train_gpt as tg  # noqa: E402
from hparams import SettingError, hparam_settings  # noqa: E402


class InputError(Exception):
    pass


def timed_ms(fn, rt) -> float:
    tg.sync(rt)
    start = time.perf_counter()
    fn()
    tg.sync(rt)
    return 1000 * (time.perf_counter() - start)


def medians(forms: dict, repeat: int, rt) -> dict[str, float]:
    """Median ms of each form, the forms interleaved (a machine's drift hits them alike), after one run of each."""
    for fn in forms.values():
        fn()
    times = {name: [] for name in forms}
    for _ in range(repeat):
        for name, fn in forms.items():
            times[name].append(timed_ms(fn, rt))
    return {name: statistics.median(t) for name, t in times.items()}


def muon_forms(model: tg.GPT, hp, rt) -> dict:
    """The clip and step of each Muon on the model's matrices, random gradients (the same on every rank)."""
    matrices = [m.weight for m in model.modules() if isinstance(m, tg.CastedLinear)]
    grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)).to(rt.device)
             for i, p in enumerate(matrices)]
    make = dict(round_robin=tg.Muon, sharded=tg.ShardedMuon)
    optimizers = {name: cls(matrices, hp.matrix_lr, hp.muon_momentum, hp.muon_backend_steps, hp.muon_wd,
                            tg.newton_schulz, hp.muon_row_norm) for name, cls in make.items()}
    flat = torch.cat([g.flatten() for g in grads])

    def step(name):
        def run():
            for p, g in zip(matrices, grads):
                p.grad = g.clone()
            optimizers[name].clip_grad_norm_(matrices, hp.grad_clip_norm)
            optimizers[name].step()
        return run

    forms = {name: step(name) for name in make}
    if rt.distributed:
        forms["ddp_all_reduce"] = lambda: dist.all_reduce(flat)
    return forms


def loss_forms(model: tg.GPT, tokens: int, rt) -> tuple[dict, dict[str, int]]:
    """Forward and backward of the training loss from random final hidden states, each form; and the bytes each
    keeps for its backward."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, tokens, model.tok_emb.weight.size(1), generator=g).to(rt.device, tg.ACT_DTYPE)
    targets = torch.randint(0, model.tok_emb.weight.size(0), (1, tokens), generator=g).to(rt.device)
    x.requires_grad_()

    def plain():
        return model.loss(x, targets)

    def fused():
        return tg.SoftcappedCrossEntropy.apply(model.head(x).flatten(0, 1), targets.flatten(), model.softcap)

    def with_backward(fn):
        def run():
            with tg.autocast(rt.device):
                loss = fn()
            loss.backward()
            x.grad = model.tok_emb.weight.grad = None
        return run

    saved = {}
    for name, fn in dict(plain=plain, fused=fused).items():
        kept = {}

        def pack(t):
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), tg.autocast(rt.device):
            fn()
        saved[name] = sum(kept.values())
    return {name: with_backward(fn) for name, fn in dict(plain=plain, fused=fused).items()}, saved


def peak_mib(fn, rt) -> float | None:
    if not rt.cuda:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["muon", "loss"], required=True)
    parser.add_argument("--repeat", type=int, default=5, help="timed runs of each form (default 5)")
    parser.add_argument("--tokens", type=int, default=65536,
                        help="loss: tokens of the micro-step (default 65536: one of 8 GPUs' share of 524288)")
    parser.add_argument("env", nargs="*", metavar="NAME=VALUE", help="train_gpt.py hyperparameters (the shape)")
    args = parser.parse_args(argv)
    try:
        if args.repeat < 1 or args.tokens < 1:
            raise InputError(f"--repeat={args.repeat} and --tokens={args.tokens} must be at least 1")
        hp = tg.read_hyperparameters(hparam_settings(args.env, tg.HPARAMS))
        rt = tg.runtime(hp)
    except (InputError, SettingError, tg.InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tg.ACT_DTYPE = rt.precision
    if rt.distributed:
        if rt.cuda:
            torch.cuda.set_device(rt.device)
        dist.init_process_group("nccl" if rt.cuda else "gloo")
    torch.manual_seed(hp.seed)
    model = tg.build_model(hp, rt.device)
    header = (f"parts_time: {args.part} on {rt.world_size}x {rt.device.type}, torch {torch.__version__}, precision "
              f"{'bf16' if rt.precision == torch.bfloat16 else 'fp32'}, {hp.num_layers} layers x {hp.model_dim}, "
              f"median of {args.repeat}")
    if args.part == "muon":
        times = medians(muon_forms(model, hp, rt), args.repeat, rt)
        lines = [f"{name:16}{ms:10.3f} ms" for name, ms in times.items()]
    else:
        forms, saved = loss_forms(model, args.tokens, rt)
        times = medians(forms, args.repeat, rt)
        header += f", {args.tokens} tokens x {hp.vocab_size} logits, forward + backward"
        lines = []
        for name, ms in times.items():
            peak = peak_mib(forms[name], rt)
            lines.append(f"{name:16}{ms:10.3f} ms   saved for backward {saved[name]:>12} bytes"
                         + (f"   peak +{peak:.0f} MiB" if peak is not None else ""))
    if rt.rank == 0:
        print("\n".join([header] + lines), flush=True)
    if rt.distributed:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
