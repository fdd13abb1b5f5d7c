"""Vocabularies beyond 1,024 (issue 20): the script end to end with a real 8,192-token SentencePiece model (a public
record's), its byte accounting checked against SentencePiece's own decoding, and data from another tokenizer refused."""
from __future__ import annotations

import json

import pytest
import sentencepiece as spm

import train_gpt as tg
from conftest import DOCS, SHORT, TOKENIZER_8192, field, lines_starting, log_lines, run_in_process

# The SP8192 records' choices at the tiny shape: no BigramHash, MLP 4x, GPTQ with SDClip, a 7-bit GPTQ embedding
# (8,192 x 64: over the fp16 size, so it really is quantised), EMA, score-first TTT; 4,096 validation targets.
SP8192 = dict(VOCAB_SIZE="8192", TOKENIZER_PATH=str(TOKENIZER_8192), BIGRAM_VOCAB_SIZE="0", MLP_MULT="4",
              QUANT_METHOD="gptq", QUANT_CLIP="sigma", EMBED_BITS="7", GPTQ_CALIB_SEQS="4", EMA_DECAY="0.9",
              ITERATIONS="8", TRAIN_BATCH_TOKENS="512", VAL_LOSS_EVERY="0", VAL_MAX_TOKENS="4096", EVAL_STRIDE="32",
              TTT_ENABLED="1", TTT_CHUNK_TOKENS="1024", TTT_EPOCHS="1")


def decoded_bytes(n_targets: int, val_docs: int = 20) -> int:
    """UTF-8 bytes of the first n_targets validation targets, from SentencePiece's decoding of each document's
    tokens (the metric's tables play no part): the stream is BOS d1 BOS d2 ..., a BOS target has no bytes."""
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER_8192))
    docs = [json.loads(line)["text"] for line in DOCS.read_text(encoding="utf-8").splitlines()[:val_docs]]
    total, left = 0, n_targets
    for doc in docs:
        ids = sp.encode(doc)[:left]
        total, left = total + len(sp.decode(ids).encode("utf-8")), left - len(ids) - 1  # - 1: the next BOS
        if left <= 0:
            break
    return total


def test_an_8192_token_run_end_to_end(tmp_path, tiny_data_8192):
    assert run_in_process(tmp_path, tiny_data_8192, **SP8192) == 0
    lines = log_lines(tmp_path)
    (loader,) = lines_starting(lines, "val_loader:")
    targets = int(field(loader, "tokens"))
    assert targets == 4096
    finals = {label: lines_starting(lines, label + " ")[0] for label in
              ("final_int6_roundtrip_exact", "final_int6_sliding_window_exact", "final_int6_ttt_exact")}
    for line in finals.values():
        assert int(field(line, "tokens")) == targets and int(field(line, "bytes")) == decoded_bytes(targets)
    averaged = float(field(lines_starting(lines, "averaged val_loss:")[0], "val_bpb"))
    assert abs(float(field(finals["final_int6_roundtrip_exact"], "val_bpb")) - averaged) < 0.05  # a sane export
    assert any(line.startswith("quant:int8 method:gptq clip:sigma bits:7 rows:8192 ") for line in lines)
    assert run_in_process(tmp_path, tiny_data_8192, RUN_ID="again", EVAL_ONLY="final_model.int6.ptz",
                          **dict(SP8192, TTT_ENABLED="0")) == 0  # TTT's own reproduction: the stack test
    again = log_lines(tmp_path, "again")
    for label in ("final_int6_roundtrip_exact", "final_int6_sliding_window_exact"):
        assert lines_starting(again, label + " ") == [finals[label]]


def test_data_from_another_tokenizer_is_refused(tmp_path, tiny_data_8192):
    with pytest.raises(tg.InputError, match=r"token id \d+ >= VOCAB_SIZE=1024 \(data from another tokenizer\?\)"):
        run_in_process(tmp_path, tiny_data_8192, **SHORT)
    assert list(tmp_path.iterdir()) == []
