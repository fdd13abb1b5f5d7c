#!/usr/bin/env bash
# The one command for a session with a GPU (docs/BENCHMARKS.md gives the exact `device` call):
#   versions (python, torch, CUDA, cuDNN, GPU, FlashAttention-3 and -4, Inductor's mix_order_reduction), then the
#   default (seed) configuration under torch.compile for a short wall-clock cap with the attention backend the
#   script picks (ATTENTION=auto) and, when the machine has several GPUs (nvidia-smi -L), once more on all of them
#   (torchrun on 2, 4 or 8: the most that is a power of two, as the batch split needs). Then where one step's time
#   goes (bench/profile_step.py: attention forward/backward, matmuls, norms/elementwise, optimizer, communication,
#   host gaps), the two parts the flags below replace (bench/parts_time.py: the Muon step, the training loss), and
#   short A/B runs: every other attention backend that is installed (cudnn, fa4, flash, fa3) and,
#   on torch 2.11, Inductor's mix_order_reduction off, then the flags that wait for a GPU's verdict (GPU_CHECK_FLAGS:
#   MUON_SHARDED=1, FUSED_CE=1), each on its own. One table at the end, read from the logs by
#   records/runlog.py: ms/step, tokens/s, MFU, peak memory, compile (warmup) and export time, the sliding eval's
#   rate on the validation slice, extrapolated to the full validation set on 8 GPUs, and in its header the torch
#   version that was measured; then the profile's table and the parts' timings.
#
# Time budget, one H100/H200 (GPU_CHECK_BUDGET, default 540 s, so the device call's 560 s limit holds): start and
# versions ~10 s; the main run 60 s of training + ~75 s compile and warmup + ~25 s start, export and evals (the
# 2026-12-04 H200 run: warmup 74 s, export 6 s, sliding eval 9 s); the profile ~90 s (compile mostly cached by the
# main run); bench/parts_time.py's two parts ~30 s (no compile); each A/B run GPU_CHECK_AB_SECONDS (25) of training + ~95 s (its graphs differ: a cold compile). A step
# that would end past the budget is skipped and says so, and each runs under `timeout` at what is left, so the table
# always comes back. On the 2026-12-04 machine (no FA3/FA4, torch 2.11): 10 + 160 + 90 + 30 + 2 x 120 = 530 s, so
# the flags' arms are skipped there unless the others are left out: GPU_CHECK_AB=none GPU_CHECK_MIX=0 (530 s again).
#
#   bash bench/gpu_check.sh                     # data in $GPU_CHECK_DATA (default scratch/gpu), see below
#   GPU_CHECK_SMOKE=1 bash bench/gpu_check.sh   # the same path on the CPU at a tiny configuration
#
# $GPU_CHECK_DATA holds *train_*.bin (or .bin.xz, unpacked here), *val_*.bin and one SentencePiece *.model.
# Wheels in $GPU_CHECK_WHEELS (default scratch/wheels) are installed first when zstandard is missing.
# GPU_CHECK_FULL_VAL_TARGETS: targets of the full validation set for the extrapolation (default: sp1024's
# 62021632, the tokenizer this check runs; SP8192's set has 40540160). GPU_CHECK_MIX: the mix_order_reduction A/B
# (auto: on torch 2.11 only; 1 always; 0 never). GPU_CHECK_AB: the attention backends to A/B (default: the installed
# ones of cudnn fa4 flash fa3 other than auto's pick; "none" for none). GPU_CHECK_FLAGS: the script's flags that are
# off until a GPU measures them, each an A/B run of its own after those (default: MUON_SHARDED=1 FUSED_CE=1, column
# ab_muon_sharded, ab_fused_ce; "none" for none).
# Logs, the tables and the profile's trace go to $OUT when set (the device tool brings that folder back), else
# scratch/gpu_check.
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
print(f"cudnn: {torch.backends.cudnn.version()}")
for module in ("flash_attn_interface", "flash_attn.cute"):
    try:
        __import__(module)
        print(f"{module}: importable")
    except Exception as e:  # noqa: BLE001 (a broken install is reported, not fatal)
        print(f"{module}: not importable ({type(e).__name__}: {e})")
try:
    import torch._inductor.config as inductor
    print(f"inductor mix_order_reduction: {int(inductor.triton.mix_order_reduction)}")
except AttributeError:
    print("inductor mix_order_reduction: absent in this torch")
PY
} | tee "$work/versions.txt"

common=(TRAIN_FILES="$data/*train_*.bin" VAL_FILES="$data/*val_*.bin" TOKENIZER_PATH="$model")
budget=${GPU_CHECK_BUDGET:-540}
ab_seconds=${GPU_CHECK_AB_SECONDS:-25} ab_cost=${GPU_CHECK_AB_COST:-120} profile_cost=${GPU_CHECK_PROFILE_COST:-90}
profile_args=() parts_cost=${GPU_CHECK_PARTS_COST:-30} parts_args=()
if [[ $smoke == 1 ]]; then
  seconds=1 ab_seconds=1 ab_cost=${GPU_CHECK_AB_COST:-30} profile_cost=${GPU_CHECK_PROFILE_COST:-30}
  profile_args=(--skip 2 --steps 2) parts_args=(--tokens 1024 --repeat 2)
  common+=(NUM_LAYERS=2 MODEL_DIM=64 NUM_HEADS=4 NUM_KV_HEADS=2 MLP_MULT=2 BIGRAM_VOCAB_SIZE=64 BIGRAM_DIM=16
           XSA_LAST_N=1 TRAIN_SEQ_LEN=64 EVAL_SEQ_LEN=64 EVAL_STRIDE=16 TRAIN_BATCH_TOKENS=1024 VAL_BATCH_SIZE=8192
           VAL_MAX_TOKENS=4096 WARMUP_STEPS=2 WARMDOWN_ITERS=5 COMPILE=0)
  backends=(math)  # the CPU has flash (auto's pick) and math
