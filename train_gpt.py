"""Parameter Golf record script: 11-layer GPT (XSA, BigramHash, SmearGate, U-Net skips) trained for 600 s,
exported as int6 + zstd-22, round-trip checked and scored by stride-64 sliding-window val_bpb.

Run: torchrun --standalone --nproc_per_node=8 train_gpt.py   (every hyperparameter is an env var, see HPARAMS)
"""
from __future__ import annotations

import ast
import base64
import collections
import concurrent.futures
import contextlib
import copy
import difflib
import functools
import glob
import hashlib
import importlib
import io
import lzma
import math
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
import tokenize
import uuid
import zipfile
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import sentencepiece as spm
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel as DDP

try:
    from flash_attn_interface import flash_attn_func
except ImportError:
    flash_attn_func = None

# ---------------------------------------------------------------------------------------------------------------
# Hyperparameters: env var -> default (its type is the default's). Defaults are the seed run; attributes are the
# lower-cased names. Everything after XSA_LAST_N is off by default: the lineage's flags (LINEAGE.md and
# LINEAGE_APRIL.md).

HPARAMS = dict(
    DATA_PATH="./data/datasets/fineweb10B_sp1024",
    TRAIN_FILES="", VAL_FILES="",  # globs; "" = DATA_PATH/fineweb_train_*.bin, DATA_PATH/fineweb_val_[0-9]*.bin
    VAL_BYTES_FILES="",  # byte sidecars (each token's bytes of the original text, e.g. CaseOps data); "" = the val
    # glob's name with fineweb_val_ -> fineweb_val_bytes_, used when such files exist
    TOKENIZER_PATH="./data/tokenizers/fineweb_1024_bpe.model",
    RUN_ID="",  # "" = random UUID4
    SEED=1337,
    VAL_BATCH_SIZE=524288, VAL_LOSS_EVERY=1000, TRAIN_LOG_EVERY=200,
    VAL_MAX_TOKENS=0,  # 0 = full validation set; otherwise a subset score, never a submission score
    ITERATIONS=9000, WARMDOWN_ITERS=3000, WARMUP_STEPS=20,
    TRAIN_BATCH_TOKENS=524288, TRAIN_SEQ_LEN=2048, EVAL_SEQ_LEN=2048,
    MAX_WALLCLOCK_SECONDS=600.0,
    QK_GAIN_INIT=1.5, VOCAB_SIZE=1024, NUM_LAYERS=11, NUM_KV_HEADS=4, MODEL_DIM=512, NUM_HEADS=8, MLP_MULT=3.0,
    ROPE_BASE=50000.0, LOGIT_SOFTCAP=30.0,
    TIED_EMBED_LR=0.035, TIED_EMBED_INIT_STD=0.005, MATRIX_LR=0.025, SCALAR_LR=0.025,
    MUON_MOMENTUM=0.99, MUON_BACKEND_STEPS=5, MUON_MOMENTUM_WARMUP_START=0.92, MUON_MOMENTUM_WARMUP_STEPS=1500,
    BETA1=0.9, BETA2=0.95, ADAM_EPS=1e-8, GRAD_CLIP_NORM=0.3,
    EVAL_STRIDE=64,
    SWA_ENABLED=True, SWA_EVERY=200,
    MUON_WD=0.04, ADAM_WD=0.04,
    BIGRAM_VOCAB_SIZE=2048, BIGRAM_DIM=128,
    XSA_LAST_N=3,
    MLP_NEG_SLOPE=0.0,  # MLP activation leaky_relu(x, slope)^2; 0 = relu^2
    ROPE_DIMS=0,  # rotate only the first ROPE_DIMS dims of each head; 0 = all
    LN_SCALE=False,  # block l's sublayer inputs scaled by 1/sqrt(l+1)
    EMA_DECAY=0.0,  # exponential average of the weights, exported instead of SWA; 0 = off
    QUANT_METHOD="rowmax",  # int6 quantiser: rowmax (the seed), clipsearch (GPTQ-lite) or gptq (also the embedding)
    QUANT_CLIP="search",  # row scales of clipsearch/gptq: search (clip quantiles) or sigma (SDClip, k x row std)
    CLIP_SIGMAS=12.85, EMBED_CLIP_SIGMAS=20.0,  # SDClip's k for the block matrices and for the embedding tables
    EMBED_BITS=8,  # grid of the embedding tables: 8, 7 or 6 bits per value
    COMPRESSOR="zstd",  # the artifact's compressor: zstd (level 22), brotli (quality 11) or lzma (preset 9e)
    GPTQ_CALIB_SEQS=64, GPTQ_RESERVE_SECONDS=10.0,  # calibration sequences; seconds taken off the training cap
    TTT_ENABLED=False,  # legal score-first test-time training after the final evals
    TTT_CHUNK_TOKENS=32768, TTT_EPOCHS=3, TTT_LR=0.002, TTT_MOMENTUM=0.9, TTT_FREEZE_BLOCKS=0,
    TTT_MAX_SECONDS=300.0,  # cap on TTT's training time, after which chunks are only scored; 0 = no cap
    # The April records' evaluation (LINEAGE_TTT_CASEOPS.md §1); the defaults are PR #1855's (1.0611, R27 and its
    # run command: rank 80, TTT beta2 0.99, TTT WD 0.5, prefix 2500 docs, 3 phases; the rest as in PR #1626/#1767).
    DOCS_EVAL=False,  # document-isolated scoring: the sliding eval's windows (EVAL_STRIDE) inside each document
    TTT_LORA_ENABLED=False,  # score-first per-document LoRA TTT with global SGD phases
    TTT_LORA_RANK=80, TTT_LORA_ALPHA=144.0,  # adapters' rank; their output scaled by alpha / rank
    TTT_LORA_CHUNK=48,  # a document's targets scored, then trained on, this many at a time
    TTT_LORA_BATCH_DOCS=64,  # documents per batch, one per row
    TTT_LORA_LR=1e-4, TTT_LORA_BETA1=0.0, TTT_LORA_BETA2=0.99, TTT_LORA_EPS=1e-10, TTT_LORA_WD=0.5,  # AdamW
    TTT_LORA_WARM_A=True,  # A carried from batch to batch along a lane (B restarts at 0); 0 = A redrawn per batch
    TTT_LORA_LANES=8,  # warm-start chains, dealt to ranks: the records' one chain per GPU of 8, for any rank count
    TTT_LORA_MAX_SECONDS=0.0,  # agreed time after which documents are scored without adapting; 0 = no cap
    TTT_LORA_PHASES=3, TTT_LORA_PREFIX_DOCS=2500,  # global SGD after PREFIX_DOCS * k / PHASES documents, k = 1..PHASES
    TTT_LORA_GLOBAL_LR=1e-3, TTT_LORA_GLOBAL_MOMENTUM=0.9,  # SGD, cosine over each phase's steps
    TTT_LORA_GLOBAL_TOKENS=32768, TTT_LORA_GLOBAL_CLIP=1.0,  # targets per global SGD step; gradient clip
    LOOP_LAYERS="",  # "a-b": blocks a..b run again after b (depth recurrence, weights shared); "" = off
    LOOP_EXTRA=1,  # extra passes of the loop segment
    LOOP_START="0",  # fraction of the training budget at which the extra passes switch on; a list: one per pass
    LOOP_UNTIE_MLP=False,  # extra passes get MLPs of their own, copied from the segment's at the switch
    PARALLEL_START=0,  # blocks from this one on read attention and MLP input alike (parallel residuals); 0 = off
    PARALLEL_MODE="gptj",  # gptj: one lane, x + attn(n(x)) + mlp(n(x)); lanes: two lanes with learned mixing
    MUON_ROW_NORM=False,  # MuonEq-R: every row of the Nesterov update normalised before Newton-Schulz
    SKIP_GATES=False,  # U-Net skips as a sigmoid-gated blend x <- s x + (1 - s) w skip instead of x + w skip
    MIN_LR=0.0,  # floor of the learning-rate multiplier during the warmdown
    WARMDOWN_FRAC=0.0,  # warmdown over this last fraction of the training budget; 0 = WARMDOWN_ITERS steps
    CONTROL_TENSOR_NAME_PATTERNS="attn_scale,attn_scales,mlp_scale,mlp_scales,resid_mix,resid_mixes,q_gain,"
                                 "skip_weight,skip_weights,smear,skip_gates,lane_resid,lane_post",
    COMPILE="auto",  # blocks (regions: the embedding, each kind of block once, the loss), model (the whole forward: a
    # graph per loop shape) or 0; auto = blocks with CUDA, 0 without
    PRECISION="auto",  # auto = bf16 autocast on CUDA and on CPUs with native bf16, else fp32; or bf16, fp32
    ATTENTION="auto",  # auto = FA3 if its start-up probe passes, else flash SDPA (then efficient, math); or a name:
                       # fa3, fa4 (flash-attn-4), cudnn, flash, efficient or math (SDPA's kernels)
    MUON_SHARDED=False,  # matrices' gradients reduce-scattered to their owners, updates all-gathered (Muon, sharded)
    FUSED_CE=False,  # the training loss by SoftcappedCrossEntropy, which keeps no fp32 copy of the logits
    EVAL_ONLY="",  # path to a final_model.int6.ptz: skip training, score the artifact
)
HPARAM_NAMES = list(HPARAMS)
SIZE_LIMIT_BYTES = 16_000_000
EVAL_LIMIT_MS = 600_000.0  # the evaluation budget, on 8xH100
ARTIFACT_PATH = "final_model.int6.ptz"
INTERRUPT_GRACE_S = 2.0  # after a signal, how long a rank blocked in a collective waits before it exits


class InputError(Exception):
    """Bad configuration or data: reported as one line, exit status 2."""


def parse_value(name: str, default, raw: str):
    try:
        if isinstance(default, bool):
            if raw not in ("0", "1", "True", "False"):
                raise ValueError
            return raw in ("1", "True")
        return type(default)(raw)
    except ValueError:
        raise InputError(f"{name}={raw!r} is not a valid {type(default).__name__}") from None


def read_hyperparameters(env) -> SimpleNamespace:
    hp = SimpleNamespace(**{n.lower(): parse_value(n, d, env[n]) if n in env else d for n, d in HPARAMS.items()})
    hp.run_id = hp.run_id or str(uuid.uuid4())
    hp.train_glob = hp.train_files or os.path.join(hp.data_path, "fineweb_train_*.bin")
    hp.val_glob = hp.val_files or os.path.join(hp.data_path, "fineweb_val_[0-9]*.bin")  # not fineweb_val_bytes_*
    hp.eval_len = hp.eval_seq_len if hp.eval_seq_len > 0 else hp.train_seq_len
    hp.control_patterns = tuple(p for p in hp.control_tensor_name_patterns.split(",") if p)
    head_dim = hp.model_dim // max(hp.num_heads, 1)
    hp.loop, hp.loop_starts = parse_loop(hp)
    for ok, message in [
        (hp.compile in ("auto", "0", "blocks", "model"), f"COMPILE={hp.compile} must be auto, 0, blocks or model"),
        (hp.precision in ("auto", "bf16", "fp32"), f"PRECISION={hp.precision} must be auto, bf16 or fp32"),
        (min(hp.train_seq_len, hp.train_batch_tokens, hp.val_batch_size, hp.num_layers, hp.num_heads) > 0,
         "TRAIN_SEQ_LEN, TRAIN_BATCH_TOKENS, VAL_BATCH_SIZE, NUM_LAYERS and NUM_HEADS must be positive"),
        (hp.num_heads > 0 and hp.model_dim % hp.num_heads == 0 and head_dim % 2 == 0,
         f"MODEL_DIM={hp.model_dim} must split into NUM_HEADS={hp.num_heads} heads of even size"),
        (hp.num_kv_heads > 0 and hp.num_heads % hp.num_kv_heads == 0,
         f"NUM_HEADS={hp.num_heads} must be a multiple of NUM_KV_HEADS={hp.num_kv_heads}"),
        (0 <= hp.xsa_last_n <= hp.num_layers, f"XSA_LAST_N={hp.xsa_last_n} must lie in [0, NUM_LAYERS]"),
        (hp.bigram_vocab_size == 0 or hp.bigram_vocab_size >= 2, "BIGRAM_VOCAB_SIZE must be 0 (off) or >= 2"),
        (min(hp.eval_stride, hp.val_max_tokens, hp.warmup_steps) >= 0,
         "EVAL_STRIDE, VAL_MAX_TOKENS and WARMUP_STEPS must be >= 0"),
        (hp.swa_every > 0, "SWA_EVERY must be positive"),
        (0 <= hp.ema_decay < 1, f"EMA_DECAY={hp.ema_decay} must lie in [0, 1) (0 = off)"),
        (hp.rope_dims == 0 or (hp.rope_dims % 2 == 0 and 2 <= hp.rope_dims <= head_dim),
         f"ROPE_DIMS={hp.rope_dims} must be 0 (whole head) or even in [2, head dim {head_dim}]"),
        (hp.quant_method in ("rowmax", "clipsearch", "gptq"),
         f"QUANT_METHOD={hp.quant_method} must be rowmax, clipsearch or gptq"),
        (hp.quant_clip in ("search", "sigma"), f"QUANT_CLIP={hp.quant_clip} must be search or sigma"),
        (hp.quant_clip != "sigma" or hp.quant_method != "rowmax",
         "QUANT_CLIP=sigma sets the scales of QUANT_METHOD=clipsearch or gptq (rowmax has its own)"),
        (hp.clip_sigmas > 0 and hp.embed_clip_sigmas > 0, "CLIP_SIGMAS and EMBED_CLIP_SIGMAS must be positive"),
        (hp.embed_bits in (6, 7, 8), f"EMBED_BITS={hp.embed_bits} must be 6, 7 or 8"),
        (hp.compressor in ("zstd", "brotli", "lzma"), f"COMPRESSOR={hp.compressor} must be zstd, brotli or lzma"),
        (hp.gptq_calib_seqs > 0 and hp.gptq_reserve_seconds >= 0,
         "GPTQ_CALIB_SEQS must be positive and GPTQ_RESERVE_SECONDS >= 0"),
        (hp.quant_method != "gptq" or hp.max_wallclock_seconds <= 0
         or hp.gptq_reserve_seconds < hp.max_wallclock_seconds,
         f"GPTQ_RESERVE_SECONDS={hp.gptq_reserve_seconds} must be below MAX_WALLCLOCK_SECONDS"),
        (hp.ttt_chunk_tokens > 0 and hp.ttt_chunk_tokens % hp.train_seq_len == 0,
         f"TTT_CHUNK_TOKENS={hp.ttt_chunk_tokens} must be a positive multiple of TRAIN_SEQ_LEN={hp.train_seq_len}"),
        (min(hp.ttt_epochs, hp.ttt_lr, hp.ttt_momentum) >= 0 and 0 <= hp.ttt_freeze_blocks <= hp.num_layers,
         "TTT_EPOCHS, TTT_LR and TTT_MOMENTUM must be >= 0 and TTT_FREEZE_BLOCKS in [0, NUM_LAYERS]"),
        (min(hp.ttt_lora_rank, hp.ttt_lora_chunk, hp.ttt_lora_batch_docs, hp.ttt_lora_lanes) >= 1,
         "TTT_LORA_RANK, TTT_LORA_CHUNK, TTT_LORA_BATCH_DOCS and TTT_LORA_LANES must be >= 1"),
        (not hp.ttt_lora_enabled or hp.ttt_lora_chunk <= hp.eval_len,
         f"TTT_LORA_CHUNK={hp.ttt_lora_chunk} must fit EVAL_SEQ_LEN={hp.eval_len}"),
        (hp.ttt_lora_alpha > 0 and hp.ttt_lora_eps > 0, "TTT_LORA_ALPHA and TTT_LORA_EPS must be positive"),
        (min(hp.ttt_lora_lr, hp.ttt_lora_wd, hp.ttt_lora_max_seconds, hp.ttt_lora_phases, hp.ttt_lora_prefix_docs,
             hp.ttt_lora_global_lr) >= 0, "TTT_LORA_LR, TTT_LORA_WD, TTT_LORA_MAX_SECONDS, TTT_LORA_PHASES, "
         "TTT_LORA_PREFIX_DOCS and TTT_LORA_GLOBAL_LR must be >= 0"),
        (all(0 <= b < 1 for b in (hp.ttt_lora_beta1, hp.ttt_lora_beta2, hp.ttt_lora_global_momentum)),
         "TTT_LORA_BETA1, TTT_LORA_BETA2 and TTT_LORA_GLOBAL_MOMENTUM must lie in [0, 1)"),
        ((hp.ttt_lora_global_tokens >= hp.eval_len or not hp.ttt_lora_enabled) and hp.ttt_lora_global_clip > 0,
         f"TTT_LORA_GLOBAL_TOKENS={hp.ttt_lora_global_tokens} must hold one EVAL_SEQ_LEN={hp.eval_len} sequence and "
         "TTT_LORA_GLOBAL_CLIP be positive"),
        (hp.attention == "auto" or hp.attention in ATTENTION_KERNELS,
         f"ATTENTION={hp.attention} must be auto, {', '.join(list(ATTENTION_KERNELS)[:-1])} or math"),
        (not hp.loop_untie_mlp or hp.loop, "LOOP_UNTIE_MLP=1 needs LOOP_LAYERS"),
        (0 <= hp.parallel_start < hp.num_layers, f"PARALLEL_START={hp.parallel_start} must lie in [0, NUM_LAYERS)"),
        (hp.parallel_mode in ("gptj", "lanes"), f"PARALLEL_MODE={hp.parallel_mode} must be gptj or lanes"),
        (hp.parallel_mode != "lanes" or not hp.parallel_start
         or (hp.parallel_start >= hp.num_layers // 2 and hp.parallel_start > (hp.loop or (-1, -1))[1]),
         f"PARALLEL_START={hp.parallel_start} with PARALLEL_MODE=lanes must be a decoder layer (>= NUM_LAYERS // 2) "
         "after the loop segment"),
        (0 <= hp.min_lr <= 1 and 0 <= hp.warmdown_frac <= 1, "MIN_LR and WARMDOWN_FRAC must lie in [0, 1]"),
    ]:
        if not ok:
            raise InputError(message)
    return hp


def parse_loop(hp: SimpleNamespace) -> tuple[tuple[int, int] | None, list[float]]:
    """LOOP_LAYERS "a-b" as (a, b), and the budget fraction at which each of the LOOP_EXTRA passes switches on."""
    if not hp.loop_layers:
        return None, []
    try:
        a, b = (int(v) for v in hp.loop_layers.split("-"))
        starts = [float(v) for v in hp.loop_start.split(",")]
    except ValueError:
        raise InputError(f"LOOP_LAYERS={hp.loop_layers!r} must be 'a-b' and LOOP_START={hp.loop_start!r} a fraction "
                         "or a comma-separated list of them") from None
    if not 0 <= a <= b < hp.num_layers:
        raise InputError(f"LOOP_LAYERS={hp.loop_layers}: the segment must lie within layers 0..{hp.num_layers - 1}")
    if hp.loop_extra < 1 or len(starts) not in (1, hp.loop_extra):
        raise InputError(f"LOOP_EXTRA={hp.loop_extra} must be >= 1, and LOOP_START one fraction or one per pass")
    if not all(0 <= f < 1 for f in starts) or starts != sorted(starts):
        raise InputError(f"LOOP_START={hp.loop_start}: fractions must lie in [0, 1), in increasing order")
    return (a, b), starts * hp.loop_extra if len(starts) == 1 else starts


def misspelt(env) -> list[str]:
    """A warning for every env var that is not a hyperparameter but is close to one."""
    close = {n: difflib.get_close_matches(n, HPARAM_NAMES, 1, 0.88) for n in sorted(env) if n not in HPARAMS}
    return [f"warning: {n} is not a hyperparameter; did you mean {c[0]}?" for n, c in close.items() if c]


ACT_DTYPE = torch.bfloat16  # activations, embedding tables, Newton-Schulz: decided once at start-up (PRECISION)


def choose_precision(mode: str, cuda: bool) -> tuple[torch.dtype, str]:
    """(activation dtype, why) for PRECISION=auto|bf16|fp32. A CPU without native bf16 emulates bf16 matmuls about
    100x slower than fp32 (0.3 vs 44 GFLOP/s measured on an AMD EPYC): auto takes fp32 there."""
    if mode != "auto":
        return (torch.bfloat16 if mode == "bf16" else torch.float32), f"PRECISION={mode}"
    if cuda:
        return torch.bfloat16, "CUDA"
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16, "CPU with native bf16"
    return torch.float32, "CPU without native bf16"


def choose_cpu_threads(env, cuda: bool) -> tuple[int | None, str]:
    """(threads of torch's CPU ops, why); None keeps torch's default. OMP_NUM_THREADS when set (its first level).
    Otherwise a CPU run takes one thread per process: on a 2-core VM (docs/BENCHMARKS.md) the small models a CPU
    can train ran faster on one thread than on two with the cores lightly loaded by other work, and up to 16 times
    faster once other processes kept both busy (OpenMP's threads wait on each other); and as the thread count
    changes float rounding, a CPU run then gives the same numbers whatever the machine's core count. A CUDA run
    keeps torch's default."""
    raw = env.get("OMP_NUM_THREADS", "").strip()
    if raw:
        first = raw.split(",")[0].strip()
        if not first.isdigit() or int(first) < 1:
            raise InputError(f"OMP_NUM_THREADS={raw!r}: expected a positive whole number of CPU threads")
        return int(first), "OMP_NUM_THREADS"
    if cuda:
        return None, "torch's default (CUDA run)"
    return 1, "one per process on CPU (set OMP_NUM_THREADS for more)"


# ---------------------------------------------------------------------------------------------------------------
# Muon: momentum + Newton-Schulz orthogonalised updates for the matrices

def newton_schulz(g: Tensor, steps: int) -> Tensor:
    """Quintic iteration pushing every singular value of g towards 1 (in bf16, as in the records). g is a matrix or
    a stack of same-shape matrices (each normalised by its own Frobenius norm): on the CPU a stack gives each
    matrix's result bit for bit (tests/test_sharded_muon.py)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(ACT_DTYPE)
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """Each rank orthogonalises every world_size-th matrix; one all-reduce of a flat buffer shares the updates.
    row_norm (MuonEq-R): every row of the Nesterov update divided by its L2 norm before Newton-Schulz."""

    def __init__(self, params, lr: float, momentum: float, backend_steps: int, weight_decay: float, orthogonalize,
                 row_norm: bool = False):
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps, weight_decay=weight_decay))
        self.orthogonalize, self.row_norm, self.flat = orthogonalize, row_norm, {}

    @torch.no_grad()
    def step(self):
        distributed = dist.is_available() and dist.is_initialized()
        rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        for gi, group in enumerate(self.param_groups):
            params, mu = group["params"], group["momentum"]
            if gi not in self.flat:
                n = sum(p.numel() for p in params)
                self.flat[gi] = torch.empty(n, dtype=ACT_DTYPE, device=params[0].device)
            flat, offset = self.flat[gi].zero_(), 0
            for i, p in enumerate(params):
                if i % world == rank and p.grad is not None:
                    if "momentum_buffer" not in self.state[p]:
                        self.state[p]["momentum_buffer"] = torch.zeros_like(p.grad)
                    buf = self.state[p]["momentum_buffer"].mul_(mu).add_(p.grad)
                    nesterov = p.grad.add(buf, alpha=mu)
                    if self.row_norm:
                        nesterov = nesterov / nesterov.float().norm(dim=-1, keepdim=True).clamp_min(1e-7)
                    update = self.orthogonalize(nesterov, group["backend_steps"])
                    flat[offset : offset + p.numel()] = (update * max(1.0, p.size(0) / p.size(1)) ** 0.5).flatten()
                offset += p.numel()
            if distributed:
                dist.all_reduce(flat)
            offset = 0
            for p in params:
                if group["weight_decay"] > 0:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(flat[offset : offset + p.numel()].view_as(p).to(p.dtype), alpha=-group["lr"])
                offset += p.numel()

    def clip_grad_norm_(self, params, max_norm: float) -> Tensor:
        """Every gradient of params scaled down to a global L2 norm of max_norm (once DDP has averaged them)."""
        return nn.utils.clip_grad_norm_(params, max_norm)


# ---------------------------------------------------------------------------------------------------------------
# Sharded Muon (MUON_SHARDED=1): each matrix's gradient goes only to the rank that orthogonalises it

def newton_schulz_cost(shape: torch.Size) -> float:
    """Newton-Schulz's work on a matrix, up to a constant: it iterates on the wide orientation (m <= n), m^2 n per
    step, so a matrix and its transpose cost the same."""
    m, n = sorted(shape)
    return float(m * m * n)


def matrix_owners(shapes: list[tuple[int, int]], world: int) -> list[int]:
    """The rank that orthogonalises each matrix: longest job first by Newton-Schulz's cost, alike on every rank."""
    return assign_owners([newton_schulz_cost(s) for s in shapes], world)


def shard_layout(shapes: list[tuple[int, int]], owners: list[int], world: int) -> tuple[int, list[list]]:
    """Where each matrix lives in the collectives' flat buffers: rank q's chunk holds the matrices q owns, those of
    one shape side by side, so that each such group (a bank) is a (count, rows, cols) stack for one Newton-Schulz
    call. Every chunk has the largest rank's size (the others end in zeros). Returns that size and, per rank, its
    banks as (shape, matrix indices, offset in the chunk)."""
    chunk, banks = 0, []
    for q in range(world):
        mine, offset = [], 0
        for shape in dict.fromkeys(shapes):
            members = [i for i, s in enumerate(shapes) if s == shape and owners[i] == q]
            if members:
                mine.append((shape, members, offset))
                offset += len(members) * shape[0] * shape[1]
        banks.append(mine)
        chunk = max(chunk, offset)
    return chunk, banks


def reduce_scatter(output: Tensor, input: Tensor):
    """Async sum over the ranks of input, rank r receiving chunk r (torch 2.13 renamed reduce_scatter_tensor)."""
    return getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)(output, input, async_op=True)


