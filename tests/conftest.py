"""Shared test helpers: where the real data lives, the one tiny configuration, tiny datasets and models, and the
two ways to run the script: in this process (tg.main(), fast) or as its own processes (python, or torchrun for
several ranks; a driver script may stand in for train_gpt.py to patch it inside those processes)."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "data"))
sys.path.insert(0, str(REPO / "bench"))

from make_shards import write_shard  # noqa: E402

SHARED_DATA = Path(os.environ.get("PG_SHARED_DATA", REPO.parent / "shared" / "data"))
TOKENIZER = SHARED_DATA / "fineweb_1024_bpe.model"
TOKENIZER_8192 = SHARED_DATA / "fineweb_8192_bpe.model"
DOCS = SHARED_DATA / "fineweb_docs_200.jsonl"
VAL_SHARD = SHARED_DATA / "fineweb_val_000000.bin"
TORCHRUN = Path(sys.executable).with_name("torchrun")

needs_shared = pytest.mark.skipif(
    not (TOKENIZER.is_file() and DOCS.is_file()),
    reason=f"real tokenizer/documents not found in {SHARED_DATA} (set PG_SHARED_DATA to the shared data folder)",
)

# The one tiny configuration: small enough to train a few dozen steps on 2 CPU cores in seconds, with every
# feature of the default architecture on (GQA, XSA, BigramHash, SmearGate, U-Net skips, SWA, 8 micro-steps). Runs are
# fp32: bf16 CPU kernels are slow even with native bf16 (rms_norm) and ~100x slow without; the tests of bf16
# behaviour set it themselves (and unit tests build models in bf16, the script's default).
TINY_ENV = dict(PRECISION="fp32",
    NUM_LAYERS="3", MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="2", MLP_MULT="2", BIGRAM_VOCAB_SIZE="64",
    BIGRAM_DIM="16", XSA_LAST_N="1", TRAIN_SEQ_LEN="64", EVAL_SEQ_LEN="64", EVAL_STRIDE="16",
    TRAIN_BATCH_TOKENS="1024", VAL_BATCH_SIZE="8192", VAL_MAX_TOKENS="4096", ITERATIONS="30", VAL_LOSS_EVERY="15",
    WARMUP_STEPS="2", WARMDOWN_ITERS="10", SWA_EVERY="2", MAX_WALLCLOCK_SECONDS="0", TRAIN_LOG_EVERY="10",
    MATRIX_LR="0.05", SCALAR_LR="0.05", TIED_EMBED_LR="0.1",
)
# A short run of the same model for tests that only need the run to happen: 4 steps of 512 tokens, one cheap
# final eval.
SHORT = dict(ITERATIONS="4", TRAIN_BATCH_TOKENS="512", WARMUP_STEPS="0", VAL_LOSS_EVERY="0", EVAL_STRIDE="0",
             VAL_MAX_TOKENS="1024", WARMDOWN_ITERS="2")


def pytest_collection_modifyitems(config, items):
    """PG_TEST_SHUFFLE=<seed> runs the test files in a shuffled order and each file's tests shuffled (a given seed
    gives the same order again), so that no test silently depends on what ran before it."""
    seed = os.environ.get("PG_TEST_SHUFFLE")
    if not seed:
        return
    rng, files = random.Random(seed), {}
    for item in items:
        files.setdefault(item.nodeid.split("::")[0], []).append(item)
    groups = list(files.values())
    rng.shuffle(groups)
    for group in groups:
        rng.shuffle(group)
    items[:] = [item for group in groups for item in group]
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter:  # said even under -q, so that a failing order can be run again
        reporter.write_line(f"PG_TEST_SHUFFLE={seed}: the test files, and the tests inside each, in a shuffled order")


def tiny_model(seed: int = 0, perturb: float = 0.05, **env):
    """The tiny configuration's model (env overrides), every tensor perturbed so that zero-initialised paths
    (projections, the bigram table) carry signal; in eval mode. Returns (model, hyperparameters)."""
    import torch

    import train_gpt as tg

    hp = tg.read_hyperparameters({**TINY_ENV, **env})
    torch.manual_seed(seed)
    model = tg.build_model(hp, torch.device("cpu"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(perturb * torch.randn_like(p))
    return model.eval(), hp


def build_tiny_dataset(out: Path, val_docs: int = 20, tokenizer: Path = TOKENIZER) -> Path:
    """Real FineWeb documents through a real tokenizer: the first `val_docs` documents are validation."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    docs = [json.loads(line)["text"] for line in DOCS.read_text(encoding="utf-8").splitlines()]
    streams = [np.concatenate([[sp.bos_id()] + sp.encode(d) for d in part])
               for part in (docs[:val_docs], docs[val_docs:])]
    out.mkdir(parents=True, exist_ok=True)
    write_shard(out / "fineweb_val_000000.bin", streams[0])
    half = len(streams[1]) // 2
    write_shard(out / "fineweb_train_000000.bin", streams[1][:half])
    write_shard(out / "fineweb_train_000001.bin", streams[1][half:])
    return out


