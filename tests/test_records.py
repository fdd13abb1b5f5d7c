"""records/package.py: checks, significance, the self-extracting script and the submission folder, on three real
tiny runs (seeds 1337, 42, 2025) scored on a full (small) validation set; failures are edits of those logs."""
import json
import math
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import train_gpt as tg
from conftest import REPO, field, log_lines, run_tiny_training, write_shard

sys.path.insert(0, str(REPO / "records"))
import package  # noqa: E402
import runlog  # noqa: E402

SEEDS = (1337, 42, 2025)
# A record's settings on the tiny model: the full validation set, the 600 s cap (a default, so not on the command).
RECORD_ENV = dict(ITERATIONS="6", VAL_LOSS_EVERY="3", WARMDOWN_ITERS="3", VAL_MAX_TOKENS="0",
                  MAX_WALLCLOCK_SECONDS="600")
SOURCE = (REPO / "train_gpt.py").read_bytes()
SHIPPED = tg.self_extracting(SOURCE)
SEP = "=" * 100


@pytest.fixture(scope="module")
def seeds(tmp_path_factory, tiny_data) -> list[Path]:
    """The logs of three real runs whose validation set is the first 4,096 targets of the tiny data's (in full)."""
    work = tmp_path_factory.mktemp("seeds")
    data = work / "data"
    data.mkdir()
    for shard in tiny_data.glob("fineweb_train_*.bin"):
        (data / shard.name).symlink_to(shard)
    val = np.fromfile(tiny_data / "fineweb_val_000000.bin", dtype="<u2", offset=1024)
    write_shard(data / "fineweb_val_000000.bin", val[:4097])

    def run(seed: int) -> Path:  # each in its own folder: a run reads back the artifact it wrote
        run_tiny_training(work / f"s{seed}", data=data, SEED=str(seed), RUN_ID=f"s{seed}", **RECORD_ENV)
        return work / f"s{seed}" / "logs" / f"s{seed}.txt"

    with ThreadPoolExecutor(len(SEEDS)) as pool:  # independent processes: they overlap their start-up
        return list(pool.map(run, SEEDS))


def pack(tmp_path: Path, logs: list[Path], *extra: str) -> int:
    return package.main([*map(str, logs), "--name", "Tiny Record", "--author", "Jane Doe", "--github-id", "jane",
                         "--blurb", "three tiny CPU runs", "--date", "2026-03-24", "--out-root", str(tmp_path / "out"),
                         *extra])


def folder(tmp_path: Path, track: str = "track_10min_16mb") -> Path:
    return tmp_path / "out" / track / "2026-03-24_Tiny_Record"


def lines_of(log: Path, prefix: str) -> list[str]:
    return [ln for ln in log.read_text(encoding="utf-8").splitlines() if ln.startswith(prefix)]


def score(log: Path, prefix: str = "final_int6_sliding_window_exact ") -> tuple[float, float]:
    (line,) = lines_of(log, prefix)
    return float(field(line, "val_loss")), float(field(line, "val_bpb"))


# -- edits of a real log: each turns one line (or the embedded source) into what a failing run would have written

def replace(prefix: str, new):
    """An edit: every body line starting with `prefix` becomes new(line) (removed when new(line) is None)."""
    def edit(text: str) -> str:
        source, sep, body = text.partition(SEP + "\n")
        out = [new(ln) if ln.startswith(prefix) else ln for ln in body.split("\n")]
        return source + sep + "\n".join(ln for ln in out if ln is not None)
    return edit


def set_field(key: str, value: str):
    return lambda line: " ".join(f"{key}:{value}" if tok.startswith(f"{key}:") else tok for tok in line.split())


def append(prefix: str, *added: str):
    """An edit: `added` lines after the last line starting with `prefix`."""
    def edit(text: str) -> str:
        lines = text.split("\n")
        at = max(i for i, ln in enumerate(lines) if ln.startswith(prefix)) + 1
        return "\n".join(lines[:at] + list(added) + lines[at:])
    return edit