def all_gather(output: Tensor, input: Tensor):
    """Async: every rank's input, concatenated in rank order (torch 2.13 renamed all_gather_into_tensor)."""
    return getattr(dist, "all_gather_single", dist.all_gather_into_tensor)(output, input, async_op=True)


class ShardedMuon(Muon):
    """Muon's update, computed where the gradients land. The matrices' gradients skip DDP (data_parallel); each
    rank's are divided by the world size and reduce-scattered, so a rank receives the mean gradients of the matrices
    it owns only (longest job first by Newton-Schulz's cost, computed alike on every rank), keeps their momentum,
    orthogonalises each bank of same-shape matrices in one call, and one all-gather per bank gives every rank every
    update. Per step and rank that moves the gradients once (reduce-scatter) and the updates once (all-gather),
    where DDP's all-reduce of the gradients (twice a reduce-scatter's bytes) and the all-reduce of the updates move
    them twice each. Banks' collectives run asynchronously: a bank is orthogonalised while later ones are in
    flight. The arithmetic is Muon's, op for op: gradients averaged as DDP does (multiplied by 1/world, then
    summed), the same momentum, Nesterov, row norm, Newton-Schulz, shape scale and decoupled decay, and clipping
    by the same global norm (clip_grad_norm_). Momentum lives on the owner only; state dict names, the parameters
    and the artifact are those of Muon."""

    def __init__(self, params, lr: float, momentum: float, backend_steps: int, weight_decay: float, orthogonalize,
                 row_norm: bool = False):
        super().__init__(params, lr, momentum, backend_steps, weight_decay, orthogonalize, row_norm)
        distributed = dist.is_available() and dist.is_initialized()
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        self.matrices = self.param_groups[0]["params"]  # one group: build_optimizers'
        shapes = [tuple(p.shape) for p in self.matrices]
        self.chunk, self.banks = shard_layout(shapes, matrix_owners(shapes, self.world), self.world)
        like, n = self.matrices[0], self.world * self.chunk
        self.send = torch.zeros(n, dtype=like.dtype, device=like.device)  # every rank's gradients, by owner
        self.shard = self.send if self.world == 1 else torch.zeros_like(self.send[: self.chunk])  # the mean of mine
        self.update = torch.zeros(self.chunk, dtype=ACT_DTYPE, device=like.device)  # my matrices' updates
        self.gathered = self.update if self.world == 1 else torch.zeros(n, dtype=ACT_DTYPE, device=like.device)
        self.in_flight = None  # the reduce-scatter of this step's gradients, once started

    def stacks(self, flat: Tensor, q: int, base: int = 0) -> list[tuple[list[int], Tensor]]:
        """Rank q's banks in its chunk of flat, which starts at base, as (matrix indices, (count, rows, cols) view)."""
        return [(members, flat[base + offset : base + offset + len(members) * shape[0] * shape[1]].view(-1, *shape))
                for shape, members, offset in self.banks[q]]

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Every matrix's mean gradient on its way to its owner's shard (once a step: the clip and the step both
        need it). A matrix without a gradient (an untied loop MLP before its switch: on every rank alike) sends
        zeros, and its owner (which sees that the gradient is missing, as every rank does) leaves its momentum alone:
        its update is zero, as in Muon, and only the decay touches it."""
        if self.in_flight is not None:
            return
        slots, grads = [], []
        for q in range(self.world):
            for members, stack in self.stacks(self.send, q, q * self.chunk):
                for i, slot in zip(members, stack):
                    if (g := self.matrices[i].grad) is None:
                        slot.zero_()
                    else:
                        slots.append(slot)
                        grads.append(g)
        if grads:
            torch._foreach_copy_(slots, grads)
        self.in_flight = []
        if self.world > 1:
            self.send.mul_(1.0 / self.world)  # DDP's averaging (exact for a power of two), then the sum
            self.in_flight.append(reduce_scatter(self.shard, self.send))

    def wait_gradients(self) -> list[tuple[list[int], Tensor]]:
        """This rank's mean gradients, per bank: (matrix indices, (count, rows, cols) view of the shard)."""
        self.reduce_gradients()
        for handle in self.in_flight:
            handle.wait()
        self.in_flight = []  # waited for once only: gloo's wait copies its result into the shard (again)
        return self.stacks(self.shard, self.rank)

    @torch.no_grad()
    def grad_norms(self) -> Tensor:
        """The L2 norm of every matrix's mean gradient, from the owners' shards: one all-reduce of one value per
        matrix, each with a single nonzero addend, so the sums are exact."""
        norms = torch.zeros(len(self.matrices), dtype=self.matrices[0].dtype, device=self.matrices[0].device)
        for members, stack in self.wait_gradients():
            norms[members] = torch.stack(torch._foreach_norm(list(stack)))
        if self.world > 1:
            dist.all_reduce(norms)
        return norms

    @torch.no_grad()
    def clip_grad_norm_(self, params, max_norm: float) -> Tensor:
        """nn.utils.clip_grad_norm_(params) with the matrices' mean gradients in their owners' shards: the same
        total norm, bit for bit (each gradient's norm stands in for the gradient in get_total_norm, in the same
        order and dtype: the norm of a one-element tensor is its absolute value, exactly), and the same factor."""
        norms, index = self.grad_norms(), {id(p): i for i, p in enumerate(self.matrices)}
        present = [p for p in params if p.grad is not None]
        others = [p for p in present if id(p) not in index]
        other_norms = iter(torch._foreach_norm([p.grad for p in others]) if others else [])
        total = nn.utils.get_total_norm([norms[index[id(p)]] if id(p) in index else next(other_norms)
                                         for p in present])
        nn.utils.clip_grads_with_norm_(others, max_norm, total)
        factor = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # clip_grads_with_norm_'s
        for _, stack in self.wait_gradients():
            torch._foreach_mul_(list(stack), factor)
        return total

    def momentum_buffer(self, p: Tensor) -> Tensor:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        return state["momentum_buffer"]

    @torch.no_grad()
    def step(self):
        group = self.param_groups[0]
        mu, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
        for (members, stack), (_, update) in zip(self.wait_gradients(), self.stacks(self.update, self.rank)):
            present = [(self.matrices[i], g) for i, g in zip(members, stack)
                       if self.matrices[i].grad is not None]  # a matrix without one keeps its momentum, as in Muon
            if present:
                grads = [g for _, g in present]
                buffers = [self.momentum_buffer(p) for p, _ in present]
                torch._foreach_mul_(buffers, mu)
                torch._foreach_add_(buffers, grads)
                torch._foreach_add_(grads, buffers, alpha=mu)  # Nesterov, in place: the shard holds g + mu buf
            nesterov = stack  # the zero slots of matrices without a gradient orthogonalise to exactly zero
            if self.row_norm:
                nesterov = nesterov / nesterov.float().norm(dim=-1, keepdim=True).clamp_min(1e-7)
            shape = stack.shape[1:]
            torch.mul(self.orthogonalize(nesterov, group["backend_steps"]), max(1.0, shape[0] / shape[1]) ** 0.5,
                      out=update)
        self.in_flight = None
        if self.world > 1:
            all_gather(self.gathered, self.update).wait()
        gathered, params, deltas = self.gathered.to(self.matrices[0].dtype), [], []
        for q in range(self.world):
            for members, stack in self.stacks(gathered, q, q * self.chunk):
                params += [self.matrices[i] for i in members]
                deltas += list(stack)
        if wd > 0:
            torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_add_(params, deltas, alpha=-lr)


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer-agnostic bits per byte

def build_byte_luts(sp: spm.SentencePieceProcessor, vocab_size: int):
    """Per-token UTF-8 byte counts: (base_bytes int16, has_leading_space bool, is_boundary bool)."""
    n = max(sp.vocab_size(), vocab_size)
    base_bytes, has_space, is_boundary = np.zeros(n, np.int16), np.zeros(n, np.bool_), np.ones(n, np.bool_)
    for i in range(sp.vocab_size()):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        is_boundary[i] = False
        if sp.is_byte(i):
            base_bytes[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith("\u2581"):
            has_space[i], piece = True, piece[1:]
        base_bytes[i] = len(piece.encode("utf-8"))
    return tuple(torch.from_numpy(a) for a in (base_bytes, has_space, is_boundary))


def target_bytes(prev: Tensor, tgt: Tensor, luts) -> Tensor:
    """Bytes of each target: its piece, plus the space of a leading '▁' unless it follows a boundary token."""
    base_bytes, has_space, is_boundary = luts
    return base_bytes[tgt].to(torch.int64) + (has_space[tgt] & ~is_boundary[prev]).to(torch.int64)


def token_bytes(tokens: Tensor, luts) -> Tensor:
    """The bytes of every token of a stream as a target (int16; the first token, never a target, 0): what every
    evaluation sums, once per scored target."""
    out = torch.zeros(len(tokens), dtype=torch.int16)
    out[1:] = target_bytes(tokens[:-1].long(), tokens[1:].long(), luts)
    return out


def load_tokenizer(path: str, vocab_size: int) -> spm.SentencePieceProcessor:
    if not path.endswith(".model") or not os.path.isfile(path):
        raise InputError(f"TOKENIZER_PATH={path}: expected an existing SentencePiece .model file")
    sp = spm.SentencePieceProcessor(model_file=path)
    if sp.vocab_size() != vocab_size:
        raise InputError(f"TOKENIZER_PATH={path} has vocab {sp.vocab_size()} but VOCAB_SIZE={vocab_size}")
    return sp


# ---------------------------------------------------------------------------------------------------------------
# Data: shards (256 x int32 header: magic 20240520, version 1, n_tokens; then n_tokens x uint16)

SHARD_MAGIC, SHARD_VERSION, HEADER_BYTES = 20240520, 1, 1024


def read_shard_header(path: str) -> int:
    """Validate a shard's header and size; return its token count."""
    try:
        size = os.path.getsize(path)
        header = np.fromfile(path, dtype="<i4", count=256)
    except OSError as e:
        raise InputError(f"{path}: cannot read shard ({e.strerror})") from None
    if header.size != 256:
        raise InputError(f"{path}: {size} bytes is too short for the 1024-byte shard header")
    if header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise InputError(f"{path}: bad shard header (magic {header[0]}, version {header[1]}; "
                         f"expected {SHARD_MAGIC}, {SHARD_VERSION})")
    n = int(header[2])
    if n < 0 or size != HEADER_BYTES + 2 * n:
        raise InputError(f"{path}: size {size} bytes, but its header promises {n} tokens = "
                         f"{HEADER_BYTES + 2 * n} bytes")
    return n


def load_data_shard(path: str) -> np.ndarray:
    """The shard's tokens, memory-mapped: read page by page as used, never a whole shard at once."""
    n = read_shard_header(path)
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n,)) if n else np.zeros(0, np.uint16)


def is_sidecar(path: str) -> bool:
    """A byte sidecar by the records' naming (fineweb_val_bytes_000000.bin): its header is a shard's, not its body."""
    return "_bytes_" in os.path.basename(path)


def resolve_files(pattern: str, variable: str, sidecars: bool = False) -> list[str]:
    """The files the glob matches, sorted; token shards (sidecars=False) must not include a byte sidecar."""
    files = sorted(glob.glob(pattern))
    if not files:
        raise InputError(f"{variable}={pattern}: no files match")
    if not sidecars and (sidecar := next((f for f in files if is_sidecar(f)), None)):
        split = "train" if variable == "TRAIN_FILES" else "val"
        folder = os.path.dirname(pattern) or "."
        raise InputError(f"{variable}={pattern} matches {sidecar}, a byte sidecar (byte counts, not token ids): use "
                         f"a glob that leaves it out, e.g. {folder}/fineweb_{split}_[0-9]*.bin")
    return files


class TokenStream:
    """All shards read in sorted order, end to end, wrapping around after the last."""

    def __init__(self, files: list[str]):
        self.files, self.index, self.pos = files, 0, 0
        self.tokens = load_data_shard(files[0])

    def take(self, n: int) -> np.ndarray:
        parts = []
        while n > 0:
            if self.pos == len(self.tokens):
                self.index = (self.index + 1) % len(self.files)
                self.tokens, self.pos = load_data_shard(self.files[self.index]), 0
                continue
            k = min(n, len(self.tokens) - self.pos)
            parts.append(self.tokens[self.pos : self.pos + k])
            self.pos, n = self.pos + k, n - k
        return np.concatenate(parts)


class DistributedTokenLoader:
    """Every rank reads the same stream; each takes its own contiguous span (+1 token for the shifted targets).
    The next span is staged as soon as the current one is handed out: on CUDA one non-blocking copy from pinned
    memory (x and y are views of it; the caching host allocator keeps the buffer until the copy is done)."""

    def __init__(self, files: list[str], rank: int, world_size: int, device: torch.device, local_tokens: int,
                 seq_len: int):
        self.stream, self.rank, self.world_size, self.device = TokenStream(files), rank, world_size, device
        self.span, self.seq_len = local_tokens + 1, seq_len
        self.staged = self.stage()

    def stage(self) -> Tensor:
        chunk = self.stream.take(self.span * self.world_size)[self.rank * self.span : (self.rank + 1) * self.span]
        tokens = torch.from_numpy(chunk.astype(np.int64))
        return tokens.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else tokens

    def next_batch(self) -> tuple[Tensor, Tensor]:
        tokens, self.staged = self.staged, self.stage()
        return tokens[:-1].view(-1, self.seq_len), tokens[1:].view(-1, self.seq_len)


def check_token_ids(tokens: np.ndarray, vocab_size: int, source: str) -> None:
    """Data made with another tokenizer would index past the embedding table: refuse it up front."""
    if len(tokens) and int(tokens.max()) >= vocab_size:
        raise InputError(f"{source}: token id {int(tokens.max())} >= VOCAB_SIZE={vocab_size} "
                         "(data from another tokenizer?)")


def load_validation_tokens(files: list[str], seq_len: int, max_tokens: int) -> Tensor:
    """Concatenated val shards, cut to a whole number of seq_len targets (+1 token for the last target)."""
    tokens = np.concatenate([load_data_shard(f) for f in files])
    if max_tokens:
        tokens = tokens[: max_tokens + 1]
    usable = (len(tokens) - 1) // seq_len * seq_len
    if usable <= 0:
        raise InputError(f"validation set {files[0]}...: {len(tokens)} tokens, fewer than one "
                         f"{seq_len}-token sequence + 1")
    return torch.from_numpy(tokens[: usable + 1].astype(np.int64))


CASEOPS_OPERATORS = "\ue001\ue002\ue003\ue004"  # TITLE, ALLCAPS, CAPNEXT, ESC: pieces of a CaseOps tokenizer


def sidecar_pattern(hp: SimpleNamespace) -> str:
    """VAL_BYTES_FILES, else the val glob with its file name's fineweb_val_ -> fineweb_val_bytes_ (the records'
    naming; "" when the name has no fineweb_val_)."""
    if hp.val_bytes_files:
        return hp.val_bytes_files
    folder, name = os.path.split(hp.val_glob)
    return os.path.join(folder, name.replace("fineweb_val_", "fineweb_val_bytes_", 1)) if "fineweb_val_" in name else ""


def validation_bytes(hp: SimpleNamespace, sp: spm.SentencePieceProcessor, luts, val_files: list[str],
                     val_tokens: Tensor) -> tuple[Tensor, list[str]]:
    """The bytes of every validation token as a target (int16, aligned with val_tokens, cut as they are) and the
    sidecar files they came from: the dataset's byte sidecars when it has them (VAL_BYTES_FILES, or found beside
    the shards by name), one per shard with the same token count, each token's bytes of the original text (CaseOps
    data needs them: its tokens do not spell the original text); else the tokenizer's table ([] files). A CaseOps
    tokenizer without sidecars, or a sidecar that disagrees with its shard or with the tokens, is an error."""
    pattern = sidecar_pattern(hp)
    files = resolve_files(pattern, "VAL_BYTES_FILES", sidecars=True) if hp.val_bytes_files else \
        sorted(glob.glob(pattern)) if pattern else []
    ids = np.array([sp.piece_to_id(op) for op in CASEOPS_OPERATORS])
    ops = ids[[sp.id_to_piece(int(i)) == op for i, op in zip(ids, CASEOPS_OPERATORS)]]
    if not files:
        if len(ops):
            raise InputError(f"TOKENIZER_PATH={hp.tokenizer_path} is a CaseOps tokenizer (it has the case operators "
                             f"U+E001-U+E004), whose tokens do not spell the original text, and no byte sidecar "
                             f"matches {pattern or 'VAL_BYTES_FILES'}: set VAL_BYTES_FILES to its "
                             "fineweb_val_bytes_*.bin")
        return token_bytes(val_tokens, luts), []
    if len(files) != len(val_files):
        raise InputError(f"VAL_BYTES_FILES={pattern}: {len(files)} byte sidecars for {len(val_files)} validation "
                         f"shards (VAL_FILES={hp.val_glob}); expected one per shard")
    for shard, sidecar in zip(val_files, files):
        if not hp.val_bytes_files and os.path.basename(sidecar) != \
                os.path.basename(shard).replace("fineweb_val_", "fineweb_val_bytes_", 1):
            raise InputError(f"{sidecar}: not the byte sidecar of {shard} by name; set VAL_BYTES_FILES explicitly")
        if (n := read_shard_header(sidecar)) != (tokens := read_shard_header(shard)):
            raise InputError(f"{sidecar}: {n} byte counts, but its shard {shard} holds {tokens} tokens")
    counts = np.concatenate([load_data_shard(f) for f in files])[: len(val_tokens)].astype(np.int32)
    tokens = val_tokens.numpy()
    zero = np.array([sp.is_control(i) for i in range(sp.vocab_size())])
    literal = np.r_[False, tokens[:-1] == ops[-1]] & (counts == 3) if len(ops) == 4 else np.zeros(len(tokens), bool)
    for bad, why in [(counts > torch.iinfo(torch.int16).max, "more bytes than one token can stand for"),
                     (zero[tokens] & (counts != 0), "a control token (BOS) stands for no text"),
                     (np.isin(tokens, ops) & (counts != 0) & ~literal, "a case operator stands for no text (only "
                      "one escaped by ESC, 3 bytes)")]:
        if bad.any():
            at = int(np.flatnonzero(bad)[0])
            raise InputError(f"VAL_BYTES_FILES={pattern}: validation token {at} (id {tokens[at]}, "
                             f"{sp.id_to_piece(int(tokens[at]))!r}) has {counts[at]} bytes: {why}")
    return torch.from_numpy(counts.astype(np.int16)), files


