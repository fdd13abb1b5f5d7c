"""records/runlog.py, the one reader of train_gpt.py's log, on the log of a real tiny run."""
import sys

import pytest

import train_gpt as tg
from conftest import REPO, TINY_ENV, field, log_lines

sys.path.insert(0, str(REPO / "records"))
import runlog  # noqa: E402


@pytest.fixture(scope="module")
def run(tiny_run):
    return runlog.read(tiny_run / "logs" / "tiny.txt")


def body(tiny_run) -> list[str]:
    lines = log_lines(tiny_run)
    separators = [i for i, line in enumerate(lines) if line == "=" * 100]
    return lines[separators[1] + 1:]


def test_source_environment_and_hyperparameters(run):
    assert run.source == (REPO / "train_gpt.py").read_bytes()  # the readable source, byte for byte
    assert run.env[0].startswith("Running Python ") and run.torch_version == tg.torch.__version__
    assert run.gpus == []  # nvidia-smi: no CUDA device
    assert set(run.hparams) == set(tg.HPARAM_NAMES)
    hp = tg.read_hyperparameters(TINY_ENV)
    assert {k: run.hparams[k] for k in TINY_ENV} == {k: str(getattr(hp, k.lower())) for k in TINY_ENV}
    assert run.hparams["MLP_MULT"] == "2.0" and run.hparams["EVAL_ONLY"] == "" and run.seed == 1337


def test_every_keyed_field_of_the_body_is_read(run, tiny_run):
    """Generic reading: each `key:value` of every body line is a field of its Line, as conftest's field() sees it."""
    texts = [t for t in body(tiny_run) if not t.startswith("hparam ")]
    assert [ln.text for ln in run.lines] == [t for t in texts if t.strip()]
    checked = 0
    for line in run.lines:
        for key, value in line.fields.items():
            if " " not in key and value:  # amount lines are below; `summary:` has no value
                assert field(line.text, key) == value, (line.text, key)
                checked += 1
    assert checked > 150


def test_steps_sizes_and_final_lines(run, tiny_run):
    lines = body(tiny_run)
    train = [t for t in lines if t.startswith("step:") and " train_loss:" in t]
    val = [t for t in lines if t.startswith("step:") and " val_loss:" in t]
    assert [ln.text for ln in run.train] == train and [ln.text for ln in run.val] == val and len(val) == 3
    assert run.train[-1].num("train_time") == float(field(train[-1], "train_time")[:-2])  # '4903ms' -> 4903.0
    assert run.val[-1].num("step") == 30 and run.val[-1].fields["step"] == "30/30"
    model, code, total = (run.num(n) for n in ("Serialized model int6+zstd", "Code size",
                                                "Total submission size int6+zstd"))
    assert model + code == total and code == run.num("code", "wrapper_bytes") == len(tg.self_extracting(run.source))
    assert run.num("code", "source_bytes") == len(run.source)
    sliding = run.last("final_int6_sliding_window_exact")
    assert sliding.num("tokens") == 4096 and sliding.words == ["subset"]  # VAL_MAX_TOKENS=4096: a subset score
    assert [ln.name for ln in run.subset_lines] == ["final_int6_roundtrip", "final_int6_roundtrip_exact",
                                                    "final_int6_sliding_window", "final_int6_sliding_window_exact"]
    assert run.last("val_subset") is not None and run.num("val_loader", "tokens") == 4096
    assert run.last("attention_backend").fields["device"] == "cpu" and run.num("world_size") == 1


def test_amount_lines_and_name_value_lookups():
    peak = runlog.parse_line("peak memory allocated: 13647 MiB reserved: 14000 MiB")
    assert (peak.name, peak.num(), peak.num("reserved")) == ("peak memory allocated", 13647, 14000)
    log = runlog.parse(b"src\n" + runlog.SEPARATOR + b"\nenv\n" + runlog.SEPARATOR + b"\n"
                       b"gptq:budget train_ms:590000 calib_ms:9000 total_ms:599000 limit_ms:600000\n"
                       b"gptq:fallback blocks.0.mlp.fc.weight reason:Hessian\n"
                       b"budget:exceeded training total_ms:607000 limit_ms:600000 (raise GPTQ_RESERVE_SECONDS)\n",
                       REPO / "x.txt")
    assert log.source == b"src\n" and log.env == ["env"]
    assert log.last("gptq", "budget").num("total_ms") == 599000 and log.last("gptq").fields["gptq"] == "fallback"
    (exceeded,) = log.all("budget", "exceeded")
    assert exceeded.words[0] == "training" and exceeded.num("total_ms") == 607000 and log.num("nothing") is None


def test_log_without_separators_is_all_body():
    log = runlog.parse(b"seed:7\n", REPO / "x.txt")
    assert log.source is None and log.env == [] and log.seed == 7


def test_missing_log_names_the_file(tmp_path):
    with pytest.raises(runlog.LogError, match=f"{tmp_path / 'no.txt'}: log file not found"):
        runlog.read(tmp_path / "no.txt")


def test_script_defaults_without_importing_the_script():
    assert runlog.script_defaults((REPO / "train_gpt.py").read_bytes()) == tg.HPARAMS
    with pytest.raises(runlog.LogError, match="HPARAMS"):
        runlog.script_defaults("x = 1\n")
