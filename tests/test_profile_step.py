"""bench/profile_step.py: where a training step's time goes. A real tiny run on the CPU (its table's rows, that they
add up to the step the tool timed, that each kind of work lands in its category), the classification of a CUDA
trace (kernels attributed through the ops that launched them, overlap, idle time), and its input errors."""
from __future__ import annotations

import gzip
import json
import subprocess
import sys

import pytest

from conftest import REPO, TOKENIZER

sys.path.insert(0, str(REPO / "bench"))
import profile_step as ps  # noqa: E402

TOOL = REPO / "bench" / "profile_step.py"
TINY = ["NUM_LAYERS=2", "MODEL_DIM=64", "NUM_HEADS=4", "NUM_KV_HEADS=2", "MLP_MULT=2", "BIGRAM_VOCAB_SIZE=64",
        "BIGRAM_DIM=16", "XSA_LAST_N=1", "TRAIN_SEQ_LEN=64", "EVAL_SEQ_LEN=64", "TRAIN_BATCH_TOKENS=1024",
        "WARMUP_STEPS=1", "COMPILE=0", "RUN_ID=profile"]


def rows_of(stdout: str) -> dict[str, list[float]]:
    start = stdout.splitlines().index(next(ln for ln in stdout.splitlines() if ln.startswith("category ")))
    rows = {}
    for line in stdout.splitlines()[start + 1:]:
        if line.startswith("wall per step"):
            break
        name, ms, share = line[:24].strip(), float(line[24:36]), float(line[36:])
        rows[name] = [ms, share]
    return rows


def test_a_tiny_cpu_run_gives_a_table_that_adds_up(tmp_path, tiny_data):
    trace = tmp_path / "trace.json.gz"
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(TOOL), "--skip", "2", "--steps", "2", "--trace", str(trace), "--",
                           f"TRAIN_FILES={tiny_data}/fineweb_train_*.bin", f"VAL_FILES={tiny_data}/fineweb_val_*.bin",
                           f"TOKENIZER_PATH={TOKENIZER}", *TINY], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    header = next(ln for ln in proc.stdout.splitlines() if ln.startswith("profile_step:"))
    assert header.startswith("profile_step: 2 steps of 1024 tokens on 1x cpu (cpu timeline), torch ")
    assert "attention flash, compile 0" in header  # what train_gpt's own start-up chose
    rows = rows_of(proc.stdout)
    assert list(rows) == list(ps.CATEGORIES) + ["host gaps", "overlap", "step (profiled)"]
    step = rows.pop("step (profiled)")[0]
    assert sum(ms for ms, _ in rows.values()) == pytest.approx(step, abs=0.01)  # the rows add up to the step
    assert sum(share for _, share in rows.values()) == pytest.approx(100, abs=0.5)
    wall = next(ln for ln in proc.stdout.splitlines() if ln.startswith("wall per step, synced: "))
    measured = float(wall.split()[4])
    assert step == pytest.approx(measured, rel=0.05)  # the trace's window is the step the tool timed
    for name in ("attention fwd", "attention bwd", "matmul", "norm/elementwise", "optimizer", "other", "host gaps"):
        assert rows[name][0] > 0, name  # each kind of work of a training step is found
    assert rows["communication"][0] == 0 and abs(rows["overlap"][0]) < 0.01  # one process, one thread
    events = json.load(gzip.open(trace, "rt"))["traceEvents"]
    assert [e["name"] for e in events if e.get("cat") == "user_annotation" and e["name"] == ps.WINDOW] == [ps.WINDOW]
    assert any(e.get("name", "").startswith("Optimizer.step#Muon.step") for e in events)
    assert (tmp_path / "logs" / "profile.txt").is_file()  # train_gpt's own log of the run, its probe line in it
    assert any(ln.startswith("attention_probe:flash err_out:") for ln in
               (tmp_path / "logs" / "profile.txt").read_text().splitlines())


def event(name, ts, dur, cat="kernel", ext=None, tid=1):
    e = {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid, "pid": 1}
    if ext is not None:
        e["args"] = {"External id": ext}
    return e


