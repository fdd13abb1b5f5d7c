"""What torch.compile hands Inductor, counted: the graphs dynamo captures in a short real run of train_gpt.py (its
main(): the warmup of every loop shape, training, the evaluations' priming and the evaluations, TTT included) and
their forward ops, under each COMPILE mode. The graphs are counted, not compiled (a backend that runs them eagerly),
so this runs on a CPU in seconds and says, machine-independently, how a configuration's compile work grows: the
input Inductor would turn into kernels, whose size its compile time follows.

    python bench/compile_count.py -- TRAIN_FILES='d/*train_*.bin' VAL_FILES='d/*val_*.bin' TOKENIZER_PATH=d/x.model \\
        LOOP_LAYERS=4-5 PARALLEL_START=7 ...        # settings after -- are train_gpt.py hyperparameters

Prints one line per mode: graphs, forward ops, the largest graphs. Exit status: 0; 2 bad input; else the run's.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import train_gpt as tg  # noqa: E402
from hparams import SettingError, hparam_settings, process_state_kept  # noqa: E402


SHORT_RUN = dict(ITERATIONS="3", WARMUP_STEPS="1", VAL_LOSS_EVERY="0", MAX_WALLCLOCK_SECONDS="0",
                 RUN_ID="compile_count")  # every graph a run compiles, in a few steps (env may override)


def count_graphs(env: dict[str, str], mode: str) -> list[int]:
    """The forward ops of every graph dynamo captures in a short train_gpt.main() (SHORT_RUN, then `env`) under
    COMPILE=mode, in capture order."""
    graphs, compile = [], torch.compile

    def counting(gm, example_inputs):
        graphs.append(sum(node.op in ("call_function", "call_method", "call_module") for node in gm.graph.nodes))
        return gm.forward

    saved_env = dict(os.environ)
    os.environ.update(SHORT_RUN, **env, COMPILE=mode)
    tg.torch.compile = lambda fn, **kw: compile(fn, backend=counting, **kw)
    torch._dynamo.reset()
    try:
        with process_state_kept(tg):
            status = tg.main()
    finally:
        tg.torch.compile = compile
        os.environ.clear()
        os.environ.update(saved_env)
        torch._dynamo.reset()
    if status:
        raise SystemExit(status)
    return graphs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=["blocks", "model"], choices=["blocks", "model"])
    parser.add_argument("env", nargs="*", metavar="NAME=VALUE", help="hyperparameters for train_gpt.py")
    args = parser.parse_args(argv)
    try:
        env = hparam_settings(args.env, tg.HPARAMS)
    except SettingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for mode in args.modes:
        try:
            graphs = count_graphs(env, mode)
        except tg.InputError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"compile_count: COMPILE={mode} graphs:{len(graphs)} forward_ops:{sum(graphs)} "
              f"largest:{','.join(map(str, sorted(graphs, reverse=True)[:4]))}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
