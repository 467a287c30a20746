"""`Cache.read_into` (pipeline/chunkio.py): rows of a chunk span straight into the caller's buffers, for
every codec a store may hold, equal to Zarr's own read; damaged, short or vanished chunk files fail
with `DamagedCache`'s one line, never reaching a batch."""

import os
from unittest.mock import patch

import numpy as np
import pytest
from test_store_format import flip, make_meta
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from reglue.pipeline import store
from reglue.pipeline.chunkio import SpanReader
from reglue.pipeline.store import Cache, DamagedCache

CODECS = {"raw+crc32c": (Crc32cCodec(),), "raw": (), "zstd": (ZstdCodec(level=3, checksum=True),),
          "blosc-lz4": (BloscCodec(cname="lz4", shuffle="shuffle"),)}


def store_with(tmp_path, codec: str, n: int = 20, chunk: int = 8) -> tuple[Cache, dict]:
    """A complete store of n samples whose per-sample arrays all use `codec`, opened for training."""
    meta = make_meta(num_samples=n, chunk_size=chunk, layers_count=0,
                     dtypes={k: v for k, v in make_meta().dtypes.items() if k != "layers"})
    with patch.dict(store.CODECS, {name: CODECS[codec] for name in store.CODECS}):
        cache = Cache.create_or_resume(str(tmp_path / f"{codec}.zarr"), meta, [str(i) for i in range(n)])
    rng = np.random.default_rng(0)
    full = {name: (rng.standard_normal(cache.array(name).shape) * 50).astype(cache.array(name).dtype)
            for name in meta.dtypes}
    for k in range(cache.num_chunks):
        cache.write_chunk("extract", k, {name: v[slice(*cache.sample_range(k))] for name, v in full.items()})
    cache.update_meta(complete=True)
    return Cache.open(cache.url), full


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
        c = np.empty((3, *values.shape[1:]), values.dtype)  # a run of consecutive rows, one buffer
        cache.read_into(name, 10, 13, [(c, np.arange(3))])
        np.testing.assert_array_equal(c, values[10:13])
        last = np.empty((4, *values.shape[1:]), values.dtype)  # the last, partial chunk: rows 16..19
        cache.read_into(name, 16, 20, [(last, np.arange(4))])
        np.testing.assert_array_equal(last, values[16:])
        np.testing.assert_array_equal(cache.read(name, 3, 18), values[3:18])  # across chunks
    assert {r.mode for r in cache._spans.values()} == {"raw" if codec.startswith("raw") else "decode"}
    with pytest.raises(ValueError, match="not one span"):
        cache.read_into("cls", 6, 10, [])


@pytest.mark.parametrize("codec", ["raw+crc32c", "zstd"])
def test_a_damaged_or_short_chunk_fails_its_read_in_one_line(tmp_path, codec):
    cache, _ = store_with(tmp_path, codec)
    path = SpanReader(cache.array("cls")).chunk_file(1)
    saved = path.read_bytes()
    out = np.empty((8, 32), np.float32)
    for damage in ("flip", "truncate"):
        flip(path) if damage == "flip" else path.write_bytes(saved[:100])
        with pytest.raises(DamagedCache, match=r"chunk 1 of 'cls' \(samples 8..15\) cannot be decoded .*cache verify"):
            cache.read_into("cls", 8, 16, [(out[:3], np.array([0, 2, 4]))])  # part of the chunk: all of it checked
        path.write_bytes(saved)
    cache.read_into("cls", 8, 16, [(out, np.arange(8))])


def test_a_vanished_chunk_fails_the_loader_s_read(tmp_path):
    cache, full = store_with(tmp_path, "raw+crc32c")
    os.remove(SpanReader(cache.array("labels")).chunk_file(1))
    with pytest.raises(DamagedCache, match=r"chunk 1 of 'labels' \(samples 8..15\) has no file"):
        cache.read_into("labels", 8, 10, [(np.empty(2, np.int64), np.arange(2))])
    # a store opened without the checks (verify, info) reads the fill value, which fails its checksum
    assert "labels: checksum mismatch" in Cache.open(cache.url, allow_incomplete=True).verify_chunk("extract", 1)


def test_a_new_store_takes_each_array_s_codec_from_the_table(tmp_path):
    meta = make_meta(dtypes={**make_meta().dtypes, "compressed": "float16"}, compressed_channels=2)
    fresh = Cache.create_or_resume(str(tmp_path / "new.zarr"), meta, ["x"] * 10)
    for name in meta.dtypes:
        assert fresh.array(name).compressors == store.CODECS[name], name
    assert fresh.array("paths").compressors == fresh.array("layers_index").compressors == store.COMPRESSORS