def test_a_cuda_trace_is_attributed_by_kernel_and_launching_op():
    trace = {"traceEvents": [
        event(ps.WINDOW, 0, 1000, "user_annotation"),
        event("aten::linear", 5, 20, "cpu_op", ext=1), event("aten::mm", 10, 10, "cpu_op", ext=2),
        event("aten::_scaled_dot_product_flash_attention", 30, 10, "cpu_op", ext=3),
        event("autograd::engine::evaluate_function: ScaledDotProductFlashAttentionBackward0", 50, 20, "cpu_op",
              ext=4, tid=2),
        event("aten::fill_", 55, 5, "cpu_op", ext=5, tid=2),  # a generic kernel inside the attention backward
        event("Optimizer.step#Muon.step", 600, 200, "user_annotation", ext=6),
        event("aten::mm", 610, 10, "cpu_op", ext=7),  # Newton-Schulz: a matmul, but the optimizer's
        event("nvjet_tst_128x64", 100, 100, ext=2),  # matmul, by its name
        event("pytorch_flash::flash_fwd_kernel", 300, 100, ext=3),  # attention forward
        event("void at::native::vectorized_elementwise_kernel", 400, 50, ext=5),  # attention bwd, by its launcher
        event("flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel", 450, 50),  # attention bwd, by its name
        event("ncclDevKernel_AllReduce_Sum_bf16_RING_LL", 470, 100),  # communication, 30 us beside the backward
        event("sm90_xmma_gemm_bf16bf16_bf16f32", 650, 50, ext=7),  # optimizer
        event("triton_red_fused__rms_norm_backward_0", 700, 50),  # norm/elementwise
        event("Memcpy HtoD (Pageable -> Device)", 900, 20, "gpu_memcpy"),  # other
        event("triton_poi_fused_add_1", 990, 110),  # 10 us of it inside the window
    ]}
    s = ps.summarise_trace(trace)
    assert s["device"] == "cuda" and s["window_us"] == 1000
    assert s["totals_us"] == {"attention fwd": 100, "attention bwd": 100, "matmul": 100, "norm/elementwise": 60,
                              "optimizer": 50, "communication": 100, "other": 20}
    assert s["covered_us"] == 100 + 100 + 50 + 50 + 70 + 50 + 50 + 20 + 10 and s["overlap_us"] == 30
    lines = ps.table(s, steps=2, measured_ms=0.5, plain_ms=0.4)
    rows = {ln[:24].strip(): float(ln[24:36]) for ln in lines[1:-1]}
    assert rows["host gaps"] == pytest.approx((1000 - 500) / 2000) and rows["overlap"] == -0.015
    assert sum(v for k, v in rows.items() if k != "step (profiled)") == pytest.approx(rows["step (profiled)"]) == 0.5


def test_names_land_in_their_categories():
    for name, expected in [("aten::_scaled_dot_product_flash_attention_for_cpu_backward", "attention bwd"),
                           ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_3", "attention bwd"),
                           ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", "attention fwd"),
                           ("fmha_cutlassB_bf16_aligned_64x64_k64_sm80", "attention bwd"),
                           ("void flash::FlashAttnFwdSm90<cutlass::bfloat16_t>", "attention fwd"),
                           ("AddmmBackward0", "matmul"), ("aten::bmm", "matmul"),
                           ("aten::_foreach_norm", "optimizer"), ("aten::_fused_adamw_", "optimizer"),
                           ("gloo:all_reduce", "communication"), ("aten::_to_copy", "other"),
                           ("aten::topk", None), ("aten::mul", None)]:
        assert ps.category(name) == expected, name


@pytest.mark.parametrize("argv, message", [
    (["--trace", "t.json"], "error: --trace=t.json: expected a path ending in .json.gz"),
    (["--steps", "0"], "error: --steps=0 and --skip=10 must be at least 1"),
    (["--", "NUM_LAYER=3"], "error: 'NUM_LAYER=3': expected NAME=VALUE, NAME one of train_gpt.py's hyperparameters"),
    (["--", "EVAL_ONLY=final_model.int6.ptz"], "error: EVAL_ONLY: there is no training to profile"),
])
def test_bad_input_is_one_line(monkeypatch, capsys, argv, message):
    monkeypatch.setenv("EVAL_ONLY", "")  # put back afterwards, whatever the tool sets
    assert ps.main(argv) == 2
    assert capsys.readouterr().err == message + "\n"


def test_help_names_the_categories():
    proc = subprocess.run([sys.executable, str(TOOL), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "host gaps" in proc.stdout and "--steps" in proc.stdout
