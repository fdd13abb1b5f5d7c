"""The CUDA path, checked on the CPU: bf16 activations under an fp32 rms_norm policy, the attention backends (each
wrapper's layout, GQA and causal handling against an independent loop), the start-up probe and its decision table
(installed or not, passes, fails, wrong numbers, forced or auto), and a missing or failing nvidia-smi. The tests
marked `cuda` run the real kernels and skip without a CUDA device."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import tiny_model

CPU = torch.device("cpu")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


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


# ---------------------------------------------------------------------------------------------------------------
# Stand-ins for the FlashAttention libraries: (B, T, H, D) in and out, as theirs

def loop_attention(q, k, v, causal=True, head_map="grouped", scale=None):
    """Attention head by head and query by query, in fp64: independent of SDPA and of tg.reference_attention.
    head_map "grouped": query head h reads KV head h // (H / Hkv) (FlashAttention's and SDPA's GQA); "tiled": h % Hkv
    (a plausible wrong convention)."""
    b, t, h, d = q.shape
    group, out = h // k.size(2), torch.zeros(b, t, h, d, dtype=torch.float64)
    q, k, v = q.double(), k.double(), v.double()
    for head in range(h):
        kv = head // group if head_map == "grouped" else head % k.size(2)
        for i in range(t):
            keys = slice(0, i + 1) if causal else slice(0, t)
            s = torch.einsum("bd,bsd->bs", q[:, i, head], k[:, keys, kv]) * (scale or 1 / math.sqrt(d))
            out[:, i, head] = torch.einsum("bs,bsd->bd", s.softmax(-1), v[:, keys, kv])
    return out


def fake_flash(calls=None, fail=None, untraceable=False, mistake=None, strict=False, returns_tuple=True):
    """Stands in for flash_attn_interface.flash_attn_func or flash_attn.cute.flash_attn_func on the CPU: the math
    of an SDPA call on their layout, or a deliberate mistake (noncausal, tiled heads, a wrong scale, no gradient)."""

    def flash_attn_func(q, k, v, qv=None, softmax_scale=None, causal=False):
        if fail:
            raise RuntimeError(fail)
        if strict and q.dtype == torch.float32:  # what FlashAttention says to fp32 and to odd head sizes
            raise AssertionError("inputs must be float16 or bfloat16")
        if strict and q.size(-1) % 8:
            raise AssertionError("head_dim must be divisible by 8")
        if untraceable:
            torch._dynamo.graph_break()  # what a build without a registered op does under fullgraph=True
        if calls is not None:
            calls.append((tuple(q.shape), tuple(k.shape), q.dtype, k.dtype, v.dtype, causal))
        assert qv is None  # the wrapper must pass causal by keyword: FA4's 4th parameter is qv
        group = q.size(2) // k.size(2)
        if mistake == "tiled":  # KV head h % Hkv instead of h // group
            k, v = k.repeat(1, 1, group, 1), v.repeat(1, 1, group, 1)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=causal and mistake != "noncausal", enable_gqa=True,
                                           scale=1.0 if mistake == "scale" else None).transpose(1, 2)
        if mistake == "detached":
            y = y.detach().requires_grad_()
        return (y, None) if returns_tuple else y  # FA4 and some FA3 builds return (out, lse)

    return flash_attn_func


def hparams(heads=4, kv_heads=2, head_dim=16, seq=64):
    return SimpleNamespace(num_heads=heads, num_kv_heads=kv_heads, model_dim=heads * head_dim, train_seq_len=seq)


def runtime(cuda=True, compile=False, precision=torch.bfloat16):
    """A CUDA run as the probe sees it, simulated on the CPU (cuda=True only says the device may run CUDA kernels)."""
    return SimpleNamespace(cuda=cuda, device=CPU, compile=compile, precision=precision, rank=0, distributed=False)


@pytest.fixture
def no_flash_libraries(monkeypatch):
    """Neither FA3 nor FA4 importable, whatever this machine has."""
    monkeypatch.setattr(tg, "flash_attn_func", None)
    monkeypatch.setattr(tg, "fa4_attn_func", None)
    monkeypatch.setattr(tg.importlib, "import_module", lambda name: (_ for _ in ()).throw(ModuleNotFoundError(
        f"No module named {name.split('.')[0]!r}")))


def qkv(dtype, b=2, t=24, h=6, hkv=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, t, n, d, generator=g).to(dtype) for n in (h, hkv, hkv)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_wrapper_computes_causal_gqa_attention(monkeypatch, dtype):
    """fa3, fa4 (stand-ins doing SDPA's math on their layout), flash and math SDPA, and the probe's reference: all
    match a head-by-head loop with query head h reading KV head h // 3, causal."""
    calls = []
    monkeypatch.setattr(tg, "flash_attn_func", fake_flash(calls, returns_tuple=False))  # newer FA3: out only
    monkeypatch.setattr(tg, "fa4_attn_func", fake_flash(calls))
    q, k, v = qkv(dtype)
    expected = loop_attention(q, k, v)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for name in ("fa3", "fa4", "flash", "math"):
        y = tg.ATTENTION_KERNELS[name](q, k, v)
        assert y.shape == q.shape and y.dtype == dtype, name
        assert ((y.double() - expected).norm() / expected.norm()).item() < tolerance, name
    assert ((tg.reference_attention(q.double(), k.double(), v.double()) - expected).norm()).item() < 1e-12
    assert calls == [((2, 24, 6, 8), (2, 24, 2, 8), dtype, dtype, dtype, True)] * 2  # (B, T, H, D), causal
    assert (loop_attention(q, k, v, head_map="tiled") - expected).norm() / expected.norm() > 0.1  # the map matters


def test_causal_attention_goes_through_the_chosen_backend(monkeypatch):
    calls = []
    monkeypatch.setattr(tg, "flash_attn_func", fake_flash(calls))
    q, k, v = qkv(torch.bfloat16)
    flash = tg.causal_attention(q, k, v)  # the default before start-up decides: flash SDPA
    monkeypatch.setattr(tg, "ATTENTION", "fa3")
    assert torch.equal(tg.causal_attention(q, k, v), flash) and len(calls) == 1


def test_flash_sdpa_on_the_cpu_is_the_unrestricted_call_of_before():
    """On the CPU, SDPA's own choice for these inputs is its flash kernel: held to it, results are bit for bit
    those of the call before backends were named (the defaults' check relies on it)."""
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = qkv(dtype)
        before = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                is_causal=True, enable_gqa=True).transpose(1, 2)
        assert torch.equal(tg.ATTENTION_KERNELS["flash"](q, k, v), before)


