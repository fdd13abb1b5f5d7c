"""Legal score-first test-time training (LINEAGE.md §1.5, §2.1; SPEC B§10.2): every target scored exactly once,
each chunk scored before any update trains on it, and nothing trains on a target before it is scored."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import train_gpt as tg
from conftest import TINY_ENV, field, log_lines, run_in_process, run_tiny_training

CPU = torch.device("cpu")
# The tiny model on short sequences of random tokens: chunks of 48 targets, 3 training sequences of 16 each.
SMALL = dict(TINY_ENV, TRAIN_SEQ_LEN="16", EVAL_SEQ_LEN="32", EVAL_STRIDE="8", VOCAB_SIZE="64",
             TTT_CHUNK_TOKENS="48", TTT_LR="0.05", TTT_EPOCHS="2")
LUTS = (torch.ones(64, dtype=torch.int16), torch.zeros(64, dtype=torch.bool), torch.zeros(64, dtype=torch.bool))
RT = SimpleNamespace(rank=0, world_size=1, device=CPU, cuda=False, compile=False, distributed=False)


def instrumented_ttt(monkeypatch, total: int, **env):
    """Runs ttt_evaluate on a small model; returns its metrics and the ordered events: ('score', [targets]) for
    every window scored, ('train', [targets]) for every optimizer step with the targets it trained on."""
    hp = tg.read_hyperparameters({**SMALL, **env})
    torch.manual_seed(0)
    model = tg.build_model(hp, CPU)
    val = torch.randint(0, 64, (total + 1,))
    plain = tg.evaluate(tg.Scorer(model), val, tg.token_bytes(val, LUTS), hp.eval_len, hp.eval_stride, 4, 0, 1)
    tg.prepare_ttt(model, hp)
    events = []
    real_score, real_train = tg.score_windows, tg.ttt_train_chunk

    def score(scorer, val_dev, val_bytes, windows, window, batch_windows, sums):
        for start, first in windows:
            events.append(("score", list(range(start + first, start + window))))
        real_score(scorer, val_dev, val_bytes, windows, window, batch_windows, sums)

    def train(model, params, optimizer, val_dev, starts, seq_len, num_seqs, epochs, world_size):
        targets = [t for s in starts.tolist() for t in range(s, s + seq_len)]  # inputs s.., targets s+1.. = index s..
        step = optimizer.step

        def counted():
            events.append(("train", targets))
            step()

        optimizer.step = counted
        real_train(model, params, optimizer, val_dev, starts, seq_len, num_seqs, epochs, world_size)
        optimizer.step = step

    monkeypatch.setattr(tg, "score_windows", score)
    monkeypatch.setattr(tg, "ttt_train_chunk", train)
    logs = []
    result = tg.ttt_evaluate(model, model, tg.Scorer(model), val, tg.token_bytes(val, LUTS), hp, RT, 4, logs.append)
    monkeypatch.setattr(tg, "score_windows", real_score)
    monkeypatch.setattr(tg, "ttt_train_chunk", real_train)
    return result, plain, events, logs, hp


@pytest.mark.parametrize("total", [48 * 5, 48 * 5 + 13, 100, 40])
def test_score_first_order_and_every_target_once(monkeypatch, total):
    (loss, bpb, tokens, nbytes), _, events, logs, hp = instrumented_ttt(monkeypatch, total)
    scored = [t for kind, targets in events if kind == "score" for t in targets if t < total]
    assert sorted(scored) == list(range(total)) and tokens == total == nbytes  # every target exactly once
    trained_so_far = -1
    updates = 0
    for kind, targets in events:
        if kind == "train":
            assert max(targets) < total  # never a target past the end
            trained_so_far = max(trained_so_far, max(targets))
            updates += 1
        else:
            assert min(targets) > trained_so_far  # nothing scored here was trained on before, nor anything after it
    chunks = (total + 47) // 48
    assert updates == (chunks - 1) * hp.ttt_epochs  # every chunk but the last trains, TTT_EPOCHS steps each
    assert logs[0].startswith(f"ttt:start chunks:{chunks} chunk_tokens:48 epochs:2")


def test_lr_zero_is_the_sliding_score_and_training_changes_it(monkeypatch):
    still, plain, _, _, _ = instrumented_ttt(monkeypatch, 240, TTT_LR="0")
    assert still == plain  # the same loss, bpb, tokens and bytes as the plain sliding eval
    moved, plain, _, _, _ = instrumented_ttt(monkeypatch, 240)
    assert moved[2:] == plain[2:] and moved[0] != plain[0]


def test_frozen_blocks_do_not_move_and_the_cap_stops_updates(monkeypatch):
    hp = tg.read_hyperparameters({**SMALL, "TTT_FREEZE_BLOCKS": "1"})
    torch.manual_seed(0)
    model = tg.build_model(hp, CPU)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    val = torch.randint(0, 64, (241,))
    tg.prepare_ttt(model, hp)
    tg.ttt_evaluate(model, model, tg.Scorer(model), val, tg.token_bytes(val, LUTS), hp, RT, 4, lambda line: None)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("blocks.0."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("blocks.1."))
    _, _, events, logs, _ = instrumented_ttt(monkeypatch, 240, TTT_MAX_SECONDS="1e-9")
    assert sum(kind == "train" for kind, _ in events) == 2  # the first chunk's updates, then the cap bites
    assert any(line.startswith("ttt:updates_stopped at_chunk:1 reason:TTT_MAX_SECONDS=1e-09") for line in logs)


def test_bad_ttt_settings_are_input_errors():
    for env, message in [({"TTT_CHUNK_TOKENS": "1000"}, "TTT_CHUNK_TOKENS=1000 must be a positive multiple of"),
                         ({"TTT_FREEZE_BLOCKS": "12"}, "TTT_FREEZE_BLOCKS in \\[0, NUM_LAYERS\\]")]:
        with pytest.raises(tg.InputError, match=message):
            tg.read_hyperparameters(env)


# The tiny run scores 4,096 targets: chunks of 512 targets (8 sequences of 64), 8 chunks.
TTT = dict(TTT_ENABLED="1", TTT_CHUNK_TOKENS="512", TTT_LR="0.02")


def finals(lines, label):
    (line,) = [line for line in lines if line.startswith(label + " ")]
    return line


def test_a_tiny_run_adapts_and_two_ranks_adapt_like_one(tmp_path, tiny_run, tiny_data):
    """TTT on the tiny run's artifact: one rank in this process, then two (gloo) through torchrun."""
    artifact = str(tiny_run / "final_model.int6.ptz")
    assert run_in_process(tmp_path / "one", tiny_data, EVAL_ONLY=artifact, **TTT) == 0
    run_tiny_training(tmp_path / "two", nproc=2, data=tiny_data, EVAL_ONLY=artifact, **TTT)
    one, two = log_lines(tmp_path / "one"), log_lines(tmp_path / "two")
    ttt, sliding = finals(one, "final_int6_ttt_exact"), finals(one, "final_int6_sliding_window_exact")
    assert field(ttt, "tokens") == field(sliding, "tokens") == "4096" and field(ttt, "bytes") == field(sliding, "bytes")
    assert float(field(ttt, "val_loss")) < float(field(sliding, "val_loss")) - 0.01  # it adapts
    assert any(line.startswith("ttt_time:") for line in one) and finals(one, "final_int6_ttt").endswith("subset")
    other = finals(two, "final_int6_ttt_exact")
    assert field(other, "tokens") == field(ttt, "tokens") and field(other, "bytes") == field(ttt, "bytes")
    assert abs(float(field(other, "val_loss")) - float(field(ttt, "val_loss"))) < 2e-3


