"""Weight averaging (SWA, EMA): it may only change what is exported, never the training itself.

The bug this guards against: snapshots taken with `.float().cpu()` are the live fp32 tensors themselves on a CPU,
so the running sum added every later snapshot into the weights being trained. The end-to-end tests run the real
script in this process with a recorder that keeps a copy of every snapshot the average takes and of the state handed
to the quantiser."""
from __future__ import annotations

import re

import pytest
import torch

import train_gpt as tg
from conftest import TINY_ENV, log_lines, recorded_run, run_in_process, tiny_model


# 12 steps, a snapshot every step once the LR multiplier is below 0.5 (steps 11 and 12), every train loss logged.
SWA_ENV = dict(ITERATIONS="12", WARMDOWN_ITERS="6", VAL_LOSS_EVERY="0", SWA_EVERY="1", TRAIN_LOG_EVERY="1")


def train_losses(lines: list[str]) -> list[str]:
    return [re.match(r"(step:\d+/\d+ train_loss:\S+)", line).group(1) for line in lines
            if re.match(r"step:\d+/\d+ train_loss:", line)]


def test_swa_changes_only_the_export(tmp_path, tiny_data, monkeypatch):
    recorded, with_swa = recorded_run(monkeypatch, tmp_path / "swa", tiny_data, **SWA_ENV)
    assert run_in_process(tmp_path / "plain", tiny_data, SWA_ENABLED="0", **SWA_ENV) == 0
    without = log_lines(tmp_path / "plain")
    assert len(train_losses(with_swa)) == 12
    assert train_losses(with_swa) == train_losses(without)  # step by step, to the last digit
    assert len(recorded["snapshots"]) == 2 and any(line.startswith("swa:applying averaged 2") for line in with_swa)
    # the exported weights are the mean of the snapshots, computed here in float64 from their copies
    for name, got in recorded["exported"].items():
        want = torch.stack([s[name].double() for s in recorded["snapshots"]]).mean(0)
        assert got.dtype == recorded["snapshots"][0][name].dtype
        assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-7 if got.dtype == torch.float32 else 1e-2), name
    # ... and not just the last snapshot (the average really averages)
    last = recorded["snapshots"][-1]
    assert any(not torch.equal(got, last[name]) for name, got in recorded["exported"].items())


def test_ema_is_the_reference_recurrence():
    """After k steps, the EMA equals ema <- d * ema + (1 - d) * w computed here in fp32, starting at the weights
    it was created with; bf16 weights are averaged in fp32 and handed back in bf16."""
    model, _ = tiny_model()
    decay = 0.9
    ema = tg.WeightAverage(model, decay)
    reference = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    for _ in range(7):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        ema.update()
        for k, v in model.state_dict().items():
            reference[k] = decay * reference[k] + (1 - decay) * v.float()
    out = ema.averaged()
    for k, v in model.state_dict().items():
        assert out[k].dtype == v.dtype
        assert torch.allclose(ema.acc[k], reference[k], rtol=1e-6, atol=1e-7), k
        assert not torch.equal(ema.acc[k], v.float()) or v.float().abs().max() == 0
    # the accumulators are tensors of their own: training the model further leaves them alone
    before = {k: a.clone() for k, a in ema.acc.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)
    assert all(torch.equal(before[k], a) for k, a in ema.acc.items())



@pytest.mark.parametrize("decay", [0.9, 0.0])
def test_an_untied_pass_averages_from_its_blocks_mlp_at_the_switch(decay):
    """EMA and SWA: when an untied loop pass is switched on (a copy of its block's MLP), its average becomes the
    block MLP's average, not that of its never-trained initialisation; after the switch each averages on its own."""
    model, _ = tiny_model(NUM_LAYERS="4", LOOP_LAYERS="1-2", LOOP_UNTIE_MLP="1")
    model.loop_passes = 0
    average = tg.WeightAverage(model, decay)

    def train_a_step():
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        average.update()

    for _ in range(3):
        train_a_step()
    copied = model.set_loop_passes(1)
    assert copied == [("blocks.1.mlp.", "blocks.1.loop_mlps.0."), ("blocks.2.mlp.", "blocks.2.loop_mlps.0.")]
    average.copy(copied)
    avg = average.averaged()
    for layer in (1, 2):
        for name in ("fc.weight", "proj.weight"):
            assert torch.equal(avg[f"blocks.{layer}.loop_mlps.0.{name}"], avg[f"blocks.{layer}.mlp.{name}"])
    before = {k: a.clone() for k, a in average.acc.items()}
    train_a_step()
    live = model.state_dict()
    for key in ("blocks.1.loop_mlps.0.fc.weight", "blocks.1.mlp.fc.weight"):
        want = decay * before[key] + (1 - decay) * live[key].float() if decay else before[key] + live[key].float()
        assert torch.allclose(average.acc[key], want, rtol=1e-6, atol=1e-7), key
    assert not torch.equal(average.acc["blocks.1.loop_mlps.0.fc.weight"], average.acc["blocks.1.mlp.fc.weight"])


