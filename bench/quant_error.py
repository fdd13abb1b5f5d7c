"""What each export setting does to a model trained by train_gpt.py: the quantisers (QUANT_METHOD, QUANT_CLIP,
EMBED_BITS) and the compressors (COMPRESSOR), each measured, on the same trained weights.

At CPU scale the int6 round trip costs little loss, so the loss gap alone cannot rank quantisers. This also
measures what GPTQ optimises: for every block matrix W the relative output error ||(W - Q) X||^2 / ||W X||^2 on
held-out activations X (training sequences that GPTQ did not calibrate on), summed over the block matrices, and
the same for the tied embedding in its role as the output head (X: the final hidden states). Bytes are those of
the artifact train_gpt.py writes for that setting.

At small widths the block matrices are under train_gpt.py's 65,536-value passthrough size (stored fp16); here every
block matrix is quantised to int6 anyway, so that settings are compared where they apply.

    python bench/quant_error.py --save-state scratch/q.pt -- TRAIN_FILES='scratch/proxy/blogs_train_*.bin' \\
        VAL_FILES='scratch/proxy/fineweb_val_*.bin' TOKENIZER_PATH=../shared/data/fineweb_1024_bpe.model \\
        NUM_LAYERS=6 MODEL_DIM=128 NUM_HEADS=4 NUM_KV_HEADS=2 TRAIN_SEQ_LEN=256 EVAL_SEQ_LEN=256 \\
        TRAIN_BATCH_TOKENS=8192 ITERATIONS=200 WARMDOWN_ITERS=100 VAL_MAX_TOKENS=262144 PRECISION=fp32
    python bench/quant_error.py --state scratch/q.pt -- <the same settings>   # measure again, no training

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
from hparams import SettingError, hparam_settings  # noqa: E402

QUANTISERS = [  # (label, settings): the seed's, then the lineage's, then the SP8192 records' and the embedding's
    ("rowmax (seed)", {}),
    ("clipsearch", dict(QUANT_METHOD="clipsearch")),
    ("gptq", dict(QUANT_METHOD="gptq")),
    ("sigma 12.85, RTN", dict(QUANT_METHOD="clipsearch", QUANT_CLIP="sigma")),
    ("gptq + sigma 12.85", dict(QUANT_METHOD="gptq", QUANT_CLIP="sigma")),
    ("gptq + sigma 12.85, embed k 8", dict(QUANT_METHOD="gptq", QUANT_CLIP="sigma", EMBED_CLIP_SIGMAS="8")),
    ("gptq + sigma 12.85, embed k 8, 7 bits", dict(QUANT_METHOD="gptq", QUANT_CLIP="sigma", EMBED_CLIP_SIGMAS="8",
                                                   EMBED_BITS="7")),
    ("gptq + sigma, embed 7 bits", dict(QUANT_METHOD="gptq", QUANT_CLIP="sigma", EMBED_BITS="7")),
    ("gptq + sigma, embed 6 bits", dict(QUANT_METHOD="gptq", QUANT_CLIP="sigma", EMBED_BITS="6")),
    ("rowmax, embed 7 bits (no GPTQ)", dict(EMBED_BITS="7")),
]
COMPRESSORS = ("zstd", "brotli", "lzma")


def all_int6(real_route):
    """The script's routing, with every block matrix (a linear layer's weight) int6 whatever its size."""
    def route(name, t, patterns):
        matrix = name.startswith("blocks.") and name.endswith(".weight") and t.ndim == 2
        return "int6" if matrix and not any(p in name for p in patterns) else real_route(name, t, patterns)
    return route


def relative_error(state, tensors, names, hessians) -> float:
    """sum ||(W - Q) X||^2 / sum ||W X||^2 over `names`, from X's second moment H = X^T X."""
    err = ref = 0.0
    for name in names:
        w = state[name].double()
        e = w - tensors[name + ".q"].double() * tensors[name + ".scale"].double()
        h = hessians[tg.hessian_key(name)].double()
        err += float(torch.einsum("ij,jk,ik->", e, h, e))
        ref += float(torch.einsum("ij,jk,ik->", w, h, w))
    return err / ref


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state", type=Path, help="trained weights saved by --save-state (skips training)")
    parser.add_argument("--save-state", type=Path, help="where to save the trained weights")
    parser.add_argument("env", nargs="*", metavar="NAME=VALUE", help="train_gpt.py hyperparameters")
    args = parser.parse_args(argv)
    try:
        env = hparam_settings(args.env, tg.HPARAMS)
    except SettingError as e:
        parser.error(str(e))
    try:
        hp = tg.read_hyperparameters({**env, "COMPILE": env.get("COMPILE", "0"), "RUN_ID": "quant_error"})
        rt = tg.runtime(hp)
        tg.ACT_DTYPE = rt.precision
        sp = tg.load_tokenizer(hp.tokenizer_path, hp.vocab_size)
        luts = tg.build_byte_luts(sp, hp.vocab_size)
        val_files = tg.resolve_files(hp.val_glob, "VAL_FILES")
        tokens = tg.load_validation_tokens(val_files, hp.train_seq_len, hp.val_max_tokens)
        token_bytes, _ = tg.validation_bytes(hp, sp, luts, val_files, tokens)  # the dataset's sidecar when it has one
        val, val_bytes = tokens.to(rt.device, torch.int32), token_bytes.to(rt.device)
        train_files = tg.resolve_files(hp.train_glob, "TRAIN_FILES")
    except tg.InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(hp.seed)
    if args.state:
        model = tg.build_model(hp, rt.device)
        model.load_state_dict(torch.load(args.state, map_location=rt.device))
    else:
        progress = SimpleNamespace(step=0, train_ms=0.0, artifact=None, reported=False)
        model, _ = tg.train(hp, rt, tg.Logger(hp.run_id, True, b""), val, val_bytes, train_files, progress)
    if args.save_state:
        torch.save(model.state_dict(), args.save_state)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tg.quant_route = all_int6(tg.quant_route)
    names = [k for k, v in state.items() if tg.quant_route(k, v, hp.control_patterns) == "int6"]
    calib = tg.collect_hessians(model, names + ["tok_emb.weight"], train_files, hp, rt)
    both = tg.collect_hessians(model, names + ["tok_emb.weight"], train_files,
                               SimpleNamespace(**{**vars(hp), "gptq_calib_seqs": 2 * hp.gptq_calib_seqs}), rt)
    held_out = {k: both[k] - calib[k] for k in calib}  # the next GPTQ_CALIB_SEQS sequences of the stream

    def val_loss() -> float:
        seq = hp.train_seq_len
        return tg.evaluate(tg.Scorer(model), val, val_bytes, seq, seq, tg.eval_batch_windows(hp, rt, seq), 0, 1)[0]

    base = val_loss()
    print(f"trained: val_loss {base:.4f} before quantisation; {sum(v.numel() for v in state.values()):,} values; "
          f"{len(names)} block matrices quantised int6")
    print("\n| quantiser | artifact bytes (zstd) | block output error | head output error | loss gap (nats) | s |")
    print("|---|---|---|---|---|---|")
    quantised = {}
    for label, settings in QUANTISERS:
        q_hp = tg.read_hyperparameters({**env, **settings})
        t0 = time.perf_counter()
        tensors, meta, _, _ = tg.quantize_state_dict(state, q_hp, calib)
        seconds = time.perf_counter() - t0
        quantised[label] = tensors, meta
        blob = tg.pack_artifact(tensors, meta)
        model.load_state_dict(tg.unpack_artifact(blob, state))
        gap = val_loss() - base
        model.load_state_dict(state)
        print(f"| {label} | {len(blob):,} | {relative_error(state, tensors, names, held_out):.3e} | "
              f"{relative_error(state, tensors, ['tok_emb.weight'], held_out):.3e} | {gap:+.5f} | {seconds:.1f} |")
    print("\n| quantiser | " + " | ".join(COMPRESSORS) + " |")
    print("|---" * (len(COMPRESSORS) + 1) + "|")
    for label in ("rowmax (seed)", "gptq + sigma 12.85"):
        tensors, meta = quantised[label]
        sizes = []
        for compressor in COMPRESSORS:
            t0 = time.perf_counter()
            blob = tg.pack_artifact(tensors, meta, compressor)
            sizes.append(f"{len(blob):,} ({time.perf_counter() - t0:.1f} s)")
            assert all(torch.equal(a, b) for a, b in zip(tg.unpack_artifact(blob, state).values(),
                                                          tg.unpack_artifact(tg.pack_artifact(tensors, meta),
                                                                             state).values()))
        print(f"| {label} | " + " | ".join(sizes) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
