"""Sharded Muon (MUON_SHARDED=1, issue 27): the matrices' gradients reduce-scattered to the ranks that own them,
Newton-Schulz on banks of same-shape matrices, the updates all-gathered. It must train exactly as the round-robin Muon
does. What is bitwise, and why: on the CPU, batched Newton-Schulz gives each matrix's result bit for bit (the same
kernels per matrix); the clip's total norm is computed from the same per-tensor norms in the same order; the mean
gradients are DDP's addends (g / world) summed over the ranks, and with one or two ranks a sum has one order. With four
ranks the order of the sums may differ between DDP's all-reduce and the reduce-scatter (floating-point addition is not
associative): the test measures and states it."""
from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch

import train_gpt as tg
from conftest import REPO, run_in_process, run_tiny_training


@pytest.fixture
def act_dtype():
    """Sets train_gpt's activation dtype for one test (main() sets it for a run) and puts it back."""
    saved = tg.ACT_DTYPE

    def use(dtype):
        tg.ACT_DTYPE = dtype
    yield use
    tg.ACT_DTYPE = saved


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_stack_of_matrices_orthogonalises_as_each_matrix_alone(act_dtype, dtype):
    act_dtype(dtype)
    torch.manual_seed(0)
    for shape in [(3, 64, 64), (4, 96, 32), (2, 32, 96), (5, 16, 48)]:
        stack = torch.randn(shape) * torch.logspace(-2, 1, shape[0])[:, None, None]  # norms a thousandfold apart
        batched = tg.newton_schulz(stack, 5)
        assert batched.dtype == dtype
        assert all(torch.equal(batched[i], tg.newton_schulz(stack[i], 5)) for i in range(shape[0])), shape


@pytest.mark.parametrize("world", [2, 4, 8])
def test_ownership_and_layout_of_the_default_model(default_model, world):
    """The 67 matrices: each owned by one rank, placed once in its owner's chunk, grouped by shape into banks with no
    gap between matrices; the loads balanced by Newton-Schulz's cost (a matrix and its transpose cost alike), the
    chunks by size too: padding them to the largest adds under 1 % to what the collectives move."""
    matrices = [m.weight for m in default_model.modules() if isinstance(m, tg.CastedLinear)]
    shapes = [tuple(p.shape) for p in matrices]
    costs = [tg.newton_schulz_cost(s) for s in shapes]
    assert tg.newton_schulz_cost((1536, 512)) == tg.newton_schulz_cost((512, 1536)) == 512 * 512 * 1536
    owners = tg.matrix_owners(shapes, world)
    load = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(world)]
    assert max(load) / (sum(load) / world) < 1.01
    chunk, banks = tg.shard_layout(shapes, owners, world)
    placed = []
    for q, mine in enumerate(banks):
        offset = 0
        for shape, members, start in mine:
            assert start == offset and all(shapes[i] == shape and owners[i] == q for i in members)
            offset += len(members) * shape[0] * shape[1]
            placed += members
        assert len({shape for shape, _, _ in mine}) == len(mine) and offset <= chunk
    assert sorted(placed) == list(range(67))
    assert world * chunk / sum(p.numel() for p in matrices) < 1.01


def muon_pair(shapes, row_norm, clip_params=5):
    """The same parameters twice, under Muon and under ShardedMuon (one rank), and clip-only parameters."""
    torch.manual_seed(1)
    a = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    others = [torch.nn.Parameter(torch.randn(clip_params)) for _ in range(2)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in others]
    muon = tg.Muon(a, 0.1, 0.9, 5, 0.04, tg.newton_schulz, row_norm)
    sharded = tg.ShardedMuon(b, 0.1, 0.9, 5, 0.04, tg.newton_schulz, row_norm)
    return (muon, a, others), (sharded, b, twins)


