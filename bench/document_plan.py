"""How many positions the document modes make the trunk compute per scored target: counted from train_gpt.py's own
plans over a validation shard, no model, no timing (the basis for scaling a GPU timing of a prefix to the full set).

    python bench/document_plan.py ../shared/data/fineweb_val_000000.bin            # the records' shape
    python bench/document_plan.py VAL.bin --resample 50000                          # + lengths drawn from VAL's docs
    python bench/document_plan.py VAL.bin -- EVAL_SEQ_LEN=256 TTT_LORA_BATCH_DOCS=16

Rows: the sliding eval (every window computes EVAL_SEQ_LEN positions), DOCS_EVAL (rows x padded length per batch at
the sliding eval's VAL_BATCH_SIZE on 8 ranks), LoRA TTT (TTT_LORA_BATCH_DOCS rows x padded length per chunk step,
forward and backward). --resample N draws N document lengths (with replacement, seed 0) from the shard's documents:
an estimate for a set of N documents, which packs batches of like lengths more tightly than a short prefix can.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import train_gpt as tg  # noqa: E402
from hparams import SettingError, hparam_settings  # noqa: E402


def lora_positions(docs: list[tuple[int, int]], hp) -> tuple[int, int, int]:
    """(positions computed, of them real window tokens, chunk steps) of LoRA TTT's plan over these documents."""
    computed = real = steps = 0
    for batch in tg.lora_batches(docs, hp.ttt_lora_batch_docs):
        chunks = [-(-(end - first) // hp.ttt_lora_chunk) for first, end in batch]
        for ci in range(max(chunks)):
            windows = [tg.chunk_window(first, end, ci, hp.ttt_lora_chunk, hp.eval_len)
                       for (first, end), n in zip(batch, chunks) if ci < n]
            length = tg.padded_length(max(w.length for w in windows), hp.eval_len, hp.train_seq_len)
            computed += hp.ttt_lora_batch_docs * length
            real += sum(w.length for w in windows)
            steps += 1
    return computed, real, steps


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("val", help="a validation shard")
    parser.add_argument("--resample", type=int, default=0, help="also estimate for this many documents")
    parser.add_argument("settings", nargs="*", help="NAME=value hyperparameters after --")
    args = parser.parse_args(argv)
    try:
        hp = tg.read_hyperparameters(hparam_settings(args.settings, tg.HPARAMS))
    except SettingError as e:
        parser.error(str(e))
    val = tg.load_validation_tokens([args.val], max(hp.train_seq_len, hp.eval_len), hp.val_max_tokens)
    docs, total = tg.documents(val), len(val) - 1
    stride = hp.eval_stride if 0 < hp.eval_stride < hp.eval_len else hp.eval_len
    batch_tokens = max(1, hp.val_batch_size // 8 // hp.eval_len) * hp.eval_len
    windows = [w for first, end in docs for w in tg.document_windows(first, end, hp.eval_len, stride)]
    batches = tg.window_batches(windows, hp, batch_tokens)
    computed, real, steps = lora_positions(docs, hp)
    window = min(hp.eval_len, total)
    lines = [f"targets:{total} docs:{len(docs)} window:{hp.eval_len} stride:{stride} chunk:{hp.ttt_lora_chunk} "
             f"batch_docs:{hp.ttt_lora_batch_docs}",
             f"sliding per_target:{len(tg.sliding_windows(total, window, stride)) * window / total:.2f}",
             f"docs per_target:{sum(n * rows for n, rows, _ in batches) / total:.2f} {tg.padding_note(batches)}",
             f"lora per_target:{computed / total:.2f} real:{real / total:.2f} padding:{1 - real / computed:.3f} "
             f"chunk_steps:{steps}"]
    if args.resample:
        lengths = np.random.default_rng(0).choice([end - first for first, end in docs], args.resample)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        drawn = [(int(s), int(s + n)) for s, n in zip(starts, lengths)]
        computed, real, steps = lora_positions(drawn, hp)
        drawn_total = int(lengths.sum())
        lines.append(f"lora resampled docs:{args.resample} targets:{drawn_total} per_target:"
                     f"{computed / drawn_total:.2f} real:{real / drawn_total:.2f} padding:{1 - real / computed:.3f}")
    for line in lines:
        print(line)
    return lines


if __name__ == "__main__":
    main()
