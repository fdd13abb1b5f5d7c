"""The CUDA path, checked on the CPU: bf16 activations under an fp32 rms_norm policy, and the FlashAttention-3
decision (probe, fallback, forced-but-unusable)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import tiny_model

CPU = torch.device("cpu")


def fp32_rms_norm(monkeypatch):
    """What CUDA autocast does since torch 2.12 (and CPU autocast does not): rms_norm computed and returned in fp32."""
    real = F.rms_norm

    def rms_norm(x, shape, weight=None, eps=None):
        return real(x.float(), shape, weight, eps)

    monkeypatch.setattr(F, "rms_norm", rms_norm)


@pytest.mark.parametrize("flags", [{}, dict(ROPE_DIMS="8", LN_SCALE="1", MLP_NEG_SLOPE="0.5")])
def test_bf16_everywhere_under_an_fp32_norm_policy(monkeypatch, flags):
    fp32_rms_norm(monkeypatch)
    assert F.rms_norm(torch.ones(2, 4, dtype=torch.bfloat16), (4,)).dtype == torch.float32  # the simulation bites
    seen = []
    real_attention = tg.causal_attention

    def recording_attention(q, k, v):
        seen.append((q.dtype, k.dtype, v.dtype))
        return real_attention(q, k, v)

    monkeypatch.setattr(tg, "causal_attention", recording_attention)
    torch.manual_seed(0)
    model, _ = tiny_model(**{"NUM_LAYERS": "4", "XSA_LAST_N": "2", **flags})
    blocks = []
    for block in model.blocks:
        block.register_forward_hook(lambda module, args, out: blocks.append((out.dtype, args[0].dtype, args[1].dtype)))
    ids = torch.randint(0, 128, (2, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, ids)
    loss.backward()
    assert seen == [(torch.bfloat16,) * 3] * 4  # every attention call: q, k and v all bf16
    assert blocks == [(torch.bfloat16,) * 3] * 4  # every block: its output, x and x0 bf16


def fake_fa3(calls=None, fail=None, untraceable=False):
    """Stands in for flash_attn_interface.flash_attn_func on the CPU (SDPA underneath)."""

    def flash_attn_func(q, k, v, causal=False):
        if fail:
            raise RuntimeError(fail)
        if untraceable:
            torch._dynamo.graph_break()  # what an FA3 build without a registered op does under fullgraph=True
        if calls is not None:
            calls.append((q.dtype, k.dtype, v.dtype, causal))
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
                                           enable_gqa=True)
        return y.transpose(1, 2), None  # FA3 returns (out, softmax_lse)

    return flash_attn_func


def runtime(cuda=True, compile=False):
    return SimpleNamespace(cuda=cuda, device=CPU, compile=compile)


def test_auto_uses_fa3_when_the_probe_passes(monkeypatch):
    calls = []
    monkeypatch.setattr(tg, "flash_attn_func", fake_fa3(calls))
    assert tg.choose_attention("auto", runtime()) == (True, "probe passed")
    assert calls == [(torch.bfloat16, torch.bfloat16, torch.bfloat16, True)]  # forward of the probe ran through it


def test_auto_falls_back_to_sdpa_with_the_first_line_of_the_error(monkeypatch):
    monkeypatch.setattr(tg, "flash_attn_func", fake_fa3(fail="no kernel image for sm_90\nsecond line"))
    assert tg.choose_attention("auto", runtime()) == (False, "RuntimeError: no kernel image for sm_90")
    with pytest.raises(tg.InputError, match=r"ATTENTION=fa3: FlashAttention-3 is unusable \(RuntimeError: no kernel"):
        tg.choose_attention("fa3", runtime())


def test_the_probe_compiles_when_the_model_will(monkeypatch):
    """Some FA3 builds run eagerly but cannot be traced with fullgraph=True: the probe must see that."""
    monkeypatch.setattr(tg, "flash_attn_func", fake_fa3(untraceable=True))
    assert tg.choose_attention("auto", runtime(compile=False)) == (True, "probe passed")
    torch._dynamo.reset()
    use, why = tg.choose_attention("auto", runtime(compile=True))
    assert not use and why.startswith("Unsupported: Call to `torch._dynamo.graph_break()`")


def test_no_fa3_installed_or_no_cuda(monkeypatch):
    monkeypatch.setattr(tg, "flash_attn_func", None)
    assert tg.choose_attention("auto", runtime()) == (False, "flash_attn_interface is not installed")
    monkeypatch.setattr(tg, "flash_attn_func", fake_fa3())
    assert tg.choose_attention("auto", runtime(cuda=False)) == (False, "no CUDA device")
    with pytest.raises(tg.InputError, match="no CUDA device"):
        tg.choose_attention("fa3", runtime(cuda=False))
    assert tg.choose_attention("sdpa", runtime()) == (False, "ATTENTION=sdpa")


def test_fa3_path_gives_the_sdpa_result(monkeypatch):
    calls = []
    monkeypatch.setattr(tg, "flash_attn_func", fake_fa3(calls))
    q = torch.randn(2, 16, 4, 8, dtype=torch.bfloat16)
    k, v = torch.randn(2, 16, 2, 8, dtype=torch.bfloat16), torch.randn(2, 16, 2, 8, dtype=torch.bfloat16)
    sdpa = tg.causal_attention(q, k, v)
    monkeypatch.setattr(tg, "USE_FA3", True)
    assert torch.equal(tg.causal_attention(q, k, v), sdpa) and len(calls) == 1


def test_bad_attention_value_is_an_input_error():
    with pytest.raises(tg.InputError, match="ATTENTION=flash must be auto, fa3 or sdpa"):
        tg.read_hyperparameters({"ATTENTION": "flash"})