def script_env(data: Path, **env) -> dict[str, str]:
    """The environment of a tiny run: TINY_ENV, the data, one CPU thread per process (overrides last)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    full.update(TINY_ENV, DATA_PATH=str(data), TOKENIZER_PATH=str(TOKENIZER), RUN_ID="tiny", CUDA_VISIBLE_DEVICES="",
                OMP_NUM_THREADS="1")
    full.update({k: str(v) for k, v in env.items()})
    return full


def run_tiny_training(workdir: Path, nproc: int = 1, data: Path | None = None, check: bool = True,
                      script: Path = REPO / "train_gpt.py", **env: str) -> subprocess.CompletedProcess:
    """train_gpt.py (or a driver `script` that imports it) as processes of its own: `python` for one, torchrun for
    several, on CPU in `workdir` with TINY_ENV (+ overrides). The log is workdir/logs/<RUN_ID>.txt ('tiny')."""
    workdir.mkdir(parents=True, exist_ok=True)
    data = data or build_tiny_dataset(workdir / "data")
    launcher = [sys.executable] if nproc == 1 else [str(TORCHRUN), "--standalone", f"--nproc_per_node={nproc}"]
    proc = subprocess.run(launcher + [str(script)], cwd=workdir, env=script_env(data, **env), capture_output=True,
                          text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"train_gpt.py exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def run_in_process(workdir: Path, data: Path, script: Path | None = None, **env: str) -> int:
    """tg.main() in this process (no interpreter or torch start-up: seconds faster), or a `script` run as
    __main__, with the environment of run_tiny_training, one thread as there; returns its exit status. What main()
    sets for the whole process (the precision, the attention backend, the environment, the folder) is put back."""
    import runpy

    import torch

    import train_gpt as tg

    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    saved = tg.ACT_DTYPE, tg.ATTENTION, torch.get_num_threads()
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.clear()
    os.environ.update(script_env(data, **env))
    os.chdir(workdir)
    torch.set_num_threads(1)
    try:
        if script is None:
            return tg.main()
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exit:
        return exit.code
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)
        tg.ACT_DTYPE, tg.ATTENTION = saved[:2]
        torch.set_num_threads(saved[2])


def recorded_run(monkeypatch, workdir, tiny_data, **env):
    """An in-process tiny run; returns what the weight average saw and what the quantiser was given, and the log."""
    import train_gpt as tg

    recorded = dict(snapshots=[], initial={}, live_at_end={}, exported={})

    class Recording(tg.WeightAverage):
        def __init__(self, model, decay=0.0):
            super().__init__(model, decay)
            recorded["initial"] = {k: v.detach().clone() for k, v in self.live.items()}

        def update(self):
            super().update()
            recorded["snapshots"].append({k: v.detach().clone() for k, v in self.live.items()})

        def averaged(self):
            recorded["live_at_end"] = {k: v.detach().clone() for k, v in self.live.items()}
            return super().averaged()

    quantize = tg.quantize_state_dict

    def spy(state, *args, **kwargs):
        recorded["exported"] = {k: v.detach().clone() for k, v in state.items()}
        return quantize(state, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(tg, "WeightAverage", Recording)
        patch.setattr(tg, "quantize_state_dict", spy)
        assert run_in_process(workdir, tiny_data, **env) == 0
    return recorded, log_lines(workdir)


def log_lines(workdir: Path, run_id: str = "tiny") -> list[str]:
    return (workdir / "logs" / f"{run_id}.txt").read_text(encoding="utf-8").splitlines()


def lines_starting(lines: list[str], prefix: str) -> list[str]:
    return [line for line in lines if line.startswith(prefix)]


def field(line: str, key: str) -> str:
    """Value of `key:value` inside a log line."""
    return line.split(f"{key}:", 1)[1].split()[0]


def scorer_of(logits_fn):
    """An evaluation scorer from any function of inputs to logits: the full logits, then the scored positions."""
    import torch.nn.functional as F

    def score(x, y, first):
        logits = logits_fn(x)[:, first:].float()
        return F.cross_entropy(logits.flatten(0, 1), y[:, first:].flatten(), reduction="none").view(len(y), -1)
    return score


@pytest.fixture(autouse=True)
def process_state():
    """What train_gpt sets for the whole process (the activation dtype, the attention backend, torch's threads), put
    back after every test: a tool or test that runs main() in this process must not change the tests after it, in
    whatever order they run."""
    import train_gpt as tg
    from hparams import process_state_kept

    with process_state_kept(tg):
        yield


@pytest.fixture(scope="session")
def default_model():
    """The seed configuration's model (26,829,913 parameters), built once; tests must not modify it."""
    import torch

    import train_gpt as tg

    torch.manual_seed(1337)
    return tg.build_model(tg.read_hyperparameters({}), torch.device("cpu"))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    if not (TOKENIZER.is_file() and DOCS.is_file()):
        pytest.skip(f"real tokenizer/documents not found in {SHARED_DATA} (set PG_SHARED_DATA)")
    return build_tiny_dataset(tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture(scope="session")
def tiny_data_8192(tmp_path_factory) -> Path:
    """The same documents through the 8,192-token SentencePiece model (a public record's)."""
    if not (TOKENIZER_8192.is_file() and DOCS.is_file()):
        pytest.skip(f"the 8,192-token tokenizer or the documents are not in {SHARED_DATA} (set PG_SHARED_DATA)")
    return build_tiny_dataset(tmp_path_factory.mktemp("tiny_data_8192"), tokenizer=TOKENIZER_8192)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_data) -> Path:
    """One finished tiny run (training, artifact, final evals) in a process of its own; returns its folder."""
    workdir = tmp_path_factory.mktemp("tiny_run")
    run_tiny_training(workdir, data=tiny_data)
    return workdir


class FakeTimer:
    """Stands in for train_gpt.StepTimer as a device would behave: every step takes `step_ms` of this rank's time
    (its clock runs `skew` times as fast as real time), and a step's end is read `lag` steps after it was queued, as
    on CUDA (lag 2). Readings are exact, as CUDA events are. A run with it is deterministic whatever the machine
    does."""

    def __init__(self, rt, step_ms: float | list[float] = 100.0, lag: int = 2, skew: float = 1.0):
        self.lag, self.skew, self.t, self.marks = lag, skew, 0.0, 0
        self.step_ms = step_ms if isinstance(step_ms, list) else None
        self.constant_ms = step_ms

    def start(self, offset_ms: float) -> None:
        self.t = offset_ms

    def mark(self) -> float:
        """Step lengths: the constant, or the list's, one per step (a list takes every step of the run)."""
        ms = self.step_ms[self.marks] if self.step_ms is not None else self.constant_ms
        self.t, self.marks = self.t + ms * self.skew, self.marks + 1
        return self.t

    def read(self, handle: float) -> float:
        return handle

    def now(self) -> float:
        return self.t


def fake_timer_from_env(rt):
    """A FakeTimer configured by FAKE_STEP_MS, FAKE_LAG and FAKE_SKEW_RANK (that rank's clock runs 1.5x fast)."""
    skewed = int(os.environ.get("FAKE_SKEW_RANK", -1)) == rt.rank
    return FakeTimer(rt, float(os.environ["FAKE_STEP_MS"]), int(os.environ.get("FAKE_LAG", 2)), 1.5 if skewed else 1.0)
