"""Shard format (SPEC B§1.2), the training stream and its rank split (B§1.4), validation truncation (B§1.5)."""
import numpy as np
import pytest
import torch

import train_gpt as tg
from make_shards import write_shard

CPU = torch.device("cpu")


def test_shard_round_trip(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 2**16, size=12_345).astype(np.uint16)
    write_shard(tmp_path / "s.bin", tokens)
    assert (tmp_path / "s.bin").stat().st_size == 1024 + 2 * 12_345
    assert tg.read_shard_header(str(tmp_path / "s.bin")) == 12_345
    assert np.array_equal(tg.load_data_shard(str(tmp_path / "s.bin")), tokens)


def corrupt(path, offset: int, value: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + 4] = np.int32(value).tobytes()
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage, message", [
    (lambda p: corrupt(p, 0, 20240521), "bad shard header"),
    (lambda p: corrupt(p, 4, 2), "bad shard header"),
    (lambda p: corrupt(p, 8, 101), "promises 101 tokens"),
    (lambda p: p.write_bytes(p.read_bytes()[:-1]), "promises 100 tokens"),
    (lambda p: p.write_bytes(p.read_bytes() + b"\0\0"), "promises 100 tokens"),
    (lambda p: p.write_bytes(p.read_bytes()[:500]), "too short"),
    (lambda p: p.unlink(), "cannot read shard"),
])
def test_malformed_shards_are_errors(tmp_path, damage, message):
    path = tmp_path / "fineweb_val_000000.bin"
    write_shard(path, np.arange(100))
    damage(path)
    with pytest.raises(tg.InputError, match=message) as err:
        tg.load_data_shard(str(path))
    assert str(path) in str(err.value)


def test_missing_files_name_the_variable(tmp_path):
    with pytest.raises(tg.InputError, match=r"TRAIN_FILES=.*no files match"):
        tg.resolve_files(str(tmp_path / "fineweb_train_*.bin"), "TRAIN_FILES")


def test_stream_reads_shards_in_sorted_order_and_wraps(tmp_path):
    write_shard(tmp_path / "fineweb_train_000001.bin", np.arange(100, 105))
    write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(0, 3))
    files = tg.resolve_files(str(tmp_path / "fineweb_train_*.bin"), "TRAIN_FILES")
    stream = tg.TokenStream(files)
    assert stream.take(4).tolist() == [0, 1, 2, 100]
    assert stream.take(6).tolist() == [101, 102, 103, 104, 0, 1]


@pytest.mark.parametrize("world_size, grad_accum", [(1, 8), (2, 4), (4, 2), (8, 1)])
def test_rank_spans_cover_the_same_tokens_for_any_world_size(tmp_path, world_size, grad_accum):
    """Per micro-step each rank takes its own contiguous span of local_tokens + 1; across ranks and micro-steps
    the set of sequences is the same whatever the world size (what makes 2 GPUs equal 1 GPU x 2 accumulation)."""
    write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(5000) % 65536)
    files = [str(tmp_path / "fineweb_train_000000.bin")]
    batch_tokens, seq_len = 512, 16
    local = batch_tokens // (world_size * grad_accum)
    spans = []
    loaders = [tg.DistributedTokenLoader(files, r, world_size, CPU, local, seq_len) for r in range(world_size)]
    for _ in range(grad_accum):
        for loader in loaders:
            x, y = loader.next_batch()
            assert x.shape == (local // seq_len, seq_len) and x.dtype == torch.int64
            assert torch.equal(x.flatten()[1:], y.flatten()[:-1])  # targets are the inputs shifted by one
            spans.append((x.flatten()[0].item(), y.flatten()[-1].item()))
    span = batch_tokens // 8 + 1
    assert sorted(spans) == [(k * span, (k + 1) * span - 1) for k in range(8)]


def test_validation_truncation(tmp_path):
    write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(1000))
    write_shard(tmp_path / "fineweb_val_000001.bin", np.arange(1000, 1100))
    files = tg.resolve_files(str(tmp_path / "fineweb_val_*.bin"), "VAL_FILES")
    val = tg.load_validation_tokens(files, 128, 0)
    assert len(val) == 1 + (1099 // 128) * 128 and val[-1].item() == 1024
    subset = tg.load_validation_tokens(files, 128, 300)
    assert len(subset) == 257 and subset.tolist() == list(range(257))
    with pytest.raises(tg.InputError, match="fewer than one 2048-token sequence"):
        tg.load_validation_tokens(files, 2048, 0)


def plain_batches(files, rank, world_size, local_tokens, seq_len, steps):
    """Reference reader: every shard read whole into memory, concatenated, wrapped around; per step the stream
    advances world_size x (local_tokens + 1) tokens and rank r takes the r-th span."""
    stream = np.concatenate([np.fromfile(f, dtype="<u2", offset=1024) for f in files]).astype(np.int64)
    span, pos = local_tokens + 1, 0
    for _ in range(steps):
        idx = (pos + rank * span + np.arange(span)) % len(stream)
        pos += world_size * span
        tokens = torch.from_numpy(stream[idx])
        yield tokens[:-1].view(-1, seq_len), tokens[1:].view(-1, seq_len)


@pytest.mark.parametrize("world_size", [1, 2, 8])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the pinned-memory staging path needs a CUDA device"))])
def test_staging_loader_equals_plain_reader_batch_for_batch(tmp_path, world_size, device):
    """Three shards of unequal length, so spans cross shard boundaries and the stream wraps around several times."""
    rng = np.random.default_rng(world_size)
    for i, n in enumerate((1000, 37, 2500)):
        write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", rng.integers(0, 1024, n))
    files = tg.resolve_files(str(tmp_path / "fineweb_train_*.bin"), "TRAIN_FILES")
    local_tokens, seq_len, steps = 96, 32, 40  # 40 x world x 97 tokens: up to 8 passes over 3,537 tokens
    for rank in range(world_size):
        loader = tg.DistributedTokenLoader(files, rank, world_size, torch.device(device), local_tokens, seq_len)
        for want_x, want_y in plain_batches(files, rank, world_size, local_tokens, seq_len, steps):
            x, y = loader.next_batch()
            assert x.device.type == device and x.dtype == torch.int64 and x.shape == (3, 32)
            assert torch.equal(x.cpu(), want_x) and torch.equal(y.cpu(), want_y)


def test_shards_are_memory_mapped_not_read_whole(tmp_path):
    write_shard(tmp_path / "s.bin", np.arange(10))
    assert isinstance(tg.load_data_shard(str(tmp_path / "s.bin")), np.memmap)
