#!/usr/bin/env bash
# The one command for a session with a GPU (docs/BENCHMARKS.md gives the exact `device` call):
#   versions (python, torch, CUDA, cuDNN, GPU, FlashAttention-3 and -4, Inductor's mix_order_reduction), then the
#   default (seed) configuration under torch.compile for a short wall-clock cap with the attention backend the
#   script picks (ATTENTION=auto) and, when the machine has several GPUs (nvidia-smi -L), once more on all of them
#   (torchrun on 2, 4 or 8: the most that is a power of two, as the batch split needs). Then the README's two
#   frontier stacks, short: sp1024 (loops, parallel residuals, GPTQ + SDClip, brotli) and, when the data folder has
#   an 8,192-token *8192*.model, SP8192 with its evaluation, document-isolated scoring and phased LoRA TTT (on the
#   sp1024 tokens, whose ids fit: its throughput, memory, compile, calibration, export and TTT time are real, its
#   losses and bytes per token mean nothing). Then where one step's
#   time goes (bench/profile_step.py: attention forward/backward, matmuls, norms/elementwise, optimizer,
#   communication, host gaps), the two parts the flags below replace (bench/parts_time.py: the Muon step, the
#   training loss), and short A/B runs: COMPILE=model (the whole-model compile) against auto's blocks, every other
#   attention backend that is installed (cudnn, fa4, flash, fa3), on torch 2.11 Inductor's mix_order_reduction off,
#   then the flags that wait for a GPU's verdict (GPU_CHECK_FLAGS: MUON_SHARDED=1, FUSED_CE=1), each on its own.
#   One table at the end, read from the logs by records/runlog.py: ms/step, tokens/s, MFU, peak memory, compile
#   (warmup; the evaluations' priming), GPTQ calibration, export time and the artifact's bytes, the sliding eval's
#   rate on the validation slice, extrapolated to the full validation set on 8 GPUs, the document modes' seconds on
#   the slice (DOCS_EVAL, LoRA TTT with its phases), and in its header the torch
#   version that was measured; then the profile's table and the parts' timings. Each run's warmup phases (one per
#   loop shape, then the eval graph) are in its log, logs/gpu_check_<name>.txt, as `warmup:<phase> ms:...`.
#
# Time budget, one H100/H200 (GPU_CHECK_BUDGET, default 540 s, so the device call's 560 s limit holds): start and
# versions ~10 s; the main run GPU_CHECK_SECONDS (40) of training + compile and warmup (75 s under the whole-model
# compile on 2026-12-04; the blocks compile is not measured yet) + ~25 s start, export and evals; each stack
# GPU_CHECK_STACK_SECONDS (30, of which GPTQ reserves 10) + ~120 s of compile, calibration, export and evals on a
# 262,144-target slice (GPU_CHECK_STACK_COST, 150); the profile ~90 s (compile mostly cached by the main run);
# bench/parts_time.py's two parts ~30 s (no compile); each A/B run GPU_CHECK_AB_SECONDS (25) of training + ~95 s
# (its graphs differ: a cold compile). A step that would end past the budget is skipped and says so, and each runs
# under `timeout` at what is left, so the table always comes back. Estimated for the 2026-12-04 machine (no
# FA3/FA4, torch 2.11): 10 + 140 + 2 x 150 + 90 = 540 s, so one call runs the defaults and the stacks; a second
# call with GPU_CHECK_STACKS=none runs the profile, the parts and the A/B runs in their order of priority (compile
# mode, attention, mix_order_reduction, the flags) as the budget allows; GPU_CHECK_AB, GPU_CHECK_MIX and
# GPU_CHECK_FLAGS choose among them.
#
#   bash bench/gpu_check.sh                     # data in $GPU_CHECK_DATA (default scratch/gpu), see below
#   GPU_CHECK_SMOKE=1 bash bench/gpu_check.sh   # the same path on the CPU at a tiny configuration
#
# $GPU_CHECK_DATA holds *train_*.bin (or .bin.xz, unpacked here), *val_*.bin and one SentencePiece *.model.
# Wheels in $GPU_CHECK_WHEELS (default scratch/wheels) are installed first when zstandard or brotli is missing.
# GPU_CHECK_FULL_VAL_TARGETS: targets of the full validation set for the extrapolation (default: sp1024's
# 62021632, the tokenizer this check runs; SP8192's set has 40540160). GPU_CHECK_MIX: the mix_order_reduction A/B
# (auto: on torch 2.11 only; 1 always; 0 never). GPU_CHECK_AB: the attention backends to A/B (default: the installed
# ones of cudnn fa4 flash fa3 other than auto's pick; "none" for none). GPU_CHECK_STACKS: the stacks to run (default
# "sp1024 sp8192"; "none" for none). GPU_CHECK_FLAGS: the script's flags that are off until a GPU measures them,
# each an A/B run of its own after those (default: MUON_SHARDED=1 FUSED_CE=1, column ab_muon_sharded,
# ab_fused_ce; "none" for none).
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