# ---------------------------------------------------------------------------------------------------------------
# Model

def rms_norm(x: Tensor) -> Tensor:
    """Parameter-free RMSNorm in the input's dtype (CUDA autocast computes rms_norm in fp32 since torch 2.12)."""
    return F.rms_norm(x, (x.size(-1),)).to(x.dtype)


def int6_rows(w: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row int6 grid on [-32, 31]: scale = max(rowmax/31, 1/31) in fp16, q = round(w/scale) (float-valued)."""
    scale = (w.abs().amax(dim=-1, keepdim=True) / 31).clamp_min(1 / 31).half()
    return torch.clamp(torch.round(w / scale.float()), -32, 31), scale


class CastedLinear(nn.Linear):
    """fp32 master weight, cast to the activation dtype at call time; no bias. Initialised by GPT: zeros, or
    orthogonal times init_scale (PyTorch's default when a side is under 64)."""

    def __init__(self, in_features: int, out_features: int, zero_init: bool = False, init_scale: float = 1.0):
        super().__init__(in_features, out_features, bias=False)
        self.zero_init, self.init_scale = zero_init, init_scale

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype))


def rope_inv_freq(seq_len: int, dims: int, base: float, train_seq_len: int) -> Tensor:
    """Frequencies of the `dims` rotated dimensions. ROPE_BASE holds at the training length; longer eval lengths
    get the NTK-scaled base (2 dims have one frequency, 1, whatever the base)."""
    if seq_len > train_seq_len and dims > 2:
        base = base * (seq_len / train_seq_len) ** (dims / (dims - 2))
    return 1.0 / base ** (torch.arange(0, dims, 2, dtype=torch.float32) / dims)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first 2 * cos.size(-1) dims (their halves paired); the rest pass through."""
    dims = 2 * cos.size(-1)
    if dims < x.size(-1):
        return torch.cat((apply_rope(x[..., :dims], cos, sin), x[..., dims:]), dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


# Attention: one backend for every call, chosen at start-up (ATTENTION). Each takes (B, T, H, D) queries and
# (B, T, Hkv, D) keys/values; query head h reads KV head h // (H / Hkv).

fa4_attn_func = None  # flash_attn.cute.flash_attn_func (pip flash-attn-4), imported only when ATTENTION=fa4 (slow)


def load_fa4():
    global fa4_attn_func
    if fa4_attn_func is None:
        fa4_attn_func = importlib.import_module("flash_attn.cute").flash_attn_func
    return fa4_attn_func


def fa3_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    y = flash_attn_func(q, k, v, causal=True)
    return y[0] if isinstance(y, tuple) else y  # some FA3 builds return (out, softmax_lse)


def fa4_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return fa4_attn_func(q, k, v, causal=True)[0]  # (out, lse); causal by keyword (its 4th parameter is qv)


def sdpa_attention(kernel: SDPBackend):
    """PyTorch SDPA held to one of its kernels for the call itself (no global flags): PyTorch's own choice may
    differ between versions, and a kernel that cannot take the inputs then fails at the probe, not mid-run."""

    def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        with sdpa_kernel([kernel]):
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True, enable_gqa=True)
        return y.transpose(1, 2)

    return attention


ATTENTION_KERNELS = dict(fa3=fa3_attention, fa4=fa4_attention, cudnn=sdpa_attention(SDPBackend.CUDNN_ATTENTION),
                         flash=sdpa_attention(SDPBackend.FLASH_ATTENTION),
                         efficient=sdpa_attention(SDPBackend.EFFICIENT_ATTENTION), math=sdpa_attention(SDPBackend.MATH))
ATTENTION_LABELS = dict(fa3="FlashAttention-3", fa4="FlashAttention-4", cudnn="cuDNN SDPA", flash="flash SDPA",
                        efficient="memory-efficient SDPA", math="math SDPA")
CUDA_ONLY_ATTENTION = ("fa3", "fa4", "cudnn", "efficient")
# auto: FA3, else flash SDPA as before (the records' kernels); the two others only run on fp32 or head sizes flash does
# not take. fa4 and cudnn run only when named, until a GPU measures them faster than these (docs/BENCHMARKS.md).
AUTO_ATTENTION = ("fa3", "flash", "efficient", "math")
PROBE_SEQ_LEN = 256  # longest probe sequence: two 128-row tiles, so a causal mask across tiles is exercised
PROBE_TOLERANCE = 0.02  # relative L2 error against fp64; bf16 rounding gives ~0.004, a wrong mask or head map > 0.1
ATTENTION = "flash"  # the backend every call uses, decided once at start-up by choose_attention


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return ATTENTION_KERNELS[ATTENTION](q, k, v)


def reference_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal GQA attention written out in the inputs' dtype: each KV head repeated over its query heads."""
    group, t = q.size(2) // k.size(2), q.size(1)
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.size(-1))
    future = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
    return torch.einsum("bhqk,bkhd->bqhd", scores.masked_fill(future, float("-inf")).softmax(-1), v)


def first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def attention_unavailable(name: str, rt: SimpleNamespace) -> str | None:
    """Why backend `name` cannot run here at all (not installed, no CUDA); None when it may, pending its probe."""
    if name == "fa3" and flash_attn_func is None:
        return "flash_attn_interface is not installed"
    if name == "fa4":
        try:
            load_fa4()
        except Exception as e:  # not installed, or installed but broken: either way not usable
            return f"flash_attn.cute does not import ({first_line(e)})"
    if name in CUDA_ONLY_ATTENTION and not rt.cuda:
        return "no CUDA device"
    return None


def probe_attention(name: str, hp: SimpleNamespace, rt: SimpleNamespace) -> tuple[bool, str]:
    """(passed, what it saw): backend `name` on this device, at the run's dtype, head size and head counts, causal,
    forward and backward, compiled when the model will be (some kernels run eagerly but cannot be traced). Its
    output and input gradients must match an fp64 reference within PROBE_TOLERANCE: running is not enough."""
    shape, head_dim = (2, min(hp.train_seq_len, PROBE_SEQ_LEN)), hp.model_dim // hp.num_heads
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(*shape, n, head_dim, generator=g, dtype=torch.float64)
              for n in (hp.num_heads, hp.num_kv_heads, hp.num_kv_heads)]
    grad = torch.randn(*shape, hp.num_heads, head_dim, generator=g, dtype=torch.float64)
    exact = [x.clone().requires_grad_() for x in inputs]
    out = reference_attention(*exact)
    out.backward(grad)
    expected = [out.detach()] + [x.grad for x in exact]
    dtype = "bf16" if rt.precision == torch.bfloat16 else "fp32"
    setup = (f"dtype:{dtype} head_dim:{head_dim} heads:{hp.num_heads}/{hp.num_kv_heads} seq:{shape[1]} "
             f"compiled:{int(bool(rt.compile))}")
    try:
        xs = [x.to(rt.device, rt.precision).requires_grad_() for x in inputs]
        y = maybe_compile(ATTENTION_KERNELS[name], rt)(*xs)
        if y.shape != xs[0].shape:
            return False, f"output of shape {tuple(y.shape)}, expected {tuple(xs[0].shape)} ({setup})"
        y.backward(grad.to(rt.device, y.dtype))
        got = [y.detach()] + [x.grad for x in xs]
        if any(t is None for t in got):
            return False, f"no gradient for {', '.join(n for n, t in zip('qkv', got[1:]) if t is None)} ({setup})"
    except Exception as e:
        return False, f"{first_line(e)} ({setup})"
    errors = [((a.double().cpu() - b).norm() / b.norm()).item() for a, b in zip(got, expected)]
    seen = " ".join(f"err_{n}:{e:.2g}" for n, e in zip(("out", "dq", "dk", "dv"), errors)) + " " + setup
    if not all(e <= PROBE_TOLERANCE for e in errors):  # NaN fails too
        return False, f"wrong numbers, relative errors above {PROBE_TOLERANCE} ({seen})"
    return True, seen


def choose_attention(mode: str, hp: SimpleNamespace, rt: SimpleNamespace) -> tuple[str, str, str]:
    """(backend, why, what its probe saw) for ATTENTION=auto or a backend's name. auto takes the first of
    AUTO_ATTENTION that is available and passes its probe; a named backend that does not is an input error."""
    if mode != "auto":
        why = attention_unavailable(mode, rt)
        passed, seen = (False, why) if why else probe_attention(mode, hp, rt)
        if not passed:
            raise InputError(f"ATTENTION={mode}: {ATTENTION_LABELS[mode]} is unusable here ({seen})")
        return mode, f"ATTENTION={mode}", seen
    skipped = []
    for name in AUTO_ATTENTION:
        why = attention_unavailable(name, rt)
        passed, seen = (False, why) if why else probe_attention(name, hp, rt)
        if passed:
            return name, "; ".join(skipped + [f"{name} passed its probe (auto never picks fa4 or cudnn: not yet "
                                                  "measured faster)"]), seen
        skipped.append(f"{name}: {seen}")
    raise InputError("ATTENTION=auto: no attention backend passed its probe (" + "; ".join(skipped) + ")")


def agree_on_attention(name: str, rt: SimpleNamespace) -> None:
    """Every rank must run the same kernel (their probes ran apart): else one clear error, not silent drift."""
    index = list(ATTENTION_KERNELS).index(name)
    highest, minus_lowest = agree_max([index, -index], rt)
    if highest != -minus_lowest:
        raise InputError(f"the ranks' attention probes chose different backends ({name} on rank {rt.rank}): "
                         "set ATTENTION to one that every rank passes")


def exclude_self_value(y: Tensor, v: Tensor) -> Tensor:
    """XSA: drop from each head's output its component along the token's own (unit) value vector.
    y: (B, T, H, D), v: (B, T, Hkv, D); query head h belongs to KV head h // (H / Hkv)."""
    b, t, h, d = y.shape
    y = y.view(b, t, v.size(2), h // v.size(2), d)
    v_hat = F.normalize(v, dim=-1).unsqueeze(3)
    return (y - (y * v_hat).sum(-1, keepdim=True) * v_hat).view(b, t, h, d)


class LoRA(NamedTuple):
    """Per-row low-rank adapter of one projection (LoRA TTT): row i of a batch adds (x A_i^T) B_i^T * scale."""
    a: Tensor  # (rows, rank, in)
    b: Tensor  # (rows, out, rank)
    scale: float  # alpha / rank


class SlotLoRA(NamedTuple):
    """The adapters of one virtual layer (a physical layer's pass): Q, K and V on the attention's normed input; O and
    MLP bypasses from the normed inputs of the attention and of the MLP, added to their outputs."""
    q: LoRA
    k: LoRA
    v: LoRA
    o: LoRA
    mlp: LoRA


class Adapters(NamedTuple):
    """Per-document adapters of a batch (one document per row): one SlotLoRA per virtual layer, and the head's."""
    slots: tuple[SlotLoRA, ...]
    head: LoRA


def low_rank(x: Tensor, lora: LoRA) -> Tensor:
    return (x @ lora.a.to(x.dtype).transpose(1, 2)) @ lora.b.to(x.dtype).transpose(1, 2) * lora.scale


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, qk_gain_init: float, xsa: bool):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.xsa = num_heads, num_kv_heads, dim // num_heads, xsa
        self.c_q = CastedLinear(dim, dim)
        self.c_k = CastedLinear(dim, num_kv_heads * self.head_dim)
        self.c_v = CastedLinear(dim, num_kv_heads * self.head_dim)
        self.proj = CastedLinear(dim, dim, zero_init=True)
        self.q_gain = nn.Parameter(torch.full((num_heads,), qk_gain_init))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, lora: SlotLoRA | None = None) -> Tensor:
        b, t, _ = x.shape
        q, k, v = self.c_q(x), self.c_k(x), self.c_v(x)
        if lora is not None:
            q, k, v = q + low_rank(x, lora.q), k + low_rank(x, lora.k), v + low_rank(x, lora.v)
        q = q.view(b, t, self.num_heads, self.head_dim)
        k = k.view(b, t, self.num_kv_heads, self.head_dim)
        v = v.view(b, t, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(rms_norm(q), cos, sin), apply_rope(rms_norm(k), cos, sin)
        y = causal_attention(q * self.q_gain.to(q.dtype)[:, None], k, v)
        if self.xsa:
            y = exclude_self_value(y, v)
        out = self.proj(y.reshape(b, t, -1))
        return out if lora is None else out + low_rank(x, lora.o)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, neg_slope: float):
        super().__init__()
        self.fc, self.proj = CastedLinear(dim, hidden), CastedLinear(hidden, dim, zero_init=True)
        self.neg_slope = neg_slope

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        return self.proj((F.leaky_relu(h, self.neg_slope) if self.neg_slope else F.relu(h)).square())


class Block(nn.Module):
    """One physical layer. In the loop segment it runs once per pass (pass k > 0 with MLP k - 1 of loop_mlps when
    LOOP_UNTIE_MLP); from PARALLEL_START on, attention and MLP read the same input (gptj) or two lanes (lanes)."""

    def __init__(self, dim: int, hp: SimpleNamespace, layer: int):
        super().__init__()
        self.attn = CausalSelfAttention(dim, hp.num_heads, hp.num_kv_heads, hp.qk_gain_init,
                                        xsa=layer >= hp.num_layers - hp.xsa_last_n)
        self.mlp = MLP(dim, int(hp.mlp_mult * dim), hp.mlp_neg_slope)
        if hp.ln_scale:  # a tensor, not a constant, so that every layer's block is one compiled graph
            self.register_buffer("ln_scale", torch.tensor(1 / math.sqrt(layer + 1)), persistent=False)
        else:
            self.ln_scale = None
        self.attn_scale = nn.Parameter(torch.ones(dim))
        self.mlp_scale = nn.Parameter(torch.ones(dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))))
        looped = hp.loop is not None and hp.loop[0] <= layer <= hp.loop[1]
        self.loop_mlps = nn.ModuleList(MLP(dim, int(hp.mlp_mult * dim), hp.mlp_neg_slope)
                                       for _ in range(hp.loop_extra)) if hp.loop_untie_mlp and looped else None
        self.parallel = hp.parallel_mode if 0 < hp.parallel_start <= layer else ""
        if self.parallel == "lanes":  # lane k <- r[i] l_k + post[i, k] out_i, i = 0 attention, 1 MLP
            self.lane_resid = nn.Parameter(torch.full((2,), math.sqrt(1.1)))
            self.lane_post = nn.Parameter(torch.ones(2, 2))

    def norm(self, x: Tensor) -> Tensor:
        return rms_norm(x) if self.ln_scale is None else rms_norm(x) * self.ln_scale

    def mlp_of_pass(self, k: int) -> MLP:
        return self.loop_mlps[k - 1] if k and self.loop_mlps is not None else self.mlp

    def mlp_out(self, mlp: MLP, h: Tensor, lora: SlotLoRA | None) -> Tensor:
        """The MLP's output from its normed input h, plus the adapter's bypass from h when there is one."""
        return mlp(h) if lora is None else mlp(h) + low_rank(h, lora.mlp)

    def forward(self, x: Tensor, x0: Tensor, cos: Tensor, sin: Tensor, mlp: MLP | None = None,
                lora: SlotLoRA | None = None) -> Tensor:
        """`mlp`: the MLP of this pass (default: the block's own), chosen by the caller, so that under compile a pass
        is an input of the block's graph, not a constant of a graph of its own; likewise `lora`, this pass's
        per-document adapters (LoRA TTT; None: the plain block)."""
        mlp, mix = self.mlp if mlp is None else mlp, self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        if self.parallel == "gptj":
            h = self.norm(x)
            return (x + self.attn_scale.to(x.dtype) * self.attn(h, cos, sin, lora)
                    + self.mlp_scale.to(x.dtype) * self.mlp_out(mlp, h, lora))
        x = x + self.attn_scale.to(x.dtype) * self.attn(self.norm(x), cos, sin, lora)
        return x + self.mlp_scale.to(x.dtype) * self.mlp_out(mlp, self.norm(x), lora)

    def forward_lanes(self, lanes: tuple[Tensor, Tensor], x0: Tensor, cos: Tensor, sin: Tensor,
                      mlp: MLP | None = None, lora: SlotLoRA | None = None) -> tuple[Tensor, Tensor]:
        """The two-lane parallel block of the 1.1063 record: attention reads lane 0, the MLP lane 1 (after the
        attention output was added to it), each output is added to both lanes with learned weights."""
        l0, l1, mlp = *lanes, self.mlp if mlp is None else mlp
        mix, r, post = (t.to(l0.dtype) for t in (self.resid_mix, self.lane_resid, self.lane_post))
        a = self.attn_scale.to(l0.dtype) * self.attn(self.norm(mix[0] * l0 + mix[1] * x0), cos, sin, lora)
        l0, l1 = r[0] * l0 + post[0, 0] * a, r[0] * l1 + post[0, 1] * a
        m = self.mlp_scale.to(l0.dtype) * self.mlp_out(mlp, self.norm(mix[0] * l1 + mix[1] * x0), lora)
        return r[1] * l0 + post[1, 0] * m, r[1] * l1 + post[1, 1] * m


def bigram_buckets(ids: Tensor, buckets: int) -> Tensor:
    """Hash of (previous, current) token into buckets-1 slots; position 0 gets the reserved last bucket."""
    ids = ids.to(torch.int32)
    mixed = torch.bitwise_xor(36313 * ids[:, 1:], 27191 * ids[:, :-1]) % (buckets - 1)
    return torch.cat((torch.full_like(ids[:, :1], buckets - 1), mixed), dim=1)


class BigramHash(nn.Module):
    """A hashed (previous, current) token embedding added to the token embedding: a zero table, so it starts
    silent, read through a projection scaled as a residual branch's output (1/sqrt(2 layers))."""

    def __init__(self, buckets: int, bigram_dim: int, dim: int, num_layers: int):
        super().__init__()
        self.buckets = buckets
        self.embed = nn.Embedding(buckets, bigram_dim)
        nn.init.zeros_(self.embed.weight)
        self.proj = CastedLinear(bigram_dim, dim, init_scale=1 / math.sqrt(2 * num_layers))
        self.scale = nn.Parameter(torch.tensor(0.05))

    def forward(self, ids: Tensor, dtype: torch.dtype) -> Tensor:
        h = self.proj(self.embed(bigram_buckets(ids, self.buckets)).to(dtype))
        return h * self.scale.to(h.dtype)


class SmearGate(nn.Module):
    """out_t = (1 - g) x_t + g x_{t-1}, g = sigmoid(gate) per channel (0.5 at init), x_{-1} = 0."""

    def __init__(self, dim: int):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        g = torch.sigmoid(self.gate.to(x.dtype))
        return (1 - g) * x + g * F.pad(x[:, :-1], (0, 0, 1, 0))


