"""bench/bench.py summarises a real train_gpt.py log into throughput figures, reading the shape from its hparams."""
import os
import sys

import pytest

import train_gpt as tg
from conftest import REPO, TOKENIZER, field, log_lines

sys.path.insert(0, str(REPO / "bench"))
import bench  # noqa: E402

SP8192_VAL_TARGETS = 40_540_160


def test_flops_per_token_at_the_defaults():
    matmul_weights = 11 * (512 * 512 * 2 + 2 * 512 * 256 + 2 * 512 * 1536) + 128 * 512 + 1024 * 512
    assert matmul_weights == 26_829_913 - 2048 * 128 - 91_225 + 65_536  # all params but tables and small tensors
    defaults = {name: str(value) for name, value in tg.HPARAMS.items()}
    assert bench.flops_per_token(defaults) == 6 * matmul_weights + 6 * 11 * 2048 * 512


@pytest.mark.parametrize("targets,window,stride", [(4096, 64, 16), (4100, 64, 16), (64, 64, 16), (10, 64, 16),
                                                   (1_040_297, 2048, 64), (SP8192_VAL_TARGETS, 2048, 64)])
def test_window_count_is_the_scripts(targets, window, stride):
    assert bench.window_count(targets, window, stride) == len(tg.sliding_windows(targets, window, stride))


def test_summary_of_the_tiny_run(tiny_run):
    lines = log_lines(tiny_run)
    summary = bench.summarise(tiny_run / "logs" / "tiny.txt", SP8192_VAL_TARGETS)
    last = [ln for ln in lines if ln.startswith("step:30/30 val_loss")][0]
    assert summary["steps"] == 30 and summary["ms_per_step"] == float(field(last, "step_avg")[:-2])
    assert summary["tokens_per_s"] == pytest.approx(1024 / (summary["ms_per_step"] / 1000))
    assert (summary["attention"], summary["device"], summary["world_size"]) == ("flash", "cpu", 1)
    assert summary["warmup_compile_s"] > 0 and summary["export_s"] > 0
    assert "peak_allocated_mib" not in summary  # CPU: no CUDA memory line
    assert summary["sliding_windows"] == len(tg.sliding_windows(4096, 64, 16)) == 253
    sliding = [ln for ln in lines if ln.startswith("final_int6_sliding_window val_loss")][0]
    rate = 253 / (int(field(sliding, "eval_time")[:-2]) / 1000)
    assert summary["sliding_windows_per_s_per_gpu"] == pytest.approx(rate)
    full = len(tg.sliding_windows(SP8192_VAL_TARGETS, 64, 16))
    assert summary["sliding_full_val_8gpu_s"] == pytest.approx(full / (8 * rate))
    assert "sliding_full_val_8gpu_s" not in bench.summarise(tiny_run / "logs" / "tiny.txt")  # no size: no guess


def test_prints_the_summary_of_a_log(tiny_run, capsys):
    log = tiny_run / "logs" / "tiny.txt"
    assert bench.main(["--log", str(log)]) == 0
    expected = [f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}" for k, v in bench.summarise(log).items()]
    assert capsys.readouterr().out.splitlines() == expected


def test_rejects_a_setting_that_is_not_a_hyperparameter(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["NUM_LAYER=3"])
    assert exc.value.code == 2 and "'NUM_LAYER=3'" in capsys.readouterr().err


