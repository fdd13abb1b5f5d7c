#!/usr/bin/env bash
# The one command for a session with a GPU (docs/BENCHMARKS.md gives the exact `device` call):
#   versions (python, torch, CUDA, GPU, FlashAttention-3), then the default (seed) configuration under
#   torch.compile for a short wall-clock cap with the attention backend the script picks (ATTENTION=auto), and
#   again with ATTENTION=sdpa when FA3 is present; each run's ms/step, tokens/s, MFU, peak memory, compile
#   (warmup) time, export time and the sliding eval's rate on the validation slice, extrapolated to the 969,057
#   windows of the full set on 8 GPUs. One table at the end. Fits in 9 minutes on one H100/H200.
#
#   bash bench/gpu_check.sh                     # data in $GPU_CHECK_DATA (default scratch/gpu), see below
#   GPU_CHECK_SMOKE=1 bash bench/gpu_check.sh   # the same path on the CPU at a tiny configuration (< 3 min)
#
# $GPU_CHECK_DATA holds *train_*.bin (or .bin.xz, unpacked here), *val_*.bin and one SentencePiece *.model.
# Wheels in $GPU_CHECK_WHEELS (default scratch/wheels) are installed first when zstandard is missing.
# Logs and the table go to $OUT when set (the device tool brings that folder back), else scratch/gpu_check.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
data=$(cd "${GPU_CHECK_DATA:-scratch/gpu}" 2>/dev/null && pwd) || { echo "gpu_check: no data folder ${GPU_CHECK_DATA:-scratch/gpu}" >&2; exit 2; }
work=${OUT:-$repo/scratch/gpu_check}
mkdir -p "$work"
smoke=${GPU_CHECK_SMOKE:-0}
py=${PYTHON:-python3}

if ! "$py" -c "import zstandard" 2>/dev/null; then
  wheels=${GPU_CHECK_WHEELS:-scratch/wheels}
  ls "$wheels"/*.whl >/dev/null 2>&1 || { echo "gpu_check: zstandard is missing and $wheels holds no wheels" >&2; exit 2; }
  "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu_check_site "$wheels"/*.whl
  export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
fi
for xz in "$data"/*train_*.bin.xz; do
  [[ -e $xz && ! -e ${xz%.xz} ]] && xz -dk "$xz"
done
train=$(ls "$data"/*train_*.bin 2>/dev/null | head -n 1) || true
val=$(ls "$data"/*val_*.bin 2>/dev/null | head -n 1) || true
model=$(ls "$data"/*.model 2>/dev/null | head -n 1) || true
[[ -n $train && -n $val && -n $model ]] || { echo "gpu_check: $data needs *train_*.bin, *val_*.bin and a *.model" >&2; exit 2; }

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
  seconds=(8 6)
  common+=(NUM_LAYERS=2 MODEL_DIM=64 NUM_HEADS=4 NUM_KV_HEADS=2 MLP_MULT=2 BIGRAM_VOCAB_SIZE=64 BIGRAM_DIM=16
           XSA_LAST_N=1 TRAIN_SEQ_LEN=64 EVAL_SEQ_LEN=64 EVAL_STRIDE=16 TRAIN_BATCH_TOKENS=1024 VAL_BATCH_SIZE=8192
           VAL_MAX_TOKENS=4096 WARMUP_STEPS=2 WARMDOWN_ITERS=5 COMPILE=0)
  runs=(auto sdpa)  # both, so the smoke test covers the two-run table
else
  seconds=(${GPU_CHECK_SECONDS:-60} ${GPU_CHECK_SDPA_SECONDS:-40})
  runs=(auto)
  "$py" -c "import flash_attn_interface" 2>/dev/null && runs+=(sdpa)
fi

i=0
for attention in "${runs[@]}"; do
  echo "== run ATTENTION=$attention, ${seconds[$i]} s of training =="
  (cd "$work" && "$py" "$repo/bench/bench.py" --seconds "${seconds[$i]}" --run-id "gpu_check_$attention" -- \
      "${common[@]}" ATTENTION="$attention") > "$work/bench_$attention.txt" 2>&1 \
    || { tail -n 20 "$work/bench_$attention.txt"; echo "gpu_check: the ATTENTION=$attention run failed" >&2; exit 1; }
  i=$((i + 1))
done

"$py" - "$work" "${runs[@]}" <<'PY' | tee "$work/table.txt"
import re, sys
from pathlib import Path
work, runs = Path(sys.argv[1]), sys.argv[2:]
rows = [("attention", "attention"), ("steps", "steps"), ("ms/step", "ms_per_step"), ("tokens/s", "tokens_per_s"),
        ("MFU (989 TFLOP/s)", "mfu_vs_h100_bf16"), ("peak alloc MiB", "peak_allocated_mib"),
        ("compile+warmup s", "warmup_compile_s"), ("sliding windows/s/GPU", "sliding_windows_per_s_per_gpu"),
        ("full sliding, 8 GPUs, s", "sliding_full_val_8gpu_s")]
cols = {}
for run in runs:
    text = (work / f"bench_{run}.txt").read_text()
    cols[run] = dict(re.findall(r"^(\w+): (.*)$", text, re.M))
    log = (work / "logs" / f"gpu_check_{run}.txt").read_text()
    export = re.search(r"^export_time:(\d+)ms", log, re.M)
    cols[run]["export_s"] = f"{int(export.group(1)) / 1000:.3g}" if export else "-"
rows.append(("export (zstd-22) s", "export_s"))
print(f"{'':26}" + "".join(f"{'ATTENTION=' + r:>22}" for r in runs))
for label, key in rows:
    print(f"{label:26}" + "".join(f"{cols[r].get(key, '-'):>22}" for r in runs))
PY
