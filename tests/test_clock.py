"""The agreed clock (issue 25): every decision that depends on time is taken at the same step on every rank, from
exact times of the steps' ends, however late the device's readings arrive.

The CUDA branch reads a step's end from an event `lag` (2) steps after the step was queued; tests inject a FakeTimer
(conftest) that behaves so on the CPU, with constant or noisy step times and ranks whose clocks run at different
rates. The exact-time schedule is what the script's schedule functions give at the steps' true end times."""
from __future__ import annotations

import json
import random
import re
from types import SimpleNamespace

import pytest
import torch

import train_gpt as tg
from conftest import FakeTimer, field, log_lines, run_in_process, run_tiny_training, REPO

RT = SimpleNamespace(distributed=False, cuda=False, device=torch.device("cpu"), rank=0)
T = 100.0  # ms per step


def decisions(hp, timer, max_steps: int = 10_000) -> tuple[int, list[tuple[float, int, bool]]]:
    """The training loop's time decisions, step by step, through the clock: (the step it stops after, [(the step's
    LR multiplier, its loop passes, whether a SWA snapshot follows it)])."""
    clock, cap_ms, out = tg.AgreedClock(timer, RT), tg.train_cap_ms(hp), []
    timer.start(0.0)
    for step in range(max_steps):
        scale, passes = tg.lr_multiplier(step, clock.at(step), hp), tg.loop_passes(step, clock.at(step), hp)
        clock.step_ended(step + 1)
        out.append((scale, passes, scale < 0.5 and (step + 1) % hp.swa_every == 0))
        if clock.would_pass(step + 1, cap_ms):
            return step + 1, out
    raise AssertionError("never stopped")


def exact(hp, steps: int, step_ms: float) -> list[tuple[float, int, bool]]:
    """The same decisions taken at the true end times, step * step_ms."""
    return [(tg.lr_multiplier(s, s * step_ms, hp), tg.loop_passes(s, s * step_ms, hp),
             tg.lr_multiplier(s, s * step_ms, hp) < 0.5 and (s + 1) % hp.swa_every == 0) for s in range(steps)]


def capped(cap_steps: float, **env) -> SimpleNamespace:
    return tg.read_hyperparameters({"MAX_WALLCLOCK_SECONDS": str(cap_steps * T / 1000), "ITERATIONS": "100000",
                                    "LOOP_LAYERS": "1-1", "LOOP_START": "0.5", "SWA_EVERY": "1", **env})


@pytest.mark.parametrize("lag", [0, 1, 2])
@pytest.mark.parametrize("schedule", [dict(WARMDOWN_ITERS="3000"), dict(WARMDOWN_ITERS="4"), dict(WARMDOWN_FRAC="0.7")])
def test_constant_steps_decide_as_the_exact_schedule(lag, schedule):
    """Caps of 5 to 100 step-times: the run stops within two steps of the last step that fits and never past the
    cap, and the LR multiplier, the loop switch and the SWA snapshots of every step are the exact-time schedule's."""
    for cap_steps in [5, 5.5, 6, 7.3, 10, 18, 25, 40, 64.9, 100]:
        hp = capped(cap_steps, **schedule)
        stop, got = decisions(hp, FakeTimer(RT, T, lag))
        fits = int(cap_steps + 1e-9)
        assert fits - 2 <= stop <= fits, (cap_steps, stop)
        assert got == exact(hp, stop, T), cap_steps


