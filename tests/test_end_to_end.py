"""train_gpt.py through torchrun on CPU: training, artifact, final lines, EVAL_ONLY, 2 ranks, bad input."""
import os
import re
import subprocess
import sys

import pytest

import train_gpt as tg
from conftest import REPO, TINY_ENV, TOKENIZER, field, log_lines, run_tiny_training

FINAL = ("final_int6_roundtrip_exact", "final_int6_sliding_window_exact")


def small_tokenizer(folder, vocab_size: int):
    import json

    import sentencepiece as spm

    from conftest import DOCS

    folder.mkdir(exist_ok=True)
    texts = [json.loads(line)["text"] for line in DOCS.read_text(encoding="utf-8").splitlines()[:50]]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(folder / "sp"),
                                   model_type="bpe", vocab_size=vocab_size, byte_fallback=True, minloglevel=2)
    return folder / "sp.model"


def lines_starting(lines, prefix):
    return [line for line in lines if line.startswith(prefix)]


def val_losses(lines):
    return [float(field(line, "val_loss")) for line in lines if re.match(r"step:\d+/\d+ val_loss", line)]


def test_tiny_run_learns_and_reports_everything(tiny_run):
    lines = log_lines(tiny_run)
    text = (tiny_run / "logs" / "tiny.txt").read_bytes()
    code = (REPO / "train_gpt.py").read_bytes()
    assert text.startswith(code) and text[len(code):].startswith(b"=" * 100 + b"\n")
    for name in tg.HPARAM_NAMES:
        assert any(line.startswith(f"hparam {name}=") for line in lines)
    losses = val_losses(lines)
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.3  # steps 0, 15, 30
    assert lines_starting(lines, "swa:start step:") and lines_starting(lines, "swa:applying averaged")
    assert lines_starting(lines, "val_subset:VAL_MAX_TOKENS=4096")
    model_bytes = int(lines_starting(lines, "Serialized model int6+zstd:")[0].split()[3])
    code_bytes = int(lines_starting(lines, "Code size:")[0].split()[2])
    total = int(lines_starting(lines, "Total submission size int6+zstd:")[0].split()[4])
    assert model_bytes == (tiny_run / "final_model.int6.ptz").stat().st_size
    (code_line,) = lines_starting(lines, "code: source_bytes:")
    assert int(field(code_line, "source_bytes")) == len(code)
    assert code_bytes == int(field(code_line, "wrapper_bytes")) == len(tg.self_extracting(code)) < len(code) / 2
    assert model_bytes + code_bytes == total
    assert not lines_starting(lines, "size_limit:exceeded")
    for prefix in FINAL:
        (line,) = lines_starting(lines, prefix)
        assert int(field(line, "tokens")) == 4096  # every validation target, scored once
    roundtrip = float(field(lines_starting(lines, FINAL[0])[0], "val_loss"))
    assert abs(roundtrip - losses[-1]) < 0.1  # int6 round trip stays close to the (SWA-free) pre-quant loss
    assert lines_starting(lines, "final_int6_sliding_window val_loss:")[0].count("stride:16")
    assert lines_starting(lines, "post_training_time:")
    assert not list(tiny_run.glob("*.tmp"))


def test_eval_only_reproduces_the_exact_lines(tiny_run, tiny_data):
    run_tiny_training(tiny_run, data=tiny_data, RUN_ID="again", EVAL_ONLY="final_model.int6.ptz")
    trained, again = log_lines(tiny_run), log_lines(tiny_run, "again")
    assert lines_starting(again, "eval_only:final_model.int6.ptz")
    assert not lines_starting(again, "step:")
    for prefix in FINAL + ("Serialized model int6+zstd:", "Total submission size"):
        assert lines_starting(again, prefix) == lines_starting(trained, prefix)


def test_two_ranks_equal_one_rank_with_twice_the_accumulation(tmp_path, tiny_run, tiny_data):
    run_tiny_training(tmp_path, nproc=2, data=tiny_data)
    one, two = log_lines(tiny_run), log_lines(tmp_path)
    assert lines_starting(two, "world_size:2 grad_accum_steps:4")
    assert lines_starting(one, "world_size:1 grad_accum_steps:8")
    a, b = val_losses(one), val_losses(two)
    assert a[0] == b[0]  # same initial weights, same validation split across ranks
    assert max(abs(x - y) for x, y in zip(a, b)) < 0.02  # same data; only bf16 summation order differs
    for prefix in FINAL:
        x, y = (lines_starting(lines, prefix)[0] for lines in (one, two))
        assert field(x, "tokens") == field(y, "tokens") and field(x, "bytes") == field(y, "bytes")


def test_compile_warmup_is_fully_undone(tmp_path, tiny_run, tiny_data):
    """WARMUP_STEPS trains real steps, then restores weights, optimizer state and data position exactly."""
    run_tiny_training(tmp_path, data=tiny_data, WARMUP_STEPS="0", ITERATIONS="15")

    def early(lines):  # steps 0-7: lr_mul is still 1 with either ITERATIONS (warmdown is the last 10 steps)
        return [re.sub(r"/\d+ ", " ", l.split(" train_time")[0]) for l in lines
                if re.match(r"step:[0-7]/\d+ (val|train)_loss", l)]

    assert len(early(log_lines(tiny_run))) == 8
    assert early(log_lines(tiny_run)) == early(log_lines(tmp_path))  # bit-identical losses


