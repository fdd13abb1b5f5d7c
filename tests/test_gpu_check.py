"""bench/gpu_check.sh, the one command for a lent GPU, end to end on the CPU (GPU_CHECK_SMOKE=1), with a stand-in
nvidia-smi that lists two GPUs so that the several-GPU section (torchrun on 2 processes) runs too."""
import os
import shutil
import subprocess
import sys

import train_gpt as tg
from conftest import REPO, TOKENIZER, TOKENIZER_8192


def fake_nvidia_smi(folder, gpus: int):
    folder.mkdir()
    listing = "".join(f'echo "GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i})"\n' for i in range(gpus))
    (folder / "nvidia-smi").write_text(f"#!/bin/sh\n{listing}")
    (folder / "nvidia-smi").chmod(0o755)
    return folder


def environment(tmp_path, gpus: int, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    path = f"{fake_nvidia_smi(tmp_path / 'bin', gpus)}:{os.path.dirname(sys.executable)}:{env['PATH']}"
    env.update(PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PATH=path, **extra)
    return env


def test_smoke_mode_runs_one_and_all_gpus_the_stacks_the_profile_and_the_ab_runs(tmp_path, tiny_data):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    shutil.copy(TOKENIZER, data / "fineweb_1024_bpe.model")
    shutil.copy(TOKENIZER_8192, data / "fineweb_8192_bpe.model")
    out = tmp_path / "out"
    env = environment(tmp_path, 2, GPU_CHECK_SMOKE="1", GPU_CHECK_DATA=str(data), OUT=str(out), GPU_CHECK_MIX="1")
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.startswith("gpus: 2 (nvidia-smi -L)\n")
    versions = (out / "versions.txt").read_text()
    for line in ("flash_attn_interface: not importable", "flash_attn.cute: not importable", "cudnn: ",
                 "inductor mix_order_reduction: 1"):
        assert line in versions, line
    table = (out / "table.txt").read_text().splitlines()
    # the torch that was measured; one GPU, all GPUs, the two frontier stacks at tiny shapes (their flags, loops,
    # GPTQ, brotli; SP8192 with document-isolated scoring and phased LoRA TTT), then the A/B runs: the other backend
    # the CPU has (math), Inductor's mix_order_reduction off (forced here: it is measured on torch 2.11 only), and
    # each flag waiting for a GPU's verdict
    assert table[0].split() == ["torch", tg.torch.__version__, "auto_x1", "auto_x2", "sp1024", "sp8192", "ab_math",
                                "ab_mix0", "ab_muon_sharded", "ab_fused_ce"]
    rows = {line[:26].strip(): line[26:].split() for line in table[1:]}
    assert rows["attention"] == ["flash"] * 4 + ["math"] + ["flash"] * 3
    assert rows["processes"] == ["1", "2"] + ["1"] * 6
    for key in ("steps", "ms/step", "tokens/s", "compile+warmup s", "export s", "artifact bytes"):
        assert all(float(v) > 0 for v in rows[key]), key
    for key in ("sliding windows/s/GPU", "full sliding, 8 GPUs, s"):  # SP8192 scores as the records: no sliding
        assert rows[key][3] == "-" and all(float(v) > 0 for v in rows[key][:3] + rows[key][4:]), key
    for key in ("DOCS_EVAL s (slice)", "LoRA TTT s (slice)"):  # the SP8192 stack's evaluation, timed
        assert float(rows[key][3]) > 0 and rows[key][:3] + rows[key][4:] == ["-"] * 7, key
    assert rows["peak alloc MiB"] == ["-"] * 8  # no CUDA memory on the CPU
    assert rows["GPTQ calibration s"][:2] == ["-", "-"] and all(float(v) > 0 for v in rows["GPTQ calibration s"][2:4])
    stack_logs = {name: (out / "logs" / f"gpu_check_{name}.txt").read_text() for name in ("sp1024", "sp8192")}
    assert all("hparam QUANT_METHOD=gptq" in log and "\nwarmup:eval ms:" in log for log in stack_logs.values())
    assert "\nwarmup:train loop_passes:1 ms:" in stack_logs["sp1024"]
    assert "\nfinal_int6_lora_ttt_exact" in stack_logs["sp8192"] and "\nfinal_int6_sliding" not in stack_logs["sp8192"]
    for name, flag in [("muon_sharded", "MUON_SHARDED=True"), ("fused_ce", "FUSED_CE=True")]:
        assert f"hparam {flag}" in (out / "logs" / f"gpu_check_ab_{name}.txt").read_text()
    assert "gpu_check: ab_mix0: with TORCHINDUCTOR_MIX_ORDER_REDUCTION=0 this torch has mix_order_reduction:0 (-1: " \
        in proc.stdout  # the switch reaches Inductor
    assert (out / "logs" / "gpu_check_auto_x2.txt").is_file()
    profile = (out / "profile.txt").read_text()
    assert "profile_step: 2 steps of 1024 tokens on 1x cpu" in profile and "\nhost gaps " in profile
    assert (out / "profile_trace.json.gz").stat().st_size > 0
    assert "\nattention bwd " in proc.stdout  # the profile's table is printed after the runs' table
    parts = (out / "parts.txt").read_text()
    for part, forms in [("muon", ("round_robin", "sharded")), ("loss", ("plain", "fused"))]:
        assert f"parts_time: {part} on 1x cpu, torch {tg.torch.__version__}, precision " in parts
        assert all(f"\n{form} " in parts and f"\n{form} " in proc.stdout for form in forms)
    assert proc.stdout.splitlines()[-1].startswith("gpu_check: ") and "failed" not in proc.stdout.splitlines()[-1]


def test_ab_runs_that_do_not_fit_the_budget_are_skipped_and_said(tmp_path, tiny_data):
    """The budget holds: with no time left after the main run, the stacks, the profile and the A/B runs are
    skipped, each saying so (SP8192 also without its tokenizer), and the table of what ran still comes back."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    shutil.copy(TOKENIZER, data / "fineweb_1024_bpe.model")
    out = tmp_path / "out"
    env = environment(tmp_path, 1, GPU_CHECK_SMOKE="1", GPU_CHECK_DATA=str(data), OUT=str(out), GPU_CHECK_MIX="0",
                      GPU_CHECK_BUDGET="200", GPU_CHECK_PROFILE_COST="1000", GPU_CHECK_AB_COST="1000",
                      GPU_CHECK_STACK_COST="1000", GPU_CHECK_PARTS_COST="1000")
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "gpu_check: profile skipped: " in proc.stdout and "it needs ~1000 s" in proc.stdout
    assert "gpu_check: parts skipped: " in proc.stdout and "they need ~1000 s" in proc.stdout
    assert "gpu_check: ab_math skipped: " in proc.stdout and "mix_order_reduction A/B not run" in proc.stdout
    assert "gpu_check: sp1024 skipped: " in proc.stdout and "a stack run needs ~1000 s" in proc.stdout
    assert "gpu_check: sp8192 skipped: " in proc.stdout and "has no *8192*.model" in proc.stdout
    assert "gpu_check: ab_muon_sharded skipped: " in proc.stdout and "gpu_check: ab_fused_ce skipped: " in proc.stdout
    assert (out / "table.txt").read_text().splitlines()[0].split()[2:] == ["auto_x1"]


def test_missing_data_folder_is_one_line(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh")], capture_output=True, text=True, timeout=60,
                          env=environment(tmp_path, 1, GPU_CHECK_DATA=str(tmp_path / "nowhere")))
    assert proc.returncode == 2 and proc.stderr.strip() == f"gpu_check: no data folder {tmp_path / 'nowhere'}"
    assert proc.stdout == "gpus: 1 (nvidia-smi -L)\n"  # one GPU: no several-GPU section would run
