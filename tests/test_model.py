"""Model invariants of SPEC B§3: parameter count, names, dtypes, BigramHash, XSA, causality, RoPE."""

import pytest
import torch

import train_gpt as tg
from conftest import tiny_model

CPU = torch.device("cpu")


def small_model(seed: int = 0, **env) -> tg.GPT:
    """The tiny model with 4 layers, XSA on the last 2, every zero-initialised tensor perturbed."""
    return tiny_model(seed, **{"NUM_LAYERS": "4", "XSA_LAST_N": "2", **env})[0]


def test_default_parameter_count_and_names(default_model):
    state = default_model.state_dict()
    assert sum(p.numel() for p in default_model.parameters()) == 26_829_913
    assert len(state) == 6 + 11 * 10  # no buffers are saved
    for name in ("tok_emb.weight", "bigram.embed.weight", "bigram.proj.weight", "bigram.scale", "smear.gate",
                 "skip_weights", "blocks.10.attn.c_q.weight", "blocks.10.attn.q_gain", "blocks.0.resid_mix"):
        assert name in state
    assert state["skip_weights"].shape == (5, 512)
    assert state["blocks.3.mlp.fc.weight"].shape == (1536, 512)
    assert state["blocks.3.attn.c_k.weight"].shape == (256, 512)


def test_default_dtypes_and_init(default_model):
    params = dict(default_model.named_parameters())
    bf16 = {n for n, p in params.items() if p.dtype == torch.bfloat16}
    assert bf16 == {"tok_emb.weight", "bigram.embed.weight"}
    assert all(p.dtype == torch.float32 for n, p in params.items() if n not in bf16)
    assert params["tok_emb.weight"].float().std().item() == pytest.approx(0.005, rel=0.02)
    assert params["bigram.embed.weight"].abs().max() == 0
    for i in range(11):
        assert params[f"blocks.{i}.attn.proj.weight"].abs().max() == 0
        assert params[f"blocks.{i}.mlp.proj.weight"].abs().max() == 0
        assert torch.all(params[f"blocks.{i}.attn.q_gain"] == 1.5)
        assert torch.equal(params[f"blocks.{i}.resid_mix"][0], torch.ones(512))
    # orthogonal x 1/sqrt(2L): W^T W = I / 22 for the 512x128 bigram projection
    w = params["bigram.proj.weight"].double()
    assert torch.allclose(w.T @ w, torch.eye(128, dtype=torch.float64) / 22, atol=1e-4)
    q = params["blocks.0.attn.c_q.weight"].double()
    assert torch.allclose(q @ q.T, torch.eye(512, dtype=torch.float64), atol=1e-2)  # up to bf16 rounding
    assert params["bigram.scale"].item() == float(torch.tensor(0.05).bfloat16())  # bf16-rounded 0.05
    # initial values were rounded to bf16 before the fp32 masters were made
    assert torch.equal(q.float(), q.float().bfloat16().float())


def test_bigram_hash_vectors():
    ids = torch.tensor([[1, 260, 261, 1023, 1023, 0, 0]])
    buckets = tg.bigram_buckets(ids, 2048)[0].tolist()
    assert buckets[0] == 2047  # the first position of every sequence has no predecessor
    assert buckets[1] == 1124 and buckets[2] == 333 and buckets[4] == 977 and buckets[6] == 0
    brute = [((36313 * c) ^ (27191 * p)) % 2047 for p, c in zip(ids[0, :-1].tolist(), ids[0, 1:].tolist())]
    assert buckets[1:] == brute


