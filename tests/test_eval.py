"""Evaluation (SPEC A4, B§2, B§7): sliding windows score every target exactly once with the longest context the
definition allows; ranks split the windows; the loss equals a brute-force per-target reference; stride = window is
the plain non-overlapping eval; a 2-process gloo run equals the 1-process result."""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import TINY_ENV, scorer_of, tiny_model

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parent.parent
V = 64
TINY_EVAL_ENV = dict(TINY_ENV, VOCAB_SIZE=str(V), TRAIN_SEQ_LEN="32")  # the tiny model over 64 random tokens


def make_luts(vocab: int = V, seed: int = 0):
    """Hand-made byte LUTs: ids 0-2 are boundary (control) tokens with 0 bytes; the rest 1-4 bytes, some with '▁'."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randint(1, 5, (vocab,), generator=gen).to(torch.int16)
    space = torch.rand(vocab, generator=gen) < 0.4
    boundary = torch.zeros(vocab, dtype=torch.bool)
    base[:3], space[:3], boundary[:3] = 0, False, True
    return base, space, boundary


def make_tokens(n_targets: int, seed: int = 0, vocab: int = V) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, vocab, (n_targets + 1,), generator=gen, dtype=torch.int64)
    toks[:: 37] = 1  # BOS-like boundary tokens scattered through the stream
    return toks


def all_target_bytes(toks: torch.Tensor, luts) -> int:
    return int(tg.target_bytes(toks[:-1], toks[1:], luts).sum())


def eval_model(seed: int = 0) -> tuple[tg.GPT, object]:
    return tiny_model(seed, perturb=0.1, **TINY_EVAL_ENV)


def fp32_logits_fn(model: tg.GPT):
    """The model fully in fp32 with autocast switched off, so references can be compared tightly."""
    m32 = tiny_model_copy_fp32(model)

    def fn(x):
        with torch.autocast("cpu", enabled=False):
            return m32.logits(m32.hidden(x))
    return fn, m32


def tiny_model_copy_fp32(model: tg.GPT) -> tg.GPT:
    hp = tg.read_hyperparameters(TINY_EVAL_ENV)
    m32 = tg.GPT(hp, torch.float32).float()
    m32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    return m32.eval()


def assigned_start(j: int, total: int, window: int, stride: int) -> int:
    """Independent statement of the definition: target j is scored by the earliest window that contains it among
    the regular windows 0, stride, 2*stride, ... (those that fit); targets past the last regular window go to the
    end-aligned window."""
    if total <= window:
        return 0
    last_regular = (total - window) // stride * stride
    if j < last_regular + window:
        return max(0, -(-(j - window + 1) // stride) * stride)
    return total - window


# ------------------------------------------------------------------------------------------------- windows

COMBOS = [(t, w, s) for t in (1, 2, 5, 31, 32, 33, 64, 100, 127, 128, 129, 257, 1000)
          for w, s in ((32, 8), (32, 32), (32, 1), (32, 5), (32, 31), (16, 3), (1, 1), (7, 7), (64, 16))]


@pytest.mark.parametrize("total,window,stride", COMBOS)
def test_sliding_windows_score_every_target_once_with_longest_context(total, window, stride):
    window_eff = min(window, total)  # evaluate() caps the window at the number of targets
    windows = tg.sliding_windows(total, window_eff, stride)
    count = [0] * total
    prev_start = -1
    for start, first in windows:
        assert 0 <= start and start + window_eff <= total, (start, window_eff, total)
        assert 0 <= first <= window_eff
        assert start > prev_start, "windows are in increasing order"
        prev_start = start
        for p in range(start + first, start + window_eff):
            count[p] += 1
            context = p - start + 1
            assert context >= min(window_eff - stride + 1, p + 1), (p, start, context)
            assert start == assigned_start(p, total, window_eff, stride), (p, start)
    assert count == [1] * total, [i for i, c in enumerate(count) if c != 1][:10]


def test_sliding_windows_seed_shape():
    """The seed's numbers (B§7.2): window 2048, stride 64 over 62,021,632 targets; our list fixes the tail."""
    total = 62_021_632
    windows = tg.sliding_windows(total, 2048, 64)
    assert windows[0] == (0, 0) and windows[1] == (64, 2048 - 64)
    assert windows[-1][0] + 2048 == total
    assert len(windows) == (total - 2048) // 64 + 1  # total is a multiple of 64: no extra tail window
    assert sum(2048 - first for _, first in windows) == total


# ------------------------------------------------------------------------------------------------- fake logits

