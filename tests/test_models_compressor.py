"""The compressor and norm stats: official formats read safely and written back, and `compress`."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from golden_models import one_thread  # noqa: F401  (autouse: one intra-op thread)

from reglue.pipeline.compressor import (
    EncoderDecoder,
    NormStats,
    UnsafeFileError,
    compress,
    load_compressor,
    load_norm_stats,
    save_compressor,
    save_norm_stats,
)

# The official file (giorgospets/reglue, shipped as test data beside the golden vectors).
OFFICIAL_STATS = Path(__file__).parent / "data" / "reglue-norm-stats" / "dino_mean_std_8_9_10_11_256.pth"


def test_official_norm_stats_load_without_pickle_code():
    stats = load_norm_stats(OFFICIAL_STATS)
    assert stats.mean.shape == stats.std.shape == (3072,) and stats.std.dtype == torch.float32
    # reference-implementation.md §3.3: global min std 0.287 at 335, max 13.79 at 480 (both layer 8).
    assert int(stats.std.argmin()) == 335 and abs(float(stats.std.min()) - 0.287) < 1e-3
    assert int(stats.std.argmax()) == 480 and abs(float(stats.std.max()) - 13.79) < 1e-2


def test_norm_stats_round_trip_in_the_official_format(tmp_path):
    mean, std = np.linspace(-1, 1, 96, dtype=np.float32), np.linspace(0.5, 2, 96, dtype=np.float32)
    save_norm_stats(tmp_path / "stats.pth", mean, std)
    # The same pickle globals as the official file: numpy arrays inside a plain dict.
    assert sorted(torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "stats.pth")) == \
        ["numpy._core.multiarray._reconstruct", "numpy.dtype", "numpy.ndarray"]
    stats = load_norm_stats(tmp_path / "stats.pth")
    assert np.array_equal(stats.mean.numpy(), mean) and np.array_equal(stats.std.numpy(), std)
    with pytest.raises(ValueError, match="std must be > 0"):
        NormStats(mean, np.zeros(96))


def test_a_norm_stats_file_with_foreign_globals_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)

    torch.save({"mean": np.zeros(3, np.float32), "std": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(UnsafeFileError, match="allow-list"):
        load_norm_stats(tmp_path / "evil.pth")
    assert not (tmp_path / "pwned").exists()


def tiny_compressor(channels=(96, 24, 8)) -> EncoderDecoder:
    torch.manual_seed(0)
    model = EncoderDecoder(channels)
    model.train()(torch.randn(4, channels[0], 4, 4))  # non-trivial BatchNorm running stats
    return model.eval()


def test_compressor_round_trip_in_the_official_format(tmp_path):
    model = tiny_compressor()
    save_compressor(tmp_path / "compression_model.pth", model)
    raw = torch.load(tmp_path / "compression_model.pth", weights_only=True)
    assert all(k.startswith("module.") for k in raw)  # as DDP saved it (train_compressor.py)
    loaded = load_compressor(tmp_path / "compression_model.pth")
    assert loaded.build_channel_list == [96, 24, 8] and not loaded.training
    torch.save({k.removeprefix("module."): v for k, v in raw.items()}, tmp_path / "plain.pth")
    x = torch.randn(2, 96, 4, 4)
    with torch.no_grad():
        for other in (loaded, load_compressor(tmp_path / "plain.pth")):
            torch.testing.assert_close(other(x)[1], model(x)[1], rtol=0, atol=0)
    torch.save({"w": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a compressor"):
        load_compressor(tmp_path / "other.pth")


def test_compress_standardizes_and_lays_tokens_out_row_major():
    model = tiny_compressor()
    g, C = 4, 96
    layers = torch.randn(2, g * g, C).half()  # as cached: (B, P, L*D) float16
    stats = NormStats(torch.randn(C), torch.rand(C) + 0.5)
    with torch.no_grad():
        out = compress(model.encoder, layers, stats)
        z = (layers.float() - stats.mean) / stats.std  # reference train.py:333-336
        expected = model.encoder(z.transpose(1, 2).contiguous().view(2, C, g, g))
    assert out.shape == (2, 8, g, g)
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="square token count"):
        compress(model.encoder, layers[:, :15], stats)
