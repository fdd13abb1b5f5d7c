"""What each int6 quantiser (QUANT_METHOD=rowmax|clipsearch|gptq) does to a model trained by train_gpt.py.

At CPU scale the int6 round trip costs almost no loss, so the loss gap cannot rank the methods. This measures what
GPTQ optimises instead: for every block matrix W (attention q/k/v/proj, MLP fc/proj) the relative output error
||(W - Q) X||^2 / ||W X||^2 on held-out activations X (training sequences that GPTQ did not calibrate on), summed
per layer type, for each method; plus the artifact bytes, the calibration and quantisation times and the loss gap.

At small widths the block matrices are under train_gpt.py's 65,536-value passthrough size (stored fp16); here
every block matrix is quantised to int6 anyway, so that the methods are compared where they apply.

    python bench/quant_error.py --seeds 1337 42 -- TRAIN_FILES='scratch/proxy/blogs_train_*.bin' \\
        VAL_FILES='scratch/proxy/fineweb_val_*.bin' TOKENIZER_PATH=../shared/data/fineweb_1024_bpe.model \\
        NUM_LAYERS=4 MODEL_DIM=128 NUM_HEADS=4 NUM_KV_HEADS=2 TRAIN_SEQ_LEN=256 EVAL_SEQ_LEN=256 \\
        TRAIN_BATCH_TOKENS=8192 ITERATIONS=200 WARMDOWN_ITERS=60 SWA_ENABLED=0 VAL_MAX_TOKENS=262144

Settings after `--` are train_gpt.py hyperparameters (NAME=VALUE). Runs on one process (CPU or one GPU).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import train_gpt as tg  # noqa: E402

METHODS = ("rowmax", "clipsearch", "gptq")
TYPES = ("attn.c_q", "attn.c_k", "attn.c_v", "attn.proj", "mlp.fc", "mlp.proj")


def layer_type(name: str) -> str | None:
    return next((t for t in TYPES if f".{t}.weight" in name), None)


def measure(env: dict[str, str], seed: int) -> dict:
    hp = tg.read_hyperparameters({**env, "SEED": str(seed), "RUN_ID": f"quant_error_{seed}"})
    rt = tg.runtime(hp)
    tg.ACT_DTYPE = rt.precision
    torch.manual_seed(seed)
    sp = tg.load_tokenizer(hp.tokenizer_path, hp.vocab_size)
    luts = [t.to(rt.device) for t in tg.build_byte_luts(sp, hp.vocab_size)]
    val = tg.load_validation_tokens(tg.resolve_files(hp.val_glob, "VAL_FILES"), hp.train_seq_len,
                                    hp.val_max_tokens).to(rt.device, torch.int32)
    train_files = tg.resolve_files(hp.train_glob, "TRAIN_FILES")
    log = tg.Logger(hp.run_id, True, b"")

    def val_loss(model) -> float:
        seq = hp.train_seq_len
        return tg.evaluate(tg.Scorer(model, rt), val, luts, seq, seq, tg.eval_batch_windows(hp, rt, seq), 0, 1)[0]

    progress = SimpleNamespace(step=0, train_ms=0.0, artifact=None, reported=False)
    model, trained = tg.train(hp, rt, log, val, luts, train_files, progress)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    names = [k for k, v in state.items() if layer_type(k) and v.ndim == 2]
    t0 = time.perf_counter()
    calib = tg.collect_hessians(model, names, train_files, hp, rt)
    calib_s = time.perf_counter() - t0
    both = tg.collect_hessians(model, names, train_files, SimpleNamespace(**{**vars(hp), "gptq_calib_seqs":
                                                                              2 * hp.gptq_calib_seqs}), rt)
    held_out = {k: both[k] - calib[k] for k in calib}  # the next GPTQ_CALIB_SEQS sequences of the stream

    base_loss = val_loss(model)
    out = dict(seed=seed, steps=progress.step, val_loss=base_loss, calib_s=calib_s, methods={})
    for method in METHODS:
        t0 = time.perf_counter()
        quantized = {n: tg.int6_quantize(n, state[n].float(), method, calib)[:2] for n in names}
        quant_s = time.perf_counter() - t0
        err, ref = {t: 0.0 for t in TYPES}, {t: 0.0 for t in TYPES}
        for n, (q, scale) in quantized.items():
            w, h = state[n].float().double(), held_out[tg.hessian_key(n)].double()
            e = w - (q * scale.float()).double()
            err[layer_type(n)] += float(torch.einsum("ij,jk,ik->", e, h, e))
            ref[layer_type(n)] += float(torch.einsum("ij,jk,ik->", w, h, w))
        # the artifact as train_gpt.py would write it, with every block matrix int6
        tensors, meta, _, _ = tg.quantize_state_dict(state, hp.control_patterns, "rowmax")
        for n, (q, scale) in quantized.items():
            tensors.pop(n, None)
            tensors[n + ".q"], tensors[n + ".scale"], meta[n] = q.to(torch.int8), scale, "int6"
        blob = tg.pack_artifact(tensors, meta)
        model.load_state_dict(tg.unpack_artifact(blob, state))
        loss = val_loss(model)
        model.load_state_dict(state)
        out["methods"][method] = dict(rel_err={t: err[t] / ref[t] for t in TYPES if ref[t]}, bytes=len(blob),
                                      quant_s=quant_s, loss_gap=loss - base_loss)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337, 42])
    parser.add_argument("env", nargs="*", metavar="NAME=VALUE", help="train_gpt.py hyperparameters")
    args = parser.parse_args(argv)
    env = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or name not in tg.HPARAM_NAMES:
            parser.error(f"{item!r}: expected NAME=VALUE with NAME one of train_gpt.py's hyperparameters")
        env[name] = value
    try:
        results = [measure({**env, "COMPILE": env.get("COMPILE", "0")}, seed) for seed in args.seeds]
    except tg.InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("| seed | method | " + " | ".join(TYPES) + " | artifact bytes | quantise s | loss gap (nats) |")
    print("|---" * (len(TYPES) + 6) + "|")
    for r in results:
        for method, m in r["methods"].items():
            errs = " | ".join(f"{m['rel_err'].get(t, float('nan')):.3e}" for t in TYPES)
            print(f"| {r['seed']} | {method} | {errs} | {m['bytes']:,} | {m['quant_s']:.2f} | {m['loss_gap']:+.5f} |")
    for r in results:
        print(f"seed {r['seed']}: {r['steps']} steps, val_loss {r['val_loss']:.4f} before quantisation, "
              f"calibration (Hessians) {r['calib_s']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