def model_of(model: int):
    """An edit: the artifact is `model` bytes; the log's own total stays model + its code size."""
    def edit(text: str) -> str:
        code = int(next(ln for ln in text.split("\n") if ln.startswith("Code size: ")).split()[2])
        text = replace("Serialized model", lambda ln: f"Serialized model int6+zstd: {model} bytes")(text)
        total = f"Total submission size int6+zstd: {model + code} bytes"
        return replace("Total submission size", lambda ln: total)(text)
    return edit


def edited(seeds: list[Path], tmp_path: Path, edits: dict, keep=(0, 1, 2)) -> list[Path]:
    """Copies of the logs (those at `keep`) in tmp_path/logs, with edits {index: [edit, ...]} applied."""
    (tmp_path / "logs").mkdir(parents=True)
    out = []
    for i in keep:
        text = seeds[i].read_text(encoding="utf-8")
        for edit in edits.get(i, ()):
            text = edit(text)
        out.append(tmp_path / "logs" / seeds[i].name)
        out[-1].write_text(text, encoding="utf-8")
    return out


def ttt_lines(loss: float):
    return append("final_int6_sliding_window_exact",
                  f"final_int6_ttt val_loss:{loss:.4f} val_bpb:{loss * 0.6:.4f} stride:16 chunk_tokens:64 "
                  "eval_time:900ms", f"final_int6_ttt_exact val_loss:{loss:.8f} val_bpb:{loss * 0.6:.8f} "
                  "tokens:4096 bytes:9800", "ttt_time:900ms")


# -- the record