def test_embedding_tables_train_in_fp32_and_keep_sub_bf16_updates():
    """bf16 tables would round TTT's ~1e-6 updates away: they train in fp32 (read in bf16), and updates smaller
    than half a bf16 step of the value survive."""
    hp = tg.read_hyperparameters(SMALL)
    torch.manual_seed(0)
    model = tg.build_model(hp, CPU)
    before = {k: v.float().clone() for k, v in model.state_dict().items()}
    assert model.tok_emb.weight.dtype == torch.bfloat16
    logs, ttt_hp = [], tg.read_hyperparameters({**SMALL, "TTT_LR": "1e-4"})
    tg.prepare_ttt(model, ttt_hp)
    val = torch.randint(0, 64, (241,))
    tg.ttt_evaluate(model, model, tg.Scorer(model), val, tg.token_bytes(val, LUTS), ttt_hp, RT, 4, logs.append)
    assert logs[0].endswith("embedding_tables:fp32")
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    delta = (model.tok_emb.weight - before["tok_emb.weight"]).abs()
    assert ((delta > 0) & (delta < before["tok_emb.weight"].abs() * 2.0 ** -9)).any()  # lost in a bf16 table


def test_one_all_reduce_per_step_for_all_gradients(monkeypatch):
    hp = tg.read_hyperparameters(SMALL)
    torch.manual_seed(0)
    model = tg.build_model(hp, CPU)
    params = [p for p in model.parameters() if p.requires_grad]
    sizes = []
    monkeypatch.setattr(tg.dist, "all_reduce", lambda t, *a, **k: sizes.append(t.numel()))
    optimizer = torch.optim.SGD(params, lr=0.01)
    val = torch.randint(0, 64, (200,))
    tg.ttt_train_chunk(model, params, optimizer, val, torch.tensor([0, 16, 32]), 16, 6, 3, world_size=2)
    assert sizes == [sum(p.numel() for p in params)] * 3  # one flat buffer per step, 3 epochs