else
  seconds=${GPU_CHECK_SECONDS:-60}
  backends=(cudnn fa4 flash fa3)  # most wanted first: the budget may not reach the last
fi
[[ -n ${GPU_CHECK_AB:-} ]] && read -r -a backends <<< "${GPU_CHECK_AB/none/}"

names=() failed=()
bench_run() {  # name, training seconds, processes, time limit, extra environment (NAME=VALUE or -), then hparams
  local name=$1 cap=$2 nproc=$3 limit=$4 extra=${5#-}
  shift 5
  echo "== run $name: $nproc process(es), $cap s of training, $*${extra:+ $extra} =="
  if (cd "$work" && timeout -k 20 "$limit" env $extra "$py" "$repo/bench/bench.py" --seconds "$cap" \
        --nproc "$nproc" --run-id "gpu_check_$name" -- "${common[@]}" "$@") > "$work/bench_$name.txt" 2>&1; then
    names+=("$name")
  else
    tail -n 20 "$work/bench_$name.txt"
    echo "gpu_check: the $name run failed or ran out of time (bench_$name.txt)" >&2
    failed+=("$name")
  fi
}
left() { echo $((budget - SECONDS)); }

bench_run auto_x1 "$seconds" 1 "$(left)" - ATTENTION=auto
[[ ${names[0]:-} == auto_x1 ]] || exit 1
for n in 8 4 2; do  # every GPU the machine has, as the largest power of two (the batch splits into 8 / n steps)
  if ((gpus >= n)); then bench_run "auto_x$n" "$seconds" "$n" "$(left)" - ATTENTION=auto; break; fi
done

if (($(left) >= profile_cost)); then
  echo "== profile: where one training step's time goes =="
  (cd "$work" && timeout -k 20 "$(left)" "$py" "$repo/bench/profile_step.py" "${profile_args[@]}" \
      --trace "$work/profile_trace.json.gz" -- "${common[@]}" RUN_ID=gpu_check_profile) > "$work/profile.txt" 2>&1 \
    || { tail -n 20 "$work/profile.txt"; echo "gpu_check: the profile failed (profile.txt)" >&2; failed+=(profile); }
else
  echo "gpu_check: profile skipped: $(left) s left of the budget, it needs ~$profile_cost s" | tee "$work/profile.txt"
fi
if (($(left) >= parts_cost)); then  # no compile: seconds each
  echo "== parts: the Muon step and the training loss, the flags' forms against the defaults' =="
  for part in muon loss; do
    (cd "$work" && timeout -k 20 "$(left)" "$py" "$repo/bench/parts_time.py" --part "$part" "${parts_args[@]}" \
        -- "${common[@]}") || { echo "gpu_check: parts_time --part $part failed" >&2; failed+=("parts_$part"); }
  done > "$work/parts.txt" 2>&1
else
  echo "gpu_check: parts skipped: $(left) s left of the budget, they need ~$parts_cost s" | tee "$work/parts.txt"
fi

auto=$(grep -m1 -oP '^attention_backend:\K\S+' "$work/logs/gpu_check_auto_x1.txt")
installed() { case $1 in fa3) grep -q '^flash_attn_interface: importable' "$work/versions.txt" ;;
                         fa4) grep -q '^flash_attn.cute: importable' "$work/versions.txt" ;; *) true ;; esac; }
arms=()
for b in "${backends[@]}"; do [[ $b != "$auto" ]] && installed "$b" && arms+=("ab_$b:ATTENTION=$b:-"); done
torch_version=$(grep -oP 'torch: \K\S+' "$work/versions.txt")
mix=${GPU_CHECK_MIX:-auto}
if [[ $mix == 1 || ($mix == auto && $torch_version == 2.11*) ]]; then
  arms+=("ab_mix0:ATTENTION=auto:TORCHINDUCTOR_MIX_ORDER_REDUCTION=0")
  TORCHINDUCTOR_MIX_ORDER_REDUCTION=0 "$py" -c 'import torch._inductor.config as c
value = int(getattr(c.triton, "mix_order_reduction", -1))
print(f"gpu_check: ab_mix0: with TORCHINDUCTOR_MIX_ORDER_REDUCTION=0 this torch has mix_order_reduction:{value} "
      "(-1: absent)")' || true
else
  echo "gpu_check: mix_order_reduction A/B not run (torch $torch_version; GPU_CHECK_MIX=$mix)"
fi
flags=${GPU_CHECK_FLAGS:-MUON_SHARDED=1 FUSED_CE=1}
for flag in ${flags/none/}; do
  name=${flag%%=*}
  arms+=("ab_${name,,}:$flag:-")
done
for arm in "${arms[@]}"; do
  IFS=: read -r name setting extra <<< "$arm"
  if (($(left) >= ab_cost)); then
    bench_run "$name" "$ab_seconds" 1 "$(left)" "$extra" "$setting"
  else
    echo "gpu_check: $name skipped: $(left) s left of the budget, an A/B run needs ~$ab_cost s"
  fi
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
grep -A 20 '^profile_step:' "$work/profile.txt" || true
grep -A 4 '^parts_time:' "$work/parts.txt" || true
echo "gpu_check: ${SECONDS} s in all (budget $budget s)${failed[*]:+; failed: ${failed[*]}}"