def test_three_real_seeds_make_a_record(seeds, tmp_path, capsys):
    losses = [score(log)[0] for log in seeds]
    sota = max(losses) + 2.0  # far enough below SOTA for any spread of three tiny runs
    assert pack(tmp_path, seeds, "--sota-loss", str(sota)) == 0
    out = capsys.readouterr()
    d = folder(tmp_path)
    assert sorted(p.name for p in d.iterdir()) == sorted(
        ["README.md", "curves.png", "requirements.txt", "submission.json", "train_gpt.py", "train_gpt_source.py",
         "train_seed1337.log", "train_seed42.log", "train_seed2025.log"])
    assert [p.name for p in d.parent.iterdir()] == [d.name] and out.err == ""  # no temporary folder, no FAIL
    for seed, log in zip(SEEDS, seeds):
        assert (d / f"train_seed{seed}.log").read_bytes() == log.read_bytes()

    # the counted script: the self-extracting form of the source every log embeds, the size the logs counted
    wrapper = (d / "train_gpt.py").read_bytes()
    assert (d / "train_gpt_source.py").read_bytes() == SOURCE and wrapper == SHIPPED
    assert all(runlog.read(log).source == SOURCE for log in seeds)
    assert all(lines_of(log, "Code size:") == [f"Code size: {len(wrapper)} bytes"] for log in seeds)
    namespace = {"__name__": "packaged", "__file__": str(d / "train_gpt.py")}
    exec(compile(wrapper, str(d / "train_gpt.py"), "exec"), namespace)  # it runs the script's top level
    assert namespace["HPARAMS"] == tg.HPARAMS and namespace["WRAPPER_HEAD"] == tg.WRAPPER_HEAD

    sub = json.loads((d / "submission.json").read_text())
    assert {"author", "github_id", "name", "blurb", "date", "track", "val_loss", "val_bpb", "val_bpb_std", "seeds",
            "seed_results", "bytes_total", "bytes_code", "hardware", "pytorch_version", "compliance",
            "significance"} <= set(sub)
    assert (sub["track"], sub["seeds"], sub["bytes_code"]) == ("10min_16mb", list(SEEDS), len(wrapper))
    assert sub["score_line"] == "final_int6_sliding_window_exact"  # no TTT line in these logs
    bpbs = [score(log)[1] for log in seeds]
    assert sub["val_bpb"] == pytest.approx(np.mean(bpbs), abs=1e-8)
    assert sub["val_bpb_std"] == pytest.approx(np.std(bpbs, ddof=1), abs=1e-8)
    for seed, log in zip(SEEDS, seeds):
        result = sub["seed_results"][str(seed)]
        (model,) = lines_of(log, "Serialized model int6+zstd: ")
        (last_step,) = lines_of(log, "step:6/6 val_loss:")
        (post,) = lines_of(log, "post_training_time:")
        assert result["artifact_bytes"] == int(model.split()[-2]) + len(wrapper)
        assert result["train_time_s"] == int(field(last_step, "train_time")[:-2]) / 1000 and result["steps"] == 6
        assert result["eval_time_s"] == int(post.split(":")[1][:-2]) / 1000
        assert (result["val_loss"], result["val_bpb"]) == score(log)
    assert sub["bytes_total"] == max(r["artifact_bytes"] for r in sub["seed_results"].values())
    assert sub["hardware"].startswith("CPU") and sub["pytorch_version"] == tg.torch.__version__
    flags = {k: v for k, v in sub["compliance"].items() if k != "failures"}
    assert all(v is True for v in flags.values()) and sub["compliance"]["failures"] == []
    from scipy import stats

    expected = stats.ttest_1samp(losses, sota - 0.005, alternative="less")
    sig = sub["significance"]
    assert sig["p_value"] == pytest.approx(expected.pvalue, rel=1e-9) and sig["t"] == pytest.approx(expected.statistic)
    assert sig["passed"] is bool(expected.pvalue < 0.01) is True and f"p={expected.pvalue:.4g}" in out.out
    assert "zstandard" in (d / "requirements.txt").read_text()

    # the run command: exactly the logged settings that differ from the script's defaults, RUN_ID, SEED and the
    # local data paths aside (those are listed apart)
    readme = (d / "README.md").read_text()
    command = readme.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert command[0] == "pip install -r requirements.txt" and command[1] == "for SEED in 1337 42 2025; do"
    hparams = dict(ln[len("hparam "):].split("=", 1) for ln in log_lines(seeds[0].parents[1], "s1337")
                   if ln.startswith("hparam "))
    expected_settings = {f"{k}={v}" for k, v in hparams.items() if str(tg.HPARAMS[k]) != v
                         and k not in ("RUN_ID", "SEED", "DATA_PATH", "TOKENIZER_PATH")}
    body = command[2].split()
    assert body[-5:] == ["SEED=$SEED", "torchrun", "--standalone", "--nproc_per_node=1", "train_gpt.py"]
    assert set(body[:-5]) == expected_settings and "ITERATIONS=6" in body and "VAL_MAX_TOKENS=0" not in body
    (local,) = [ln for ln in readme.splitlines() if ln.startswith("Local data paths")]
    assert f"`DATA_PATH={hparams['DATA_PATH']}`" in local and f"`TOKENIZER_PATH={hparams['TOKENIZER_PATH']}`" in local
    assert "| 1337 | 6 |" in readme and "![loss curves](curves.png)" in readme

    from matplotlib.image import imread  # (what it draws: tests/test_plot_curves.py)

    assert imread(d / "curves.png").shape[:2] == (480, 1200)


# -- failed checks: one FAIL line naming the log, nothing written