# ---------------------------------------------------------------------------------------------------------------
# The probe and the choice

def test_the_probe_runs_the_runs_dtype_head_size_and_head_counts(monkeypatch):
    """Not bf16 with head size 64 whatever the run uses (issue 25)."""
    for hp, precision in [(hparams(heads=6, kv_heads=3, head_dim=24, seq=40), torch.float32),
                          (hparams(heads=8, kv_heads=1, head_dim=32, seq=2048), torch.bfloat16)]:
        calls = []
        monkeypatch.setattr(tg, "flash_attn_func", fake_flash(calls))
        passed, seen = tg.probe_attention("fa3", hp, runtime(precision=precision))
        t, d = min(hp.train_seq_len, tg.PROBE_SEQ_LEN), hp.model_dim // hp.num_heads
        assert passed and calls == [((2, t, hp.num_heads, d), (2, t, hp.num_kv_heads, d)) + (precision,) * 3 + (True,)]
        assert seen.endswith(f"dtype:{'fp32' if precision == torch.float32 else 'bf16'} head_dim:{d} "
                             f"heads:{hp.num_heads}/{hp.num_kv_heads} seq:{t} compiled:0")


@pytest.mark.parametrize("mistake", ["noncausal", "tiled", "scale", "detached"])
def test_a_backend_that_runs_but_computes_something_else_fails_its_probe(monkeypatch, mistake):
    monkeypatch.setattr(tg, "flash_attn_func", fake_flash(mistake=mistake))
    passed, seen = tg.probe_attention("fa3", hparams(), runtime())
    assert not passed
    if mistake == "detached":
        assert seen.startswith("no gradient for q, k, v")
    else:
        errors = [float(f.split(":")[1]) for f in seen.split() if f.startswith("err_")]
        assert seen.startswith("wrong numbers") and max(errors) > 5 * tg.PROBE_TOLERANCE  # far off, not borderline
    with pytest.raises(tg.InputError, match=r"^ATTENTION=fa3: FlashAttention-3 is unusable here \((wrong|no grad)"):
        tg.choose_attention("fa3", hparams(), runtime())
    backend, why, _ = tg.choose_attention("auto", hparams(), runtime())
    assert backend == "flash" and why.startswith(f"fa3: {seen}; flash passed its probe")


