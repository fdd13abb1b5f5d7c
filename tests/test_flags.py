"""The lineage flags beyond the seed (LINEAGE.md §1.2-1.5): MLP_NEG_SLOPE, ROPE_DIMS, LN_SCALE, EMA_DECAY.
Each is off by default; here each one's invariant, its effect on a real tiny run, and that all of them compile
with fullgraph=True (no graph break)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import field, log_lines, run_tiny_training

CPU = torch.device("cpu")
SMALL = dict(NUM_LAYERS="4", MODEL_DIM="64", NUM_HEADS="2", NUM_KV_HEADS="1", BIGRAM_VOCAB_SIZE="64",
             BIGRAM_DIM="16", XSA_LAST_N="1", TRAIN_SEQ_LEN="32", VOCAB_SIZE="128")


def small(**env) -> tuple[tg.GPT, object]:
    hp = tg.read_hyperparameters({**SMALL, **env})
    torch.manual_seed(0)
    model = tg.build_model(hp, CPU)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval(), hp


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
    ids = torch.randint(0, 128, (1, 32))
    assert not torch.allclose(full.logits(full.hidden(ids)), part.logits(part.hidden(ids)))


def test_ln_scale_multiplies_each_blocks_norm_exactly():
    on, _ = small(LN_SCALE="1")
    off, _ = small()
    x = torch.randn(2, 8, 64)
    for layer, (a, b) in enumerate(zip(on.blocks, off.blocks)):
        assert torch.equal(b.norm(x), tg.rms_norm(x))
        assert torch.equal(a.norm(x), tg.rms_norm(x) * (1 / math.sqrt(layer + 1)))


@pytest.mark.parametrize("env, message", [
    ({"EMA_DECAY": "-0.1"}, "EMA_DECAY=-0.1 must lie in [0, 1)"),
    ({"EMA_DECAY": "1"}, "EMA_DECAY=1.0 must lie in [0, 1)"),
    ({"ROPE_DIMS": "15"}, "ROPE_DIMS=15 must be 0 (whole head) or even in [2, head dim 64]"),
    ({"ROPE_DIMS": "66"}, "ROPE_DIMS=66 must be 0"),
    ({"LN_SCALE": "yes"}, "LN_SCALE='yes' is not a valid bool"),
    ({"MLP_NEG_SLOPE": "half"}, "MLP_NEG_SLOPE='half' is not a valid float"),
])
def test_bad_flag_values_are_input_errors(env, message):
    with pytest.raises(tg.InputError) as e:
        tg.read_hyperparameters(env)
    assert message in str(e.value)


FLAGS = {"MLP_NEG_SLOPE": "0.5", "ROPE_DIMS": "8", "LN_SCALE": "1", "EMA_DECAY": "0.9"}
FINAL = "final_int6_sliding_window_exact"


@pytest.mark.parametrize("name", FLAGS)
def test_each_flag_changes_the_tiny_run(tmp_path, tiny_run, tiny_data, name):
    run_tiny_training(tmp_path, data=tiny_data, **{name: FLAGS[name]})
    lines = log_lines(tmp_path)
    assert f"hparam {name}={tg.parse_value(name, tg.HPARAMS[name], FLAGS[name])}" in lines
    mine = [line for line in lines if line.startswith(FINAL)][0]
    seed = [line for line in log_lines(tiny_run) if line.startswith(FINAL)][0]
    assert field(mine, "tokens") == field(seed, "tokens")
    assert field(mine, "val_loss") != field(seed, "val_loss")  # the flag is not inert
    assert float(field(mine, "val_loss")) < 6.5  # and the run still learns (it starts at ln 1024 = 6.93)


def test_all_flags_compile_without_graph_breaks(tmp_path, tiny_data):
    """COMPILE=1 on the CPU: model, logits and Newton-Schulz under torch.compile(fullgraph=True), which raises
    at the first graph break."""
    run_tiny_training(tmp_path, data=tiny_data, COMPILE="1", ITERATIONS="6", VAL_LOSS_EVERY="0", WARMUP_STEPS="1",
                      WARMDOWN_ITERS="3", **FLAGS)
    lines = log_lines(tmp_path)
    assert "attention_backend:sdpa compile:1 device:cpu reason:flash_attn_interface is not installed" in lines
    assert any(line.startswith(FINAL) for line in lines) and "ema:applying decay:0.9" in lines
    assert [line for line in lines if line.startswith("warmup_time:")][0].endswith("ms (includes compilation)")