FAILURES = [
    ("over_16mb", {1: [model_of(15_990_000)]}, 1, "bytes > 16,000,000"),
    ("sizes_disagree", {0: [replace("Total submission size", lambda ln: ln.replace(" bytes", "1 bytes"))]}, 0,
     "!= total"),
    ("train_over_600s", {2: [replace("step:6/6 val_loss", set_field("train_time", "700000ms"))]}, 2,
     "training 700000 ms > 600000 ms"),
    ("gptq_total_over", {0: [append("export_time", "gptq:budget train_ms:590000 calib_ms:15000 total_ms:605000 "
                                    "limit_ms:600000")]}, 0, "training 605000 ms"),
    ("budget_exceeded_line", {1: [append("post_training_time", "budget:exceeded evaluation total_ms:601000")]}, 1,
     "the log says 'budget:exceeded evaluation total_ms:601000'"),
    ("eval_over_600s", {1: [replace("post_training_time", lambda ln: "post_training_time:700000ms")]}, 1,
     "(post_training_time) 700000 ms > 600000 ms"),
    ("val_subset_line", {0: [append("hparam ", "val_subset:VAL_MAX_TOKENS=1024 subset scores")]}, 0,
     "validation subset (val_subset:)"),
    ("final_lines_subset", {2: [replace("final_", lambda ln: ln + " subset")]}, 2,
     "validation subset (final_int6_roundtrip,"),
    ("eval_only", {1: [replace("step:", lambda ln: None), replace("hparam EVAL_ONLY=", lambda ln: ln + "final.ptz"),
                       append("hparam ", "eval_only:final.ptz")]}, 1, "an EVAL_ONLY re-score"),
    ("subset_every_sign", {0: [replace("hparam VAL_MAX_TOKENS=", lambda ln: "hparam VAL_MAX_TOKENS=1024"),
                               append("hparam ", "val_subset:VAL_MAX_TOKENS=1024"),
                               replace("final_", lambda ln: ln + " subset")]}, 0,
     "validation subset (final_int6_roundtrip, final_int6_roundtrip_exact, final_int6_sliding_window, "
     "final_int6_sliding_window_exact, val_subset:)"),
    ("two_problems_one_check", {1: [append("export_time", "gptq:budget train_ms:590000 calib_ms:15000 total_ms:605000",
                                           "budget:exceeded training total_ms:605000 limit_ms:600000")]}, 1,
     "the log says 'budget:exceeded training total_ms:605000 limit_ms:600000'; training 605000 ms"),
    ("script_differs", {2: [lambda text: "# edited\n" + text]}, 2, "embedded script differs from"),
    ("missing_score_line", {0: [replace("final_int6_sliding_window_exact", lambda ln: None)]}, 0,
     "missing line(s): final_int6_sliding_window_exact"),
    ("ttt_missing_in_one_log", {0: [ttt_lines(6.0)], 1: [ttt_lines(6.1)]}, 2, "missing line(s): final_int6_ttt_exact"),
    ("hyperparameters_differ", {1: [replace("hparam MATRIX_LR=", lambda ln: "hparam MATRIX_LR=0.06")]}, 1,
     "settings differ from"),
    ("duplicate_seed", {2: [replace("seed:", lambda ln: "seed:1337")]}, 2, "seed 1337 is also"),
]


@pytest.mark.parametrize("edits,bad,message", [f[1:] for f in FAILURES], ids=[f[0] for f in FAILURES])
def test_a_failed_check_is_one_line_and_writes_nothing(seeds, tmp_path, capsys, edits, bad, message):
    logs = edited(seeds, tmp_path, edits)
    assert pack(tmp_path, logs) == 1
    err = capsys.readouterr().err
    fails = [ln for ln in err.splitlines() if ln.startswith("FAIL ")]
    assert len(fails) == 1 and fails[0].startswith(f"FAIL {logs[bad]}: ") and message in fails[0], err
    assert not (tmp_path / "out").exists()


def test_a_record_needs_three_seeds_and_significance_is_printed_anyway(seeds, tmp_path, capsys):
    logs = edited(seeds, tmp_path, {}, keep=(0, 1))
    assert pack(tmp_path, logs, "--sota-loss", "7.0") == 1
    out = capsys.readouterr()
    (line,) = [ln for ln in out.err.splitlines() if ln.startswith("FAIL ")]
    assert line.startswith(f"FAIL {logs[0]}, {logs[1]}: 2 seed(s); a record needs at least 3")
    assert "significance vs SOTA val_loss 7.0" in out.out and not (tmp_path / "out").exists()


def test_non_record_is_written_with_its_failures(seeds, tmp_path):
    logs = edited(seeds, tmp_path, {1: [model_of(15_990_000), lambda text: "# edited\n" + text]}, keep=(0, 1))
    assert pack(tmp_path, logs, "--non-record") == 0
    d = folder(tmp_path, "track_non_record_16mb")
    sub = json.loads((d / "submission.json").read_text())
    comp = sub["compliance"]
    assert sub["track"] == "non_record_16mb" and comp["three_seeds"] is False  # a fact, not a failure here
    assert comp["artifact_under_16mb"] is False and comp["same_script_all_seeds"] is False
    assert [f.split(": ", 1)[0] for f in comp["failures"]] == [str(logs[1])] * 2
    readme = (d / "README.md").read_text()
    assert "- artifact_under_16mb: **NO**" in readme and all(f in readme for f in comp["failures"])
    assert "**not every log embeds it**" in readme and (d / "train_gpt_source.py").read_bytes() == SOURCE
    assert not (tmp_path / "out" / "track_10min_16mb").exists()