def position_free_logits_fn(x: torch.Tensor) -> torch.Tensor:
    v = torch.arange(V, dtype=torch.float32)
    return torch.sin(x[..., None].float() * 0.37 + v * 1.3) * 3.0


def position_free_reference(toks: torch.Tensor) -> float:
    logits = position_free_logits_fn(toks[:-1][None])[0]
    return F.cross_entropy(logits.double(), toks[1:], reduction="sum").item()


def test_uniform_logits_give_ln_v_and_exact_counts():
    toks, luts = make_tokens(300, seed=1), make_luts()
    uniform = lambda x: torch.zeros(*x.shape, V)  # noqa: E731
    loss, bpb, tokens, nbytes = tg.evaluate(scorer_of(uniform), toks, tg.token_bytes(toks, luts), 32, 8, 4, 0, 1)
    assert tokens == 300 and nbytes == all_target_bytes(toks, luts)
    assert loss == pytest.approx(math.log(V), rel=1e-6)
    assert bpb == pytest.approx(math.log(V) / math.log(2) * 300 / nbytes, rel=1e-6)


@pytest.mark.parametrize("total,window,stride,batch", [(300, 32, 8, 4), (301, 32, 5, 3), (77, 16, 16, 2),
                                                        (20, 32, 8, 4), (129, 32, 1, 7)])
def test_position_free_logits_match_per_target_reference(total, window, stride, batch):
    toks, luts = make_tokens(total, seed=total), make_luts()
    per_token = tg.token_bytes(toks, luts)
    loss, bpb, tokens, nbytes = tg.evaluate(scorer_of(position_free_logits_fn), toks, per_token, window, stride, batch,
                                            0, 1)
    assert tokens == total and nbytes == all_target_bytes(toks, luts)
    assert loss == pytest.approx(position_free_reference(toks) / total, rel=1e-6)


class RecordingAllReduce:
    """Stands in for dist.all_reduce: records each rank's local sums, then fills in a nonzero placeholder so the
    rank's own division cannot fail; the test sums the recorded parts itself."""

    def __init__(self):
        self.parts = []

    def __call__(self, tensor, *args, **kwargs):
        self.parts.append(tensor.clone())
        tensor.fill_(1.0)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("total,window,stride,batch", [(300, 32, 8, 4), (61, 32, 8, 2), (40, 32, 32, 1)])
def test_rank_slices_cover_every_window_once(monkeypatch, world_size, total, window, stride, batch):
    toks, luts = make_tokens(total, seed=7), make_luts()
    per_token, recorder = tg.token_bytes(toks, luts), RecordingAllReduce()
    monkeypatch.setattr(tg.dist, "all_reduce", recorder)
    if world_size == 1:
        loss, _, tokens, nbytes = tg.evaluate(scorer_of(position_free_logits_fn), toks, per_token, window, stride,
                                              batch, 0, 1)
        assert recorder.parts == [], "a single process must not all-reduce"
        sums = torch.tensor([loss * tokens, tokens, nbytes], dtype=torch.float64)
    else:
        for rank in range(world_size):
            tg.evaluate(scorer_of(position_free_logits_fn), toks, per_token, window, stride, batch, rank, world_size)
        assert len(recorder.parts) == world_size
        assert all(p.dtype == torch.float64 and p.shape == (3,) for p in recorder.parts)
        sums = torch.stack(recorder.parts).sum(0)
    assert int(sums[1]) == total
    assert int(sums[2]) == all_target_bytes(toks, luts)
    assert sums[0].item() == pytest.approx(position_free_reference(toks), rel=1e-6)


# ------------------------------------------------------------------------------------------------- tiny model

def brute_force(logits_fn, toks: torch.Tensor, window: int, stride: int, use_autocast: bool) -> float:
    """For each target j: run the model on exactly the context its window gives it, val[start .. j], and take the
    log-loss of the last position (causality means the rest of the window cannot matter)."""
    total = len(toks) - 1
    window = min(window, total)
    loss = 0.0
    for j in range(total):
        s = assigned_start(j, total, window, stride)
        ctx = toks[s : j + 1][None]
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_autocast):
            logits = logits_fn(ctx)[0, -1].float()
        loss += F.cross_entropy(logits.double()[None], toks[j + 1 : j + 2]).item()
    return loss


@pytest.fixture(scope="module")
def model():
    return eval_model(seed=0)