def test_a_slow_first_step_delays_nothing_by_more_than_a_step():
    """The first step after the warmup is often slow (allocator, loader): the decisions that follow it may differ
    from the exact schedule's by at most one step."""
    hp = capped(40, WARMDOWN_FRAC="0.5")
    stop, got = decisions(hp, FakeTimer(RT, [3 * T] + [T] * 200, lag=2))
    true_end = [0.0] + [3 * T + (s - 1) * T for s in range(1, 200)]
    want = [(tg.lr_multiplier(s, true_end[s], hp), tg.loop_passes(s, true_end[s], hp)) for s in range(stop)]
    switch = [next(s for s, d in enumerate(seq) if d[1]) for seq in (got, want)]
    assert abs(switch[0] - switch[1]) <= 1
    first_decay = [next(s for s, d in enumerate(seq) if d[0] < 1) for seq in (got, want)]
    assert abs(first_decay[0] - first_decay[1]) <= 1
    assert 40 - 2 - 2 <= stop <= 40 - 2  # 38 steps fit; the slow step sits in the window of the latest eight


@pytest.mark.parametrize("lag", [0, 2])
def test_the_stop_never_passes_the_cap_with_noisy_steps(lag):
    """Noisy steps (50-150 ms, as on a shared CPU), 200 runs: with the step to spare no run passes the cap, and none
    stops more than lag + 3 steps short (the steps whose readings are pending count at the slowest recent time too).
    Without the spare step (the next step at the slowest recent step time) some runs pass it: a step slower than the
    eight before it and longer than the time left."""
    cap_ms, passed_without_spare = 3000.0, 0
    hp = tg.read_hyperparameters({"MAX_WALLCLOCK_SECONDS": "3", "ITERATIONS": "100000"})
    for seed in range(200):
        rng = random.Random(seed)
        step_ms = [rng.uniform(50, 150) for _ in range(100)]
        ends = [sum(step_ms[:n]) for n in range(101)]
        stop, _ = decisions(hp, FakeTimer(RT, step_ms, lag))
        fits = max(n for n in range(101) if ends[n] <= cap_ms)
        assert ends[stop] <= cap_ms and stop >= fits - lag - 3, seed
        clock = tg.AgreedClock(FakeTimer(RT, step_ms, lag), RT)
        clock.timer.start(0.0)
        for step in range(1, 101):
            clock.step_ended(step)
            if clock.ms + (step + 1 - clock.steps) * max(clock.recent) > cap_ms:
                break
        passed_without_spare += ends[step] > cap_ms
    assert passed_without_spare > 0, "the rule without the spare step passes the cap in some of these runs"


# A wall-clock capped tiny run, 12.5 step-times: a time-based warmdown over 8 steps' time, a SWA snapshot every step
# below half the LR, a loop switched on at half the budget, every step logged.
CAPPED = dict(MAX_WALLCLOCK_SECONDS="1.25", ITERATIONS="100000", WARMDOWN_ITERS="8", SWA_EVERY="1", VAL_LOSS_EVERY="0",
              LOOP_LAYERS="1-1", LOOP_START="0.5", TRAIN_LOG_EVERY="1", WARMUP_STEPS="0", EVAL_STRIDE="0")


def check_against_exact_schedule(lines: list[str], step_ms: float, env: dict[str, str]) -> None:
    """The run's logged decisions are the exact-time schedule's for steps of step_ms (agreed)."""
    hp = tg.read_hyperparameters(env)
    steps = [line for line in lines if re.match(r"step:\d+/\d+ train_loss", line)]
    stop = int(field(next(line for line in lines if line.startswith("stopping_early")), "step").split("/")[0])
    assert stop == 11 and len(steps) == stop  # 12 steps fit 1,250 ms; one to spare
    for line in steps:
        k = int(line.split("/")[0].split(":")[1])
        assert field(line, "lr_mul") == f"{tg.lr_multiplier(k - 1, (k - 1) * step_ms, hp):.4f}", line
        assert field(line, "train_time") == f"{k * step_ms:.0f}ms", line
    switch = next(s for s in range(stop) if tg.loop_passes(s, s * step_ms, hp))
    assert [line for line in lines if line.startswith("loop:on")][0] == f"loop:on step:{switch} virtual_layers:4"
    first_swa = next(s for s in range(1, stop + 1) if tg.lr_multiplier(s - 1, (s - 1) * step_ms, hp) < 0.5)
    assert f"swa:start step:{first_swa}" in lines