def test_one_seed_has_no_spread_and_no_significance(seeds, tmp_path, capsys):
    logs = edited(seeds, tmp_path, {}, keep=(0,))
    assert pack(tmp_path, logs, "--non-record", "--sota-loss", "7.0") == 0
    sub = json.loads((folder(tmp_path, "track_non_record_16mb") / "submission.json").read_text())
    assert sub["val_bpb_std"] is None and sub["significance"]["p_value"] is None and sub["compliance"]["failures"] == []
    assert "not computable" in capsys.readouterr().out


def test_eval_only_logs_make_a_non_record_without_curves(seeds, tmp_path, capsys):
    no_steps = [replace("step:", lambda ln: None), append("hparam ", "eval_only:final_model.int6.ptz")]
    logs = edited(seeds, tmp_path, {0: no_steps, 1: no_steps, 2: no_steps})
    assert pack(tmp_path, logs, "--non-record") == 0
    out = capsys.readouterr()
    assert "note: no curves.png: no log has step lines" in out.out and out.err.count("EVAL_ONLY re-score") == 3
    assert not (folder(tmp_path, "track_non_record_16mb") / "curves.png").exists()


def test_ttt_line_is_the_score_and_both_are_shown(seeds, tmp_path):
    logs = edited(seeds, tmp_path, {0: [ttt_lines(6.0)], 1: [ttt_lines(6.1)], 2: [ttt_lines(6.2)]})
    assert pack(tmp_path, logs, "--sota-loss", "7.0") == 0
    d = folder(tmp_path)
    sub = json.loads((d / "submission.json").read_text())
    assert sub["score_line"] == "final_int6_ttt_exact" and sub["val_loss"] == pytest.approx(6.1)
    assert sub["seed_results"]["42"]["sliding_val_bpb"] == score(seeds[1])[1]
    assert sub["significance"]["score_line"] == "final_int6_ttt_exact"
    header = next(ln for ln in (d / "README.md").read_text().splitlines() if ln.startswith("| Seed |"))
    assert "| Sliding val_bpb | TTT val_bpb |" in header


def lora_lines(loss: float):
    return append("final_int6_sliding_window_exact",
                  f"final_int6_docs val_loss:{loss + 0.1:.4f} val_bpb:{loss * 0.7:.4f} stride:16 eval_time:300ms",
                  f"final_int6_docs_exact val_loss:{loss + 0.1:.8f} val_bpb:{loss * 0.7:.8f} tokens:4096 bytes:9800",
                  f"final_int6_lora_ttt val_loss:{loss:.4f} val_bpb:{loss * 0.5:.4f} chunk:48 rank:80 eval_time:900ms",
                  f"final_int6_lora_ttt_exact val_loss:{loss:.8f} val_bpb:{loss * 0.5:.8f} tokens:4096 bytes:9800")


def test_lora_ttt_line_takes_precedence_over_ttt_and_sliding(seeds, tmp_path):
    """The most adapted legal score the logs have, by a fixed precedence: LoRA TTT before TTT before sliding, even
    where TTT's number is lower (no picking the best of several scores)."""
    logs = edited(seeds, tmp_path, {i: [ttt_lines(5.0 + i / 10), lora_lines(6.0 + i / 10)] for i in range(3)})
    assert pack(tmp_path, logs, "--sota-loss", "7.0") == 0
    d = folder(tmp_path)
    sub = json.loads((d / "submission.json").read_text())
    assert sub["score_line"] == "final_int6_lora_ttt_exact" and sub["val_loss"] == pytest.approx(6.1)
    assert sub["seed_results"]["42"]["lora_ttt_val_bpb"] == pytest.approx(6.1 * 0.5)
    assert sub["significance"]["score_line"] == "final_int6_lora_ttt_exact"
    readme = (d / "README.md").read_text()
    assert "| Sliding val_bpb | LoRA TTT val_bpb |" in readme and "(phased per-document LoRA TTT, mean of 3" in readme
    one = runlog.parse(lora_lines(6.0)("final_int6_sliding_window_exact x\n").encode(), Path("x.txt"))
    assert one.num("final_int6_lora_ttt_exact", "val_loss") == 6.0
    assert one.num("final_int6_docs_exact", "tokens") == 4096