def test_a_run_averages_an_untied_pass_from_its_switch_on(tmp_path, tiny_data, monkeypatch):
    """End to end with EMA and an untied pass switched on mid-run: the exported pass MLP is the EMA recurrence
    computed here over the block MLP's snapshots before the switch and the pass's own after it."""
    decay = 0.5
    recorded, lines = recorded_run(monkeypatch, tmp_path, tiny_data, ITERATIONS="6", EMA_DECAY=str(decay),
                                   LOOP_LAYERS="1-1", LOOP_UNTIE_MLP="1", LOOP_START="0.5", VAL_LOSS_EVERY="0")
    assert "loop:on step:3 virtual_layers:4" in lines and len(recorded["snapshots"]) == 6
    for name in ("fc.weight", "proj.weight"):
        block, loop = f"blocks.1.mlp.{name}", f"blocks.1.loop_mlps.0.{name}"
        ema = recorded["initial"][block].float()
        for i, snapshot in enumerate(recorded["snapshots"]):  # snapshot i: after step i + 1
            ema = decay * ema + (1 - decay) * snapshot[block if i < 3 else loop].float()
        got = recorded["exported"][loop]
        assert torch.allclose(got.float(), ema, rtol=1e-5, atol=1e-7 if got.dtype == torch.float32 else 1e-2), name


def test_swa_accumulators_never_alias_the_weights():
    model, _ = tiny_model()
    swa = tg.WeightAverage(model)
    live = model.state_dict()
    assert all(a.data_ptr() != live[k].data_ptr() for k, a in swa.acc.items())
    swa.update()
    swa.update()
    first = {k: v.clone() for k, v in live.items()}
    assert all(torch.equal(live[k], first[k]) for k in live)  # updating never writes into the weights
    assert all(torch.equal(swa.averaged()[k], first[k]) for k in live)


def test_ema_exports_the_averaged_weights_not_the_live_ones(tmp_path, tiny_data, monkeypatch):
    recorded, lines = recorded_run(monkeypatch, tmp_path, tiny_data, EMA_DECAY="0.9", **SWA_ENV)
    assert "ema:applying decay:0.9" in lines and "swa:off reason:EMA_DECAY" in lines
    assert not any(line.startswith(("swa:start", "swa:applying")) for line in lines)
    assert len(recorded["snapshots"]) == 12  # one update per optimizer step
    ema, live = recorded["snapshots"], recorded["live_at_end"]
    assert set(recorded["exported"]) == set(live)
    differs = 0
    for name, got in recorded["exported"].items():
        reference = recorded["initial"][name].float()  # EMA from the weights training starts with
        for snapshot in ema:
            reference = 0.9 * reference + 0.1 * snapshot[name].float()
        assert got.dtype == live[name].dtype
        assert torch.allclose(got.float(), reference.to(got.dtype).float(), rtol=1e-5, atol=1e-6), name
        differs += not torch.equal(got, live[name])
    assert differs > len(live) // 2  # the export is not the live model
    # the artifact on disk holds the quantised EMA weights exactly
    ref = tg.build_model(tg.read_hyperparameters({**TINY_ENV, "EMA_DECAY": "0.9"}), torch.device("cpu")).state_dict()
    from_disk = tg.unpack_artifact((tmp_path / "final_model.int6.ptz").read_bytes(), ref)
    tensors, meta, _, _ = tg.quantize_state_dict(recorded["exported"], tg.read_hyperparameters({}))
    want = tg.dequantize_state_dict(tensors, meta, ref)
    assert all(torch.equal(from_disk[k], want[k]) for k in want)
    averaged = [line for line in lines if line.startswith("averaged val_loss:")]
    assert len(averaged) == 1 and "val_bpb:" in averaged[0]