def test_the_training_loop_takes_the_exact_schedule_with_late_readings(tmp_path, tiny_data, monkeypatch):
    monkeypatch.setattr(tg, "StepTimer", lambda rt: FakeTimer(rt, T, lag=2))
    assert run_in_process(tmp_path, tiny_data, **CAPPED) == 0
    lines = log_lines(tmp_path)
    check_against_exact_schedule(lines, T, CAPPED)
    assert f"summary: steps:11 train_time:{11 * T:.0f}ms stop:wallclock_cap" in lines


DRIVER = f"""
import json, os, sys
sys.path[:0] = [{str(REPO)!r}, {str(REPO / "tests")!r}]
import train_gpt as tg
from conftest import fake_timer_from_env

lines = []
call = tg.Logger.__call__
def recording_call(self, line):
    lines.append(line)
    call(self, line)
tg.Logger.__call__ = recording_call
tg.StepTimer = fake_timer_from_env
status = tg.main()
with open(f"rank{{os.environ['RANK']}}.json", "w") as f:
    json.dump(dict(status=status, lines=lines), f)
sys.exit(status)
"""


def test_ranks_with_skewed_clocks_take_the_slowest_ranks_schedule(tmp_path, tiny_data):
    """Two ranks, rank 1's clock 1.5x fast, readings 2 steps late: both take every decision at the same step, the
    exact schedule of the agreed (slowest) clock, 150 ms per step."""
    (tmp_path / "driver.py").write_text(DRIVER)
    env = dict(CAPPED, MAX_WALLCLOCK_SECONDS="1.875")  # 12.5 step-times of 150 ms
    run_tiny_training(tmp_path, nproc=2, data=tiny_data, script=tmp_path / "driver.py", FAKE_STEP_MS="100",
                      FAKE_SKEW_RANK="1", **env)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    decisions = ("step:", "loop:on", "swa:", "stopping_early", "replicas:", "summary: steps",
                 "summary: budget training")
    decided = [[re.sub(r"train_loss:\S+", "", line) for line in r["lines"] if line.startswith(decisions)]
               for r in ranks]  # each rank logs its own train loss
    assert decided[0] == decided[1] and {r["status"] for r in ranks} == {0}
    check_against_exact_schedule(ranks[0]["lines"], 150.0, env)
    assert "replicas:identical ranks:2" in ranks[0]["lines"]


def test_the_cuda_branch_times_steps_by_events(monkeypatch):
    """StepTimer's CUDA branch on the CPU, with torch.cuda's Event and synchronize standing in: a reading is the
    marked event's time since the segment's start event plus the segment's offset, read only after waiting for that
    event, whatever the host did meanwhile."""
    now, waited = [0.0], []

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing
            self.at = None

        def record(self):
            self.at = now[0]

        def synchronize(self):
            waited.append(self.at)

        def elapsed_time(self, end):
            assert self.at is not None and end.at is not None
            return end.at - self.at

    monkeypatch.setattr(tg.torch.cuda, "Event", Event)
    monkeypatch.setattr(tg.torch.cuda, "synchronize", lambda: None)
    timer = tg.StepTimer(SimpleNamespace(cuda=True))
    assert timer.lag == 2
    now[0] = 5.0
    timer.start(1000.0)
    handles = []
    for step in range(1, 4):
        now[0] += 30.0  # the step's end on the device
        handles.append(timer.mark())
    now[0] += 500.0  # the host does something else before it reads
    assert [timer.read(h) for h in handles] == [1030.0, 1060.0, 1090.0] and waited == [35.0, 65.0, 95.0]
    assert timer.now() == 1590.0
    timer.start(2000.0)  # after a pause: the old handles keep their segment
    now[0] += 10.0
    assert timer.read(timer.mark()) == 2010.0 and timer.read(handles[0]) == 1030.0
