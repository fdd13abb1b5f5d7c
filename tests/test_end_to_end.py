"""train_gpt.py end to end on CPU: training, the artifact and its counted code, final lines, EVAL_ONLY, two ranks,
the warmup undone, the size limit, the summary."""
import hashlib
import re
import sys

import pytest

import train_gpt as tg
from conftest import (REPO, SHORT, build_tiny_dataset, field, lines_starting, log_lines, needs_shared, run_in_process,
                      run_tiny_training)

FINAL = ("final_int6_roundtrip_exact", "final_int6_sliding_window_exact")


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
    assert "replicas:identical ranks:1" in lines
    assert lines_starting(lines, "precision:") == ["precision:fp32 reason:PRECISION=fp32"]
    assert lines_starting(lines, "cpu_threads:") == ["cpu_threads:1 reason:OMP_NUM_THREADS"]
    blob = (tiny_run / "final_model.int6.ptz").read_bytes()
    model_bytes = int(lines_starting(lines, "Serialized model int6+zstd:")[0].split()[3])
    code_bytes = int(lines_starting(lines, "Code size:")[0].split()[2])
    total = int(lines_starting(lines, "Total submission size int6+zstd:")[0].split()[4])
    (code_line,) = lines_starting(lines, "code: source_bytes:")
    assert model_bytes == len(blob) and int(field(code_line, "source_bytes")) == len(code)
    assert code_bytes == int(field(code_line, "wrapper_bytes")) == len(tg.self_extracting(code)) < len(code) / 2
    assert model_bytes + code_bytes == total and not lines_starting(lines, "size_limit:exceeded")
    assert f"artifact:final_model.int6.ptz bytes:{len(blob)} sha256:{hashlib.sha256(blob).hexdigest()}" in lines
    for prefix in FINAL:
        (line,) = lines_starting(lines, prefix)
        assert int(field(line, "tokens")) == 4096 and line.endswith(" subset")  # every target, scored once
    roundtrip = float(field(lines_starting(lines, FINAL[0])[0], "val_loss"))
    assert abs(roundtrip - losses[-1]) < 0.1  # int6 round trip stays close to the (SWA-free) pre-quant loss
    assert lines_starting(lines, "final_int6_sliding_window val_loss:")[0].count("stride:16")
    assert not list(tiny_run.glob("*.tmp"))


def test_the_summary_closes_the_log(tiny_run):
    lines = log_lines(tiny_run)
    summary = lines_starting(lines, "summary: ")
    assert summary[0] == "summary: steps:30 train_time:" + field(summary[0], "train_time") + " stop:iterations"
    bpb = dict(kv.split(":") for kv in summary[1].split()[2:-1])
    assert summary[1].endswith(" subset") and set(bpb) == {"pre_quant", "averaged", "roundtrip", "sliding"}
    assert bpb["sliding"] == field(lines_starting(lines, "final_int6_sliding_window ")[0], "val_bpb")
    model, code = (int(field(lines_starting(lines, "summary: bytes")[0], k)) for k in ("model", "code"))
    assert summary[2] == f"summary: bytes model:{model} code:{code} total:{model + code} limit:16000000 ok"
    assert re.fullmatch(r"summary: budget evaluation:\d+ms = averaged \d+ \+ export \d+ \+ roundtrip \d+ \+ "
                        r"sliding \d+, limit:600000ms on 8 GPUs unchecked \(this run: 1x cpu\)", summary[3])
    train = [line for line in lines if re.match(r"step:\d+/\d+ train_loss", line)]
    assert [field(line, "lr_mul") for line in train[-2:]] == ["1.0000", "0.1000"] and "time_left" not in train[-1]