@pytest.mark.parametrize("row_norm", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_rank_steps_as_muon_bit_for_bit(act_dtype, dtype, row_norm):
    """Steps with large gradients (the clip bites), small ones (it does not) and a matrix without a gradient (an idle
    untied loop MLP: its momentum must be left alone): weights, clipped gradients, total norms and momentum equal."""
    act_dtype(dtype)
    shapes = [(64, 32), (32, 64), (64, 32), (16, 16), (64, 32), (32, 64)]
    (muon, a, others), (sharded, b, twins) = muon_pair(shapes, row_norm)
    for step, scale in enumerate([0.001, 3.0, 3.0, 0.001, 3.0]):
        for pa, pb in zip(a + others, b + twins):
            pa.grad = torch.randn(pa.shape) * scale
            pb.grad = pa.grad.clone()
        if step == 2:
            a[3].grad = b[3].grad = None
        norms = [opt.clip_grad_norm_(params + rest, 0.3) for opt, params, rest in [(muon, a, others),
                                                                                     (sharded, b, twins)]]
        assert torch.equal(*norms) and (norms[0] > 0.3) == (scale > 1), step
        assert all(torch.equal(x.grad, y.grad) for x, y in zip(others, twins))
        muon.step()
        sharded.step()
        assert all(torch.equal(x, y) for x, y in zip(a, b)), step
    assert all(torch.equal(muon.state[x]["momentum_buffer"], sharded.state[y]["momentum_buffer"])
               for x, y in zip(a, b))


def test_the_optimizer_state_restores_exactly():
    """The warmup deep-copies every optimizer's state_dict and loads it back later: a ShardedMuon so restored (with
    the weights) steps exactly as from the moment it was saved, and from an empty state as a new one."""
    _, (sharded, params, _) = muon_pair([(32, 16), (16, 32), (32, 16)], False)
    grads = [[torch.randn(p.shape) for p in params] for _ in range(3)]

    def step(k):
        for p, g in zip(params, grads[k]):
            p.grad = g.clone()
        sharded.step()
        return [p.detach().clone() for p in params]

    def restore(state, weights):
        sharded.load_state_dict(copy.deepcopy(state))
        with torch.no_grad():
            for p, w in zip(params, weights):
                p.copy_(w)

    fresh, start = copy.deepcopy(sharded.state_dict()), [p.detach().clone() for p in params]
    first = step(0)
    saved = copy.deepcopy(sharded.state_dict())
    second, third = step(1), step(2)
    restore(saved, first)
    assert all(torch.equal(x, y) for x, y in zip(step(1) + step(2), second + third))
    restore(fresh, start)
    assert all(torch.equal(x, y) for x, y in zip(step(0), first))


# Runs train() twice in the same processes, round-robin Muon then sharded, from the same seed; records per rank and
# run the logged lines, the collectives Python issued (name, elements sent), the clip's total norms and the weights.
# Step times come from FakeTimer (100 ms, the last rank's clock 1.5x fast), so both runs stop at the same step.
DRIVER = f"""
import json, os, random, sys
import numpy as np, torch
sys.path[:0] = [{str(REPO)!r}, {str(REPO / "tests")!r}]
import train_gpt as tg
from conftest import fake_timer_from_env
tg.StepTimer = fake_timer_from_env
lines, calls, norms = [], [], []

def counting(name, fn, sent):
    def collective(*args, **kwargs):
        calls.append((name, args[sent].numel()))
        return fn(*args, **kwargs)
    return collective

for name, attr, sent in [("all_reduce", "all_reduce", 0), ("reduce_scatter", "reduce_scatter_single", 1),
                         ("reduce_scatter", "reduce_scatter_tensor", 1), ("all_gather", "all_gather_single", 1),
                         ("all_gather", "all_gather_into_tensor", 1)]:
    if hasattr(tg.dist, attr):
        setattr(tg.dist, attr, counting(name, getattr(tg.dist, attr), sent))
for cls in (tg.Muon, tg.ShardedMuon):
    def clip(self, params, max_norm, _clip=cls.clip_grad_norm_):
        total = _clip(self, params, max_norm)
        norms.append(total.item())
        return total
    cls.clip_grad_norm_ = clip
call = tg.Logger.__call__

def recording_call(self, line):
    lines.append(line)
    call(self, line)

tg.Logger.__call__ = recording_call
data_parallel, ignored = tg.data_parallel, []

def recording_data_parallel(*args):
    module = data_parallel(*args)
    ignored.append(sorted(getattr(module, "parameters_to_ignore", [])))
    return module

tg.data_parallel = recording_data_parallel

def both(hp, rt, log, code, wrapper, val, val_bytes, train_files, artifact_state, progress):
    record = {{}}
    for sharded in (0, 1):
        hp.muon_sharded = bool(sharded)
        random.seed(hp.seed); np.random.seed(hp.seed); torch.manual_seed(hp.seed)
        for seen in (lines, calls, norms):
            seen.clear()
        model, info = tg.train(hp, rt, log, val, val_bytes, train_files, progress)
        weights = {{k: v.detach().clone() for k, v in model.state_dict().items()}}
        torch.save(weights, f"weights{{sharded}}_{{rt.rank}}.pt")
        matrices = [m.weight for m in model.modules() if isinstance(m, tg.CastedLinear)]
        record[sharded] = dict(lines=list(lines), calls=list(calls), norms=list(norms), steps=info.steps,
                               matrices=len(matrices), numel=sum(p.numel() for p in matrices),
                               ignored=ignored[-1], names=[n for n, p in model.named_parameters() if p.ndim == 2
                                                           and any(p is m for m in matrices)])
    with open(f"rank{{rt.rank}}.json", "w") as f:
        json.dump(record, f)
    return 0

tg.run = both
sys.exit(tg.main())
"""
CAPPED = dict(MAX_WALLCLOCK_SECONDS="1.5", ITERATIONS="100000", FAKE_STEP_MS="100", WARMUP_STEPS="2",
              WARMDOWN_ITERS="4", SWA_ENABLED="0", VAL_LOSS_EVERY="0", TRAIN_LOG_EVERY="1", VAL_MAX_TOKENS="1024")


@pytest.mark.parametrize("nproc", [1, 2, 4])
def test_sharded_training_is_round_robin_training(tmp_path, tiny_data, nproc):
    """The tiny model trained under a wall-clock cap (the last rank's clock 1.5x fast) with 8 / nproc micro-steps, the
    warmup's state restore and the clip: both runs stop at the same step on every rank with identical replicas and
    the same losses. With 1 and 2 ranks the clip's norms and the weights are bitwise equal. With 4 they differ in the
    last bits: DDP's buckets (without the matrices under MUON_SHARDED) and the reduce-scatter's chunks sum the four
    addends of an element in other orders, which shows in the embedding tables too, which Muon never touches.
    Under MUON_SHARDED DDP leaves the matrices alone, and Python issues one reduce-scatter (every matrix's gradient)
    and one all-gather per step, never the all-reduce of the updates; without it, that all-reduce, once a step."""
    (tmp_path / "driver.py").write_text(DRIVER)
    run_tiny_training(tmp_path, nproc=nproc, data=tiny_data, script=tmp_path / "driver.py",
                      FAKE_SKEW_RANK=str(nproc - 1), **CAPPED)
    ranks = [{int(k): v for k, v in json.loads((tmp_path / f"rank{r}.json").read_text()).items()} for r in range(nproc)]
    decided = ("stopping_early", "replicas:", "warmup_step")
    ends = {(r, mode): [line for line in ranks[r][mode]["lines"] if line.startswith(decided)]
            for r in range(nproc) for mode in (0, 1)}
    assert len(set(map(tuple, ends.values()))) == 1, ends
    assert f"replicas:identical ranks:{nproc}" in ends[0, 0] and any("stopping_early" in e for e in ends[0, 0])
    losses = [[line.split(" train_time")[0] for line in ranks[0][mode]["lines"] if " train_loss:" in line]
              for mode in (0, 1)]
    assert losses[0] == losses[1] and len(losses[0]) == ranks[0][0]["steps"] >= 6
    norms = [torch.tensor(ranks[0][mode]["norms"], dtype=torch.float64) for mode in (0, 1)]
    assert max(norms[0]) > 0.3  # the clip bites at some steps
    assert torch.equal(*norms) if nproc <= 2 else torch.allclose(*norms, rtol=1e-6, atol=0)
    for r in range(nproc):
        plain, sharded = (torch.load(tmp_path / f"weights{mode}_{r}.pt") for mode in (0, 1))
        diff = {k: ((plain[k] - sharded[k]).abs().max() / plain[k].abs().max()).item() for k in plain}
        assert max(diff.values()) == 0.0 if nproc <= 2 else 0 < max(diff.values()) < 1e-4, (r, diff)
        assert nproc <= 2 or diff["tok_emb.weight"] > 0
    steps, matrices, numel = (ranks[0][0][k] for k in ("steps", "matrices", "numel"))
    optimizer_steps = steps + int(CAPPED["WARMUP_STEPS"])
    for r in range(nproc if nproc > 1 else 0):
        assert ranks[r][0]["ignored"] == [] and ranks[r][1]["ignored"] == sorted(ranks[r][1]["names"])
        plain, sharded = ranks[r][0]["calls"], ranks[r][1]["calls"]
        assert [c for c in plain if c[0] != "all_reduce"] == []
        assert [c for c in plain if c == ["all_reduce", numel]] == [["all_reduce", numel]] * optimizer_steps
        scattered = [n for name, n in sharded if name == "reduce_scatter"]
        gathered = [n for name, n in sharded if name == "all_gather"]
        assert len(scattered) == len(gathered) == optimizer_steps
        assert numel <= scattered[0] == nproc * gathered[0] < 1.25 * numel  # every gradient, padding < 25 %
        assert max(n for name, n in sharded if name == "all_reduce") == matrices  # the clip's norms only


def test_sharded_muon_and_fused_ce_compile_before_the_timed_loop(tmp_path, tiny_data, monkeypatch):
    """COMPILE=blocks with MUON_SHARDED=1 and FUSED_CE=1: the fused loss traces inside the compiled training-loss
    region (fullgraph: a graph break would raise), Newton-Schulz compiles once per bank shape in the warmup, and no
    graph is compiled inside the timed loop (dynamo's count after the warmup and after training). Dynamo with its eager
    backend: the tracing is what is tested."""
    from torch._dynamo.utils import counters

    compile = torch.compile
    monkeypatch.setattr(tg.torch, "compile", lambda fn, **kw: compile(fn, backend="eager", **kw))
    graphs, logger, checksums = {}, tg.Logger.__call__, tg.replica_checksums

    def count(self, line):
        if line.startswith("warmup_time"):
            graphs["warmup"] = counters["stats"]["unique_graphs"]
        logger(self, line)

    def after_training(model, rt):
        graphs["training"] = counters["stats"]["unique_graphs"]
        return checksums(model, rt)

    monkeypatch.setattr(tg.Logger, "__call__", count)
    monkeypatch.setattr(tg, "replica_checksums", after_training)
    torch._dynamo.reset()
    counters.clear()
    try:
        assert run_in_process(tmp_path, tiny_data, COMPILE="blocks", MUON_SHARDED="1", FUSED_CE="1", ITERATIONS="4",
                              WARMUP_STEPS="1", VAL_LOSS_EVERY="0", EVAL_STRIDE="0", VAL_MAX_TOKENS="1024") == 0
    finally:
        torch._dynamo.reset()
    assert graphs["warmup"] > 0 and graphs["training"] == graphs["warmup"]