class GPT(nn.Module):
    def __init__(self, hp: SimpleNamespace, dtype: torch.dtype):
        super().__init__()
        dim, layers = hp.model_dim, hp.num_layers
        self.softcap, self.fused_ce = hp.logit_softcap, hp.fused_ce
        self.rope_dims = hp.rope_dims or dim // hp.num_heads
        self.rope_base, self.train_seq_len = hp.rope_base, hp.train_seq_len
        self.act_dtype = dtype  # of the residual stream
        self.tok_emb = nn.Embedding(hp.vocab_size, dim)
        self.bigram = BigramHash(hp.bigram_vocab_size, hp.bigram_dim, dim, layers) if hp.bigram_vocab_size else None
        self.smear = SmearGate(dim)
        self.num_layers, self.loop, self.loop_passes = layers, hp.loop, len(hp.loop_starts)  # passes on: all
        encoder = len(self.virtual_layers()) // 2  # skips sized for the shape with every pass on
        self.skip_weights = nn.Parameter(torch.ones(min(encoder, len(self.virtual_layers()) - encoder), dim))
        self.skip_gates = nn.Parameter(torch.zeros(len(self.skip_weights), dim)) if hp.skip_gates else None
        self.blocks = nn.ModuleList(Block(dim, hp, i) for i in range(layers))
        nn.init.normal_(self.tok_emb.weight, std=hp.tied_embed_init_std)
        for m in self.modules():
            if not isinstance(m, CastedLinear):
                continue
            if m.zero_init:
                nn.init.zeros_(m.weight)
            elif min(m.weight.shape) >= 64:
                nn.init.orthogonal_(m.weight)
                m.weight.data.mul_(m.init_scale)

    def embed(self, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x0, the embedded input every block reads, and RoPE's cos and sin at the input's length."""
        t = ids.size(1)
        freqs = torch.outer(torch.arange(t, device=ids.device, dtype=torch.float32),
                            rope_inv_freq(t, self.rope_dims, self.rope_base, self.train_seq_len).to(ids.device))
        x = self.tok_emb(ids).to(self.act_dtype)  # a no-op unless TTT trains the tables in fp32
        cos, sin = freqs.cos()[None, :, None, :].to(x.dtype), freqs.sin()[None, :, None, :].to(x.dtype)
        if self.bigram is not None:
            x = x + self.bigram(ids, x.dtype)
        return self.smear(rms_norm(x)), cos, sin

    def hidden(self, ids: Tensor, adapters: Adapters | None = None) -> Tensor:
        """The final hidden states; `adapters`: per-document adapters, one per virtual layer, or None."""
        x0, cos, sin = self.embed(ids)
        x, order = x0.view_as(x0), self.virtual_layers()  # not x0 itself: a compiled block would specialise on it
        encoder, skips, lanes = len(order) // 2, [], None
        for i, (layer, k) in enumerate(order):
            if i >= encoder and skips:  # decoder position j takes the j-th innermost encoder output
                skip = skips.pop()
                if lanes is None:
                    x = self.add_skip(i - encoder, x, skip)
                else:
                    lanes = tuple(self.add_skip(i - encoder, lane, skip) for lane in lanes)
            block, lora = self.blocks[layer], None if adapters is None else adapters.slots[i]
            if block.parallel == "lanes":
                lanes = block.forward_lanes(lanes or (x, x.view_as(x)), x0, cos, sin, block.mlp_of_pass(k), lora)
            else:
                x = block(x, x0, cos, sin, block.mlp_of_pass(k), lora)
            if i < encoder:
                skips.append(x)
        return rms_norm(x if lanes is None else (lanes[0] + lanes[1]) / 2)

    def set_loop_passes(self, n: int) -> list[tuple[str, str]]:
        """Switches extra passes on. An untied pass starts as a copy of its block's MLP: the switch changes the
        path, not a weight. Returns the (source, copy) state-dict prefixes copied."""
        copied = []
        for k in range(self.loop_passes + 1, n + 1):
            for i, block in enumerate(self.blocks):
                if block.loop_mlps is not None:
                    block.loop_mlps[k - 1].load_state_dict(block.mlp.state_dict())
                    copied.append((f"blocks.{i}.mlp.", f"blocks.{i}.loop_mlps.{k - 1}."))
        self.loop_passes = n
        return copied

    def virtual_layers(self) -> list[tuple[int, int]]:
        """(physical layer, pass) in running order: the loop segment a..b again after b, once per pass on."""
        a, b = self.loop or (self.num_layers, self.num_layers)
        passes = [(layer, k) for k in range(1, self.loop_passes + 1) for layer in range(a, b + 1)]
        return [(i, 0) for i in range(min(b + 1, self.num_layers))] + passes + \
            [(i, 0) for i in range(b + 1, self.num_layers)]

    def add_skip(self, j: int, x: Tensor, skip: Tensor) -> Tensor:
        """U-Net skip j: x + w skip, or with SKIP_GATES the blend s x + (1 - s) w skip, s = sigmoid(gate)."""
        w = self.skip_weights[j].to(x.dtype)
        if self.skip_gates is None:
            return x + w * skip
        s = torch.sigmoid(self.skip_gates[j].to(x.dtype))
        return s * x + (1 - s) * (w * skip)

    def embedding_tables(self) -> list[nn.Parameter]:
        return [self.tok_emb.weight] + ([self.bigram.embed.weight] if self.bigram is not None else [])

    def head(self, x: Tensor) -> Tensor:
        """The tied head (the token embedding): raw logits, in x's dtype."""
        return F.linear(x, self.tok_emb.weight.to(x.dtype))

    def logits(self, x: Tensor, adapter: LoRA | None = None) -> Tensor:
        """The tied head with a tanh softcap, in fp32; `adapter`: a per-row low-rank term added to the raw logits
        (LoRA TTT)."""
        raw = self.head(x) if adapter is None else self.head(x) + low_rank(x, adapter)
        return self.softcap * torch.tanh(raw.float() / self.softcap)

    def loss(self, x: Tensor, targets: Tensor, reduction: str = "mean", adapter: LoRA | None = None) -> Tensor:
        """Cross-entropy of the targets from the final hidden states x (reduction "none": per position)."""
        return F.cross_entropy(self.logits(x, adapter).flatten(0, 1), targets.flatten(), reduction=reduction)

    def objective(self, x: Tensor, targets: Tensor) -> Tensor:
        """The training loss: the mean cross-entropy (a region compiled apart from the evaluations' per-position
        losses, whose shapes vary); under FUSED_CE the same loss by SoftcappedCrossEntropy."""
        if self.fused_ce:
            return SoftcappedCrossEntropy.apply(self.head(x).flatten(0, 1), targets.flatten(), self.softcap)
        return self.loss(x, targets)

    def forward(self, ids: Tensor, targets: Tensor) -> Tensor:
        return self.objective(self.hidden(ids), targets)


def build_model(hp: SimpleNamespace, device: torch.device) -> GPT:
    """fp32 init, then the activation dtype (PRECISION) everywhere except linear weights, small and control tensors
    (fp32 masters); buffers (constants such as the LN scales) stay fp32, as the Python floats they stand for."""
    model = GPT(hp, ACT_DTYPE)
    for name, p in model.named_parameters():
        p.data = p.data.to(ACT_DTYPE)
    for m in model.modules():
        if isinstance(m, CastedLinear):
            m.float()
    for name, p in model.named_parameters():
        if p.ndim < 2 or any(c in name for c in hp.control_patterns):
            p.data = p.data.float()
    return model.to(device)


# ---------------------------------------------------------------------------------------------------------------
# Fused softcapped cross-entropy (FUSED_CE=1): the training loss without two fp32 copies of the logits

class SoftcappedCrossEntropy(torch.autograd.Function):
    """mean_i CE(c tanh(z_i / c), t_i) of raw logits z (N, V) and its gradient (softmax - onehot) (1 - tanh^2) / N.
    Autograd through GPT.loss keeps two fp32 N x V tensors for the backward (tanh's output and log_softmax's);
    this keeps z (bf16 under autocast: a quarter of their bytes) and each row's log-sum-exp, and recomputes tanh in
    the backward, which is one fused expression (the softcap's c and 1/c cancel). The same loss and gradients up to
    rounding: the loss is lse - l_t where log_softmax computes l_t - max - log(sum), and the gradient multiplies by
    (1 - tanh^2) once where autograd multiplies by c, by (1 - tanh^2) and divides by c (tests/test_fused_ce.py)."""

    @staticmethod
    def forward(ctx, raw: Tensor, targets: Tensor, softcap: float) -> Tensor:
        logits = torch.div(raw.float(), softcap).tanh_().mul_(softcap)  # GPT.logits, in one buffer
        lse = torch.logsumexp(logits, dim=-1)
        ctx.save_for_backward(raw, targets, lse)
        ctx.softcap = softcap
        return (lse - logits.gather(1, targets[:, None]).squeeze(1)).mean()

    @staticmethod
    def backward(ctx, grad: Tensor):
        raw, targets, lse = ctx.saved_tensors
        tanh = torch.div(raw.float(), ctx.softcap).tanh_()
        dlogits = torch.mul(tanh, ctx.softcap).sub_(lse[:, None]).exp_()  # the softmax
        dlogits[torch.arange(len(targets), device=targets.device), targets] -= 1
        dlogits.mul_(grad / len(targets)).mul_(tanh.square_().neg_().add_(1))
        return dlogits.to(raw.dtype), None, None


# ---------------------------------------------------------------------------------------------------------------
# Evaluation: every target scored exactly once; stride = window gives the non-overlapping eval

def sliding_windows(total: int, window: int, stride: int) -> list[tuple[int, int]]:
    """(start, first scored offset) of each window over `total` targets. A window scores the targets no earlier
    window scored; the last one is aligned to the end so the tail keeps a full window of context."""
    if total <= window:
        return [(0, 0)]
    starts = range(0, total - window + 1, stride)
    windows = [(s, 0 if s == 0 else window - stride) for s in starts]
    covered = starts[-1] + window
    if covered < total:
        windows.append((total - window, covered - (total - window)))
    return windows


def rank_share(items, rank: int, world_size: int):
    return items[len(items) * rank // world_size : len(items) * (rank + 1) // world_size]


class Scorer:
    """Per-position NLL of the targets a window scores, y[:, first:]: the trunk (compiled once, for the whole
    window) runs on every position, the head and the loss only on the scored ones (a sliding window scores the
    last EVAL_STRIDE of its 2048 positions)."""

    def __init__(self, model: GPT, hidden=None):
        self.model, self.hidden = model, model.hidden if hidden is None else hidden

    def __call__(self, x: Tensor, y: Tensor, first: int) -> Tensor:
        return self.model.loss(self.hidden(x)[:, first:], y[:, first:], "none").view(len(y), -1)


def score_windows(scorer, val: Tensor, val_bytes: Tensor, windows: list[tuple[int, int]], window: int,
                  batch_windows: int, sums: Tensor) -> None:
    """Adds the NLL, count and bytes (val_bytes, per token) of the targets these windows score to `sums` (float64, on
    the device). Every batch holds batch_windows windows (padding windows score nothing), so every batch has the
    same shape."""
    if not windows:
        return
    windows = windows + [(windows[-1][0], window)] * (-len(windows) % batch_windows)
    positions = torch.arange(window + 1, device=val.device)
    starts, first = (torch.tensor(column, device=val.device)[:, None] for column in zip(*windows))
    for i in range(0, len(windows), batch_windows):
        index = starts[i : i + batch_windows] + positions
        tokens = val[index].long()
        x, y = tokens[:, :-1], tokens[:, 1:]
        head = min(f for _, f in windows[i : i + batch_windows])  # the batch's first scored position (host side)
        with torch.inference_mode(), autocast(val.device):
            nll = scorer(x, y, head)
        scored = positions[head:-1] >= first[i : i + batch_windows]
        sums[0] += (nll.double() * scored).sum()
        sums[1] += scored.sum()
        sums[2] += (val_bytes[index[:, head + 1 :]] * scored).sum()


def metrics(sums: Tensor, world_size: int) -> tuple[float, float, int, int]:
    """(val_loss nats/token, val_bpb, scored tokens, scored bytes), summed over all ranks."""
    if world_size > 1:
        dist.all_reduce(sums)
    loss, tokens, nbytes = sums.tolist()
    return loss / tokens, loss / tokens / math.log(2) * tokens / nbytes, int(tokens), int(nbytes)


def evaluate(scorer, val: Tensor, val_bytes: Tensor, window: int, stride: int, batch_windows: int, rank: int,
             world_size: int) -> tuple[float, float, int, int]:
    """Scores this rank's share of the windows over `val` (tokens and their bytes already on the device)."""
    total = len(val) - 1
    window = min(window, total)
    sums = torch.zeros(3, dtype=torch.float64, device=val.device)  # loss, tokens, bytes
    windows = rank_share(sliding_windows(total, window, stride), rank, world_size)
    score_windows(scorer, val, val_bytes, windows, window, batch_windows, sums)
    return metrics(sums, world_size)


def autocast(device: torch.device):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=ACT_DTYPE == torch.bfloat16)


def all_reduce_flat(tensors: list[Tensor]) -> None:
    """Sums every tensor over the ranks in one collective (one flat fp32 buffer), in place."""
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    dist.all_reduce(flat)
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))