def test_the_probe_tolerance_sits_well_above_bf16_rounding():
    """The real kernels here, at the default model's head shape: bf16 errors are a fifth of the tolerance or less,
    fp32's are rounding noise."""
    for precision, bound in [(torch.bfloat16, tg.PROBE_TOLERANCE / 2), (torch.float32, 1e-5)]:
        for name in ("flash", "math"):
            passed, seen = tg.probe_attention(name, hparams(heads=8, kv_heads=4, head_dim=64, seq=2048),
                                              runtime(cuda=False, precision=precision))
            errors = [float(f.split(":")[1]) for f in seen.split() if f.startswith("err_")]
            assert passed and len(errors) == 4 and max(errors) < bound, (name, seen)


def test_auto_takes_fa3_when_installed_and_passing(monkeypatch, no_flash_libraries):
    calls = []
    monkeypatch.setattr(tg, "flash_attn_func", fake_flash(calls))
    backend, why, seen = tg.choose_attention("auto", hparams(), runtime())
    assert backend == "fa3" and len(calls) == 1 and seen.startswith("err_out:")
    assert why == "fa3 passed its probe (auto never picks fa4 or cudnn: not yet measured faster)"


def test_auto_without_fa3_is_flash_sdpa_as_before(no_flash_libraries):
    for rt in (runtime(), runtime(cuda=False)):
        backend, why, _ = tg.choose_attention("auto", hparams(), rt)
        assert backend == "flash" and why.startswith("fa3: flash_attn_interface is not installed; flash passed")


def test_auto_never_picks_fa4_or_cudnn_until_measured(monkeypatch, no_flash_libraries):
    calls = []
    monkeypatch.setattr(tg, "fa4_attn_func", fake_flash(calls))
    assert tg.choose_attention("auto", hparams(), runtime())[0] == "flash" and calls == []
    assert set(tg.AUTO_ATTENTION) == {"fa3", "flash", "efficient", "math"}
    backend, why, _ = tg.choose_attention("fa4", hparams(), runtime())  # named: probed and used
    assert (backend, why) == ("fa4", "ATTENTION=fa4") and len(calls) == 1


def test_auto_falls_back_with_the_first_line_of_each_error(monkeypatch, no_flash_libraries):
    monkeypatch.setattr(tg, "flash_attn_func", fake_flash(fail="no kernel image for sm_90\nsecond line"))
    backend, why, _ = tg.choose_attention("auto", hparams(), runtime())
    assert backend == "flash" and why.startswith("fa3: RuntimeError: no kernel image for sm_90 (dtype:bf16 ")
    with pytest.raises(tg.InputError, match=r"^ATTENTION=fa3: FlashAttention-3 is unusable here \(RuntimeError: no "
                                            r"kernel image for sm_90 \(dtype:bf16 head_dim:16"):
        tg.choose_attention("fa3", hparams(), runtime())


def refuse(real, refuses):
    """A backend as CUDA's flash SDPA is: it refuses fp32 and head sizes that are not a multiple of 8."""

    def attention(q, k, v):
        if refuses(q):
            raise RuntimeError("No available kernel. Aborting execution.")
        return real(q, k, v)

    return attention


