"""The store's bookkeeping as it is made to hold at ImageNet-21K scale (bench/scale.py): done markers
listed and read as files, the listing's digest streamed, reads chunk by chunk."""

import hashlib
import json

import numpy as np
import pytest
from test_store_format import fill, make_meta

from reglue.pipeline import store
from reglue.pipeline.store import Cache, verify


def test_markers_are_listed_and_read_as_zarr_wrote_them(tmp_path):
    cache = Cache.create_or_resume(str(tmp_path / "c.zarr"), make_meta(), [str(i) for i in range(10)])
    assert cache.unmarked("extract") == [0, 1, 2] and cache.markers("extract") == {}
    fill(cache)
    assert cache.unmarked("extract") == [] and sorted(cache.markers("extract")) == [0, 1, 2]
    assert cache.markers("extract")[1] == dict(cache.group["_markers/extract/0000001"].attrs)
    cache.delete_marker("extract", 1)
    (tmp_path / "c.zarr/_markers/extract/0000002/zarr.json").write_text('{"attributes": {"chu')  # torn write
    assert cache.unmarked("extract") == [1] and list(cache.markers("extract")) == [0], "torn: counts as absent"


def test_markers_on_an_fsspec_url():
    url = "memory://bookkeeping/c.zarr"
    cache = Cache.create_or_resume(url, make_meta(), [str(i) for i in range(10)])
    fill(cache)
    assert cache.unmarked("extract") == [] and cache.markers("extract")[1]["chunk"] == 1
    cache.update_meta(complete=True)
    assert verify(url) == []
    np.testing.assert_array_equal(Cache.open(url).read("cls", 2, 7), cache.array("cls")[2:7])  # through Zarr


@pytest.mark.parametrize("size", [1, 2, 3, 65536])
def test_the_streamed_digest_is_that_of_the_whole_json(size):
    values = [[], [[], []], [["é/ü.png", 'a"b'], [1, -1]], {"b": [1, 2], "a": None}, 3.5,
              [tuple(f"p{i}" for i in range(10)), tuple(range(10))], [list(range(7)), [{"k": i} for i in range(9)]]]
    for value in values:
        h = hashlib.sha256()
        for piece in store._json_pieces(value, size):
            h.update(piece.encode())
        assert h.hexdigest() == hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest(), value


def test_reads_across_chunks_equal_zarr_s(tmp_path):
    cache = Cache.create_or_resume(str(tmp_path / "c.zarr"), make_meta(), [str(i) for i in range(10)])
    full = fill(cache)
    for name, (start, stop) in {"cls": (3, 9), "labels": (0, None), "patches": (5, 6), "layers": (1, 3),
                                "valid": (9, 20), "vae_moments": (4, 4)}.items():
        np.testing.assert_array_equal(cache.read(name, start, stop), full[name][start:stop])
        np.testing.assert_array_equal(cache.read(name, start, stop), cache.array(name)[start:stop])