def test_eval_only_reproduces_the_exact_lines(tiny_run, tiny_data):
    assert run_in_process(tiny_run, tiny_data, RUN_ID="again", EVAL_ONLY="final_model.int6.ptz") == 0
    trained, again = log_lines(tiny_run), log_lines(tiny_run, "again")
    assert lines_starting(again, "eval_only:final_model.int6.ptz") and not lines_starting(again, "step:")
    for prefix in FINAL + ("Serialized model int6+zstd:", "Total submission size"):
        assert lines_starting(again, prefix) == lines_starting(trained, prefix)


def test_the_self_extracting_wrapper_is_the_script(tiny_run, tiny_data, tmp_path):
    """The counted form runs as the script: trained from the wrapper, the tiny run's artifact (byte for byte) and
    exact lines come back, and the wrapper's own EVAL_ONLY re-scores them; it counts itself and its log embeds the
    source it runs (the counted one)."""
    wrapper = tmp_path / "train_gpt.py"
    wrapper.write_bytes(tg.self_extracting((REPO / "train_gpt.py").read_bytes()))
    assert run_in_process(tmp_path, tiny_data, script=wrapper) == 0
    assert run_in_process(tmp_path, tiny_data, script=wrapper, RUN_ID="again", EVAL_ONLY="final_model.int6.ptz") == 0
    for run_id in ("tiny", "again"):
        lines = log_lines(tmp_path, run_id)
        for prefix in FINAL:
            assert lines_starting(lines, prefix) == lines_starting(log_lines(tiny_run), prefix)
        assert lines_starting(lines, "Code size:") == [f"Code size: {wrapper.stat().st_size} bytes"]
    assert lines_starting(log_lines(tmp_path), "artifact:") == lines_starting(log_lines(tiny_run), "artifact:")
    counted = tg.counted_source((REPO / "train_gpt.py").read_bytes())
    assert (tmp_path / "logs" / "again.txt").read_bytes().startswith(counted)


def test_two_ranks_equal_one_rank_with_twice_the_accumulation(tmp_path, tiny_run, tiny_data):
    run_tiny_training(tmp_path, nproc=2, data=tiny_data)
    one, two = log_lines(tiny_run), log_lines(tmp_path)
    assert lines_starting(two, "world_size:2 grad_accum_steps:4")
    assert lines_starting(one, "world_size:1 grad_accum_steps:8")
    a, b = val_losses(one), val_losses(two)
    assert a[0] == b[0]  # same initial weights, same validation split across ranks
    assert max(abs(x - y) for x, y in zip(a, b)) < 0.02  # same data; only bf16 summation order differs
    assert "replicas:identical ranks:2" in two
    for prefix in FINAL:
        x, y = (lines_starting(lines, prefix)[0] for lines in (one, two))
        assert field(x, "tokens") == field(y, "tokens") and field(x, "bytes") == field(y, "bytes")


def test_compile_warmup_is_fully_undone(tmp_path, tiny_run, tiny_data):
    """WARMUP_STEPS trains real steps, then restores weights, optimizer state and data position exactly."""
    assert run_in_process(tmp_path, tiny_data, WARMUP_STEPS="0", ITERATIONS="15") == 0

    def early(lines):  # steps 0-7: lr_mul is still 1 with either ITERATIONS (warmdown is the last 10 steps)
        return [re.sub(r"/\d+ ", " ", line.split(" train_time")[0]) for line in lines
                if re.match(r"step:[0-7]/\d+ (val|train)_loss", line)]

    assert len(early(log_lines(tiny_run))) == 8
    assert early(log_lines(tiny_run)) == early(log_lines(tmp_path))  # bit-identical losses


def test_over_the_size_limit_is_loud_and_fails(tiny_run, tiny_data, monkeypatch):
    monkeypatch.setattr(tg, "SIZE_LIMIT_BYTES", 100_000)  # below the tiny artifact
    assert run_in_process(tiny_run, tiny_data, RUN_ID="oversize", EVAL_ONLY="final_model.int6.ptz") == 1
    lines = log_lines(tiny_run, "oversize")
    (over,) = lines_starting(lines, "size_limit:exceeded")
    total = int(lines_starting(lines, "Total submission size int6+zstd:")[0].split()[4])
    assert over == f"size_limit:exceeded total:{total} limit:100000 over_by:{total - 100_000}"
    assert all(lines_starting(lines, prefix) for prefix in FINAL)  # the evaluations still ran
    assert lines_starting(lines, "summary: bytes")[0].endswith(" exceeded")