def test_xsa_output_is_orthogonal_to_own_value():
    torch.manual_seed(0)
    y, v = torch.randn(2, 16, 8, 64), torch.randn(2, 16, 4, 64)
    out = tg.exclude_self_value(y, v)
    v_hat = torch.nn.functional.normalize(v, dim=-1)
    for h in range(8):  # query head h shares KV head h // 2
        assert (out[:, :, h] * v_hat[:, :, h // 2]).sum(-1).abs().max() < 1e-5
        # the removed part is exactly the projection on the own value direction
        removed = y[:, :, h] - out[:, :, h]
        assert torch.allclose(removed, (y[:, :, h] * v_hat[:, :, h // 2]).sum(-1, keepdim=True) * v_hat[:, :, h // 2],
                              atol=1e-5)


def test_xsa_inside_the_model_only_on_last_layers():
    model = small_model()
    assert [b.attn.xsa for b in model.blocks] == [False, False, True, True]
    captured = {}

    def hook(name):
        def grab(module, inputs, output):
            captured[name] = inputs[0]
        return grab

    attn = model.blocks[3].attn
    attn.proj.register_forward_hook(hook("y"))
    attn.c_v.register_forward_hook(lambda m, i, o: captured.__setitem__("v", o))
    ids = torch.randint(0, 128, (2, 32))
    with tg.autocast(CPU):
        model.logits(model.hidden(ids))
    y = captured["y"].float().view(2, 32, 2, 2, 16)
    v_hat = torch.nn.functional.normalize(captured["v"].float().view(2, 32, 2, 16), dim=-1).unsqueeze(3)
    v_scale = captured["v"].float().norm(dim=-1).max()  # outputs are convex mixes of values: |y| <= this
    assert (y * v_hat).sum(-1).abs().max() < 0.02 * v_scale  # zero up to bf16 rounding
    before = captured["v"].float().view(2, 32, 2, 1, 16).expand(-1, -1, -1, 2, -1)  # a pure own-value output
    assert (tg.exclude_self_value(before.reshape(2, 32, 4, 16), captured["v"].float().view(2, 32, 2, 16))
            .abs().max() < 1e-5)


def test_causality():
    model = small_model()
    ids = torch.randint(0, 128, (1, 32))
    changed = ids.clone()
    changed[0, 20] = (ids[0, 20] + 1) % 128
    with torch.no_grad(), tg.autocast(CPU):
        a, b = model.logits(model.hidden(ids)), model.logits(model.hidden(changed))
    assert torch.equal(a[:, :20], b[:, :20])
    assert not torch.equal(a[:, 20:], b[:, 20:])


def test_forward_loss_matches_logits():
    model = small_model()
    ids, tgt = torch.randint(0, 128, (2, 32)), torch.randint(0, 128, (2, 32))
    with torch.no_grad(), tg.autocast(CPU):
        loss = model(ids, tgt)
        logits = model.logits(model.hidden(ids))
    assert logits.dtype == torch.float32 and logits.abs().max() <= 30.0
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tgt.flatten())
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_rope_base_semantics():
    base, d = 50000.0, 64
    at_train = tg.rope_inv_freq(2048, d, base, train_seq_len=2048)
    expected = torch.tensor([base ** (-2 * j / d) for j in range(d // 2)])
    assert torch.allclose(at_train, expected, rtol=1e-6)
    assert torch.equal(tg.rope_inv_freq(1024, d, base, 2048), at_train)  # shorter: the base as given
    # longer than training: NTK-scaled base = base * (T / train)^(d / (d - 2))
    longer = tg.rope_inv_freq(4096, d, base, 2048)
    scaled = base * 2 ** (64 / 62)
    assert longer[1].item() == pytest.approx(scaled ** (-2 / 64), rel=1e-6)


def test_rope_is_relative():
    """Attention scores after RoPE depend only on the position difference."""
    inv = tg.rope_inv_freq(16, 8, 10000.0, 16)
    freqs = torch.outer(torch.arange(16.0), inv)
    cos, sin = freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]
    q, k = torch.randn(8), torch.randn(8)
    rq = tg.apply_rope(q.expand(1, 16, 1, 8), cos, sin)[0, :, 0]
    rk = tg.apply_rope(k.expand(1, 16, 1, 8), cos, sin)[0, :, 0]
    assert (rq[5] @ rk[2]).item() == pytest.approx((rq[13] @ rk[10]).item(), rel=1e-4)
    assert (rq[5] @ rk[5]).item() == pytest.approx((q @ k).item(), rel=1e-4)


def test_unet_skips_and_smear():
    model = small_model(XSA_LAST_N="0")
    assert len(model.virtual_layers()) // 2 == 2 and model.skip_weights.shape == (2, 64)
    x = torch.randn(1, 4, 3)
    gate = tg.SmearGate(3)  # g = 0.5 at init: the average of the token and its predecessor
    out = gate(x)
    assert torch.allclose(out[:, 0], 0.5 * x[:, 0]) and torch.allclose(out[:, 1:], 0.5 * (x[:, 1:] + x[:, :-1]))