@pytest.mark.parametrize("total,window,stride,batch", [(101, 32, 8, 3), (70, 16, 5, 4), (24, 32, 8, 2)])
def test_sliding_loss_equals_brute_force_reference_fp32(model, total, window, stride, batch):
    m, _ = model
    fn, _ = fp32_logits_fn(m)
    toks, luts = make_tokens(total, seed=total + 3), make_luts()
    loss, bpb, tokens, nbytes = tg.evaluate(scorer_of(fn), toks, tg.token_bytes(toks, luts), window, stride, batch, 0,
                                            1)
    assert tokens == total and nbytes == all_target_bytes(toks, luts)
    ref = brute_force(fn, toks, window, stride, use_autocast=False) / total
    assert loss == pytest.approx(ref, rel=1e-5)
    assert bpb == pytest.approx(ref / math.log(2) * total / nbytes, rel=1e-5)
    # the model is not trivial: a wrong window assignment would show up
    uniform = math.log(V)
    assert abs(loss - uniform) > 0.05


def test_sliding_loss_bf16_model_close_to_reference(model):
    """The real dtype policy under evaluate()'s bf16 autocast: same answer within bf16 noise."""
    m, _ = model
    total, window, stride = 90, 32, 8
    toks, luts = make_tokens(total, seed=11), make_luts()
    loss, _, tokens, _ = tg.evaluate(tg.Scorer(m), toks, tg.token_bytes(toks, luts), window, stride, 4, 0, 1)
    ref = brute_force(lambda x: m.logits(m.hidden(x)), toks, window, stride, use_autocast=True) / total
    assert tokens == total
    assert loss == pytest.approx(ref, rel=2e-3)


@pytest.mark.parametrize("total,window,stride,batch", [(203, 32, 8, 3), (100, 32, 32, 2), (77, 16, 5, 4)])
def test_head_runs_on_scored_positions_only_and_equals_the_full_computation(model, total, window, stride, batch):
    """The eval's head and loss see only the positions a batch scores (all of them only in the first window's
    batch): the same loss as computing every position's logits and keeping the scored ones, same tokens, bytes."""
    m, _ = model
    toks, luts = make_tokens(total, seed=31), make_luts()
    seen, real_loss = [], m.loss
    m.loss = lambda x, y, reduction="mean": (seen.append(x.size(1)), real_loss(x, y, reduction))[1]
    try:
        fast = tg.evaluate(tg.Scorer(m), toks, tg.token_bytes(toks, luts), window, stride, batch, 0, 1)
    finally:
        del m.loss
    full = tg.evaluate(scorer_of(lambda x: m.logits(m.hidden(x))), toks, tg.token_bytes(toks, luts), window, stride,
                       batch, 0, 1)
    assert fast[2:] == full[2:] == (total, all_target_bytes(toks, luts))
    assert fast[0] == pytest.approx(full[0], rel=1e-6)
    windows = tg.sliding_windows(total, window, stride)
    assert seen == [window - min(f for _, f in windows[i : i + batch]) for i in range(0, len(windows), batch)]
    assert stride == window or min(seen) == stride  # a sliding batch computes the head on `stride` positions


def test_context_matters_for_tiny_model(model):
    """Guard for the reference test: scoring every target with a short (1-token) context gives another loss."""
    m, _ = model
    fn, _ = fp32_logits_fn(m)
    toks, luts = make_tokens(101, seed=104), make_luts()
    loss, *_ = tg.evaluate(scorer_of(fn), toks, tg.token_bytes(toks, luts), 32, 8, 3, 0, 1)
    short = sum(F.cross_entropy(fn(toks[j : j + 1][None])[0, -1:].double(), toks[j + 1 : j + 2]).item()
                for j in range(101)) / 101
    assert abs(loss - short) > 1e-3


@pytest.mark.parametrize("total,window", [(128, 32), (96, 16)])
def test_stride_equal_window_is_plain_non_overlapping_eval(model, total, window):
    m, hp = model
    toks, luts = make_tokens(total, seed=5), make_luts()
    loss, bpb, tokens, nbytes = tg.evaluate(tg.Scorer(m), toks, tg.token_bytes(toks, luts), window, window, 2, 0, 1)
    x = toks[:-1].view(-1, window)
    y = toks[1:].view(-1, window)
    with torch.inference_mode(), tg.autocast(CPU):
        chunk_losses = [m(x[i : i + 1], y[i : i + 1]).item() for i in range(x.size(0))]  # training loss path
    ref = sum(chunk_losses) * window / total
    nb = int(tg.target_bytes(x, y, luts).sum())
    assert tokens == total and nbytes == nb
    assert loss == pytest.approx(ref, rel=1e-6)
    assert bpb == pytest.approx(ref / math.log(2) * total / nb, rel=1e-6)