@needs_shared
def test_short_uncapped_runs_warn_and_full_validation_is_not_a_subset(tmp_path):
    data = build_tiny_dataset(tmp_path / "data", val_docs=2)  # a small validation set, scored whole
    assert run_in_process(tmp_path, data, ITERATIONS="4", WARMUP_STEPS="0", VAL_LOSS_EVERY="0",
                          EVAL_STRIDE="0", VAL_MAX_TOKENS="0") == 0
    lines = log_lines(tmp_path)
    assert "warning: WARMDOWN_ITERS=10 > ITERATIONS=4: the learning rate starts at 0.400 of its value and only " \
           "decays" in lines
    finals = lines_starting(lines, "final_int6_")
    assert len(finals) == 2 and not any("subset" in line for line in finals)  # EVAL_STRIDE=0: no sliding eval
    assert int(field(finals[1], "tokens")) > 4096 and not lines_starting(lines, "val_subset:")


def test_precision_fp32_runs_without_autocast(tmp_path, tiny_data):
    """PRECISION=fp32 (what auto picks on a CPU without native bf16) trains the same model as bf16, within bf16's
    rounding; the log says which precision ran and why."""
    for precision in ("bf16", "fp32"):
        assert run_in_process(tmp_path / precision, tiny_data, PRECISION=precision, **SHORT) == 0
    lines = {p: log_lines(tmp_path / p) for p in ("bf16", "fp32")}
    assert "precision:fp32 reason:PRECISION=fp32" in lines["fp32"]
    bf16, fp32 = (float(field(lines_starting(lines[p], FINAL[0])[0], "val_loss")) for p in ("bf16", "fp32"))
    assert bf16 != fp32 and abs(bf16 - fp32) < 0.02
    assert tg.choose_precision("auto", cuda=True) == (tg.torch.bfloat16, "CUDA")
    native = tg.torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert tg.choose_precision("auto", cuda=False)[0] == (tg.torch.bfloat16 if native else tg.torch.float32)


def test_cpu_threads_are_omp_num_threads_or_one_per_process_on_cpu():
    """The policy (docs/BENCHMARKS.md has the measurements behind it); a bad OMP_NUM_THREADS is in test_run_ux."""
    assert tg.choose_cpu_threads({}, cuda=False) == (1, "one per process on CPU (set OMP_NUM_THREADS for more)")
    assert tg.choose_cpu_threads({"OMP_NUM_THREADS": "3"}, cuda=False) == (3, "OMP_NUM_THREADS")
    assert tg.choose_cpu_threads({"OMP_NUM_THREADS": " 4,2 "}, cuda=True) == (4, "OMP_NUM_THREADS")  # nested levels
    assert tg.choose_cpu_threads({"OMP_NUM_THREADS": ""}, cuda=True) == (None, "torch's default (CUDA run)")


def test_missing_or_old_zstandard_is_an_error_not_a_fallback(tmp_path, tiny_data, monkeypatch):
    import types

    monkeypatch.setitem(sys.modules, "zstandard", None)  # makes `import zstandard` raise ImportError
    with pytest.raises(tg.InputError, match=r"zstandard package \(>= 0.22\) is required"):
        run_in_process(tmp_path, tiny_data)
    assert list(tmp_path.iterdir()) == []  # refused before training, nothing written
    monkeypatch.setitem(sys.modules, "zstandard", types.SimpleNamespace(__version__="0.21.0"))
    with pytest.raises(tg.InputError, match=r"zstandard package \(>= 0.22\) is required"):
        tg.compressor()