if ! "$py" -c "import zstandard, brotli" 2>/dev/null; then  # brotli: the stacks' compressor
  wheels=${GPU_CHECK_WHEELS:-scratch/wheels}
  ls "$wheels"/*.whl >/dev/null 2>&1 || fail "zstandard or brotli is missing and $wheels holds no wheels"
  "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu_check_site "$wheels"/*.whl
  export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
fi
for xz in "$data"/*train_*.bin.xz; do
  [[ -e $xz && ! -e ${xz%.xz} ]] && xz -dk "$xz"
done
train=$(ls "$data"/*train_*.bin 2>/dev/null | head -n 1) || true
val=$(ls "$data"/*val_*.bin 2>/dev/null | head -n 1) || true
model=$(ls "$data"/*.model 2>/dev/null | grep -v 8192 | head -n 1) || true
model8192=$(ls "$data"/*8192*.model 2>/dev/null | head -n 1) || true
[[ -n $train && -n $val && -n $model ]] || fail "$data needs *train_*.bin, *val_*.bin and a (1,024-token) *.model"

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
stack_seconds=${GPU_CHECK_STACK_SECONDS:-30} stack_cost=${GPU_CHECK_STACK_COST:-150}
profile_args=() parts_cost=${GPU_CHECK_PARTS_COST:-30} parts_args=()
# The README's frontier stacks (its commands' settings), on a 262,144-target validation slice
sp1024=(MLP_NEG_SLOPE=0.5 ROPE_DIMS=16 ROPE_BASE=10000 LN_SCALE=1 XSA_LAST_N=11 EMA_DECAY=0.997 QK_GAIN_INIT=5.0
        LOOP_LAYERS=4-5 LOOP_START=0.35 PARALLEL_START=7 MUON_ROW_NORM=1 SKIP_GATES=1 MUON_WD=0.09 WARMDOWN_FRAC=0.72
        TRAIN_BATCH_TOKENS=786432 QUANT_METHOD=gptq QUANT_CLIP=sigma COMPRESSOR=brotli VAL_MAX_TOKENS=262144)
sp8192=(VOCAB_SIZE=8192 TOKENIZER_PATH="$model8192" BIGRAM_VOCAB_SIZE=0 MLP_MULT=4 MLP_NEG_SLOPE=0.5 ROPE_DIMS=16
        ROPE_BASE=10000 LN_SCALE=1 XSA_LAST_N=11 QK_GAIN_INIT=5.25 LOOP_LAYERS=3-5 LOOP_EXTRA=2 LOOP_START=0.35
        PARALLEL_START=7 MUON_ROW_NORM=1 SKIP_GATES=1 MUON_WD=0.095 MATRIX_LR=0.022 EMA_DECAY=0.9965
        WARMDOWN_FRAC=0.72 TRAIN_BATCH_TOKENS=786432 QUANT_METHOD=gptq QUANT_CLIP=sigma EMBED_BITS=7
        GPTQ_RESERVE_SECONDS=12 COMPRESSOR=brotli EVAL_STRIDE=0 DOCS_EVAL=1 TTT_LORA_ENABLED=1
        VAL_MAX_TOKENS=262144 TTT_LORA_BATCH_DOCS=16 TTT_LORA_PREFIX_DOCS=48)  # the slice's ~233 documents: 3 phases
if [[ $smoke == 1 ]]; then
  seconds=1 ab_seconds=1 ab_cost=${GPU_CHECK_AB_COST:-30} profile_cost=${GPU_CHECK_PROFILE_COST:-30}
  stack_seconds=2 stack_cost=${GPU_CHECK_STACK_COST:-40}
  profile_args=(--skip 2 --steps 2) parts_args=(--tokens 1024 --repeat 2)
  common+=(NUM_LAYERS=2 MODEL_DIM=64 NUM_HEADS=4 NUM_KV_HEADS=2 MLP_MULT=2 BIGRAM_VOCAB_SIZE=64 BIGRAM_DIM=16
           XSA_LAST_N=1 TRAIN_SEQ_LEN=64 EVAL_SEQ_LEN=64 EVAL_STRIDE=16 TRAIN_BATCH_TOKENS=1024 VAL_BATCH_SIZE=8192
           VAL_MAX_TOKENS=4096 WARMUP_STEPS=2 WARMDOWN_ITERS=5 COMPILE=0)
  small=(NUM_LAYERS=6 XSA_LAST_N=6 PARALLEL_START=4 TRAIN_BATCH_TOKENS=1024 VAL_MAX_TOKENS=4096 GPTQ_RESERVE_SECONDS=1
         GPTQ_CALIB_SEQS=4 MLP_MULT=17)  # the stacks' shapes, tiny (the slice: one document, no LoRA phases)
  sp1024+=("${small[@]}" LOOP_LAYERS=2-3)
  sp8192+=("${small[@]}" LOOP_LAYERS=1-3)
  backends=(math)  # the CPU has flash (auto's pick) and math
else
  seconds=${GPU_CHECK_SECONDS:-40}
  backends=(cudnn fa4 flash fa3)  # most wanted first: the budget may not reach the last
fi
read -r -a stacks <<< "${GPU_CHECK_STACKS:-sp1024 sp8192}"
[[ ${stacks[0]:-} == none ]] && stacks=()
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
for stack in "${stacks[@]}"; do
  if [[ $stack == sp8192 && -z $model8192 ]]; then
    echo "gpu_check: sp8192 skipped: $data has no *8192*.model"
  elif (($(left) >= stack_cost)); then
    case $stack in
      sp1024) bench_run sp1024 "$stack_seconds" 1 "$(left)" - "${sp1024[@]}" ;;
      sp8192) bench_run sp8192 "$stack_seconds" 1 "$(left)" - "${sp8192[@]}" ;;
      *) fail "GPU_CHECK_STACKS: unknown stack $stack (expected sp1024, sp8192 or none)" ;;
    esac
  else
    echo "gpu_check: $stack skipped: $(left) s left of the budget, a stack run needs ~$stack_cost s"
  fi
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
arms=("ab_model:COMPILE=model:-")  # the whole-model compile, against auto's regions (blocks)
[[ $smoke == 1 ]] && arms=()  # the CPU runs no compile
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
        ("eval compile s", "eval_compile_s"), ("GPTQ calibration s", "calibration_s"), ("export s", "export_s"),
        ("artifact bytes", "artifact_bytes"), ("sliding windows/s/GPU", "sliding_windows_per_s_per_gpu"),
        ("full sliding, 8 GPUs, s", "sliding_full_val_8gpu_s"), ("DOCS_EVAL s (slice)", "docs_eval_s"),
        ("LoRA TTT s (slice)", "lora_ttt_s")]
show = lambda v: "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
print(f"{'torch ' + str(first.torch_version):26}" + "".join(f"{name:>22}" for name in names))
for label, key in rows:
    print(f"{label:26}" + "".join(f"{show(cols[n].get(key)):>22}" for n in names))
PY
grep -A 20 '^profile_step:' "$work/profile.txt" || true
grep -A 4 '^parts_time:' "$work/parts.txt" || true
echo "gpu_check: ${SECONDS} s in all (budget $budget s)${failed[*]:+; failed: ${failed[*]}}"
