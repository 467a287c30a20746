"""`Cache.read_into` (pipeline/chunkio.py): rows of a chunk span straight into the caller's buffers, for
every codec a store may hold, equal to Zarr's own read; damaged chunk files fail with a one-line error."""

from unittest.mock import patch

import numpy as np
import pytest
from test_store_format import make_meta
from zarr.codecs import BloscCodec, ZstdCodec

from reglue.pipeline import store
from reglue.pipeline.chunkio import SpanReader
from reglue.pipeline.store import Cache

CODECS = {"raw": (), "zstd": (ZstdCodec(level=3),), "blosc-lz4": (BloscCodec(cname="lz4", shuffle="shuffle"),)}


def store_with(tmp_path, codec: str, n: int = 20, chunk: int = 8) -> tuple[Cache, dict]:
    """A store of n samples whose per-sample arrays all use `codec`; chunk 1's `labels` are all 0 (the
    fill value), so Zarr writes no file for it."""
    meta = make_meta(num_samples=n, chunk_size=chunk, layers_count=0,
                     dtypes={k: v for k, v in make_meta().dtypes.items() if k != "layers"})
    with patch.dict(store.CODECS, {name: CODECS[codec] for name in store.CODECS}):
        cache = Cache.create_or_resume(str(tmp_path / f"{codec}.zarr"), meta, [str(i) for i in range(n)])
    rng = np.random.default_rng(0)
    full = {name: (rng.standard_normal(cache.array(name).shape) * 50).astype(cache.array(name).dtype)
            for name in meta.dtypes}
    full["labels"][chunk:2 * chunk] = 0
    for k in range(cache.num_chunks):
        cache.write_chunk("extract", k, {name: v[slice(*cache.sample_range(k))] for name, v in full.items()})
    return cache, full


@pytest.mark.parametrize("codec", list(CODECS))
def test_read_into_places_each_row_where_asked(tmp_path, codec):
    cache, full = store_with(tmp_path, codec)
    assert [type(c) for c in cache.array("patches").compressors] == [type(c) for c in CODECS[codec]]
    for name, values in full.items():
        # chunk 1 (rows 8..15), span 9..15: rows out of order, a gap, a duplicate, two destinations
        a, b = np.zeros((4, *values.shape[1:]), values.dtype), np.zeros((3, *values.shape[1:]), values.dtype)
        cache.read_into(name, 9, 15, [(a, np.array([5, 0, 2, 2])), (b[1:], np.array([1, 3]))])
        np.testing.assert_array_equal(a, values[[14, 9, 11, 11]])
        np.testing.assert_array_equal(b[1:], values[[10, 12]])
        assert not b[0].any(), "a row outside the destinations was written"
        last = np.empty((4, *values.shape[1:]), values.dtype)  # the last, partial chunk: rows 16..19
        cache.read_into(name, 16, 20, [(last, np.arange(4))])
        np.testing.assert_array_equal(last, values[16:])
    assert not (cache.array("labels").store_path.store.root / "labels/c/1").exists()
    assert {r.mode for r in cache._spans.values()} == {"raw" if codec == "raw" else "decode"}
    with pytest.raises(ValueError, match="not one span"):
        cache.read_into("cls", 6, 10, [])


def test_a_truncated_raw_chunk_fails_with_one_line_naming_the_file(tmp_path):
    cache, _ = store_with(tmp_path, "raw")
    path = SpanReader(cache.array("cls")).chunk_file(1)
    path.write_bytes(path.read_bytes()[:100])
    out = np.empty((8, 32), np.float32)
    with pytest.raises(ValueError, match=r"cls/c/1/0: chunk file ends early.*cache verify"):
        cache.read_into("cls", 8, 16, [(out, np.arange(8))])


def test_an_undecodable_chunk_fails_with_one_line_naming_the_file(tmp_path):
    cache, _ = store_with(tmp_path, "zstd")
    SpanReader(cache.array("cls")).chunk_file(0).write_bytes(b"not zstd")
    with pytest.raises(ValueError, match=r"cls/c/0/0: cannot decode the chunk.*cache verify"):
        cache.read_into("cls", 0, 8, [(np.empty((8, 32), np.float32), np.arange(8))])


def test_a_new_store_takes_each_array_s_codec_from_the_table(tmp_path):
    meta = make_meta(dtypes={**make_meta().dtypes, "compressed": "float16"}, compressed_channels=2)
    fresh = Cache.create_or_resume(str(tmp_path / "new.zarr"), meta, ["x"] * 10)
    for name in meta.dtypes:
        assert fresh.array(name).compressors == store.CODECS[name], name
    assert fresh.array("paths").compressors == fresh.array("layers_index").compressors == store.COMPRESSORS
