"""bench/parts_time.py times the Muon step and the training loss against the forms the flags put in their place."""
import sys

import pytest

import train_gpt as tg
from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import parts_time  # noqa: E402

SHAPE = ["PRECISION=fp32", "NUM_LAYERS=2", "MODEL_DIM=64", "NUM_HEADS=4", "NUM_KV_HEADS=2", "XSA_LAST_N=1",
         "BIGRAM_VOCAB_SIZE=64", "BIGRAM_DIM=16", "MLP_MULT=2"]


@pytest.fixture(autouse=True)
def keep_act_dtype():
    saved = tg.ACT_DTYPE  # main() sets the precision for the process, as train_gpt.main does
    yield
    tg.ACT_DTYPE = saved


def test_both_parts_at_a_tiny_shape(capsys):
    assert parts_time.main(["--part", "muon", "--repeat", "1", *SHAPE]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (f"parts_time: muon on 1x cpu, torch {tg.torch.__version__}, precision fp32, 2 layers x 64, "
                      "median of 1")
    assert [line.split()[0] for line in out[1:]] == ["round_robin", "sharded"]
    assert all(float(line.split()[1]) > 0 for line in out[1:])
    assert parts_time.main(["--part", "loss", "--repeat", "1", "--tokens", "256", *SHAPE]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("256 tokens x 1024 logits, forward + backward")
    saved = {line.split()[0]: int(line.split("saved for backward")[1].split()[0]) for line in out[1:]}
    # autograd keeps tanh's and log_softmax's fp32 outputs, the fused loss the fp32 raw logits (and both the head's
    # input and weight)
    inputs = 256 * 64 * 4 + 1024 * 64 * 4
    assert saved["plain"] >= 8 * 256 * 1024 + inputs and saved["fused"] <= 4 * 256 * 1024 + inputs + 16 * 256


def test_bad_input_is_one_error_line(capsys):
    assert parts_time.main(["--part", "loss", "NOT_A_HPARAM=1"]) == 2
    assert capsys.readouterr().err == ("error: 'NOT_A_HPARAM=1': expected NAME=VALUE, NAME one of train_gpt.py's "
                                       "hyperparameters\n")
    assert parts_time.main(["--part", "muon", "--repeat", "0"]) == 2
    assert capsys.readouterr().err == "error: --repeat=0 and --tokens=65536 must be at least 1\n"