@pytest.mark.parametrize("precision, head_dim", [(torch.float32, 16), (torch.bfloat16, 18)])
def test_fp32_or_an_odd_head_size_picks_a_backend_that_runs_up_front(monkeypatch, no_flash_libraries, precision,
                                                                     head_dim):
    """Issue 25: PRECISION=fp32 on CUDA, or a head size flash does not take, failed late with "No available kernel".
    Now FA3 (bf16/fp16 only) and flash fail their probes at start-up, and auto goes on to a kernel that runs (here
    math: efficient SDPA has no CPU kernel, which the simulation of a CUDA device shows too)."""
    monkeypatch.setattr(tg, "flash_attn_func", fake_flash(strict=True))
    kernels = dict(tg.ATTENTION_KERNELS,
                   flash=refuse(tg.ATTENTION_KERNELS["flash"], lambda q: q.dtype == torch.float32 or q.size(-1) % 8))
    monkeypatch.setattr(tg, "ATTENTION_KERNELS", kernels)
    backend, why, seen = tg.choose_attention("auto", hparams(head_dim=head_dim), runtime(precision=precision))
    assert backend == "math" and f"head_dim:{head_dim}" in seen
    reasons = dict(part.split(": ", 1) for part in why.split("; ")[:-1])
    assert list(reasons) == ["fa3", "flash", "efficient"]
    assert reasons["fa3"].startswith("AssertionError: " + ("inputs must be float16 or bfloat16"
                                                          if precision == torch.float32 else "head_dim must be"))
    assert reasons["flash"].startswith("RuntimeError: No available kernel")
    assert reasons["efficient"].startswith("RuntimeError: No viable backend")  # the real SDPA refusal, up front
    with pytest.raises(tg.InputError, match=r"^ATTENTION=flash: flash SDPA is unusable here \(RuntimeError: No "):
        tg.choose_attention("flash", hparams(head_dim=head_dim), runtime(precision=precision))


def test_named_backends_that_cannot_run_here_are_input_errors(no_flash_libraries):
    for name, why in [("fa3", "flash_attn_interface is not installed"),
                      ("fa4", "flash_attn.cute does not import (ModuleNotFoundError: No module named 'flash_attn')"),
                      ("cudnn", "no CUDA device"), ("efficient", "no CUDA device")]:
        with pytest.raises(tg.InputError) as error:
            tg.choose_attention(name, hparams(), runtime(cuda=False))
        assert str(error.value) == f"ATTENTION={name}: {tg.ATTENTION_LABELS[name]} is unusable here ({why})"
    with pytest.raises(tg.InputError, match=r"^ATTENTION=cudnn: cuDNN SDPA is unusable here \(RuntimeError: No viable"):
        tg.choose_attention("cudnn", hparams(), runtime())  # "CUDA" with no cuDNN kernel: refused by its probe
    for name in ("flash", "math"):
        assert tg.choose_attention(name, hparams(), runtime(cuda=False))[:2] == (name, f"ATTENTION={name}")


def test_auto_with_nothing_that_passes_is_one_error(monkeypatch, no_flash_libraries):
    monkeypatch.setattr(tg, "AUTO_ATTENTION", ("fa3", "efficient"))
    with pytest.raises(tg.InputError, match=r"^ATTENTION=auto: no attention backend passed its probe \(fa3: "
                                            r"flash_attn_interface is not installed; efficient: no CUDA device\)$"):
        tg.choose_attention("auto", hparams(), runtime(cuda=False))


def test_the_probe_compiles_when_the_model_will(monkeypatch):
    """Some FA3 builds run eagerly but cannot be traced with fullgraph=True: the probe must see that."""
    monkeypatch.setattr(tg, "flash_attn_func", fake_flash(untraceable=True))
    assert tg.choose_attention("fa3", hparams(), runtime(compile=False))[0] == "fa3"
    torch._dynamo.reset()
    with pytest.raises(tg.InputError, match=r"ATTENTION=fa3: FlashAttention-3 is unusable here \(Unsupported: Call to "
                                            r"`torch._dynamo.graph_break\(\)` \(dtype:bf16 .* compiled:1\)\)$"):
        tg.choose_attention("fa3", hparams(), runtime(compile=True))
    torch._dynamo.reset()


