"""bench/gpu_check.sh, the one command for a lent GPU, exercised end to end on the CPU (GPU_CHECK_SMOKE=1)."""
import os
import re
import shutil
import subprocess
import sys

from conftest import REPO, TOKENIZER


def test_smoke_mode_runs_both_backends_and_prints_one_table(tmp_path, tiny_data):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    shutil.copy(TOKENIZER, data / "fineweb_1024_bpe.model")
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    env.update(GPU_CHECK_SMOKE="1", GPU_CHECK_DATA=str(data), OUT=str(out), PYTHON=sys.executable,
               CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PATH=f"{os.path.dirname(sys.executable)}:{env['PATH']}")
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert re.search(r"python: 3\.\d+\.\d+  torch: \S+  cuda: None\ndevice: cpu\nflash_attn_interface: not importable",
                     proc.stdout)
    table = (out / "table.txt").read_text().splitlines()
    assert table[0].split() == ["ATTENTION=auto", "ATTENTION=sdpa"]
    rows = {line[:26].strip(): line[26:].split() for line in table[1:]}
    assert rows["attention"] == ["sdpa", "sdpa"]  # no FA3 on this machine: auto falls back
    for key in ("ms/step", "tokens/s", "compile+warmup s", "sliding windows/s/GPU", "full sliding, 8 GPUs, s",
                "export (zstd-22) s"):
        assert all(float(v) > 0 for v in rows[key]), key
    assert all(int(v) > 0 for v in rows["steps"])
    assert (out / "logs" / "gpu_check_auto.txt").is_file() and (out / "versions.txt").is_file()


def test_missing_data_folder_is_one_line(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh")], capture_output=True, text=True,
                          env={**os.environ, "GPU_CHECK_DATA": str(tmp_path / "nowhere")}, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip() == f"gpu_check: no data folder {tmp_path / 'nowhere'}"