def strip_steps(tiny_run, tmp_path):
    lines = (tiny_run / "logs" / "tiny.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    path = tmp_path / "no_steps.txt"
    path.write_text("".join(ln for ln in lines if not ln.startswith("step:")), encoding="utf-8")
    return path


def not_a_log(tiny_run, tmp_path):
    path = tmp_path / "other.txt"
    path.write_text("hello\n")
    return path


@pytest.mark.parametrize("make_log,expected", [
    (lambda run, tmp: tmp / "nope.txt", "nope.txt: log file not found"),
    (strip_steps, "no_steps.txt: no hparam or training step lines"),
    (not_a_log, "other.txt: no hparam or training step lines"),
], ids=["missing", "no-step-lines", "not-a-log"])
def test_bad_log_is_one_line(tiny_run, tmp_path, capsys, make_log, expected):
    assert bench.main(["--log", str(make_log(tiny_run, tmp_path))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err


def test_export_time_table_on_a_small_model(capsys):
    """bench/export_time.py packs the same artifact on every worker count (it checks the bytes agree) and prints one
    row per compressor and worker count."""
    import export_time

    assert export_time.main(["--workers", "1", "2", "--compressors", "zstd", "brotli", "--", "NUM_LAYERS=2",
                             "MODEL_DIM=128", "NUM_HEADS=4", "NUM_KV_HEADS=2", "XSA_LAST_N=1"]) == 0
    out = capsys.readouterr().out.split("\nCPU time of the frames")
    rows = [line.split("|")[1:-1] for line in out[0].splitlines() if line.startswith(("| zstd", "| brotli"))]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [("zstd", "1"), ("zstd", "2"), ("brotli", "1"),
                                                            ("brotli", "2")]
    assert rows[0][3] == rows[1][3] and rows[2][3] == rows[3][3]
    cpu = [line.split("|")[1:-1] for line in out[1].splitlines() if line.startswith(("| zstd", "| brotli"))]
    assert [r[0].strip() for r in cpu] == ["zstd", "brotli"]
    assert all(float(r[1]) >= float(r[2]) > 0 for r in cpu)  # the total over the frames, the largest one


def test_a_stack_hands_inductor_about_what_the_defaults_do(tmp_path, tiny_data, monkeypatch):
    """COMPILE=blocks (issue 25): the sp1024 frontier stack's flags (a loop, parallel blocks, XSA everywhere, LN
    scale, partial RoPE, gated skips) at the default depth give Inductor at most 1.3x the defaults' forward ops; the
    whole-model compile gives it over 2x (a graph per loop shape). Counted, not compiled: machine-independent."""
    import compile_count

    monkeypatch.chdir(tmp_path)
    shape = dict(DATA_PATH=str(tiny_data), TOKENIZER_PATH=str(TOKENIZER), MODEL_DIM="64", NUM_HEADS="4",
                 NUM_KV_HEADS="2", TRAIN_SEQ_LEN="64", EVAL_SEQ_LEN="64", EVAL_STRIDE="32", TRAIN_BATCH_TOKENS="512",
                 VAL_BATCH_SIZE="4096", VAL_MAX_TOKENS="1024", PRECISION="fp32", CUDA_VISIBLE_DEVICES="")
    stack = dict(shape, MLP_NEG_SLOPE="0.5", ROPE_DIMS="8", LN_SCALE="1", XSA_LAST_N="11", EMA_DECAY="0.997",
                 LOOP_LAYERS="4-5", LOOP_START="0.35", PARALLEL_START="7", MUON_ROW_NORM="1", SKIP_GATES="1")
    ops = {(name, mode): sum(compile_count.count_graphs(env, mode))
           for name, env in (("default", shape), ("stack", stack)) for mode in ("blocks", "model")}
    assert ops["stack", "blocks"] <= 1.3 * ops["default", "blocks"]
    assert ops["stack", "model"] > 2 * ops["default", "model"] > 2 * ops["default", "blocks"]


def test_counting_graphs_leaves_the_process_as_it_was(tmp_path, tiny_data, monkeypatch):
    """compile_count runs train_gpt.main() in this process: what main() sets for the whole process (the activation
    dtype, the attention backend, the threads, the environment) is put back, or later tests would see fp32."""
    import compile_count

    monkeypatch.chdir(tmp_path)
    before = tg.ACT_DTYPE, tg.ATTENTION, tg.torch.get_num_threads(), dict(os.environ)
    compile_count.count_graphs(dict(DATA_PATH=str(tiny_data), TOKENIZER_PATH=str(TOKENIZER), MODEL_DIM="64",
                                    NUM_LAYERS="2", XSA_LAST_N="1", NUM_HEADS="4", NUM_KV_HEADS="2",
                                    TRAIN_SEQ_LEN="64", EVAL_SEQ_LEN="64", EVAL_STRIDE="0", TRAIN_BATCH_TOKENS="512",
                                    VAL_BATCH_SIZE="4096", VAL_MAX_TOKENS="512", PRECISION="fp32",
                                    OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=""), "blocks")
    assert (tg.ACT_DTYPE, tg.ATTENTION, tg.torch.get_num_threads(), dict(os.environ)) == before


@pytest.mark.parametrize("tool, argv", [("bench", []), ("compile_count", []), ("document_plan", ["val.bin"]),
                                        ("export_time", []), ("parts_time", ["--part", "loss"]), ("profile_step", []),
                                        ("quant_error", [])])
@pytest.mark.parametrize("setting", ["NUM_LAYER=3", "NUM_LAYERS"])
def test_every_bench_tool_refuses_a_setting_train_gpt_does_not_take(capsys, tool, argv, setting):
    """A misspelt or valueless hyperparameter is one error line and exit status 2 before any work, in every tool."""
    module = __import__(tool)
    try:
        status = module.main([*argv, "--", setting])
    except SystemExit as e:  # argparse's parser.error
        status = e.code
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith(f"error: '{setting}': expected NAME=VALUE, NAME one of train_gpt.py's hyperparameters")