def test_gptq_total_is_the_training_time(seeds, tmp_path):
    logs = edited(seeds, tmp_path, {i: [append("export_time", "gptq:budget train_ms:588000 calib_ms:11000 "
                                               "total_ms:599000 limit_ms:600000")] for i in range(3)})
    assert pack(tmp_path, logs) == 0
    sub = json.loads((folder(tmp_path) / "submission.json").read_text())
    assert sub["seed_results"]["42"]["train_time_s"] == 599.0


def wrapper_counted_as(size: int, model: int | None = None):
    """An edit: the log counted a wrapper of `size` bytes (another liblzma), optionally with a `model`-byte artifact."""
    def edit(text: str) -> str:
        text = replace("code: ", set_field("wrapper_bytes", str(size)))(text)
        text = replace("Code size: ", lambda ln: f"Code size: {size} bytes")(text)
        old_model = int(next(ln for ln in text.split("\n") if ln.startswith("Serialized model")).split()[-2])
        return model_of(model or old_model)(text)
    return edit


def test_a_wrapper_of_another_size_counts_what_is_shipped(seeds, tmp_path, capsys):
    small = len(SHIPPED) - 10
    logs = edited(seeds, tmp_path, {i: [wrapper_counted_as(small)] for i in range(3)})
    assert pack(tmp_path, logs) == 0
    (note,) = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("note: ")]
    assert f"is {len(SHIPPED):,} bytes; the logs counted {small:,} ({logs[0]}), {small:,} ({logs[1]})" in note
    # at the limit by the log's count, over it by the shipped file's: a failure
    logs = edited(seeds, tmp_path / "b", {i: [wrapper_counted_as(small, 16_000_000 - small)] for i in range(3)})
    assert pack(tmp_path / "b", logs) == 1
    assert capsys.readouterr().err.count("bytes > 16,000,000") == 3


def test_run_command_per_seed_and_challenge_data_paths(seeds, tmp_path):
    """Data paths in the challenge's layout (./data/...) go on the command; a differing setting gives one command
    per seed; with no local path there is no line listing them."""
    challenge_data = [replace("hparam DATA_PATH=", lambda ln: "hparam DATA_PATH=./data/datasets/fineweb10B_sp8192"),
                      replace("hparam TOKENIZER_PATH=",
                              lambda ln: "hparam TOKENIZER_PATH=./data/tokenizers/fineweb_8192_bpe.model")]
    other_lr = replace("hparam MATRIX_LR=", lambda ln: "hparam MATRIX_LR=0.06")
    logs = edited(seeds, tmp_path, {0: challenge_data, 1: challenge_data, 2: challenge_data + [other_lr]})
    assert pack(tmp_path, logs, "--non-record") == 0
    readme = (folder(tmp_path, "track_non_record_16mb") / "README.md").read_text()
    command = readme.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()[1:]
    assert len(command) == 3 and [ln.split(" SEED=")[1].split()[0] for ln in command] == ["1337", "42", "2025"]
    assert all("DATA_PATH=./data/datasets/fineweb10B_sp8192 " in ln for ln in command)
    assert all("TOKENIZER_PATH=./data/tokenizers/fineweb_8192_bpe.model " in ln for ln in command)
    assert "MATRIX_LR=0.06" in command[2] and "MATRIX_LR=0.05" in command[0] and "Local data paths" not in readme


# -- significance: scipy's one-sided one-sample t-test of the challenge's rule

def runs_with(losses: list[float], tokens: int = 4000, nbytes: int = 9700) -> list[runlog.RunLog]:
    return [runlog.parse(f"seed:{i}\nfinal_int6_sliding_window_exact val_loss:{x} val_bpb:{x * 0.6} tokens:{tokens} "
                         f"bytes:{nbytes}\n".encode(), Path(f"r{i}.txt")) for i, x in enumerate(losses)]


