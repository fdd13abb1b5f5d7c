"""The lineage flags beyond the seed (LINEAGE.md §1.2-1.5): MLP_NEG_SLOPE, ROPE_DIMS, LN_SCALE, EMA_DECAY.
Each is off by default; here each one's invariant, its effect on a real tiny run, and that all of them compile
with fullgraph=True (no graph break)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import SHORT, TINY_ENV, field, log_lines, recorded_run, run_in_process, tiny_model

CPU = torch.device("cpu")


def small(**env) -> tuple[tg.GPT, object]:
    return tiny_model(NUM_LAYERS="4", **env)


@pytest.mark.parametrize("slope", [0.0, 0.5, 0.75])
def test_mlp_activation_is_leaky_relu_squared(slope):
    model, _ = small(MLP_NEG_SLOPE=str(slope))
    mlp = model.blocks[0].mlp
    x = torch.randn(3, 64)
    h = x @ mlp.fc.weight.T
    act = torch.where(h > 0, h, slope * h) ** 2  # the negative side contributes slope^2 x^2, never negative
    assert torch.allclose(mlp(x), act @ mlp.proj.weight.T, atol=1e-5)
    if slope == 0:
        assert torch.equal(mlp(x), mlp.proj(F.relu(mlp.fc(x)).square()))  # the seed's relu^2, bit for bit


def test_partial_rope_rotates_only_the_first_dims_at_the_stated_frequencies():
    dims, head, base, t = 16, 64, 50_000.0, 40
    inv = tg.rope_inv_freq(t, dims, base, train_seq_len=64)
    assert torch.allclose(inv, base ** (-torch.arange(0, dims, 2).double() / dims).float())
    angles = torch.outer(torch.arange(t, dtype=torch.float32), inv)
    cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
    x = torch.randn(1, t, 2, head)
    y = tg.apply_rope(x, cos, sin)
    assert torch.equal(y[..., dims:], x[..., dims:])  # dims >= ROPE_DIMS pass through untouched
    # the rotated slice: pairs (i, i + dims/2) turned by -angle (the records' convention), norms kept
    x1, x2 = x[..., : dims // 2], x[..., dims // 2 : dims]
    assert torch.allclose(y[..., : dims // 2], x1 * cos + x2 * sin, atol=1e-6)
    assert torch.allclose(y[..., dims // 2 : dims], x2 * cos - x1 * sin, atol=1e-6)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)


def test_partial_rope_scores_depend_on_relative_position_only():
    """q.k of the rotated part depends on (i - j) only: shift both positions, the score stays."""
    dims, head = 8, 32
    inv = tg.rope_inv_freq(64, dims, 10_000.0, 64)
    angles = torch.outer(torch.arange(64, dtype=torch.float64), inv.double())
    cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
    q = torch.randn(1, 1, 1, head, dtype=torch.float64).expand(1, 64, 1, head)
    k = torch.randn(1, 1, 1, head, dtype=torch.float64).expand(1, 64, 1, head)
    rq, rk = tg.apply_rope(q, cos, sin)[0, :, 0], tg.apply_rope(k, cos, sin)[0, :, 0]
    for i, j, shift in [(10, 3, 20), (5, 5, 40), (30, 1, 7)]:
        assert torch.allclose(rq[i] @ rk[j], rq[i + shift] @ rk[j + shift], atol=1e-10)
    assert not torch.allclose(rq[10] @ rk[3], rq[10] @ rk[4])  # and it does depend on the distance


def test_partial_rope_ntk_rule_uses_the_rotated_dims():
    dims, base = 16, 50_000.0
    assert torch.equal(tg.rope_inv_freq(64, dims, base, 64), tg.rope_inv_freq(32, dims, base, 64))  # no rescale
    longer = tg.rope_inv_freq(128, dims, base, 64)  # eval length 2x the training length
    scaled = base * 2 ** (dims / (dims - 2))
    assert torch.allclose(longer, scaled ** (-torch.arange(0, dims, 2).float() / dims))
    assert torch.equal(tg.rope_inv_freq(128, 2, base, 64), torch.ones(1))  # 2 dims: one frequency, 1


def test_rope_dims_in_the_model_leave_the_other_dims_position_free():
    """With ROPE_DIMS = 2, attention sees position only through one pair of dims per head: the model's output
    changes with ROPE_DIMS (the flag is live) but its parameter set does not."""
    full, _ = small()
    part, _ = small(ROPE_DIMS="2")
    assert full.state_dict().keys() == part.state_dict().keys()
    ids = torch.randint(0, 1024, (1, 32))
    assert not torch.allclose(full.logits(full.hidden(ids)), part.logits(part.hidden(ids)))


def test_ln_scale_multiplies_each_blocks_norm_exactly():
    on, _ = small(LN_SCALE="1")
    off, _ = small()
    x = torch.randn(2, 8, 64)
    for layer, (a, b) in enumerate(zip(on.blocks, off.blocks)):
        assert torch.equal(b.norm(x), tg.rms_norm(x))
        assert torch.equal(a.norm(x), tg.rms_norm(x) * (1 / math.sqrt(layer + 1)))


# Every flag beyond the seed, each with a value that switches it on in the tiny configuration.
FLAGS = {"MLP_NEG_SLOPE": "0.5", "ROPE_DIMS": "8", "LN_SCALE": "1", "EMA_DECAY": "0.9", "QUANT_METHOD": "gptq",
         "LOOP_LAYERS": "1-1", "LOOP_UNTIE_MLP": "1", "PARALLEL_START": "2", "PARALLEL_MODE": "lanes",
         "MUON_ROW_NORM": "1", "SKIP_GATES": "1", "MIN_LR": "0.75", "WARMDOWN_FRAC": "0.9"}
NEEDS = {"LOOP_UNTIE_MLP": {"LOOP_LAYERS": "1-1"}, "PARALLEL_MODE": {"PARALLEL_START": "2"},
         "QUANT_METHOD": {"MLP_MULT": "17"}}  # MLP_MULT=17: matrices over the passthrough size, so GPTQ has work
FINAL = "final_int6_roundtrip_exact"


@pytest.fixture(scope="module")
def short_runs(tmp_path_factory, tiny_data):
    """The final line of the short tiny run with each flag on, and of the same run without it:
    {name: (with, without)}. Runs in this process; runs without a flag are shared."""
    def final(env: dict) -> str:
        folder = tmp_path_factory.mktemp("short")
        assert run_in_process(folder, tiny_data, **SHORT, **env) == 0
        return [line for line in log_lines(folder) if line.startswith(FINAL)][0]

    without = {}
    for name in FLAGS:
        needs = NEEDS.get(name, {})
        key = tuple(sorted(needs.items()))
        if key not in without:
            without[key] = final(needs)
    return {name: (final({**NEEDS.get(name, {}), name: FLAGS[name]}),
                   without[tuple(sorted(NEEDS.get(name, {}).items()))]) for name in FLAGS}


@pytest.mark.parametrize("name", FLAGS)
def test_each_flag_changes_the_tiny_run(short_runs, name):
    mine, seed = short_runs[name]
    assert field(mine, "tokens") == field(seed, "tokens")
    assert field(mine, "val_loss") != field(seed, "val_loss")  # the flag is not inert


# ------------------------------------------------------------------------------------------------ the sp1024 frontier

LOOPED = dict(NUM_LAYERS="4", LOOP_LAYERS="1-2", LOOP_EXTRA="2")


def by_hand(model: tg.GPT, ids: torch.Tensor, order: list[tuple[int, int]]) -> torch.Tensor:
    """The trunk composed explicitly: blocks in `order`, the first half pushing U-Net skips that the second half
    pops innermost first."""
    x = model.tok_emb(ids) + model.bigram(ids, model.act_dtype)
    x = x0 = model.smear(tg.rms_norm(x))
    t = ids.size(1)
    freqs = torch.outer(torch.arange(t, dtype=torch.float32), tg.rope_inv_freq(t, model.rope_dims, model.rope_base,
                                                                                 model.train_seq_len))
    cos, sin = freqs.cos()[None, :, None, :].to(x.dtype), freqs.sin()[None, :, None, :].to(x.dtype)
    half, skips = len(order) // 2, []
    for i, (layer, k) in enumerate(order):
        if i >= half and skips:
            x = x + model.skip_weights[i - half].to(x.dtype) * skips.pop()
        x = model.blocks[layer](x, x0, cos, sin, model.blocks[layer].mlp_of_pass(k))
        if i < half:
            skips.append(x)
    return tg.rms_norm(x)


@pytest.mark.parametrize("env", [{}, {"LOOP_UNTIE_MLP": "1"}])
def test_the_looped_forward_is_the_blocks_in_virtual_order(env):
    model, _ = tiny_model(**LOOPED, **env)
    ids = torch.randint(0, 1024, (2, 64))
    assert model.skip_weights.shape == (4, 64)  # sized for the 8 virtual layers of the final shape
    expected = {0: [0, 1, 2, 3], 1: [0, 1, 2, 1, 2, 3], 2: [0, 1, 2, 1, 2, 1, 2, 3]}
    passes = {0: [0, 0, 0, 0], 1: [0, 0, 0, 1, 1, 0], 2: [0, 0, 0, 1, 1, 2, 2, 0]}
    with torch.no_grad(), tg.autocast(CPU):
        for n in (0, 1, 2):
            model.loop_passes = n
            order = list(zip(expected[n], passes[n]))
            assert model.virtual_layers() == order
            assert torch.equal(model.hidden(ids), by_hand(model, ids, order))
    if env:  # an untied pass runs its own MLP: perturbed apart from the base one, the output moves
        assert torch.equal(model.blocks[1].mlp_of_pass(1).fc.weight, model.blocks[1].loop_mlps[0].fc.weight)
        assert model.blocks[3].loop_mlps is None and model.blocks[0].loop_mlps is None


def test_the_switch_changes_the_path_not_a_weight():
    model, _ = tiny_model(**LOOPED, LOOP_UNTIE_MLP="1", LOOP_START="0.3,0.6")
    model.loop_passes = 0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 1024, (2, 64))
    with torch.no_grad():
        h0 = model.hidden(ids)
        model.set_loop_passes(1)
        h1 = model.hidden(ids)
    after = model.state_dict()
    untied = {k for k in after if ".loop_mlps.0." in k}
    assert untied and all(torch.equal(after[k], before[k]) for k in after if k not in untied)
    for layer in (1, 2):  # the pass switched on starts as a copy of its block's MLP
        for name in ("fc.weight", "proj.weight"):
            assert torch.equal(after[f"blocks.{layer}.loop_mlps.0.{name}"], after[f"blocks.{layer}.mlp.{name}"])
    assert not torch.equal(after["blocks.1.loop_mlps.1.fc.weight"], after["blocks.1.mlp.fc.weight"])  # not yet on
    assert not torch.equal(h0, h1)
    hp = tg.read_hyperparameters({**TINY_ENV, **LOOPED, "LOOP_START": "0.3,0.6", "ITERATIONS": "100"})
    assert [tg.loop_passes(s, 0.0, hp) for s in (0, 29, 30, 59, 60, 99)] == [0, 0, 1, 1, 2, 2]



def test_a_run_that_ends_before_the_switch_exports_the_final_shape(tmp_path, tiny_data, monkeypatch):
    """LOOP_START=0.9 of 5 steps is never reached inside the loop (steps 0-4 are at 0-0.8 of the budget): the
    switch happens at the end, so GPTQ, the export and the final evaluations all see the shape EVAL_ONLY rebuilds,
    the untied pass holding a copy of the trained MLP rather than its never-trained initialisation."""
    env = dict(LOOP_LAYERS="1-1", LOOP_UNTIE_MLP="1", LOOP_START="0.9", ITERATIONS="5", QUANT_METHOD="gptq",
               GPTQ_CALIB_SEQS="2", EVAL_STRIDE="0")
    recorded, lines = recorded_run(monkeypatch, tmp_path, tiny_data, **env)
    exported = recorded["exported"]
    assert [line for line in lines if line.startswith("loop:on")] == [
        "loop:on step:5 virtual_layers:4 (at the end of training: the artifact runs the final shape, which "
        "EVAL_ONLY rebuilds)"]
    for name in ("fc.weight", "proj.weight"):
        assert torch.equal(exported[f"blocks.1.loop_mlps.0.{name}"], exported[f"blocks.1.mlp.{name}"])


def test_parallel_blocks_follow_their_formulas():
    gptj, _ = tiny_model(NUM_LAYERS="4", PARALLEL_START="2")
    lanes, _ = tiny_model(NUM_LAYERS="4", PARALLEL_START="2", PARALLEL_MODE="lanes")
    x, x0 = torch.randn(2, 16, 64), torch.randn(2, 16, 64)
    cos, sin = torch.ones(1, 16, 1, 8), torch.zeros(1, 16, 1, 8)
    with torch.no_grad():
        b = gptj.blocks[2]
        assert gptj.blocks[1].parallel == "" and b.parallel == "gptj"
        x_in = b.resid_mix[0] * x + b.resid_mix[1] * x0
        h = tg.rms_norm(x_in)
        assert torch.allclose(b(x, x0, cos, sin), x_in + b.attn_scale * b.attn(h, cos, sin) + b.mlp_scale * b.mlp(h),
                              atol=1e-6)
        b = lanes.blocks[3]
        l0, l1 = torch.randn(2, 16, 64), torch.randn(2, 16, 64)
        b.lane_resid.copy_(torch.tensor([0.9, 1.2]))
        b.lane_post.copy_(torch.tensor([[0.5, 1.5], [2.0, 0.25]]))
        a = b.attn_scale * b.attn(tg.rms_norm(b.resid_mix[0] * l0 + b.resid_mix[1] * x0), cos, sin)
        m0, m1 = 0.9 * l0 + 0.5 * a, 0.9 * l1 + 1.5 * a
        m = b.mlp_scale * b.mlp(tg.rms_norm(b.resid_mix[0] * m1 + b.resid_mix[1] * x0))
        got = b.forward_lanes((l0, l1), x0, cos, sin)
        assert torch.allclose(got[0], 1.2 * m0 + 2.0 * m, atol=1e-5)
        assert torch.allclose(got[1], 1.2 * m1 + 0.25 * m, atol=1e-5)
    assert {k for k in lanes.state_dict() if "lane_" in k} == {f"blocks.{i}.lane_{n}" for i in (2, 3)
                                                                  for n in ("resid", "post")}


def test_gated_skips_blend_and_muon_row_norm_normalises_rows():
    model, _ = tiny_model(SKIP_GATES="1")
    x, skip = torch.randn(2, 8, 64), torch.randn(2, 8, 64)
    with torch.no_grad():
        model.skip_gates[0].copy_(torch.linspace(-2, 2, 64))
        s = torch.sigmoid(model.skip_gates[0])
        w = model.skip_weights[0]
        assert torch.allclose(model.add_skip(0, x, skip), s * x + (1 - s) * w * skip, atol=1e-6)
    assert tiny_model()[0].skip_gates is None
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(48, 32))
    p.grad = torch.randn(48, 32) * torch.logspace(-2, 1, 48)[:, None]  # rows of very different norms
    before = p.detach().clone()
    tg.Muon([p], lr=0.1, momentum=0.9, backend_steps=5, weight_decay=0.0, orthogonalize=tg.newton_schulz,
            row_norm=True).step()
    nesterov = p.grad + 0.9 * p.grad  # first step: the momentum buffer is the gradient
    update = tg.newton_schulz(nesterov / nesterov.norm(dim=-1, keepdim=True), 5) * math.sqrt(48 / 32)
    assert torch.equal(p.detach(), torch.add(before, update.bfloat16().float(), alpha=-0.1))


def test_min_lr_and_warmdown_frac_shape_the_schedule():
    hp = tg.read_hyperparameters({"ITERATIONS": "100", "WARMDOWN_FRAC": "0.4", "MIN_LR": "0.1",
                                  "MAX_WALLCLOCK_SECONDS": "0"})
    assert [round(tg.lr_multiplier(s, 0.0, hp), 6) for s in (0, 60, 70, 90, 96, 100)] == [1, 1, 0.75, 0.25, 0.1, 0.1]
    capped = tg.read_hyperparameters({"WARMDOWN_FRAC": "0.5", "MAX_WALLCLOCK_SECONDS": "100"})
    assert [tg.lr_multiplier(0, ms, capped) for ms in (0.0, 50_000.0, 75_000.0, 100_000.0)] == [1, 1, 0.5, 0]
    seed = tg.read_hyperparameters({"ITERATIONS": "100", "MAX_WALLCLOCK_SECONDS": "0", "WARMDOWN_ITERS": "40"})
    assert tg.lr_multiplier(90, 0.0, seed) == 0.25 and tg.lr_multiplier(100, 0.0, seed) == 0


# The README's sp1024 frontier stack at the tiny shape: loops switched on twice during training, parallel lanes,
# MuonEq-R, gated skips, XSA on all layers, EMA, the schedule knobs, the lineage flags, GPTQ and TTT.
STACK = dict(NUM_LAYERS="4", XSA_LAST_N="4", LOOP_LAYERS="1-2", LOOP_EXTRA="2", LOOP_START="0.3,0.6",
             PARALLEL_START="3", PARALLEL_MODE="lanes", MUON_ROW_NORM="1", SKIP_GATES="1", EMA_DECAY="0.9",
             WARMDOWN_FRAC="0.5", MIN_LR="0.1", MLP_NEG_SLOPE="0.5", ROPE_DIMS="8", LN_SCALE="1", QK_GAIN_INIT="5",
             QUANT_METHOD="gptq", GPTQ_CALIB_SEQS="4", MLP_MULT="17", ITERATIONS="10", VAL_LOSS_EVERY="5",
             VAL_MAX_TOKENS="2048", TRAIN_BATCH_TOKENS="512", WARMUP_STEPS="1")


def test_the_stack_runs_end_to_end_and_eval_only_rebuilds_it(tmp_path, tiny_data):
    env = dict(STACK, TTT_ENABLED="1", TTT_CHUNK_TOKENS="512", TTT_EPOCHS="1")
    assert run_in_process(tmp_path, tiny_data, **env) == 0
    lines = log_lines(tmp_path)
    assert [line for line in lines if line.startswith("loop:on")] == ["loop:on step:3 virtual_layers:6",
                                                                      "loop:on step:6 virtual_layers:8"]
    assert "replicas:identical ranks:1" in lines and "ema:applying decay:0.9" in lines
    assert any(line.startswith("gptq:budget") for line in lines)
    assert any(line.startswith("final_int6_ttt_exact") for line in lines)
    assert run_in_process(tmp_path, tiny_data, RUN_ID="again", EVAL_ONLY="final_model.int6.ptz", **env) == 0
    for prefix in ("final_int6_roundtrip_exact", "final_int6_sliding_window_exact", "final_int6_ttt_exact"):
        assert [x for x in log_lines(tmp_path, "again") if x.startswith(prefix)] == \
            [x for x in lines if x.startswith(prefix)]


@pytest.mark.parametrize("mode", ["blocks", "model"])
def test_the_stack_compiles_every_graph_before_it_is_timed(tmp_path, tiny_data, monkeypatch, mode):
    """COMPILE=blocks|model on the CPU with every flag and TTT: torch.compile(fullgraph=True) raises at any graph
    break or past the recompile limit, and no graph is compiled inside the timed loop, loop switches included, nor
    inside the timed evaluations, TTT included (dynamo's counters after the warmup, after the loop, after the
    evaluations' priming and at the end). Dynamo with its eager backend: what is tested is the tracing; Inductor's
    code generation is slow on a CPU. With blocks, every block of a kind shares one graph: the graphs do not grow
    with the loop's passes."""
    from torch._dynamo.utils import counters

    compile = torch.compile
    monkeypatch.setattr(tg.torch, "compile", lambda fn, **kw: compile(fn, backend="eager", **kw))
    graphs, logger = {}, tg.Logger.__call__
    checksums = tg.replica_checksums

    def count(self, line):
        if line.startswith(("warmup_time", "eval:compiled")):
            graphs[line.split(":")[0]] = counters["stats"]["unique_graphs"]
        logger(self, line)

    def after_training(model, rt):
        graphs["training"] = counters["stats"]["unique_graphs"]
        return checksums(model, rt)

    monkeypatch.setattr(tg.Logger, "__call__", count)
    monkeypatch.setattr(tg, "replica_checksums", after_training)
    results = {}
    for extra in (1, 2) if mode == "blocks" else (2,):
        torch._dynamo.reset()
        counters.clear()
        env = dict(STACK, COMPILE=mode, EVAL_STRIDE="16", LOOP_EXTRA=str(extra), LOOP_START="0.3,0.6"[:4 * extra - 1],
                   TTT_ENABLED="1", TTT_CHUNK_TOKENS="512", TTT_EPOCHS="1", VAL_LOSS_EVERY="3", ITERATIONS="7")
        assert run_in_process(tmp_path / str(extra), tiny_data, **env) == 0
        lines = log_lines(tmp_path / str(extra))
        assert (f"attention_backend:flash compile:{mode} device:cpu reason:fa3: flash_attn_interface is not installed; "
                "flash passed its probe (auto never picks fa4 or cudnn: not yet measured faster)") in lines
        assert [ln for ln in lines if ln.startswith("attention_probe:flash err_out:")][0].endswith(" compiled:1")
        assert len([line for line in lines if line.startswith("loop:on")]) == extra
        assert graphs["warmup_time"] > 0 and graphs["training"] == graphs["warmup_time"]
        assert graphs["eval"] >= graphs["training"] and counters["stats"]["unique_graphs"] == graphs["eval"]
        results[extra] = graphs["eval"]
    if mode == "blocks":
        assert results[1] == results[2]
    torch._dynamo.reset()