def run_main_in_process(monkeypatch, workdir, tiny_data, **env):
    monkeypatch.chdir(workdir)
    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    full = {**TINY_ENV, "DATA_PATH": str(tiny_data), "TOKENIZER_PATH": str(TOKENIZER), **env}
    monkeypatch.setattr(os, "environ", {**os.environ, **full})
    return tg.main()


def test_over_the_size_limit_is_loud_and_fails(tiny_run, tiny_data, monkeypatch):
    """In-process, with the limit lowered below the tiny artifact's size."""
    monkeypatch.setattr(tg, "SIZE_LIMIT_BYTES", 100_000)
    assert run_main_in_process(monkeypatch, tiny_run, tiny_data, RUN_ID="oversize",
                               EVAL_ONLY="final_model.int6.ptz") == 1
    lines = log_lines(tiny_run, "oversize")
    (over,) = lines_starting(lines, "size_limit:exceeded")
    total = int(lines_starting(lines, "Total submission size int6+zstd:")[0].split()[4])
    assert over == f"size_limit:exceeded total:{total} limit:100000 over_by:{total - 100_000}"
    assert all(lines_starting(lines, prefix) for prefix in FINAL)  # the evaluations still ran


@pytest.mark.parametrize("env, message", [
    ({"NUM_LAYERS": "eleven"}, "NUM_LAYERS='eleven' is not a valid int"),
    ({"TRAIN_BATCH_TOKENS": "1000"}, "TRAIN_BATCH_TOKENS=1000 must split into"),
    ({"TOKENIZER_PATH": "nowhere.model"}, "TOKENIZER_PATH=nowhere.model"),
    ({"VOCAB_SIZE": "2048"}, "VOCAB_SIZE=2048"),
    ({"TRAIN_FILES": "nothing_*.bin"}, "TRAIN_FILES=nothing_*.bin: no files match"),
    ({"EVAL_ONLY": "missing.ptz"}, "EVAL_ONLY=missing.ptz: no such artifact file"),
    ({"NUM_KV_HEADS": "3"}, "must be a multiple of NUM_KV_HEADS=3"),
    ({"VOCAB_SIZE": "512", "TOKENIZER_PATH": "SMALL"}, ">= VOCAB_SIZE=512 (data from another tokenizer?)"),
    ({"EMA_DECAY": "1"}, "EMA_DECAY=1.0 must lie in [0, 1)"),
    ({"ROPE_DIMS": "7"}, "ROPE_DIMS=7 must be 0 (whole head) or even in [2, head dim 16]"),
    ({"ATTENTION": "fa3"}, "ATTENTION=fa3: FlashAttention-3 is unusable (flash_attn_interface is not installed)"),
    ({"QUANT_METHOD": "gptq", "MAX_WALLCLOCK_SECONDS": "5", "GPTQ_RESERVE_SECONDS": "5"}, "GPTQ_RESERVE_SECONDS=5.0"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, tiny_data, env, message):
    if env.get("TOKENIZER_PATH") == "SMALL":  # a real 512-piece tokenizer, so only the data disagrees
        env["TOKENIZER_PATH"] = str(small_tokenizer(tmp_path.parent / "sp512", 512))
    full = {**os.environ, **TINY_ENV, "DATA_PATH": str(tiny_data), "TOKENIZER_PATH": str(TOKENIZER), **env}
    proc = subprocess.run([sys.executable, str(REPO / "train_gpt.py")], cwd=tmp_path, env=full,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {proc.stderr.strip()[7:]}"] and message in proc.stderr
    assert list(tmp_path.iterdir()) == []  # no log, no artifact


def test_stride_zero_skips_the_sliding_eval(tiny_run, tiny_data, monkeypatch):
    assert run_main_in_process(monkeypatch, tiny_run, tiny_data, RUN_ID="nostride", EVAL_STRIDE="0",
                               EVAL_ONLY="final_model.int6.ptz") == 0
    lines = log_lines(tiny_run, "nostride")
    assert lines_starting(lines, "final_int6_roundtrip_exact") == lines_starting(log_lines(tiny_run), FINAL[0])
    assert not lines_starting(lines, "final_int6_sliding_window")


def test_missing_zstandard_is_an_error_not_a_fallback(tmp_path, tiny_data, monkeypatch):
    monkeypatch.setitem(sys.modules, "zstandard", None)  # makes `import zstandard` raise ImportError
    with pytest.raises(tg.InputError, match=r"zstandard package \(>= 0.22\) is required"):
        run_main_in_process(monkeypatch, tmp_path, tiny_data)
    assert list(tmp_path.iterdir()) == []  # refused before training, nothing written


def test_zstandard_too_old_for_multi_frame_artifacts_is_an_error(monkeypatch):
    import types

    monkeypatch.setitem(sys.modules, "zstandard", types.SimpleNamespace(__version__="0.21.0"))
    with pytest.raises(tg.InputError, match=r"zstandard package \(>= 0.22\) is required"):
        tg.compressor()