def summed_gradients(params: list[nn.Parameter], world_size: int) -> None:
    """Every parameter's gradient (zeros where it has none) summed over the ranks, in one all-reduce."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    if world_size > 1:
        all_reduce_flat(grads)
    for p, g in zip(params, grads):
        p.grad = g


def ttt_train_chunk(model: nn.Module, params: list[nn.Parameter], optimizer: torch.optim.Optimizer, val: Tensor,
                    starts: Tensor, seq_len: int, num_seqs: int, epochs: int, world_size: int) -> None:
    """`epochs` SGD steps on this rank's sequences val[s : s + seq_len + 1] of an already scored chunk; gradients
    summed over ranks (one all-reduce per step) and divided by the chunk's sequence count, so any split over ranks
    takes the same step."""
    tokens = val[starts[:, None] + torch.arange(seq_len + 1, device=val.device)].long()
    for _ in range(epochs):
        if len(tokens):
            with autocast(tokens.device):
                (model(tokens[:, :-1], tokens[:, 1:]) * len(tokens) / num_seqs).backward()
        summed_gradients(params, world_size)
        nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def train_tables_in_fp32(model: GPT) -> None:
    """The embedding tables in fp32 for test-time training: bf16 would round their ~1e-6 updates away; read in the
    activation dtype they score exactly as before."""
    for table in model.embedding_tables():
        table.data = table.data.float()


def prepare_ttt(model: GPT, hp: SimpleNamespace) -> None:
    """The model as TTT trains it: the embedding tables in fp32, the first TTT_FREEZE_BLOCKS blocks frozen."""
    train_tables_in_fp32(model)
    for i, block in enumerate(model.blocks):
        block.requires_grad_(i >= hp.ttt_freeze_blocks)


def ttt_evaluate(model: GPT, trainer: nn.Module, scorer: Scorer, val: Tensor, val_bytes: Tensor, hp: SimpleNamespace,
                 rt: SimpleNamespace, batch_windows: int, log) -> tuple[float, float, int, int]:
    """Legal score-first test-time training over the sliding-window plan: windows are grouped into chunks of
    TTT_CHUNK_TOKENS targets by their first scored target; each chunk is scored under inference mode, then (all
    but the last) trains the model (prepared by prepare_ttt) on its targets, all scored by then. No target is
    scored by weights that saw it. `trainer` is the model's training forward (compiled or not)."""
    total = len(val) - 1
    window, chunk = min(hp.eval_len, total), hp.ttt_chunk_tokens
    chunks = [[] for _ in range((total + chunk - 1) // chunk)]
    for start, first in sliding_windows(total, window, hp.eval_stride if 0 < hp.eval_stride < window else window):
        chunks[(start + first) // chunk].append((start, first))
    sums = torch.zeros(3, dtype=torch.float64, device=val.device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=hp.ttt_lr, momentum=hp.ttt_momentum)
    seqs_per_chunk = chunk // hp.train_seq_len
    mine = len(rank_share(range(seqs_per_chunk), rt.rank, rt.world_size))
    log(f"ttt:start chunks:{len(chunks)} chunk_tokens:{chunk} epochs:{hp.ttt_epochs} lr:{hp.ttt_lr} "
        f"trainable_params:{sum(p.numel() for p in params)} frozen_blocks:{hp.ttt_freeze_blocks} "
        "embedding_tables:fp32")
    train_s, trained, stopped = 0.0, 0, False
    for c, windows in enumerate(chunks):
        model.eval()
        score_windows(scorer, val, val_bytes, rank_share(windows, rt.rank, rt.world_size), window, batch_windows, sums)
        if c == len(chunks) - 1 or stopped:
            continue
        if hp.ttt_max_seconds > 0 and trained and train_s * (trained + 1) / trained > hp.ttt_max_seconds:
            stopped = True
            log(f"ttt:updates_stopped at_chunk:{c} reason:TTT_MAX_SECONDS={hp.ttt_max_seconds:g} (chunks {c + 1}.."
                f"{len(chunks) - 1} are scored by the weights adapted on chunks 0..{c - 1})")
            continue
        sync(rt)
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = hp.ttt_lr * 0.5 * (1 + math.cos(math.pi * c / (len(chunks) - 1)))
        starts = rank_share(torch.arange(c * chunk, (c + 1) * chunk, hp.train_seq_len, device=val.device),
                            rt.rank, rt.world_size)
        model.train()
        ttt_train_chunk(trainer, params, optimizer, val, starts, hp.train_seq_len, seqs_per_chunk, hp.ttt_epochs,
                        rt.world_size)
        sync(rt)
        train_s = agree_max([train_s + time.perf_counter() - t0], rt)[0]  # one cap decision for all ranks
        trained += 1
    return metrics(sums, rt.world_size)


# ---------------------------------------------------------------------------------------------------------------
# Documents: document-isolated scoring and phased per-document LoRA TTT (the April records' evaluation,
# LINEAGE_TTT_CASEOPS.md §1-2). The validation stream is cut into documents at BOS and no window leaves its document.
# A batch holds one window per row, right-padded with 0 to one of a few lengths: attention is causal, so padding
# after a row's tokens changes nothing before them, and RoPE counts positions from the row's start, as for a lone
# window. Bytes per target come from val_bytes, as in every evaluation.

BOS_ID = 1  # the challenge's tokenizers (pad 0, bos 1, eos 2, unk 3): every document starts with one BOS


class Window(NamedTuple):
    """One row of a document batch: input tokens val[start : start + length], all of one document (their targets
    val[start + 1 : start + length + 1]); the row scores the last `scored` of those targets."""
    start: int
    length: int
    scored: int


NO_WINDOW = Window(0, 0, 0)  # a padding row: keeps a batch at its shape, scores nothing


class Scores(NamedTuple):
    """A batch's last S positions per row, (rows, S) each: the NLL, whether the position is a target the row scores,
    and that target's index (target j is token j + 1 of the stream)."""
    nll: Tensor
    mask: Tensor
    target: Tensor


def documents(val: Tensor) -> list[tuple[int, int]]:
    """(first, end) target indices of every document: a document starts at a BOS (or at the stream's start) and its
    targets run up to and including the next BOS, so the documents' targets are every target exactly once."""
    total = len(val) - 1
    starts = [0] + (val[1:total] == BOS_ID).nonzero().flatten().add(1).tolist()
    return list(zip(starts, starts[1:] + [total]))


def document_windows(first: int, end: int, window: int, stride: int) -> list[Window]:
    """The sliding eval's windows (sliding_windows) inside one document: each of its targets once, with all the
    context the document offers up to `window` tokens."""
    span = min(window, end - first)
    return [Window(first + s, span, span - f) for s, f in sliding_windows(end - first, span, stride)]


def chunk_window(first: int, end: int, ci: int, chunk: int, window: int) -> Window:
    """Chunk ci of a document (its targets chunk * ci onwards, at most `chunk` of them) at the end of the last
    <= `window` tokens of the document that end with it: a document-local window sliding by the chunk (§1.6)."""
    stop = min(chunk * (ci + 1), end - first)
    lo = max(0, stop - window)
    return Window(first + lo, stop - lo, stop - chunk * ci)


def padded_length(n: int, window: int, train_seq_len: int) -> int:
    """The length of a batch whose longest row has n tokens: the next power of two, at least window / 16, so each
    mode compiles at most six shapes and a row computes less than twice its tokens. Beyond TRAIN_SEQ_LEN RoPE's NTK
    base depends on the length (A3): a longer batch takes the whole window, so that no target's score depends on
    the rows it shares a batch with."""
    length = min(window, max(window // 16, 1 << (n - 1).bit_length()))
    return window if length > train_seq_len else length


def length_buckets(hp: SimpleNamespace) -> list[int]:
    """Every length padded_length gives: the shapes compiled before the timed evaluations."""
    return sorted({padded_length(n, hp.eval_len, hp.train_seq_len) for n in range(1, hp.eval_len + 1)})


def window_nll(model: GPT, hidden, val: Tensor, windows: list[Window], rows: int, length: int,
               adapters: Adapters | None = None) -> Scores:
    """The scores of a batch of windows, one per row (padding rows empty), inputs right-padded with 0 to `length`.
    The trunk runs on every position, the head and the loss only on each row's last S positions (S: the most any row
    scores), where its scored targets are."""
    device, s = val.device, max(w.scored for w in windows)
    starts, lengths, scored = (torch.tensor(column, device=device)
                               for column in zip(*(windows + [NO_WINDOW] * (rows - len(windows)))))
    positions = torch.arange(length + 1, device=device)
    tokens = val[(starts[:, None] + positions).clamp_max(len(val) - 1)].long()
    x = torch.where(positions[:-1] < lengths[:, None], tokens[:, :-1], 0)
    tail = lengths[:, None] - s + torch.arange(s, device=device)
    mask = tail >= (lengths - scored)[:, None]
    tail = tail.clamp_min(0)
    h = hidden(x, adapters)
    h = h.gather(1, tail[..., None].expand(-1, -1, h.size(-1)))
    nll = model.loss(h, tokens[:, 1:].gather(1, tail), "none", None if adapters is None else adapters.head)
    return Scores(nll.view(rows, s), mask, starts[:, None] + tail)


def add_scores(sums: Tensor, scores: Scores, val_bytes: Tensor) -> None:
    """Adds the NLL, count and bytes of the scored targets to sums (float64: loss, tokens, bytes)."""
    sums[0] += torch.where(scores.mask, scores.nll.detach().double(), 0.0).sum()
    sums[1] += scores.mask.sum()
    sums[2] += (val_bytes[scores.target + 1] * scores.mask).sum()


def window_batches(windows: list[Window], hp: SimpleNamespace, batch_tokens: int) -> list[tuple[int, int, list]]:
    """(length, rows, windows) of each batch: the windows longest first, a batch of one padded length holding
    batch_tokens // length rows (the sliding eval's tokens per batch), so all batches of a length have one shape."""
    batches = []
    for w in sorted(windows, key=lambda w: -w.length):
        length = padded_length(w.length, hp.eval_len, hp.train_seq_len)
        if batches and batches[-1][0] == length and len(batches[-1][2]) < batches[-1][1]:
            batches[-1][2].append(w)
        else:
            batches.append((length, max(1, batch_tokens // length), [w]))
    return batches


def score_batches(model: GPT, hidden, val: Tensor, val_bytes: Tensor, batches: list[tuple[int, int, list]],
                  sums: Tensor) -> None:
    for length, rows, windows in batches:
        with torch.inference_mode(), autocast(val.device):
            scores = window_nll(model, hidden, val, windows, rows, length)
        add_scores(sums, scores, val_bytes)


def padding_note(batches: list[tuple[int, int, list]]) -> str:
    """How much of the computed positions is padding (rows past a window's end, empty rows)."""
    real, computed = sum(w.length for _, _, ws in batches for w in ws), sum(n * rows for n, rows, _ in batches)
    return f"positions:{computed} padding:{1 - real / max(computed, 1):.3f}"


def docs_evaluate(model: GPT, hidden, val: Tensor, val_bytes: Tensor, hp: SimpleNamespace, rt: SimpleNamespace,
                  stride: int, batch_tokens: int, log) -> tuple[float, float, int, int]:
    """Document-isolated scoring: the sliding eval inside every document (its windows, stride EVAL_STRIDE), no
    attention across a document boundary. The batches, of nearly equal tokens, are dealt to the ranks in turn."""
    docs = documents(val)
    windows = [w for first, end in docs for w in document_windows(first, end, hp.eval_len, stride)]
    batches = window_batches(windows, hp, batch_tokens)
    log(f"docs:plan docs:{len(docs)} windows:{len(windows)} batches:{len(batches)} stride:{stride} "
        f"lengths:{','.join(map(str, sorted({n for n, _, _ in batches})))} {padding_note(batches)}")
    sums = torch.zeros(3, dtype=torch.float64, device=val.device)
    score_batches(model, hidden, val, val_bytes, batches[rt.rank :: rt.world_size], sums)
    return metrics(sums, rt.world_size)


def lora_batches(docs: list[tuple[int, int]], batch_docs: int) -> list[list[tuple[int, int]]]:
    """§1.3: the documents sorted by length, cut into consecutive batches, the batches taken longest first (both
    sorts stable). This is the processing order every rank computes alike: a document's place is its batch's, then
    its row's."""
    by_length = sorted(docs, key=lambda d: d[1] - d[0])
    batches = [by_length[i : i + batch_docs] for i in range(0, len(by_length), batch_docs)]
    return sorted(batches, key=lambda b: -(b[-1][1] - b[-1][0]))


def phase_ends(batch_sizes: list[int], hp: SimpleNamespace) -> list[tuple[int, int]]:
    """(prefix documents, batches holding them) of each global SGD pause (§1.8): the first TTT_LORA_PREFIX_DOCS * k //
    TTT_LORA_PHASES documents of the processing order, k = 1..PHASES, once every batch holding one of them is scored
    (later documents of the last such batch wait for the next phase). A pause after the last batch would adapt
    nothing left to score: dropped."""
    done = [sum(batch_sizes[: i + 1]) for i in range(len(batch_sizes))]  # documents in the first i + 1 batches
    ends = []
    for k in range(1, hp.ttt_lora_phases + 1):
        docs = min(hp.ttt_lora_prefix_docs * k // hp.ttt_lora_phases, done[-1])
        batches = next(i + 1 for i, n in enumerate(done) if n >= docs)
        if docs and batches < len(batch_sizes):
            ends.append((docs, batches))
    return ends


class DocumentAdapters:
    """The adapters of one batch, a row per document (§1.4), fp32: Q, K, V, O and MLP for every virtual layer (a loop
    pass has its own) and the head's; A (rows, rank, in) drawn from U(±1/√in) unless given (warm start), B (rows,
    out, rank) zero, so a fresh set changes nothing; output scaled by alpha / rank."""

    def __init__(self, model: GPT, hp: SimpleNamespace, a: list[Tensor] | None, generator: torch.Generator | None):
        dim, kv = model.tok_emb.embedding_dim, model.blocks[0].attn.c_k.weight.size(0)
        slots = len(model.virtual_layers())
        shapes = [(dim, dim), (dim, kv), (dim, kv), (dim, dim), (dim, dim)] * slots
        shapes.append((dim, model.tok_emb.num_embeddings))
        rows, rank, device = hp.ttt_lora_batch_docs, hp.ttt_lora_rank, model.tok_emb.weight.device
        self.a = a or [torch.empty(rows, rank, n, device=device).uniform_(-n ** -0.5, n ** -0.5, generator=generator)
                       for n, _ in shapes]
        self.b = [torch.zeros(rows, out, rank, device=device) for _, out in shapes]
        for t in self.a + self.b:
            t.requires_grad_(True)
        loras = [LoRA(a, b, hp.ttt_lora_alpha / rank) for a, b in zip(self.a, self.b)]
        self.inputs = Adapters(tuple(SlotLoRA(*loras[5 * i : 5 * i + 5]) for i in range(slots)), loras[-1])

    def optimizer(self, hp: SimpleNamespace, rt: SimpleNamespace) -> torch.optim.Optimizer:
        """A fresh AdamW (moments and step at zero) for this batch."""
        return torch.optim.AdamW(self.a + self.b, lr=hp.ttt_lora_lr, betas=(hp.ttt_lora_beta1, hp.ttt_lora_beta2),
                                 eps=hp.ttt_lora_eps, weight_decay=hp.ttt_lora_wd, fused=rt.cuda)


def adapter_generator(hp: SimpleNamespace, device: torch.device, phase: int, key: int) -> torch.Generator:
    """The draw of a fresh A: seeded by the run's seed, the phase and the lane (or batch), never by the rank."""
    return torch.Generator(device=device).manual_seed(hp.seed * 1_000_003 + phase * 65_537 + key)


def adapt(optimizer: torch.optim.Optimizer, scores: Scores, train: Tensor) -> None:
    """One step on the sum over the training rows of each row's mean NLL over its chunk."""
    per_row = torch.where(scores.mask, scores.nll, 0.0).sum(1) / scores.mask.sum(1).clamp_min(1)
    (per_row * train).sum().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def adapt_batch(model: GPT, hidden, val: Tensor, val_bytes: Tensor, docs: list[tuple[int, int]],
                adapters: DocumentAdapters, hp: SimpleNamespace, rt: SimpleNamespace, sums: Tensor) -> int:
    """Score-first LoRA TTT of one batch (§1.6): chunk by chunk, each document's window ending with its chunk is
    scored with the adapters as they are and added to the sums; only then do the adapters take one AdamW step on
    the chunks of the documents that have a later chunk (a document's last chunk is scored, never trained on).
    Returns the positions computed."""
    chunk, rows = hp.ttt_lora_chunk, hp.ttt_lora_batch_docs
    chunks = [-(-(end - first) // chunk) for first, end in docs]
    optimizer, computed = adapters.optimizer(hp, rt), 0
    for ci in range(max(chunks)):
        windows = [chunk_window(first, end, ci, chunk, hp.eval_len) if ci < n else NO_WINDOW
                   for (first, end), n in zip(docs, chunks)]
        length = padded_length(max(w.length for w in windows), hp.eval_len, hp.train_seq_len)
        with autocast(val.device):
            scores = window_nll(model, hidden, val, windows, rows, length, adapters.inputs)
        add_scores(sums, scores, val_bytes)
        train = [ci < n - 1 for n in chunks]
        if any(train):
            adapt(optimizer, scores, torch.tensor(train + [False] * (rows - len(docs)), device=val.device))
        computed += rows * length
    return computed


def global_step(params: list[nn.Parameter], optimizer: torch.optim.Optimizer, scores: Scores | None, targets: int,
                clip: float, world_size: int) -> None:
    """One SGD step of the whole model: this rank's share of the step's mean NLL (over `targets`, all ranks' scored
    targets), gradients summed over the ranks, so any split of the rows takes the same step; clipped."""
    if scores is not None:
        (torch.where(scores.mask, scores.nll, 0.0).sum() / targets).backward()
    summed_gradients(params, world_size)
    nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def global_sgd(model: GPT, hidden, val: Tensor, prefix: list[tuple[int, int]], hp: SimpleNamespace,
               rt: SimpleNamespace) -> int:
    """A global phase (§1.8): the whole model trained by SGD on the prefix's documents, every one scored by now. Each
    document is cut into pieces of at most EVAL_SEQ_LEN targets, one per row (no attention across documents),
    TTT_LORA_GLOBAL_TOKENS // EVAL_SEQ_LEN rows a step, split over the ranks; momentum, a cosine from the LR to 0 over
    the phase's groups of rows (the last group, at 0, skipped), one epoch. Returns the steps taken."""
    window = hp.eval_len
    pieces = [Window(s, min(window, end - s), min(window, end - s)) for first, end in prefix
              for s in range(first, end, window)]
    per_step = hp.ttt_lora_global_tokens // window
    groups = [pieces[i : i + per_step] for i in range(0, len(pieces), per_step)]
    rows, params = -(-per_step // rt.world_size), list(model.parameters())
    model.requires_grad_(True)
    optimizer = torch.optim.SGD(params, lr=hp.ttt_lora_global_lr, momentum=hp.ttt_lora_global_momentum)
    for ci, group in enumerate(groups[:-1]):
        for g in optimizer.param_groups:
            g["lr"] = hp.ttt_lora_global_lr * 0.5 * (1 + math.cos(math.pi * ci / (len(groups) - 1)))
        mine, scores = rank_share(group, rt.rank, rt.world_size), None
        if mine:
            length = padded_length(max(w.length for w in mine), window, hp.train_seq_len)
            with autocast(val.device):
                scores = window_nll(model, hidden, val, mine, rows, length)
        global_step(params, optimizer, scores, sum(w.scored for w in group), hp.ttt_lora_global_clip, rt.world_size)
    model.requires_grad_(False)
    return max(len(groups) - 1, 0)


def lora_ttt_evaluate(model: GPT, hidden, val: Tensor, val_bytes: Tensor, hp: SimpleNamespace, rt: SimpleNamespace,
                      stride: int, batch_tokens: int, log) -> tuple[float, float, int, int]:
    """Phased per-document LoRA TTT, score-first. The batches of the processing order (lora_batches) are cut into
    segments by the global phases; in a segment, batch i continues lane (i - segment start) % TTT_LORA_LANES (its A
    warm-started from the lane's previous batch; a segment's first batch of a lane draws a fresh A), and lane l
    belongs to rank l % world size. No rank's work depends on another's or on the rank count: every batch sees the
    same inputs, weights and A whatever the number of ranks, and the sums are all-reduced (only float summation
    order differs). Every TTT_LORA_LANES batches make a round; with TTT_LORA_MAX_SECONDS every rank votes the
    elapsed time after each round (agree_max), and once the next round would pass the cap the rest is scored as
    DOCS_EVAL scores it, without adapting. At each phase end every rank runs the same global SGD steps. The model's
    weights are restored at the end."""
    docs = documents(val)
    batches = lora_batches(docs, hp.ttt_lora_batch_docs)
    order = [doc for batch in batches for doc in batch]
    phases = phase_ends([len(b) for b in batches], hp)
    bounds, lanes = [0] + [b for _, b in phases] + [len(batches)], hp.ttt_lora_lanes
    params = list(model.parameters())
    trainable, saved = [p.requires_grad for p in params], copy.deepcopy(model.state_dict()) if phases else None
    log(f"lora_ttt:plan docs:{len(docs)} batches:{len(batches)} batch_docs:{hp.ttt_lora_batch_docs} "
        f"chunk:{hp.ttt_lora_chunk} rank:{hp.ttt_lora_rank} alpha:{hp.ttt_lora_alpha:g} lr:{hp.ttt_lora_lr:g} "
        f"warm_a:{int(hp.ttt_lora_warm_a)} lanes:{lanes} lanes_on_rank0:{len(range(0, lanes, rt.world_size))} "
        f"phases:{','.join(str(d) for d, _ in phases) or 'none'}")
    model.requires_grad_(False)
    sums = torch.zeros(3, dtype=torch.float64, device=val.device)
    start, adapting, rounds, adapted, computed = time.perf_counter(), True, 0, 0, 0
    for phase, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        lane_a = {}  # lane -> the A of its latest batch (warm start)
        for first in range(lo, hi, lanes):
            for i in range(first, min(hi, first + lanes)):
                lane = i - first
                if lane % rt.world_size != rt.rank:
                    continue
                if not adapting:
                    windows = [w for f, e in batches[i] for w in document_windows(f, e, hp.eval_len, stride)]
                    score_batches(model, hidden, val, val_bytes, window_batches(windows, hp, batch_tokens), sums)
                    continue
                generator = adapter_generator(hp, val.device, phase, lane if hp.ttt_lora_warm_a else i)
                adapters = DocumentAdapters(model, hp, lane_a.get(lane), generator)
                computed += adapt_batch(model, hidden, val, val_bytes, batches[i], adapters, hp, rt, sums)
                adapted += 1
                if hp.ttt_lora_warm_a:
                    lane_a[lane] = adapters.a
            if hp.ttt_lora_max_seconds and adapting:
                sync(rt)
                elapsed, rounds = agree_max([time.perf_counter() - start], rt)[0], rounds + 1
                if elapsed * (rounds + 1) / rounds > hp.ttt_lora_max_seconds:
                    adapting = False
                    log(f"lora_ttt:updates_stopped after_round:{rounds} batches_adapted:{min(hi, first + lanes)} "
                        f"elapsed_ms:{1000 * elapsed:.0f} reason:TTT_LORA_MAX_SECONDS={hp.ttt_lora_max_seconds:g} "
                        "(the remaining documents are scored as DOCS_EVAL scores them)")
        if phase < len(phases) and adapting:
            sync(rt)
            t0 = time.perf_counter()
            steps = global_sgd(model, hidden, val, order[: phases[phase][0]], hp, rt)
            sync(rt)
            log(f"lora_ttt:phase {phase + 1}/{len(phases)} prefix_docs:{phases[phase][0]} batches_scored:{hi} "
                f"global_steps:{steps} sgd_ms:{1000 * (time.perf_counter() - t0):.0f} "
                f"elapsed_ms:{1000 * (time.perf_counter() - start):.0f}")
    log(f"lora_ttt:done rank0_batches:{adapted} rank0_positions:{computed} "
        f"elapsed_ms:{1000 * (time.perf_counter() - start):.0f}")
    if saved is not None:
        model.load_state_dict(saved)
    for p, t in zip(params, trainable):
        p.requires_grad_(t)
    return metrics(sums, rt.world_size)


def prime_documents(model: GPT, hidden, hp: SimpleNamespace, rt: SimpleNamespace, batch_tokens: int) -> None:
    """Every graph the document modes run, at every bucket length, on random tokens (compiled here, not inside the
    timed evaluations): the scoring forward (inference mode); with LoRA TTT the forward and backward through the
    adapters with the model frozen, and with phases the forward and backward of the model's global SGD. No weight
    changes."""
    device = model.tok_emb.weight.device
    val = torch.randint(0, hp.vocab_size, (hp.eval_len + 1,), device=device)
    params = list(model.parameters())
    trainable = [p.requires_grad for p in params]
    for length in length_buckets(hp):
        with torch.inference_mode(), autocast(device):
            window_nll(model, hidden, val, [Window(0, length, length)], max(1, batch_tokens // length), length)
        if not hp.ttt_lora_enabled:
            continue
        model.requires_grad_(False)
        adapters = DocumentAdapters(model, hp, None, None)
        with autocast(device):
            scores = window_nll(model, hidden, val, [Window(0, length, min(length, hp.ttt_lora_chunk))],
                                hp.ttt_lora_batch_docs, length, adapters.inputs)
        scores.nll.sum().backward()
        if hp.ttt_lora_phases:
            model.requires_grad_(True)
            rows = -(-(hp.ttt_lora_global_tokens // hp.eval_len) // rt.world_size)
            with autocast(device):
                window_nll(model, hidden, val, [Window(0, length, length)], rows, length).nll.sum().backward()
            model.zero_grad(set_to_none=True)
    for p, t in zip(params, trainable):
        p.requires_grad_(t)


# ---------------------------------------------------------------------------------------------------------------
# Quantisation and the artifact: int6 rows for block matrices, int8 rows for embeddings, fp16 for small tensors

def quant_route(name: str, t: Tensor, control_patterns: tuple[str, ...]) -> str:
    if not t.is_floating_point() or t.numel() <= 65536:
        return "passthrough"
    if any(p in name for p in control_patterns):
        return "passthrough_ctrl"
    return "int6" if name.startswith("blocks.") else "int8"  # block matrices; the embedding tables int8


def embed_rows(w: Tensor, qmax: int = 127) -> tuple[Tensor, Tensor]:
    """Per-row grid [-qmax, qmax] of an embedding table: clipped at the 0.9999984 quantile of |w| (the seed's int8)."""
    clip = torch.quantile(w.abs(), 0.9999984, dim=-1, keepdim=True)
    scale = (clip / qmax).clamp_min(1 / qmax).half()
    return torch.clamp(torch.round(w.clamp(-clip, clip) / scale.float()), -qmax, qmax), scale


def sigma_rows(w: Tensor, sigmas: float, qmax: int) -> tuple[Tensor, Tensor]:
    """SDClip (the SP8192 records): row scale = k * std(row) / qmax in fp16, values clamped to [-qmax, qmax]. One
    pass, no search; a larger k clips less and rounds coarser, for a smaller compressed size."""
    scale = (sigmas * w.std(dim=-1, keepdim=True) / qmax).clamp_min(2**-14).half()  # 2^-14: fp16's least normal
    return torch.clamp(torch.round(w / scale.float()), -qmax, qmax), scale


CLIP_QUANTILES = (0.999, 0.9995, 0.9999, 0.99999, 1.0)  # of |w| per row: the GPTQ-lite candidates


def clipsearch_rows(w: Tensor, qmax: int = 31) -> tuple[Tensor, Tensor]:
    """Symmetric grid [-qmax, qmax]; each row clips at the candidate quantile of |w| that reconstructs it with the
    least squared error (chosen per row, which also minimises the whole matrix's error)."""
    best = None
    for p in CLIP_QUANTILES:
        clip = w.abs().amax(-1, keepdim=True) if p == 1.0 else torch.quantile(w.abs(), p, dim=-1, keepdim=True)
        scale = (clip / qmax).clamp_min(1 / qmax).half()
        q = torch.clamp(torch.round(w / scale.float()), -qmax, qmax)
        err = (w - q * scale.float()).square().sum(-1, keepdim=True)
        if best is not None:
            take = err < best[2]
            q, scale = torch.where(take, q, best[0]), torch.where(take, scale, best[1])
            err = torch.minimum(err, best[2])
        best = q, scale, err
    return best[0], best[1]


def gptq_rows(w: Tensor, h: Tensor, scale: Tensor, qmax: int = 31, block: int = 128) -> Tensor | None:
    """GPTQ on the grid [-qmax, qmax] with fixed row scales: columns in order of decreasing H_jj, each one's
    rounding error spread over the columns not yet quantised through the upper Cholesky factor of H^-1, which
    lowers the output error tr((W - Q) H (W - Q)^T). None if H is not positive definite even after damping, or zero."""
    w, h, s = w.float().clone(), h.float().clone(), scale.float()
    dead = h.diagonal() == 0  # inputs never active in calibration
    if dead.all():  # a matrix calibration never reached: nothing to weigh its error by
        return None
    h[dead, dead] = 1
    w[:, dead] = 0
    h.diagonal().add_(0.01 * h.diagonal().mean())
    order = torch.argsort(h.diagonal(), descending=True, stable=True)
    w, h = w[:, order], h[order][:, order]
    u, info = torch.linalg.cholesky_ex(h)
    if info == 0:
        u, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(u), upper=True)
    if info != 0 or not torch.isfinite(u).all():
        return None
    q = torch.empty_like(w)
    for b0 in range(0, w.size(1), block):
        b1 = min(b0 + block, w.size(1))
        wb, err = w[:, b0:b1].clone(), torch.empty_like(w[:, b0:b1])
        for j in range(b1 - b0):
            q[:, b0 + j] = torch.clamp(torch.round(wb[:, j : j + 1] / s), -qmax, qmax).squeeze(1)
            err[:, j] = (wb[:, j] - q[:, b0 + j] * s.squeeze(1)) / u[b0 + j, b0 + j]
            wb[:, j + 1 :] -= err[:, j : j + 1] * u[b0 + j, b0 + j + 1 : b1]
        w[:, b1:] -= err @ u[b0:b1, b1:]
    return q[:, torch.argsort(order)]


def hessian_key(name: str) -> str:
    """q, k and v read the same input: one Hessian."""
    return name.replace(".attn.c_k.", ".attn.c_q.").replace(".attn.c_v.", ".attn.c_q.")


def int6_quantize(name: str, w: Tensor, hp: SimpleNamespace, hessians: dict | None) -> tuple[Tensor, Tensor, bool]:
    """(q, scale, whether GPTQ fell back to round-to-nearest) of one int6 matrix under QUANT_METHOD and QUANT_CLIP."""
    if hp.quant_method == "rowmax":
        return *int6_rows(w), False
    q, scale = sigma_rows(w, hp.clip_sigmas, 31) if hp.quant_clip == "sigma" else clipsearch_rows(w)
    g = gptq_rows(w, hessians[hessian_key(name)], scale) if hp.quant_method == "gptq" else None
    return (q if g is None else g), scale, hp.quant_method == "gptq" and g is None


def embedding_quantize(name: str, w: Tensor, hp: SimpleNamespace, hessians: dict | None) -> tuple[Tensor, Tensor, bool]:
    """(q, scale, fell back) of an embedding table on the EMBED_BITS grid. With QUANT_METHOD=gptq the tied embedding,
    which is also the output head, gets GPTQ with the Hessian of the head's input (the final norm's output)."""
    qmax = 2 ** (hp.embed_bits - 1) - 1
    q, scale = sigma_rows(w, hp.embed_clip_sigmas, qmax) if hp.quant_clip == "sigma" else embed_rows(w, qmax)
    if hp.quant_method != "gptq" or name != "tok_emb.weight":
        return q, scale, False
    g = gptq_rows(w, hessians[name], scale, qmax)
    return (q if g is None else g), scale, g is None


def int6_groups(names: list[str]) -> list[list[str]]:
    """The int6 matrices quantised together: q, k and v of a layer read the same input (one Hessian) and are solved
    as one stacked matrix (every quantiser treats rows independently: the same result, fewer GPTQ column steps)."""
    groups = {}
    for name in names:
        groups.setdefault(hessian_key(name), []).append(name)
    return list(groups.values())


def assign_owners(costs: list[float], world_size: int) -> list[int]:
    """Longest job first, each onto the least-loaded rank: a balanced split that every rank computes alike."""
    load, owner = [0.0] * world_size, [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        owner[i] = min(range(world_size), key=load.__getitem__)
        load[owner[i]] += costs[i]
    return owner


def quantize_int6(state: dict[str, Tensor], names: list[str], hp: SimpleNamespace, hessians: dict | None,
                  rank: int = 0, world_size: int = 1) -> dict[str, tuple[Tensor, Tensor, bool]]:
    """(int8-held q, fp16 scale, whether GPTQ fell back) of every int6 matrix. Each rank quantises its share of the
    groups (GPTQ's cost grows with rows x columns^2); one summed all-reduce of zero-filled buffers, to which exactly
    one rank adds each value, hands every result to every rank."""
    groups = int6_groups(names)
    costs = [sum(state[n].size(0) for n in g) * state[g[0]].size(1) ** 2 for g in groups]
    out = {}
    for group, owner in zip(groups, assign_owners(costs, world_size)):
        if owner == rank:
            q, scale, fell_back = int6_quantize(group[0], torch.cat([state[n].float() for n in group]), hp, hessians)
            rows = [state[n].size(0) for n in group]
            out.update({n: (qn.to(torch.int8), sn, fell_back) for n, qn, sn in zip(group, q.split(rows),
                                                                                   scale.split(rows))})
    if world_size == 1 or not names:
        return out
    device = state[names[0]].device
    q = torch.zeros(sum(state[n].numel() for n in names), dtype=torch.int8, device=device)
    scales = torch.zeros(sum(state[n].size(0) for n in names), dtype=torch.float16, device=device)
    flags = torch.zeros(len(names), device=device)
    qs, ss = q.split([state[n].numel() for n in names]), scales.split([state[n].size(0) for n in names])
    for i, name in enumerate(names):
        if name in out:
            qs[i].copy_(out[name][0].flatten())
            ss[i].copy_(out[name][1].flatten())
            flags[i] = float(out[name][2])
    for t in (q, scales, flags):
        dist.all_reduce(t)
    return {n: (qs[i].view_as(state[n]), ss[i].view(-1, 1), bool(flags[i])) for i, n in enumerate(names)}


def quantize_state_dict(state: dict[str, Tensor], hp: SimpleNamespace, hessians: dict[str, Tensor] | None = None,
                        rank: int = 0, world_size: int = 1):
    """Returns ({stored tensors}, {name: route}, {route: statistics}, [matrices where GPTQ fell back to rounding
    to nearest]). Every rank calls it (the int6 matrices are spread over the ranks); all get the same result."""
    meta = {name: quant_route(name, t, hp.control_patterns) for name, t in state.items()}
    int6 = quantize_int6(state, [n for n, route in meta.items() if route == "int6"], hp, hessians, rank, world_size)
    tensors, stats, fallbacks = {}, {}, []
    for name, t in state.items():
        route = meta[name]
        if route == "passthrough":
            tensors[name] = t.half() if t.is_floating_point() else t
        elif route == "passthrough_ctrl":
            tensors[name] = t.float()
        else:
            w = t.float()
            q, scale, fell_back = int6[name] if route == "int6" else embedding_quantize(name, w, hp, hessians)
            fallbacks += [name] * fell_back
            tensors[name + ".q"], tensors[name + ".scale"] = q.to(torch.int8).contiguous(), scale
            top = 2 ** (hp.embed_bits - 1) - 1 if route == "int8" else 31
            st = stats.setdefault(route, SimpleNamespace(rows=0, floor_rows=0, clipped=0, values=0, sq_err=0.0))
            st.rows += scale.numel()
            st.floor_rows += int((scale == torch.tensor(1 / top).half()).sum())
            st.clipped += int((w.abs() > (top + 0.5) * scale.float()).sum())
            st.values += w.numel()
            st.sq_err += float((w - q.float() * scale.float()).square().sum())
    return tensors, meta, stats, fallbacks


def dequantize_state_dict(tensors: dict, meta: dict, reference: dict[str, Tensor]) -> dict[str, Tensor]:
    def mismatch(what: str):
        return InputError(f"artifact does not match the model configuration ({what}); "
                          "set the same model env vars as the training run")

    if set(meta) != set(reference):
        missing, extra = sorted(set(reference) - set(meta)), sorted(set(meta) - set(reference))
        raise mismatch(f"missing {missing[:3]}, unexpected {extra[:3]}")
    out = {}
    for name, ref in reference.items():
        if meta[name] in ("passthrough", "passthrough_ctrl"):
            out[name] = tensors[name].to(ref.dtype)
        else:
            out[name] = (tensors[name + ".q"].float() * tensors[name + ".scale"].float()).to(ref.dtype)
        if out[name].shape != ref.shape:
            raise mismatch(f"{name} is {tuple(out[name].shape)}, the model expects {tuple(ref.shape)}")
    return out


def compressor():
    try:
        import zstandard
    except ImportError:
        zstandard = None
    if zstandard is None or tuple(map(int, zstandard.__version__.split(".")[:2])) < (0, 22):  # multi-frame reads
        raise InputError("the zstandard package (>= 0.22) is required for the int6+zstd artifact "
                         "(pip install 'zstandard>=0.22')")
    return zstandard


def brotli_module():
    try:
        import brotli
    except ImportError:
        raise InputError("COMPRESSOR=brotli needs the brotli package (pip install brotli)") from None
    return brotli


XZ_MAGIC, BROTLI_TAG = b"\xfd7zXZ\x00", b"BRT\x02"


def frames(raw: bytes) -> list[tuple[int, int]]:
    """torch.save's bytes cut at the data of every stored tensor of >= 64 KiB: over the whole stream zstd's and
    lzma's sizes jump with where torch's 64-byte-aligned records happen to fall (the small interleaved records
    throw their parsers off for long stretches); frame by frame they do not, and are smaller. Frames are also
    compressed in parallel, and brotli 11's time grows faster than its input (one 27 MB stream: 87 s, its frames
    21 s of CPU time, +0.05% bytes)."""
    cuts = {0, len(raw)}
    with zipfile.ZipFile(io.BytesIO(raw)) as z:
        for info in z.infolist():  # stored uncompressed: data follows the 30-byte header, name and extra field
            if info.file_size >= 65536:
                start = info.header_offset + 30 + sum(struct.unpack_from("<HH", raw, info.header_offset + 26))
                cuts |= {start, start + info.file_size}
    bounds = sorted(cuts)
    return list(zip(bounds, bounds[1:]))


def usable_cpus() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def compress_frame(part: bytes, method: str) -> bytes:
    """One frame: zstd level 22 (min_match=6 skips chance short matches) and lzma preset 9e frames concatenate into
    a stream of their own format; a brotli 11 frame is preceded by its length."""
    if method == "brotli":
        packed = brotli_module().compress(part, quality=11)
        return struct.pack("<I", len(packed)) + packed
    if method == "lzma":
        return lzma.compress(part, preset=9 | lzma.PRESET_EXTREME)
    zstd = compressor()
    return zstd.ZstdCompressor(compression_params=zstd.ZstdCompressionParameters.from_level(
        22, source_size=len(part), min_match=6)).compress(part)


def pack_artifact(tensors: dict[str, Tensor], meta: dict[str, str], method: str = "zstd",
                  workers: int | None = None) -> bytes:
    """torch.save's bytes, compressed frame by frame on `workers` threads (default: every CPU this process may use;
    the compressors release the GIL), largest first. The bytes do not depend on the number of workers."""
    buf = io.BytesIO()
    torch.save({"w": {k: v.cpu() for k, v in tensors.items()}, "m": meta}, buf)
    raw = buf.getvalue()
    parts = [raw[a:b] for a, b in frames(raw)]
    packed = [b""] * len(parts)
    with concurrent.futures.ThreadPoolExecutor(workers or usable_cpus()) as pool:
        jobs = {pool.submit(compress_frame, parts[i], method): i for i in sorted(range(len(parts)),
                                                                               key=lambda i: -len(parts[i]))}
        for job in concurrent.futures.as_completed(jobs):
            packed[jobs[job]] = job.result()
    return (BROTLI_TAG if method == "brotli" else b"") + b"".join(packed)


def artifact_payload(blob: bytes) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The stored tensors and routes of any artifact pack_artifact writes (its compressor told by its first bytes)."""
    if blob.startswith(XZ_MAGIC):
        raw = lzma.decompress(blob)
    elif blob.startswith(BROTLI_TAG):
        parts, pos, brotli = [], len(BROTLI_TAG), brotli_module()
        while pos < len(blob):
            (n,) = struct.unpack_from("<I", blob, pos)
            parts.append(brotli.decompress(blob[pos + 4 : pos + 4 + n]))
            pos += 4 + n
        raw = b"".join(parts)
    else:
        raw = compressor().ZstdDecompressor().decompressobj(read_across_frames=True).decompress(blob)
    payload = torch.load(io.BytesIO(raw), map_location="cpu")
    return payload["w"], payload["m"]


def unpack_artifact(blob: bytes, reference: dict[str, Tensor]) -> dict[str, Tensor]:
    return dequantize_state_dict(*artifact_payload(blob), reference)


ARTIFACT_MAGICS = {"zstd": b"\x28\xb5\x2f\xfd", "lzma": XZ_MAGIC, "brotli": BROTLI_TAG}  # the first bytes of each


def read_artifact(path: str, reference: dict[str, Tensor]) -> dict[str, Tensor]:
    """EVAL_ONLY's artifact, dequantised. Anything else is an input error that says what the path holds and what
    was expected."""
    expected = f"expected an artifact a training run wrote ({ARTIFACT_PATH}: zstd, lzma or brotli)"
    where = Path(path)
    if where.is_dir():
        inside = where / ARTIFACT_PATH
        raise InputError(f"EVAL_ONLY={path}: a folder; {expected}"
                         + (f", such as EVAL_ONLY={inside}" if inside.is_file() else ""))
    if not where.exists():
        raise InputError(f"EVAL_ONLY={path}: no such file; {expected}")
    try:
        blob = where.read_bytes()
    except OSError as e:
        raise InputError(f"EVAL_ONLY={path}: unreadable ({e.strerror}); {expected}") from None
    if not blob:
        raise InputError(f"EVAL_ONLY={path}: an empty file (0 bytes); {expected}")
    try:
        return unpack_artifact(blob, reference)
    except InputError as e:
        raise InputError(f"EVAL_ONLY={path}: {e}") from None
    except Exception as e:
        reason = (str(e).strip().splitlines() or [""])[0]
        kind = next((k for k, magic in ARTIFACT_MAGICS.items() if blob.startswith(magic)), None)
        if kind is None:
            raise InputError(f"EVAL_ONLY={path}: {len(blob)} bytes starting {blob[:8].hex(' ')}, not a zstd, lzma or "
                             f"brotli stream; {expected}") from None
        raise InputError(f"EVAL_ONLY={path}: a {kind} stream of {len(blob)} bytes that does not unpack "
                         f"({type(e).__name__}: {reason}); expected a complete artifact (truncated or damaged?)"
                         ) from None


# ---------------------------------------------------------------------------------------------------------------
# Training

def train_cap_ms(hp: SimpleNamespace) -> float:
    """The training loop's wall-clock budget: the cap less GPTQ's calibration reserve (0 = no cap)."""
    if hp.max_wallclock_seconds <= 0:
        return 0.0
    return 1000 * (hp.max_wallclock_seconds - (hp.gptq_reserve_seconds if hp.quant_method == "gptq" else 0.0))


def budget_fraction(step: int, elapsed_ms: float, hp: SimpleNamespace) -> float:
    """How far training is through its budget: time over the cap (GPTQ's reserve excluded), or steps over
    ITERATIONS when uncapped. The schedule's switches (warmdown, loop passes) read it, from the agreed clock."""
    cap_ms = train_cap_ms(hp)
    return elapsed_ms / cap_ms if cap_ms else step / max(hp.iterations, 1)


def lr_multiplier(step: int, elapsed_ms: float, hp: SimpleNamespace) -> float:
    """1, then a linear decay to MIN_LR: over the last WARMDOWN_FRAC of the budget, or else over the last
    WARMDOWN_ITERS steps (measured in wall-clock time at the mean step time so far when capped)."""
    cap_ms = train_cap_ms(hp)
    if hp.warmdown_frac > 0:
        mul = min(1.0, max(1 - budget_fraction(step, elapsed_ms, hp), 0.0) / hp.warmdown_frac)
    elif hp.warmdown_iters <= 0:
        mul = 1.0
    elif cap_ms <= 0:
        mul = min(1.0, max(hp.iterations - step, 0) / hp.warmdown_iters)
    else:
        warmdown_ms = hp.warmdown_iters * elapsed_ms / max(step, 1)
        remaining_ms = max(cap_ms - elapsed_ms, 0.0)
        mul = remaining_ms / max(warmdown_ms, 1e-9) if remaining_ms <= warmdown_ms else 1.0
    return max(mul, hp.min_lr)


def loop_passes(step: int, elapsed_ms: float, hp: SimpleNamespace) -> int:
    """Extra passes of the loop segment switched on at this point of the budget."""
    return sum(budget_fraction(step, elapsed_ms, hp) >= f for f in hp.loop_starts)


def muon_momentum(step: int, hp: SimpleNamespace) -> float:
    frac = min(step / hp.muon_momentum_warmup_steps, 1.0) if hp.muon_momentum_warmup_steps > 0 else 1.0
    return (1 - frac) * hp.muon_momentum_warmup_start + frac * hp.muon_momentum


def build_optimizers(model: GPT, hp: SimpleNamespace, orthogonalize, fused: bool) -> dict[str, torch.optim.Optimizer]:
    """Muon for the matrices, AdamW for the embedding tables and the control/scalar tensors."""
    matrices = [m.weight for m in model.modules() if isinstance(m, CastedLinear)]
    tables = model.embedding_tables()
    taken = {id(p) for p in matrices + tables}
    scalars = [p for p in model.parameters() if id(p) not in taken]
    optimizers = dict(
        muon=(ShardedMuon if hp.muon_sharded else Muon)(matrices, hp.matrix_lr, hp.muon_momentum_warmup_start,
                                                        hp.muon_backend_steps, hp.muon_wd, orthogonalize,
                                                        hp.muon_row_norm),
        adam=torch.optim.AdamW([dict(params=tables, lr=hp.tied_embed_lr), dict(params=scalars, lr=hp.scalar_lr)],
                               betas=(hp.beta1, hp.beta2), eps=hp.adam_eps, weight_decay=hp.adam_wd, fused=fused),
    )
    for opt in optimizers.values():
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
    return optimizers


def data_parallel(module: nn.Module, muon: Muon, hp: SimpleNamespace, rt: SimpleNamespace) -> nn.Module:
    """DDP around the (compiled) model: it averages the gradients during the backward, all of them, or under
    MUON_SHARDED all but the matrices', which ShardedMuon reduce-scatters to their owners itself. DDP looks for
    unused parameters only when it has some: untied loop MLPs (matrices), idle before their switch."""
    if not rt.distributed:
        return module
    sharded = {id(p) for p in muon.param_groups[0]["params"]} if isinstance(muon, ShardedMuon) else set()
    if sharded:
        DDP._set_params_and_buffers_to_ignore_for_model(module, [n for n, p in module.named_parameters()
                                                                 if id(p) in sharded])
    return DDP(module, device_ids=[rt.device.index] if rt.cuda else None, gradient_as_bucket_view=True,
               find_unused_parameters=hp.loop_untie_mlp and not sharded)


class WeightAverage:
    """fp32 average of every state-dict tensor, in accumulators of its own on the model's device (never views of
    the weights): uniform over the snapshots taken (SWA), or exponential from the weights it starts from (EMA,
    ema <- d * ema + (1 - d) * w after every step)."""

    def __init__(self, model: nn.Module, decay: float = 0.0):
        self.decay, self.count, self.live = decay, 0, model.state_dict()
        self.acc = {k: v.float().clone() if decay else torch.zeros(v.shape, device=v.device)
                    for k, v in self.live.items()}

    @torch.no_grad()
    def update(self) -> None:
        acc, live = list(self.acc.values()), [v.float() for v in self.live.values()]
        if self.decay:
            torch._foreach_mul_(acc, self.decay)
        torch._foreach_add_(acc, live, alpha=1 - self.decay if self.decay else 1)
        self.count += 1

    def averaged(self) -> dict[str, Tensor]:
        return {k: (a if self.decay else a / self.count).to(self.live[k].dtype) for k, a in self.acc.items()}

    @torch.no_grad()
    def copy(self, prefixes: list[tuple[str, str]]) -> None:
        """The average of each copy starts as its source's (an untied loop pass switched on: otherwise its average
        would keep the initialisation the pass never trained from, 0.997^n of it after n EMA steps)."""
        for source, target in prefixes:
            for k in self.acc:
                if k.startswith(target):
                    self.acc[k].copy_(self.acc[source + k[len(target):]])


class StepTimer:
    """Local training time at the end of each step, as the device saw it. On the CPU the work is synchronous: a
    step has ended when it returns. On CUDA an event is recorded after each queued step and timed against the
    segment's start event once the host has waited for that event, so a reading is exact however far the host runs
    ahead of the device. `lag` is how many steps a reading is left pending before it is read: on CUDA 2, so the host
    never waits for the step it has just queued nor the one before it."""

    def __init__(self, rt: SimpleNamespace):
        self.cuda, self.lag = rt.cuda, 2 if rt.cuda else 0
        self.offset, self.origin = 0.0, None

    def start(self, offset_ms: float) -> None:
        """A timed segment begins now, at local training time offset_ms (after a pause the clock resumes there)."""
        self.offset = offset_ms
        if self.cuda:
            torch.cuda.synchronize()
            self.origin = torch.cuda.Event(enable_timing=True)
            self.origin.record()
        else:
            self.origin = time.perf_counter()

    def mark(self):
        """A handle on the end of the work queued so far (the step just queued)."""
        if not self.cuda:
            return self.offset + 1000 * (time.perf_counter() - self.origin)
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        return self.offset, self.origin, end

    def read(self, handle) -> float:
        """The local training time (ms) at which the marked work ended; waits for it on CUDA."""
        if not self.cuda:
            return handle
        offset, origin, end = handle
        end.synchronize()
        return offset + origin.elapsed_time(end)

    def now(self) -> float:
        """The local training time once all queued work has ended."""
        return self.read(self.mark())


class AgreedClock:
    """Training time as every rank agrees on it. After each step the StepTimer's exact reading of a step's end is
    voted with MAX over the ranks, `lag` steps after that step was queued (the first step's at once), so every rank
    knows the same end times at the same step and takes every decision that depends on time (the learning rate,
    SWA, the stop, a loop switch) alike. Between readings the clock extrapolates at the mean step time."""

    def __init__(self, timer: StepTimer, rt: SimpleNamespace):
        self.timer, self.rt, self.pending = timer, rt, collections.deque()
        self.ms, self.steps = 0.0, 0  # agreed: the training time at which `steps` steps had ended
        self.recent = collections.deque(maxlen=8)  # agreed times of the latest steps

    def step_ended(self, step: int) -> None:
        """Step `step` has been queued: mark its end; read and vote every pending step up to step - lag."""
        self.pending.append((step, self.timer.mark()))
        while self.pending and self.pending[0][0] <= max(step - self.timer.lag, 1):
            done, handle = self.pending.popleft()
            self.agree(agree_max([self.timer.read(handle)], self.rt)[0], done)

    def agree(self, ms: float, steps: int) -> None:
        self.recent.append((ms - self.ms) / (steps - self.steps))
        self.ms, self.steps = ms, steps

    def at(self, step: int) -> float:
        """The agreed training time at which `step` steps will have ended, extrapolated at the mean step time."""
        return self.ms + (step - self.steps) * self.ms / self.steps if self.steps else self.ms

    def would_pass(self, step: int, limit_ms: float) -> bool:
        """Would step `step` + 1 end past limit_ms, with one step to spare, were the steps as slow as the slowest of
        the latest? The spare step is for jitter: of steady steps with noise, one in nine is slower than the eight
        before it, and it must not carry training past the cap."""
        return self.ms + (step + 2 - self.steps) * max(self.recent, default=0.0) > limit_ms


def replica_checksums(model: nn.Module, rt: SimpleNamespace) -> list[int]:
    """Every rank's checksum of its weights (the first 8 bytes of a sha256 of their bytes). DDP never re-syncs
    parameters: equal checksums show that every rank applied the same updates."""
    digest = hashlib.sha256()
    for value in model.state_dict().values():
        digest.update(value.detach().reshape(-1).cpu().view(torch.uint8).numpy())
    mine = torch.tensor(int.from_bytes(digest.digest()[:8], "little", signed=True), device=rt.device)
    if not rt.distributed:
        return [mine.item()]
    every = [torch.zeros_like(mine) for _ in range(rt.world_size)]
    dist.all_gather(every, mine)
    return [t.item() for t in every]


def eval_batch_windows(hp: SimpleNamespace, rt: SimpleNamespace, window: int) -> int:
    """Windows per eval batch: VAL_BATCH_SIZE tokens over all ranks, as the training batch's micro-steps."""
    return max(1, hp.val_batch_size // (rt.world_size * rt.grad_accum) // window)


def train(hp: SimpleNamespace, rt: SimpleNamespace, log: Logger, val: Tensor, val_bytes: Tensor, train_files: list[str],
          progress: SimpleNamespace) -> tuple[GPT, SimpleNamespace]:
    """The timed training loop. Returns the model holding the weights to export (the SWA/EMA average when one
    applies), in eval mode, and a record of the run (agreed train_ms, steps, last val_bpb, why it stopped,
    whether the replicas agree, the scorer of its periodic evals)."""
    base_model = build_model(hp, rt.device)
    log(f"model_params:{sum(p.numel() for p in base_model.parameters() if p.requires_grad)}")
    log(f"train_loader:dataset:{Path(train_files[0]).parent.name} train_shards:{len(train_files)}")
    compiled, hidden = compile_model(base_model, rt)
    orthogonalize = torch.compile(newton_schulz, dynamic=False) if rt.compile else newton_schulz
    optimizers = build_optimizers(base_model, hp, orthogonalize, fused=rt.cuda)
    model = data_parallel(compiled, optimizers["muon"], hp, rt)
    log(f"tied_embed_lr:{hp.tied_embed_lr} matrix_lr:{hp.matrix_lr} scalar_lr:{hp.scalar_lr}")
    log(f"train_batch_tokens:{hp.train_batch_tokens} train_seq_len:{hp.train_seq_len} iterations:{hp.iterations} "
        f"warmup_steps:{hp.warmup_steps} max_wallclock_seconds:{hp.max_wallclock_seconds:.3f}")

    def new_loader() -> DistributedTokenLoader:
        return DistributedTokenLoader(train_files, rt.rank, rt.world_size, rt.device, rt.local_tokens, hp.train_seq_len)

    def train_step(loader: DistributedTokenLoader, step: int, lr_scale: float) -> Tensor:
        total = torch.zeros((), device=rt.device)
        for micro in range(rt.grad_accum):
            x, y = loader.next_batch()
            if rt.distributed:
                model.require_backward_grad_sync = micro == rt.grad_accum - 1
            with autocast(rt.device):
                loss = model(x, y)
            (loss / rt.grad_accum).backward()
            total += loss.detach()
        optimizers["muon"].param_groups[0]["momentum"] = muon_momentum(step, hp)
        for opt in optimizers.values():
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * lr_scale
        if hp.grad_clip_norm > 0:
            optimizers["muon"].clip_grad_norm_(base_model.parameters(), hp.grad_clip_norm)
        for opt in optimizers.values():
            opt.step()
        base_model.zero_grad(set_to_none=True)
        return total / rt.grad_accum

    scorer = Scorer(base_model, hidden)
    first_passes = loop_passes(0, 0.0, hp)
    base_model.set_loop_passes(first_passes)
    if hp.warmup_steps:  # compile priming on real batches, every loop shape the run will take, then every state
        model_state = copy.deepcopy(base_model.state_dict())  # is put back exactly
        opt_states = {name: copy.deepcopy(opt.state_dict()) for name, opt in optimizers.items()}
        loader, warmup_start = new_loader(), time.perf_counter()
        eval_batch = torch.zeros(eval_batch_windows(hp, rt, hp.train_seq_len), hp.train_seq_len + 1,
                                 dtype=torch.int64, device=rt.device)[:, :-1]  # the eval's inputs: a strided view

        def phase_done(name: str, started: float) -> float:
            sync(rt)
            now = time.perf_counter()
            log(f"warmup:{name} ms:{1000 * (now - started):.0f} elapsed_ms:{1000 * (now - warmup_start):.0f}")
            return now

        for passes in range(first_passes, len(hp.loop_starts) + 1):
            base_model.set_loop_passes(passes)
            started = time.perf_counter()
            for i in range(hp.warmup_steps):
                train_step(loader, 0, 1.0)
                if hp.warmup_steps <= 20 or (i + 1) % 10 == 0 or i + 1 == hp.warmup_steps:
                    log(f"warmup_step:{i + 1}/{hp.warmup_steps}" + f" loop_passes:{passes}" * bool(hp.loop))
            started = phase_done(f"train loop_passes:{passes}" if hp.loop else "train", started)
            base_model.eval()
            with torch.inference_mode(), autocast(rt.device):  # the periodic eval's graph too
                scorer.hidden(eval_batch)
            base_model.train()
            phase_done("eval", started)
        log(f"warmup_time:{1000 * (time.perf_counter() - warmup_start):.0f}ms"
            + f" (includes compilation: COMPILE={rt.compile})" * bool(rt.compile))
        base_model.load_state_dict(model_state)
        base_model.loop_passes = first_passes
        for name, opt in optimizers.items():
            opt.load_state_dict(opt_states[name])
    loader = new_loader()

    average = WeightAverage(base_model, hp.ema_decay) if hp.ema_decay or hp.swa_enabled else None
    if hp.ema_decay and hp.swa_enabled:
        log("swa:off reason:EMA_DECAY")
    cap_ms, timer = train_cap_ms(hp), StepTimer(rt)
    clock, train_ms, stop_after, step, val_bpb = AgreedClock(timer, rt), 0.0, None, 0, None

    def progress_fields(scale: float, elapsed_ms: float) -> str:
        return f" lr_mul:{scale:.4f}" + (f" time_left:{max(cap_ms - elapsed_ms, 0) / 1000:.1f}s" if cap_ms else "")

    timer.start(0.0)
    while True:
        last = step == hp.iterations or step == stop_after
        if last or (hp.val_loss_every > 0 and step % hp.val_loss_every == 0):  # the live weights, clock stopped
            train_ms = timer.now()
            if last:
                train_ms = agree_max([train_ms], rt)[0]
            base_model.eval()
            loss, val_bpb, _, _ = evaluate(scorer, val, val_bytes, hp.train_seq_len, hp.train_seq_len,
                                           eval_batch_windows(hp, rt, hp.train_seq_len), rt.rank, rt.world_size)
            base_model.train()
            log(f"step:{step}/{hp.iterations} val_loss:{loss:.4f} val_bpb:{val_bpb:.4f} train_time:{train_ms:.0f}ms "
                f"step_avg:{train_ms / max(step, 1):.2f}ms")
            timer.start(train_ms)
        if last:
            if step == stop_after and step < hp.iterations:
                log(f"stopping_early: wallclock_cap train_time:{train_ms:.0f}ms step:{step}/{hp.iterations}")
            break
        if (passes := loop_passes(step, clock.at(step), hp)) != base_model.loop_passes:
            copied = base_model.set_loop_passes(passes)
            if average is not None:
                average.copy(copied)
            log(f"loop:on step:{step} virtual_layers:{len(base_model.virtual_layers())}")
        scale = lr_multiplier(step, clock.at(step), hp)
        train_loss = train_step(loader, step, scale)
        step += 1
        clock.step_ended(step)
        progress.step, progress.train_ms = step, clock.at(step)
        if hp.ema_decay or (average is not None and scale < 0.5 and step % hp.swa_every == 0):
            average.update()
            if not hp.ema_decay and average.count == 1:
                log(f"swa:start step:{step}")
        if step <= 10 or step % hp.train_log_every == 0:
            log(f"step:{step}/{hp.iterations} train_loss:{train_loss.item():.4f} train_time:{clock.at(step):.0f}ms "
                f"step_avg:{clock.at(step) / step:.2f}ms" + progress_fields(scale, clock.at(step)))
        if stop_after is None and cap_ms and clock.would_pass(step, cap_ms):
            stop_after = step

    if rt.cuda:
        log(f"peak memory allocated: {torch.cuda.max_memory_allocated() // 2**20} MiB "
            f"reserved: {torch.cuda.max_memory_reserved() // 2**20} MiB")
    averaged = bool(hp.ema_decay) or (average is not None and average.count > 1)
    if averaged:
        log(f"ema:applying decay:{hp.ema_decay}" if hp.ema_decay
            else f"swa:applying averaged {average.count} checkpoints")
        base_model.load_state_dict(average.averaged())
    if base_model.loop_passes < len(hp.loop_starts):  # training ended before a switch
        base_model.set_loop_passes(len(hp.loop_starts))
        log(f"loop:on step:{step} virtual_layers:{len(base_model.virtual_layers())} (at the end of training: the "
            "artifact runs the final shape, which EVAL_ONLY rebuilds)")
    base_model.eval()
    checksums = replica_checksums(base_model, rt)
    identical = len(set(checksums)) == 1
    log(f"replicas:identical ranks:{rt.world_size}" if identical else
        "replicas:diverged checksums:" + ",".join(f"{c & (2**64 - 1):016x}" for c in checksums))
    stop = "wallclock_cap" if step == stop_after and step < hp.iterations else "iterations"
    return base_model, SimpleNamespace(train_ms=train_ms, steps=step, val_bpb=val_bpb, stop=stop, averaged=averaged,
                                       scorer=scorer, replicas_identical=identical)


# ---------------------------------------------------------------------------------------------------------------
# Export: GPTQ calibration (training time: it reads training data), int6 matrices spread over the ranks, the
# artifact written by rank 0

@contextlib.contextmanager
def exact_fp32():
    """TF32 off while Hessians are summed and GPTQ solves: their fp32 matmuls must be fp32."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def collect_hessians(model: GPT, names: list[str], train_files: list[str], hp: SimpleNamespace,
                     rt: SimpleNamespace) -> dict[str, Tensor]:
    """H = sum of x x^T over the inputs x of each named matrix (q, k and v share one; a looped block's matrices add
    every pass; the tied embedding's is the head's input, the final hidden states), from GPTQ_CALIB_SEQS sequences at
    the start of the training stream, split across ranks and summed over them."""
    keys, hessians = sorted({hessian_key(n) for n in names}), {}

    def accumulate(key: str, x: Tensor) -> None:
        x = x.detach().flatten(0, -2).float()
        if key not in hessians:
            hessians[key] = torch.zeros(x.size(1), x.size(1), device=x.device)
        with torch.autocast(x.device.type, enabled=False):
            hessians[key].addmm_(x.T, x)

    handles = [m.register_forward_hook(lambda module, inputs, output, key=n + ".weight": accumulate(key, inputs[0]))
               for n, m in model.named_modules() if n + ".weight" in keys and n != "tok_emb"]
    seqs = TokenStream(train_files).take(hp.gptq_calib_seqs * hp.train_seq_len).reshape(-1, hp.train_seq_len)
    mine = rank_share(seqs, rt.rank, rt.world_size)
    model.eval()
    with torch.no_grad(), autocast(rt.device), torch.compiler.set_stance("force_eager"):  # the hooks run eagerly
        for i in range(0, len(mine), 8):
            h = model.hidden(torch.from_numpy(mine[i : i + 8].astype(np.int64)).to(rt.device))
            if "tok_emb.weight" in keys:
                accumulate("tok_emb.weight", h)
    for handle in handles:
        handle.remove()
    for key in keys:
        n = model.get_parameter(key).size(1)
        hessians.setdefault(key, torch.zeros(n, n, device=rt.device))  # a rank without sequences adds zeros
        if rt.distributed:
            dist.all_reduce(hessians[key])
    return hessians


def quantize(model: GPT, hp: SimpleNamespace, rt: SimpleNamespace, train_files: list[str]):
    """The model's quantised state under QUANT_METHOD (GPTQ calibrates on training data first). Every rank takes
    part and gets the result."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    with exact_fp32():
        hessians = None
        if hp.quant_method == "gptq":
            names = [k for k, v in state.items() if quant_route(k, v, hp.control_patterns) == "int6"]
            hessians = collect_hessians(model, names + ["tok_emb.weight"], train_files, hp, rt)
        return quantize_state_dict(state, hp, hessians, rt.rank, rt.world_size)


def verified(tmp: Path, blob: bytes, tensors: dict[str, Tensor], meta: dict[str, str],
             reference: dict[str, Tensor]) -> dict[str, Tensor]:
    """The state the file `tmp` holds, checked to be what was packed: the same bytes read back, unpacking to the
    same dequantised tensors."""
    if tmp.read_bytes() != blob:
        raise RuntimeError(f"{tmp}: the bytes read back differ from the {len(blob)} written")
    state = unpack_artifact(blob, reference)
    packed = dequantize_state_dict({k: v.cpu() for k, v in tensors.items()}, meta, reference)
    differ = [k for k in packed if not torch.equal(state[k], packed[k])]
    if differ:
        raise RuntimeError(f"{tmp}: unpacks to other values than were packed ({', '.join(differ[:3])})")
    return state


def write_artifact(quantized, path: str, reference: dict[str, Tensor], hp: SimpleNamespace, rt: SimpleNamespace,
                   log: Logger, progress: SimpleNamespace) -> dict[str, Tensor] | None:
    """Rank 0 logs what the quantiser did and writes the artifact under a name of its own beside `path` (no two
    runs in one folder share it), reads it back and checks it, and only then renames it over `path`: an earlier
    run's artifact is replaced, atomically, by a complete and verified one, never lost to a run that did not
    finish. A failed or interrupted write removes its own temporary file and nothing else. Returns rank 0's checked
    state (for the evaluations; `reference` gives the dtypes and shapes); the other ranks wait for the file."""
    tensors, meta, stats, fallbacks = quantized
    state = None
    if rt.rank == 0:
        for name in fallbacks:
            log(f"gptq:fallback {name} reason:Hessian zero or not positive definite, rounded to nearest")
        for route, st in sorted(stats.items()):
            method = ("gptq" if hp.quant_method == "gptq" else "rowclip") if route == "int8" else hp.quant_method
            method += " clip:" + ("sigma" if hp.quant_clip == "sigma" else "per_row") if method != "rowmax" else ""
            bits = hp.embed_bits if route == "int8" else 6
            log(f"quant:{route} method:{method} bits:{bits} rows:{st.rows} scale_floor_rows:{st.floor_rows} "
                f"clipped:{st.clipped / st.values:.6f} weight_mse:{st.sq_err / st.values:.4e}")
        blob = pack_artifact(tensors, meta, hp.compressor)
        progress.partial = tmp = Path(f"{path}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())  # on disk before the rename, so a crash cannot leave a renamed, empty file
            state = verified(tmp, blob, tensors, meta, reference)
            tmp.replace(path)
            progress.artifact = path
        finally:
            tmp.unlink(missing_ok=True)
            progress.partial = None
    if rt.distributed:
        dist.barrier()
    return state


# ---------------------------------------------------------------------------------------------------------------
# The run: the code's two forms, the log, the runtime, final evaluations, the summary, interruptions

WRAPPER_HEAD = b'import lzma as L,base64 as B\nexec(L.decompress(B.b85decode("'
WRAPPER_TAIL = b'"),format=L.FORMAT_RAW,filters=[{"id":L.FILTER_LZMA2}]))\n'
LZMA2 = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]


def docstring(node: ast.AST) -> ast.Expr | None:
    """The docstring statement of a module, class or function, if it has one."""
    owner = isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body
    first = node.body[0] if owner else None
    text = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str)
    return first if text else None


def program(source: str) -> str:
    """The syntax tree of a source with its docstrings and signature annotations taken out: what runs."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if docstring(node):
            node.body = node.body[1:] or [ast.Pass()]
        if isinstance(node, ast.arg):
            node.annotation = None
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            node.returns = None
    return ast.dump(tree)


@functools.lru_cache(maxsize=4)
def counted_source(source: bytes) -> bytes:
    """The program as it is shipped and counted: the source without what only a reader needs (docstrings, comments,
    signature annotations, blank lines, indentation beyond one space a level). Edited line by line, so the result
    does not depend on the Python version; checked to be the same program (`program`), else the source itself."""
    text = source.decode("utf-8")
    rows = text.split("\n")
    lines = [row.encode("utf-8") for row in rows]
    cuts = collections.defaultdict(list)  # row -> [(start byte, end byte or None: the line's end)] taken out
    drop, passes = set(), set()
    for node in ast.walk(ast.parse(text)):
        if doc := docstring(node):
            drop.update(range(doc.lineno, doc.end_lineno + 1))
            if len(node.body) == 1:  # a body of only a docstring still needs a statement
                passes.add(doc.lineno)
        if isinstance(node, ast.arg) and node.annotation and node.annotation.end_lineno == node.lineno:
            cuts[node.lineno].append((node.col_offset + len(node.arg.encode()), node.annotation.end_col_offset))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.returns:
            row, line = node.returns.lineno, lines[node.returns.lineno - 1]
            if node.returns.end_lineno == row and b"->" in line[: node.returns.col_offset]:
                arrow = line.rindex(b"->", 0, node.returns.col_offset)
                cuts[row].append((len(line[:arrow].rstrip()), node.returns.end_col_offset))
    starts, verbatim, depth, logical = {}, set(), 0, True  # rows starting a logical line (their depth); in strings
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        (row, col), end_row = tok.start, tok.end[0]
        if tok.type == tokenize.INDENT:
            depth += 1
        elif tok.type == tokenize.DEDENT:
            depth -= 1
        elif tok.type == tokenize.COMMENT:
            cuts[row].append((len(rows[row - 1][:col].encode("utf-8")), None))
        elif tok.type == tokenize.NEWLINE:
            logical = True
        elif tok.type not in (tokenize.NL, tokenize.ENDMARKER):
            if logical:
                starts[row], logical = depth, False
            verbatim.update(range(row + 1, end_row + 1))  # rows that begin inside a multi-line string
    out = []
    for row, line in enumerate(lines, 1):
        if row in passes:
            out.append(b" " * starts[row] + b"pass")
        if row in drop:
            continue
        for a, b in sorted(cuts[row], reverse=True):
            line = line[:a] + (line[b:] if b is not None else b"")
        if row in verbatim:
            out.append(line.rstrip() if cuts[row] else line)
        elif line.strip():
            out.append(b" " * starts.get(row, 1) + line.strip())  # within brackets any indentation will do
    counted = b"\n".join(out) + b"\n"
    try:
        return counted if program(counted.decode("utf-8")) == program(text) else source
    except SyntaxError:
        return source


def self_extracting(source: bytes) -> bytes:
    """The shipped, counted form of the script (the April records' convention): raw LZMA2 of its counted source,
    base85, exec'd by a two-line wrapper. Deterministic for a given source and liblzma."""
    packed = lzma.compress(counted_source(source), lzma.FORMAT_RAW, filters=LZMA2)
    return WRAPPER_HEAD + base64.b85encode(packed) + WRAPPER_TAIL


def script_code(path: str) -> tuple[bytes, bytes]:
    """(source, counted wrapper) of the running script, whichever of the two forms the file is (the wrapper's source
    is the counted one)."""
    raw = Path(path).read_bytes()
    if raw.startswith(WRAPPER_HEAD) and raw.endswith(WRAPPER_TAIL):
        packed = raw[len(WRAPPER_HEAD) : -len(WRAPPER_TAIL)]
        return lzma.decompress(base64.b85decode(packed), lzma.FORMAT_RAW, filters=LZMA2), raw
    return raw, self_extracting(raw)


def nvidia_smi() -> str:
    """nvidia-smi's report for the log's header. A missing, hanging or failing nvidia-smi is noted there, never
    fatal: the GPUs it would list are a record, not something the run needs."""
    if not torch.cuda.is_available():
        return "nvidia-smi: no CUDA device"
    try:
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"nvidia-smi: not run ({first_line(e)})"
    if smi.returncode:
        return f"nvidia-smi: exited {smi.returncode} ({((smi.stderr or smi.stdout).strip().splitlines() or [''])[0]})"
    return smi.stdout.rstrip()


class Logger:
    """Rank 0 prints every line and appends it to logs/<RUN_ID>.txt, which opens with the script's source."""

    def __init__(self, run_id: str, enabled: bool, code: bytes):
        self.path, self.enabled = Path("logs") / f"{run_id}.txt", enabled
        if enabled:
            self.path.parent.mkdir(exist_ok=True)
            print(self.path, flush=True)
            smi = nvidia_smi()
            self.path.write_bytes(code)
            self.write("\n".join(["=" * 100, f"Running Python {sys.version}", f"Running PyTorch {torch.__version__}",
                                  smi, "=" * 100]))

    def write(self, line: str) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")

    def __call__(self, line: str) -> None:
        if self.enabled:
            print(line, flush=True)
        self.write(line)


def runtime(hp: SimpleNamespace) -> SimpleNamespace:
    """Where this process runs: torchrun's rank and world size, the accumulation that keeps the batch of 8 GPUs,
    the device, and whether to compile."""
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    world_size = int(os.environ["WORLD_SIZE"]) if distributed else 1
    grad_accum = 8 // world_size if 8 % world_size == 0 else 1
    local_tokens = hp.train_batch_tokens // (world_size * grad_accum)
    if local_tokens * world_size * grad_accum != hp.train_batch_tokens or local_tokens % hp.train_seq_len:
        unit = world_size * grad_accum * hp.train_seq_len
        below = hp.train_batch_tokens // unit * unit
        nearest = [str(n) for n in (below, below + unit) if n]
        raise InputError(f"TRAIN_BATCH_TOKENS={hp.train_batch_tokens} must split into {world_size} ranks x "
                         f"{grad_accum} micro-steps of whole TRAIN_SEQ_LEN={hp.train_seq_len} sequences "
                         f"(nearest valid: {' or '.join(nearest)})")
    cuda = torch.cuda.is_available()
    precision, precision_why = choose_precision(hp.precision, cuda)
    return SimpleNamespace(precision=precision, precision_why=precision_why,
        distributed=distributed, rank=int(os.environ["RANK"]) if distributed else 0, world_size=world_size,
        grad_accum=grad_accum, local_tokens=local_tokens, cuda=cuda,
        device=torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu"),
        host_group=None,  # the gloo group of host-side votes (agree_max), made with the process group
        compile={"auto": "blocks" if cuda else "", "0": ""}.get(hp.compile, hp.compile))  # "", blocks or model


COMPILED = dict(dynamic=False, fullgraph=True)  # one graph per shape; a graph break is an error


def maybe_compile(fn, rt: SimpleNamespace):
    return torch.compile(fn, **COMPILED) if rt.compile else fn


def compile_model(model: GPT, rt: SimpleNamespace) -> tuple[nn.Module, object]:
    """(training forward, evaluation trunk) of the model under COMPILE. blocks: the embedding, every block and the
    training loss are compiled regions; the blocks share one graph per kind of block (attention with or without XSA,
    sequential or parallel) and mode, whatever the layer, loop pass or loop shape, so the compile time does not grow
    with the layers and loops. model: the whole forward and the whole trunk, a graph per loop shape. Uncompiled
    work (GPTQ's calibration with its hooks) runs under torch.compiler.set_stance("force_eager")."""
    torch._dynamo.config.recompile_limit = 64  # graphs per compiled function (kinds x modes x shapes); past it: error
    if rt.compile == "model":
        return torch.compile(model, **COMPILED), torch.compile(model.hidden, **COMPILED)
    if rt.compile == "blocks":
        model.embed = torch.compile(model.embed, **COMPILED)
        model.objective = torch.compile(model.objective, **COMPILED)
        for block in model.blocks:
            block.compile(**COMPILED)
            block.forward_lanes = torch.compile(block.forward_lanes, **COMPILED)
    return model, model.hidden


def sync(rt: SimpleNamespace) -> None:
    """Wait for queued GPU work, so that wall-clock readings mean what they say."""
    if rt.cuda:
        torch.cuda.synchronize()


def agree_max(values: list[float], rt: SimpleNamespace) -> list[float]:
    """The largest of every rank's values: a time-based decision or verdict made once for all ranks. Voted among the
    hosts (gloo), so a vote never waits for the device's queue."""
    if not rt.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=rt.host_group)
    return t.tolist()


def timed(report: SimpleNamespace, rt: SimpleNamespace, part: str, fn, *args):
    """fn(*args), its wall-clock time (queued GPU work included) recorded as report.ms[part]."""
    sync(rt)
    t0 = time.perf_counter()
    out = fn(*args)
    sync(rt)
    report.ms[part] = 1000 * (time.perf_counter() - t0)
    return out


def check_training_budget(report: SimpleNamespace, hp: SimpleNamespace, rt: SimpleNamespace, log: Logger) -> None:
    """Training plus GPTQ calibration (which reads training data) must fit MAX_WALLCLOCK_SECONDS."""
    limit = 1000 * hp.max_wallclock_seconds
    if "calibration" in report.ms:
        report.ms["calibration"] = agree_max([report.ms["calibration"]], rt)[0]
    total = report.train_ms + report.ms.get("calibration", 0.0)
    if "calibration" in report.ms:
        log(f"gptq:budget train_ms:{report.train_ms:.0f} calib_ms:{report.ms['calibration']:.0f} "
            f"total_ms:{total:.0f} limit_ms:{limit:.0f}")
    if limit and total > limit:
        log(f"budget:exceeded training total_ms:{total:.0f} limit_ms:{limit:.0f}"
            + " (raise GPTQ_RESERVE_SECONDS)" * ("calibration" in report.ms))
        report.failed.append("training")


def prime_evaluations(model: GPT, trainer: nn.Module, scorer: Scorer, hp: SimpleNamespace, rt: SimpleNamespace,
                      batch_windows: int) -> None:
    """Runs every graph of the final evaluations once on random tokens: the scoring trunk on a batch of windows (a
    strided view, as score_windows passes), with TTT a training step's forward and backward on this rank's share of
    a chunk (its gradients dropped), and the document modes' graphs (prime_documents)."""
    device, window = model.tok_emb.weight.device, hp.eval_len
    windows = torch.randint(0, hp.vocab_size, (batch_windows, window + 1), device=device)
    with torch.inference_mode(), autocast(device):
        scorer.hidden(windows[:, :-1])
    mine = len(rank_share(range(hp.ttt_chunk_tokens // hp.train_seq_len), rt.rank, rt.world_size))
    if hp.ttt_enabled and mine:
        seqs = torch.randint(0, hp.vocab_size, (mine, hp.train_seq_len + 1), device=device)
        model.train()
        with autocast(device):
            trainer(seqs[:, :-1], seqs[:, 1:]).backward()
        model.zero_grad(set_to_none=True)
        model.eval()
    if hp.docs_eval or hp.ttt_lora_enabled:
        prime_documents(model, scorer.hidden, hp, rt, batch_windows * window)


def final_evaluations(model: GPT, val: Tensor, val_bytes: Tensor, hp: SimpleNamespace, rt: SimpleNamespace,
                      log: Logger, report: SimpleNamespace) -> None:
    """The artifact's scores: the non-overlapping round trip, the sliding window (the submission score), with
    DOCS_EVAL the document-isolated score, with TTT_LORA_ENABLED phased LoRA TTT (which puts the weights back) and,
    with TTT_ENABLED, legal score-first TTT, which adapts `model` as it scores and so comes last. Under COMPILE every
    graph they run is compiled first, on random tokens, outside the timed evaluations."""
    if hp.ttt_enabled:  # the model as TTT trains it: it scores alike, and its graphs are compiled with the others
        prepare_ttt(model, hp)
    if hp.ttt_lora_enabled and hp.ttt_lora_phases:
        train_tables_in_fp32(model)
    trainer, hidden = compile_model(model, rt)
    scorer, batch = Scorer(model, hidden), eval_batch_windows(hp, rt, hp.eval_len)
    if rt.compile:
        timed(report, rt, "compile", prime_evaluations, model, trainer, scorer, hp, rt, batch)
        log(f"eval:compiled compile_ms:{report.ms['compile']:.0f} (random tokens, before the timed evaluations)")
    stride = hp.eval_stride if 0 < hp.eval_stride < hp.eval_len else hp.eval_len
    subset, strided = " subset" if hp.val_max_tokens else "", f" stride:{stride}" if stride < hp.eval_len else ""
    finals = [("roundtrip", "final_int6_roundtrip", "", lambda: evaluate(
        scorer, val, val_bytes, hp.eval_len, hp.eval_len, batch, rt.rank, rt.world_size))]
    if stride < hp.eval_len:
        finals.append(("sliding", "final_int6_sliding_window", strided, lambda: evaluate(
            scorer, val, val_bytes, hp.eval_len, stride, batch, rt.rank, rt.world_size)))
    if hp.docs_eval:
        finals.append(("docs", "final_int6_docs", f" stride:{stride}", lambda: docs_evaluate(
            model, hidden, val, val_bytes, hp, rt, stride, batch * hp.eval_len, log)))
    if hp.ttt_lora_enabled:
        finals.append(("lora_ttt", "final_int6_lora_ttt", f" chunk:{hp.ttt_lora_chunk} rank:{hp.ttt_lora_rank}",
                       lambda: lora_ttt_evaluate(
                           model, hidden, val, val_bytes, hp, rt, stride, batch * hp.eval_len, log)))
    if hp.ttt_enabled:
        finals.append(("ttt", "final_int6_ttt", f"{strided} chunk_tokens:{hp.ttt_chunk_tokens}", lambda: ttt_evaluate(
            model, trainer, scorer, val, val_bytes, hp, rt, batch, log)))
    for key, label, extra, evaluation in finals:
        loss, report.bpb[key], tokens, nbytes = timed(report, rt, key, evaluation)
        log(f"{label} val_loss:{loss:.4f} val_bpb:{report.bpb[key]:.4f}{extra} eval_time:{report.ms[key]:.0f}ms"
            f"{subset}")
        log(f"{label}_exact val_loss:{loss:.8f} val_bpb:{report.bpb[key]:.8f} tokens:{tokens} bytes:{nbytes}{subset}")
    if hp.ttt_enabled:
        log(f"ttt_time:{report.ms['ttt']:.0f}ms")


def summarise(report: SimpleNamespace, hp: SimpleNamespace, rt: SimpleNamespace, log: Logger, model_bytes: int,
              code_bytes: int) -> int:
    """The closing lines and the exit status (1: over the size or a budget, or diverged replicas). The verdicts
    read times agreed over the ranks, so every rank exits alike."""
    parts = list(report.ms)
    post_ms, *agreed = agree_max([report.post_ms] + [report.ms[p] for p in parts], rt)
    ms, failed, total = dict(zip(parts, agreed)), report.failed, model_bytes + code_bytes
    on_8_gpus = rt.cuda and rt.world_size == 8
    if on_8_gpus and post_ms > EVAL_LIMIT_MS:
        log(f"budget:exceeded evaluation total_ms:{post_ms:.0f} limit_ms:{EVAL_LIMIT_MS:.0f}")
        failed.append("evaluation")

    def verdict(budget: str) -> str:
        return "exceeded" if budget in failed else "ok"

    if not hp.eval_only:
        log(f"summary: steps:{report.steps} train_time:{report.train_ms:.0f}ms stop:{report.stop}")
    subset = " subset" if hp.val_max_tokens else ""
    log("summary: val_bpb " + " ".join(f"{k}:{v:.4f}" for k, v in report.bpb.items() if v is not None) + subset)
    log(f"summary: bytes model:{model_bytes} code:{code_bytes} total:{total} limit:{SIZE_LIMIT_BYTES} "
        + verdict("size"))
    if not hp.eval_only and hp.max_wallclock_seconds > 0:
        calib = ms.get("calibration", 0.0)
        log(f"summary: budget training:{report.train_ms + calib:.0f}ms = train {report.train_ms:.0f} + "
            f"calibration {calib:.0f}, limit:{1000 * hp.max_wallclock_seconds:.0f}ms " + verdict("training"))
    evaluation = " + ".join(f"{k} {v:.0f}" for k, v in ms.items() if k != "calibration")
    log(f"summary: budget evaluation:{post_ms:.0f}ms = {evaluation}, limit:{EVAL_LIMIT_MS:.0f}ms on 8 GPUs "
        + (verdict("evaluation") if on_8_gpus else f"unchecked (this run: {rt.world_size}x {rt.device.type})"))
    return 1 if failed else 0


def run(hp: SimpleNamespace, rt: SimpleNamespace, log: Logger, code: bytes, wrapper: bytes, val: Tensor,
        val_bytes: Tensor, train_files: list[str], artifact_state: dict | None, progress: SimpleNamespace) -> int:
    """Train (unless EVAL_ONLY), export, evaluate and summarise; returns the exit status."""
    report = SimpleNamespace(bpb={}, ms={}, failed=[], train_ms=0.0, steps=0, stop=None, post_ms=0.0)
    artifact = hp.eval_only or ARTIFACT_PATH
    if hp.eval_only:
        log(f"eval_only:{artifact}")
        post_start = time.perf_counter()
    else:
        progress.earlier = os.path.exists(artifact)
        if progress.earlier:
            log(f"artifact:keeping the {artifact} of an earlier run until this run's is written and verified")
        model, trained = train(hp, rt, log, val, val_bytes, train_files, progress)
        report.train_ms, report.steps, report.stop = trained.train_ms, trained.steps, trained.stop
        report.bpb["pre_quant"] = trained.val_bpb
        if not trained.replicas_identical:
            report.failed.append("replicas")
        quantized = None
        if hp.quant_method == "gptq":  # calibration reads training data: it belongs to the training budget
            quantized = timed(report, rt, "calibration", quantize, model, hp, rt, train_files)
        check_training_budget(report, hp, rt, log)
        post_start = time.perf_counter()
        if trained.averaged:
            seq = hp.train_seq_len
            loss, report.bpb["averaged"], _, _ = timed(report, rt, "averaged", evaluate, trained.scorer, val, val_bytes,
                                                       seq, seq, eval_batch_windows(hp, rt, seq), rt.rank,
                                                       rt.world_size)
            log(f"averaged val_loss:{loss:.4f} val_bpb:{report.bpb['averaged']:.4f} "
                f"eval_time:{report.ms['averaged']:.0f}ms (the weights to export, before quantisation)")
        artifact_state = timed(report, rt, "export", lambda: write_artifact(
            quantized or quantize(model, hp, rt, train_files), artifact, model.state_dict(), hp, rt, log, progress))
        progress.artifact = artifact
        log(f"export_time:{report.ms['export']:.0f}ms")

    blob = Path(artifact).read_bytes()
    log(f"code: source_bytes:{len(code)} wrapper_bytes:{len(wrapper)} "
        "(the counted code is the self-extracting form)")
    log(f"Serialized model int6+{hp.compressor}: {len(blob)} bytes")
    log(f"Code size: {len(wrapper)} bytes")
    log(f"Total submission size int6+{hp.compressor}: {len(blob) + len(wrapper)} bytes")
    log(f"artifact:{artifact} bytes:{len(blob)} sha256:{hashlib.sha256(blob).hexdigest()}")
    if len(blob) + len(wrapper) > SIZE_LIMIT_BYTES:
        log(f"size_limit:exceeded total:{len(blob) + len(wrapper)} limit:{SIZE_LIMIT_BYTES} "
            f"over_by:{len(blob) + len(wrapper) - SIZE_LIMIT_BYTES}")
        report.failed.append("size")

    eval_model = build_model(hp, rt.device)
    eval_model.load_state_dict(artifact_state or unpack_artifact(blob, eval_model.state_dict()), strict=True)
    eval_model.eval()
    final_evaluations(eval_model, val, val_bytes, hp, rt, log, report)
    report.post_ms = 1000 * (time.perf_counter() - post_start)
    log(f"post_training_time:{report.post_ms:.0f}ms")
    return summarise(report, hp, rt, log, len(blob), len(wrapper))


def interrupted_message(progress: SimpleNamespace) -> str:
    if progress.artifact:
        return f"interrupted during evaluation: the artifact {progress.artifact} is complete"
    kept = f"; the earlier {ARTIFACT_PATH} is kept" if progress.earlier else ""
    return f"interrupted at step {progress.step} (train_time {progress.train_ms:.0f} ms): no artifact written{kept}"


def interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def exit_promptly_on_signals(rt: SimpleNamespace, log: Logger, progress: SimpleNamespace):
    """A rank blocked in a collective never runs Python's signal handlers (the peers it waits for may be gone), so
    torchrun would wait out its grace period. While the run lasts, a watcher thread woken by the signal itself
    gives the main thread INTERRUPT_GRACE_S to stop cleanly, then says so and ends the process."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous = signal.set_wakeup_fd(write_fd)

    def watch():
        if not os.read(read_fd, 1):  # the run ended without a signal
            return os.close(read_fd)
        time.sleep(INTERRUPT_GRACE_S)
        if progress.partial:
            progress.partial.unlink(missing_ok=True)
        if not progress.reported:
            message = interrupted_message(progress) + f" (rank {rt.rank} was blocked in a collective)"
            if rt.rank == 0:
                log(message)
            print(message, file=sys.stderr, flush=True)
        os._exit(130)

    threading.Thread(target=watch, daemon=True).start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous)
        os.close(write_fd)


def main() -> int:
    warnings = misspelt(os.environ)
    for line in warnings if int(os.environ.get("RANK", 0)) == 0 else []:
        print(line, file=sys.stderr, flush=True)
    hp = read_hyperparameters(os.environ)
    rt = runtime(hp)
    threads, threads_why = choose_cpu_threads(os.environ, rt.cuda)
    if threads:
        torch.set_num_threads(threads)
    global ACT_DTYPE, ATTENTION
    ACT_DTYPE = rt.precision
    compressor()
    if hp.compressor == "brotli":
        brotli_module()
    sp = load_tokenizer(hp.tokenizer_path, hp.vocab_size)
    luts = build_byte_luts(sp, hp.vocab_size)
    val_files = resolve_files(hp.val_glob, "VAL_FILES")
    val_tokens = load_validation_tokens(val_files, max(hp.train_seq_len, hp.eval_len), hp.val_max_tokens)
    check_token_ids(val_tokens.numpy(), hp.vocab_size, f"VAL_FILES={hp.val_glob}")
    val_token_bytes, sidecars = validation_bytes(hp, sp, luts, val_files, val_tokens)
    train_files, artifact_state = [], None
    if hp.eval_only:
        artifact_state = read_artifact(hp.eval_only, build_model(hp, torch.device("cpu")).state_dict())
    else:
        train_files = resolve_files(hp.train_glob, "TRAIN_FILES")
        if sum(read_shard_header(f) for f in train_files) == 0:
            raise InputError(f"TRAIN_FILES={hp.train_glob}: the shards hold no tokens")
        check_token_ids(load_data_shard(train_files[0]), hp.vocab_size, train_files[0])

    if rt.cuda:
        torch.cuda.set_device(rt.device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if rt.distributed:
        dist.init_process_group("nccl" if rt.cuda else "gloo", device_id=rt.device if rt.cuda else None)
        rt.host_group = dist.new_group(backend="gloo")  # its own on the CPU too: one path for both
        dist.barrier()
    ATTENTION, why, probe = choose_attention(hp.attention, hp, rt)
    agree_on_attention(ATTENTION, rt)
    code, wrapper = script_code(__file__)
    log = Logger(hp.run_id, rt.rank == 0, code)
    for line in warnings:
        log.write(line)
    for name in HPARAM_NAMES:
        log(f"hparam {name}={getattr(hp, name.lower())}")
    if hp.warmdown_iters > hp.iterations and hp.max_wallclock_seconds <= 0 and not hp.eval_only:
        log(f"warning: WARMDOWN_ITERS={hp.warmdown_iters} > ITERATIONS={hp.iterations}: the learning rate starts "
            f"at {lr_multiplier(0, 0.0, hp):.3f} of its value and only decays")
    if hp.val_max_tokens:
        log(f"val_subset:VAL_MAX_TOKENS={hp.val_max_tokens} scores below are subset scores, not submission scores")
    log(f"val_bpb:enabled tokenizer_kind=sentencepiece tokenizer_path={hp.tokenizer_path}")
    if sidecars:
        log(f"val_bpb:byte_sidecar files:{len(sidecars)} pattern={sidecar_pattern(hp)} "
            f"bytes:{int(val_token_bytes.sum())} (each target's bytes of the original text, from the dataset)")
    else:
        log(f"val_bpb:byte_table bytes:{int(val_token_bytes.sum())} (no byte sidecar matches "
            f"{sidecar_pattern(hp) or 'VAL_BYTES_FILES'})")
    log(f"val_loader:shards pattern={hp.val_glob} tokens:{len(val_tokens) - 1}")
    log(f"world_size:{rt.world_size} grad_accum_steps:{rt.grad_accum}")
    log(f"attention_backend:{ATTENTION} compile:{rt.compile or 0} device:{rt.device.type} reason:{why}")
    log(f"attention_probe:{ATTENTION} {probe}")
    log(f"precision:{'bf16' if ACT_DTYPE == torch.bfloat16 else 'fp32'} reason:{rt.precision_why}")
    log(f"cpu_threads:{torch.get_num_threads()} reason:{threads_why}")
    log(f"attention_mode:gqa num_heads:{hp.num_heads} num_kv_heads:{hp.num_kv_heads}")
    log(f"XSA:last_{hp.xsa_last_n} active_layers:{list(range(hp.num_layers - hp.xsa_last_n, hp.num_layers))}")
    log(f"seed:{hp.seed}")
    random.seed(hp.seed)
    np.random.seed(hp.seed)
    torch.manual_seed(hp.seed)

    val = val_tokens.to(rt.device, torch.int32)  # on the device once per run; int32 halves its memory
    val_bytes = val_token_bytes.to(rt.device)
    progress = SimpleNamespace(step=0, train_ms=0.0, artifact=None, earlier=False, partial=None, reported=False)
    signal.signal(signal.SIGTERM, interrupt)  # how torchrun stops its workers after a Ctrl-C
    try:
        with exit_promptly_on_signals(rt, log, progress):
            status = run(hp, rt, log, code, wrapper, val, val_bytes, train_files, artifact_state, progress)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if rt.rank == 0:
            message = interrupted_message(progress)
            log(message)
            print(message, file=sys.stderr, flush=True)
        progress.reported = True
        return 130
    if rt.distributed:
        dist.barrier()  # no rank tears the group down while another still uses it
        dist.destroy_process_group()
    return status


if __name__ == "__main__":
    try:
        sys.exit(main())
    except InputError as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted before training started: nothing written", file=sys.stderr, flush=True)
        sys.exit(130)
