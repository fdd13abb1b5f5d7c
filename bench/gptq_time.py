"""Time the int6 export of the default model (66 matrices, q/k/v stacked into 11) with QUANT_METHOD's quantiser,
the matrices spread over the ranks as in train_gpt.py:

    torchrun --standalone --nproc_per_node=2 bench/gptq_time.py [--method gptq] [--repeat 3]

Weights are the default model's initialisation with trained-like noise (rows above the int6 scale floor), Hessians
X^T X of random correlated activations (2,048 rows per matrix): the solve's cost depends on the shapes, not on the
values. Prints the Hessian-free quantisation time per repeat (rank 0), the slowest rank's time counting.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_gpt as tg  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="gptq", choices=["rowmax", "clipsearch", "gptq"])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    hp = tg.read_hyperparameters({"QUANT_METHOD": args.method})
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    state = {k: (v.float() + 0.05 * torch.randn(v.shape, generator=gen)).to(v.dtype)
             for k, v in tg.build_model(hp, torch.device("cpu")).state_dict().items()}
    names = [k for k, v in state.items() if tg.quant_route(k, v, hp.control_patterns) == "int6"]
    hessians = {}
    for name in names + ["tok_emb.weight"]:
        key, cols = tg.hessian_key(name), state[name].size(1)
        if key not in hessians:
            x = torch.randn(2048, cols, generator=gen) @ (torch.eye(cols) + torch.randn(cols, cols, generator=gen) / 30)
            hessians[key] = x.T @ x
    for r in range(args.repeat):
        if distributed:
            dist.barrier()
        t0 = time.perf_counter()
        tg.quantize_state_dict(state, hp, hessians, rank, world)
        seconds = tg.agree_max([time.perf_counter() - t0], argparse.Namespace(distributed=distributed,
                                                                               device=torch.device("cpu")))[0]
        if rank == 0:
            print(f"repeat:{r} method:{args.method} matrices:{len(names)} groups:{len(tg.int6_groups(names))} "
                  f"ranks:{world} threads_per_rank:{torch.get_num_threads()} seconds:{seconds:.2f}", flush=True)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
