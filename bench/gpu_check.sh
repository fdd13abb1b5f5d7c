#!/usr/bin/env bash
# The one command for a session with a GPU (docs/BENCHMARKS.md gives the exact `device` call):
#   versions (python, torch, CUDA, GPU, FlashAttention-3), then the default (seed) configuration under
#   torch.compile for a short wall-clock cap with the attention backend the script picks (ATTENTION=auto), again
#   with ATTENTION=sdpa when FA3 is present, and, when the machine has several GPUs (nvidia-smi -L), once more on
#   all of them (torchrun on 2, 4 or 8: the most that is a power of two, as the batch split needs). One table at the
#   end, read from the logs by records/runlog.py: ms/step, tokens/s, MFU, peak memory, compile (warmup) and export
#   time, the sliding eval's rate on the validation slice, extrapolated to the full validation set on 8 GPUs, and in
#   its header the torch version that was measured. Fits in 9 minutes on one H100/H200.
#
#   bash bench/gpu_check.sh                     # data in $GPU_CHECK_DATA (default scratch/gpu), see below
#   GPU_CHECK_SMOKE=1 bash bench/gpu_check.sh   # the same path on the CPU at a tiny configuration
#
# $GPU_CHECK_DATA holds *train_*.bin (or .bin.xz, unpacked here), *val_*.bin and one SentencePiece *.model.
# Wheels in $GPU_CHECK_WHEELS (default scratch/wheels) are installed first when zstandard is missing.
# GPU_CHECK_FULL_VAL_TARGETS: targets of the full validation set for the extrapolation (default: sp1024's
# 62021632, the tokenizer this check runs; SP8192's set has 40540160).
# Logs and the table go to $OUT when set (the device tool brings that folder back), else scratch/gpu_check.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
gpus=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU ' || true)
echo "gpus: $gpus (nvidia-smi -L)"
fail() { echo "gpu_check: $1" >&2; exit 2; }
data=$(cd "${GPU_CHECK_DATA:-scratch/gpu}" 2>/dev/null && pwd) || fail "no data folder ${GPU_CHECK_DATA:-scratch/gpu}"
work=${OUT:-$repo/scratch/gpu_check}
mkdir -p "$work"
smoke=${GPU_CHECK_SMOKE:-0}
py=${PYTHON:-python3}

if ! "$py" -c "import zstandard" 2>/dev/null; then
  wheels=${GPU_CHECK_WHEELS:-scratch/wheels}
  ls "$wheels"/*.whl >/dev/null 2>&1 || fail "zstandard is missing and $wheels holds no wheels"
  "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu_check_site "$wheels"/*.whl
  export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
fi
for xz in "$data"/*train_*.bin.xz; do
  [[ -e $xz && ! -e ${xz%.xz} ]] && xz -dk "$xz"
done
train=$(ls "$data"/*train_*.bin 2>/dev/null | head -n 1) || true
val=$(ls "$data"/*val_*.bin 2>/dev/null | head -n 1) || true
model=$(ls "$data"/*.model 2>/dev/null | head -n 1) || true
[[ -n $train && -n $val && -n $model ]] || fail "$data needs *train_*.bin, *val_*.bin and a *.model"

{
  echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
  "$py" - <<'PY'
import platform, torch
print(f"python: {platform.python_version()}  torch: {torch.__version__}  cuda: {torch.version.cuda}")
print(f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}")
try:
    import flash_attn_interface  # noqa: F401
    print("flash_attn_interface: importable")
except ImportError as e:
    print(f"flash_attn_interface: not importable ({e})")
PY
} | tee "$work/versions.txt"

common=(TRAIN_FILES="$data/*train_*.bin" VAL_FILES="$data/*val_*.bin" TOKENIZER_PATH="$model")
if [[ $smoke == 1 ]]; then
  seconds=1
  common+=(NUM_LAYERS=2 MODEL_DIM=64 NUM_HEADS=4 NUM_KV_HEADS=2 MLP_MULT=2 BIGRAM_VOCAB_SIZE=64 BIGRAM_DIM=16
           XSA_LAST_N=1 TRAIN_SEQ_LEN=64 EVAL_SEQ_LEN=64 EVAL_STRIDE=16 TRAIN_BATCH_TOKENS=1024 VAL_BATCH_SIZE=8192
           VAL_MAX_TOKENS=4096 WARMUP_STEPS=2 WARMDOWN_ITERS=5 COMPILE=0)
  runs=(auto:1)
else
  seconds=${GPU_CHECK_SECONDS:-60}
  runs=(auto:1)
  "$py" -c "import flash_attn_interface" 2>/dev/null && runs+=(sdpa:1)
fi
for n in 8 4 2; do  # every GPU the machine has, as the largest power of two (the batch splits into 8 / n steps)
  if ((gpus >= n)); then runs+=("auto:$n"); break; fi
done

names=()
for run in "${runs[@]}"; do
  attention=${run%:*} nproc=${run#*:}
  name="${attention}_x$nproc" cap=$seconds
  [[ $attention == sdpa && $smoke != 1 ]] && cap=${GPU_CHECK_SDPA_SECONDS:-40}
  echo "== run ATTENTION=$attention on $nproc process(es), $cap s of training =="
  (cd "$work" && "$py" "$repo/bench/bench.py" --seconds "$cap" --nproc "$nproc" --run-id "gpu_check_$name" -- \
      "${common[@]}" ATTENTION="$attention") > "$work/bench_$name.txt" 2>&1 \
    || { tail -n 20 "$work/bench_$name.txt"; echo "gpu_check: the $name run failed" >&2; exit 1; }
  names+=("$name")
done

export GPU_CHECK_FULL_VAL_TARGETS=${GPU_CHECK_FULL_VAL_TARGETS:-62021632}
"$py" - "$work" "${names[@]}" <<'PY' | tee "$work/table.txt"
import os, sys
from pathlib import Path
sys.path[:0] = ["bench", "records"]
import bench, runlog
work, names = Path(sys.argv[1]), sys.argv[2:]
logs = {name: work / "logs" / f"gpu_check_{name}.txt" for name in names}
full = int(os.environ["GPU_CHECK_FULL_VAL_TARGETS"])
cols = {name: bench.summarise(log, full) for name, log in logs.items()}
first = runlog.read(logs[names[0]])
rows = [("attention", "attention"), ("processes", "world_size"), ("steps", "steps"), ("ms/step", "ms_per_step"),
        ("tokens/s", "tokens_per_s"), ("MFU (989 TFLOP/s)", "mfu_vs_h100_bf16"),
        ("peak alloc MiB", "peak_allocated_mib"), ("compile+warmup s", "warmup_compile_s"),
        ("export (zstd-22) s", "export_s"), ("sliding windows/s/GPU", "sliding_windows_per_s_per_gpu"),
        ("full sliding, 8 GPUs, s", "sliding_full_val_8gpu_s")]
show = lambda v: "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
print(f"{'torch ' + str(first.torch_version):26}" + "".join(f"{name:>22}" for name in names))
for label, key in rows:
    print(f"{label:26}" + "".join(f"{show(cols[n].get(key)):>22}" for n in names))
PY