def test_ranks_that_chose_differently_stop_with_one_error(monkeypatch):
    rt = SimpleNamespace(rank=1, distributed=True)
    monkeypatch.setattr(tg, "agree_max", lambda values, rt: [max(values[0], 3), max(values[1], 0)])  # others: 0..3
    with pytest.raises(tg.InputError, match=r"^the ranks' attention probes chose different backends \(flash on rank "
                                            r"1\): set ATTENTION to one that every rank passes$"):
        tg.agree_on_attention("flash", rt)
    monkeypatch.undo()
    assert tg.agree_on_attention("fa3", SimpleNamespace(rank=0, distributed=False)) is None  # one rank: itself


def test_bad_attention_value_is_an_input_error():
    with pytest.raises(tg.InputError, match="ATTENTION=sdpa must be auto, fa3, fa4, cudnn, flash, efficient or math"):
        tg.read_hyperparameters({"ATTENTION": "sdpa"})


# ---------------------------------------------------------------------------------------------------------------
# nvidia-smi in the log's header

def fake_binary(folder, body: str):
    folder.mkdir(exist_ok=True)
    (folder / "nvidia-smi").write_text(f"#!/bin/sh\n{body}\n")
    (folder / "nvidia-smi").chmod(0o755)
    return str(folder)


def test_a_missing_or_failing_nvidia_smi_is_noted_not_fatal(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert tg.nvidia_smi().startswith("nvidia-smi: not run (FileNotFoundError: ")
    monkeypatch.setenv("PATH", fake_binary(tmp_path / "failing", 'echo "Failed to initialize NVML" >&2; exit 9'))
    assert tg.nvidia_smi() == "nvidia-smi: exited 9 (Failed to initialize NVML)"
    monkeypatch.setenv("PATH", fake_binary(tmp_path / "working", 'echo "| 0  NVIDIA H200  On |"'))
    assert tg.nvidia_smi() == "| 0  NVIDIA H200  On |"
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.chdir(tmp_path)
    tg.Logger("smi", True, b"print('source')\n")("a line")  # the whole header, nvidia-smi missing
    text = (tmp_path / "logs" / "smi.txt").read_text()
    assert "nvidia-smi: not run (FileNotFoundError" in text and text.endswith("=" * 100 + "\na line\n")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert tg.nvidia_smi() == "nvidia-smi: no CUDA device"


# ---------------------------------------------------------------------------------------------------------------
# The real kernels (a lent GPU)

@cuda
@pytest.mark.parametrize("precision", [torch.bfloat16, torch.float32])
def test_on_cuda_every_available_backend_matches_the_reference_and_auto_runs(precision):
    rt = SimpleNamespace(cuda=True, device=torch.device("cuda"), compile=False, precision=precision, rank=0,
                         distributed=False)
    hp = hparams(heads=8, kv_heads=4, head_dim=64, seq=2048)
    outputs = {}
    q, k, v = (x.cuda() for x in qkv(precision, t=256, h=8, hkv=4, d=64))
    for name in tg.ATTENTION_KERNELS:
        if tg.attention_unavailable(name, rt) is None and tg.probe_attention(name, hp, rt)[0]:
            outputs[name] = tg.ATTENTION_KERNELS[name](q, k, v).double()
    assert "math" in outputs and (precision == torch.float32 or "flash" in outputs), outputs.keys()
    for name, y in outputs.items():
        assert ((y - outputs["math"]).norm() / outputs["math"].norm()).item() < tg.PROBE_TOLERANCE, name
    backend, why, _ = tg.choose_attention("auto", hp, rt)  # fp32: not flash (bf16/fp16 only), but something runs
    assert backend in outputs and (precision == torch.bfloat16 or backend != "flash"), why


@cuda
def test_on_cuda_a_named_cudnn_either_runs_or_says_why_up_front():
    rt = SimpleNamespace(cuda=True, device=torch.device("cuda"), compile=False, precision=torch.bfloat16, rank=0,
                         distributed=False)
    try:
        assert tg.choose_attention("cudnn", hparams(heads=8, kv_heads=4, head_dim=64), rt)[0] == "cudnn"
    except tg.InputError as e:
        assert str(e).startswith("ATTENTION=cudnn: cuDNN SDPA is unusable here (")

