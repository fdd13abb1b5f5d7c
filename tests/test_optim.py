"""Optimizer pieces (SPEC B§4): Newton-Schulz, Muon, parameter groups, LR and momentum schedules."""
import pytest
import torch

import train_gpt as tg

SEED_HP = tg.read_hyperparameters({})


@pytest.mark.parametrize("shape", [(512, 512), (1536, 512), (512, 1536), (512, 128)])
def test_newton_schulz_singular_values_near_one(shape):
    torch.manual_seed(0)
    g = torch.randn(shape) @ torch.diag(torch.logspace(-1, 0, shape[1]))  # singular values spread over a decade
    out = tg.newton_schulz(g, 5)
    assert out.shape == shape and out.dtype == torch.bfloat16
    s = torch.linalg.svdvals(out.float())
    # the quintic maps every singular value into a band around 1 (deliberately not exactly 1); only the
    # smallest few of a square Gaussian matrix, which start near 0, are still climbing after 5 steps
    assert s.max() < 1.25 and torch.quantile(s, 0.05) > 0.6 and s.median() > 0.8
    assert torch.linalg.svdvals(g).max() / torch.quantile(torch.linalg.svdvals(g), 0.05) > 5


@pytest.mark.parametrize("step, expected", [(6000, 0.9815), (7445, 0.500), (8900, 0.0148)])
def test_lr_multiplier_reference_points(step, expected):
    """Seed example: 67.08 ms/step with a 600 s cap and WARMDOWN_ITERS=3000 (SPEC B§12.3)."""
    assert tg.lr_multiplier(step, step * 67.08, SEED_HP) == pytest.approx(expected, abs=2e-3)


def test_lr_multiplier_edges():
    assert tg.lr_multiplier(100, 100 * 67.08, SEED_HP) == 1.0
    assert tg.lr_multiplier(9000, 605_000, SEED_HP) == 0.0
    uncapped = tg.read_hyperparameters({"MAX_WALLCLOCK_SECONDS": "0", "ITERATIONS": "100", "WARMDOWN_ITERS": "20"})
    assert [tg.lr_multiplier(s, 0.0, uncapped) for s in (0, 80, 90, 100)] == [1.0, 1.0, 0.5, 0.0]
    assert tg.lr_multiplier(50, 1e9, tg.read_hyperparameters({"WARMDOWN_ITERS": "0"})) == 1.0


def test_muon_momentum_warmup():
    assert tg.muon_momentum(0, SEED_HP) == pytest.approx(0.92)
    assert tg.muon_momentum(750, SEED_HP) == pytest.approx(0.955)
    assert tg.muon_momentum(5000, SEED_HP) == pytest.approx(0.99)


def test_muon_step_matches_its_definition():
    torch.manual_seed(0)
    tall, wide = torch.nn.Parameter(torch.randn(96, 32)), torch.nn.Parameter(torch.randn(32, 64))
    start = [tall.detach().clone(), wide.detach().clone()]
    opt = tg.Muon([tall, wide], lr=0.1, momentum=0.9, backend_steps=5, weight_decay=0.04,
                  orthogonalize=tg.newton_schulz)
    grads = [[torch.randn(96, 32), torch.randn(32, 64)] for _ in range(2)]
    bufs = [torch.zeros(96, 32), torch.zeros(32, 64)]
    expected = [s.clone() for s in start]
    for step_grads in grads:
        tall.grad, wide.grad = step_grads
        opt.step()
        for i, g in enumerate(step_grads):
            bufs[i] = 0.9 * bufs[i] + g
            update = tg.newton_schulz(g + 0.9 * bufs[i], 5).float() * max(1, g.size(0) / g.size(1)) ** 0.5
            expected[i] = expected[i] * (1 - 0.1 * 0.04) - 0.1 * update.bfloat16().float()
    assert torch.allclose(tall.detach(), expected[0], atol=1e-5)
    assert torch.allclose(wide.detach(), expected[1], atol=1e-5)


def test_parameter_groups_of_the_default_model(default_model):
    model = default_model
    optimizers = tg.build_optimizers(model, SEED_HP, tg.newton_schulz, fused=False)
    assert list(optimizers) == ["muon", "adam"]
    muon, adamw = optimizers["muon"], optimizers["adam"]
    names = {id(p): n for n, p in model.named_parameters()}
    matrices = {names[id(p)] for p in muon.param_groups[0]["params"]}
    assert len(matrices) == 67 and "bigram.proj.weight" in matrices
    assert all(n.startswith("blocks.") for n in matrices - {"bigram.proj.weight"})
    tables, scalars = ({names[id(p)] for p in g["params"]} for g in adamw.param_groups)
    assert tables == {"tok_emb.weight", "bigram.embed.weight"}
    assert "skip_weights" in scalars and "smear.gate" in scalars and "bigram.scale" in scalars
    assert all(n.endswith(("q_gain", "attn_scale", "mlp_scale", "resid_mix")) for n in scalars
               if n.startswith("blocks."))
    assert len(matrices) + len(tables) + len(scalars) == len(names)
    assert [g["lr"] for g in adamw.param_groups] == [0.035, 0.025] and muon.param_groups[0]["lr"] == 0.025
    assert adamw.defaults["weight_decay"] == 0.04 and muon.defaults["weight_decay"] == 0.04