def test_stride_equal_window_with_ragged_tail(model):
    """total not a multiple of the window: the tail targets are scored once, by an end-aligned window."""
    m, _ = model
    fn, _ = fp32_logits_fn(m)
    total, window = 100, 32
    toks, luts = make_tokens(total, seed=6), make_luts()
    loss, _, tokens, nbytes = tg.evaluate(scorer_of(fn), toks, tg.token_bytes(toks, luts), window, window, 2, 0, 1)
    nll = torch.zeros(total, dtype=torch.float64)
    for s in (0, 32, 64):
        logits = fn(toks[s : s + window][None])[0]
        nll[s : s + window] = F.cross_entropy(logits.double(), toks[s + 1 : s + window + 1], reduction="none")
    logits = fn(toks[total - window : total][None])[0]
    tail = F.cross_entropy(logits.double(), toks[total - window + 1 : total + 1], reduction="none")
    nll[96:] = tail[96 - (total - window):]
    assert tokens == total and nbytes == all_target_bytes(toks, luts)
    assert loss == pytest.approx(nll.mean().item(), rel=1e-5)


# ------------------------------------------------------------------------------------------------- gloo

WORKER = r"""
import argparse, json, os, sys
import torch
sys.path.insert(0, os.environ["PG_REPO"])
import train_gpt as tg
import torch.distributed as dist
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
torch.set_num_threads(1)
dist.init_process_group("gloo", rank=rank, world_size=world)
blob = torch.load(os.environ["PG_INPUT"])
hp = tg.read_hyperparameters(blob["env"])
model = tg.build_model(hp, torch.device("cpu"))
model.load_state_dict(blob["state"], strict=True)
model.eval()
args = blob["args"]
res = tg.evaluate(tg.Scorer(model), blob["toks"], tg.token_bytes(blob["toks"], blob["luts"]), args["window"],
                  args["stride"], args["batch"], rank, world)
dist.destroy_process_group()
with open(os.environ["PG_OUTPUT"], "w") as f:
    json.dump(list(res), f)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gloo_evaluate(world: int, model: tg.GPT, toks, luts, args: dict, tmp_path: Path) -> list[list]:
    """Every rank's (loss, bpb, tokens, bytes) from `world` fresh processes evaluating `model` together. Fresh
    processes on both sides of a comparison: a process that has already run other work may pick other CPU kernels
    (seen with ONEDNN_MAX_CPU_ISA=AVX2 after an in-process training run: 2e-5 relative)."""
    folder = tmp_path / f"world{world}"
    folder.mkdir()
    inp = folder / "input.pt"
    torch.save(dict(env=TINY_EVAL_ENV, state=model.state_dict(), toks=toks, luts=luts, args=args), inp)
    script = folder / "worker.py"
    script.write_text(WORKER)
    port = free_port()
    procs = []
    for rank in range(world):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK"))}
        env.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   PG_REPO=str(REPO), PG_INPUT=str(inp), PG_OUTPUT=str(folder / f"out{rank}.json"),
                   OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
        procs.append(subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    for p in procs:
        try:
            out, _ = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, out[-3000:]
    return [json.loads((folder / f"out{r}.json").read_text()) for r in range(world)]


def test_two_process_gloo_equals_single_process(model, tmp_path):
    m, _ = model
    total, window, stride, batch = 203, 32, 8, 3
    toks, luts = make_tokens(total, seed=21), make_luts()
    args = dict(window=window, stride=stride, batch=batch)
    [single] = gloo_evaluate(1, m, toks, luts, args, tmp_path)
    results = gloo_evaluate(2, m, toks, luts, args, tmp_path)
    assert results[0] == results[1], "every rank reports the all-reduced totals"
    loss, bpb, tokens, nbytes = results[0]
    assert tokens == single[2] == total and nbytes == single[3] == all_target_bytes(toks, luts)
    assert loss == pytest.approx(single[0], rel=1e-9)
    assert bpb == pytest.approx(single[1], rel=1e-9)
    # and the one-rank worker is the in-process evaluation (same code, same numbers up to kernel choice)
    here = tg.evaluate(tg.Scorer(m), toks, tg.token_bytes(toks, luts), window, stride, batch, 0, 1)
    assert here[2:] == tuple(single[2:]) and here[0] == pytest.approx(single[0], rel=1e-4)