def test_significance_pass_small_improvement_and_noise():
    sig = lambda losses: package.significance(runs_with(losses), package.SLIDING, 1.9, None)  # noqa: E731
    assert sig([1.8800, 1.8810, 1.8790])["passed"] is True
    assert sig([1.8970, 1.8960, 1.8980])["p_value"] > 0.5  # better than SOTA, by less than 0.005 nats
    noisy = sig([1.880, 1.900, 1.870])
    assert not noisy["passed"] and 0.01 < noisy["p_value"] < 0.5


def test_significance_hand_computed_t_and_closed_form_p():
    res = package.significance(runs_with([1.8900, 1.8910, 1.8920]), package.SLIDING, 1.9, None)
    t = -4e-3 / (1e-3 / math.sqrt(3))  # d = -5e-3, -4e-3, -3e-3 against 1.895
    assert res["t"] == pytest.approx(t, rel=1e-6) and res["n"] == 3
    assert res["p_value"] == pytest.approx(0.5 + t / (2 * math.sqrt(t * t + 2)), rel=1e-9)  # Student t, df 2
    assert res["p_value"] == pytest.approx(0.0101021, abs=1e-6) and not res["passed"]
    two = package.significance(runs_with([1.8800, 1.8860]), package.SLIDING, 1.9, None)
    t = -0.012 / (math.sqrt(0.000018) / math.sqrt(2))
    assert two["p_value"] == pytest.approx(0.5 + math.atan(t) / math.pi, rel=1e-9)  # df 1: Cauchy


def test_significance_sota_in_bpb_is_converted_per_run():
    ratio = 4000 / (9700 * math.log(2))  # tokens / (bytes ln 2): nats per token -> bits per byte
    losses = [1.8800, 1.8810, 1.8790]
    a = package.significance(runs_with(losses), package.SLIDING, 1.9, None)
    b = package.significance(runs_with(losses), package.SLIDING, None, 1.9 * ratio)
    assert b["p_value"] == pytest.approx(a["p_value"], rel=1e-9)
    assert b["sota_val_loss_per_seed"][0] == pytest.approx(1.9)


def test_significance_of_one_seed_is_not_computable():
    res = package.significance(runs_with([1.85]), package.SLIDING, 1.9, None)
    assert res["p_value"] is None and not res["passed"] and "not computable" in package.describe_significance(res)


# -- bad input: one error line, exit 2, nothing written

def test_refuses_an_existing_folder(seeds, tmp_path, capsys):
    assert pack(tmp_path, seeds) == 0
    readme = folder(tmp_path) / "README.md"
    readme.write_text("hand edits")
    assert pack(tmp_path, seeds) == 2
    assert "already exists" in capsys.readouterr().err and readme.read_text() == "hand edits"


@pytest.mark.parametrize("case", ["date", "missing", "twice", "no_script", "no_hparams_table", "scipy",
                                  "matplotlib"])
def test_bad_input_is_one_error_line(seeds, tmp_path, capsys, monkeypatch, case):
    logs, extra = list(seeds), []
    if case == "date":
        extra = ["--date", "24/03/2026"]
    elif case == "missing":
        logs[1] = tmp_path / "nope.txt"
    elif case == "twice":
        logs[2] = logs[0]
    elif case == "no_script":
        logs[0] = tmp_path / "other.txt"
        logs[0].write_text("hello\n")
    elif case == "no_hparams_table":  # the defaults of the run command come from the embedded script
        logs[0] = tmp_path / "log.txt"
        logs[0].write_text("x = 1\n" + seeds[0].read_text().split(SEP + "\n", 1)[1])
    else:
        monkeypatch.setitem(sys.modules, case, None)  # the import now fails
        extra = ["--sota-loss", "7.0"]
    code = package.main([*map(str, logs), "--name", "X", "--author", "a", "--github-id", "g", "--out-root",
                         str(tmp_path / "out"), *extra])
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and not (tmp_path / "out").exists(), errors
