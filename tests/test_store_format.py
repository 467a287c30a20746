"""The cache store on its own (no models): layout, chunk ownership, markers, resume rules, verify."""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch

from reglue.pipeline import codec
from reglue.pipeline.store import (
    Cache,
    CacheMeta,
    DamagedCache,
    chunks_of_rank,
    decode_patches,
    info,
    layer_sample_indices,
    probe,
    verify,
)

DTYPES = {"vae_moments": "float16", "cls": "float32", "patches": "int8", "patches_scale": "float16",
          "labels": "int64", "valid": "bool", "layers": "float16"}


def make_meta(**changes) -> CacheMeta:
    meta = CacheMeta(num_samples=10, chunk_size=4, resolution=64, latent_channels=4, latent_size=8,
                     vae_scaling_factor=0.18215, dino_dim=32, num_patches=16, grid=4, layers=(8, 9, 10, 11),
                     layers_count=3, num_classes=2, class_names=("a", "b"), encoders={"preset": "tiny"},
                     patches_encoding=codec.ENCODING, dtypes=DTYPES,
                     source={"root": "src", "kind": "classes", "count": 10, "sha256": "0" * 64}, versions={})
    return dataclasses.replace(meta, **changes)


def fill(cache: Cache, seed: int = 0) -> dict[str, np.ndarray]:
    """Write every chunk with random values; returns the full arrays as written."""
    rng = np.random.default_rng(seed)
    full = {n: (rng.standard_normal(cache.array(n).shape) * 50).astype(cache.array(n).dtype) for n in cache.meta.dtypes}
    for k in range(cache.num_chunks):
        cache.write_chunk("extract", k, {n: v[slice(*cache.region(n, k))] for n, v in full.items()})
    return full


@pytest.mark.parametrize("n,m,c", [(10, 3, 4), (37, 37, 5), (1000, 7, 64), (5, 0, 2), (64, 64, 64), (100, 99, 1)])
def test_layer_rows_are_contiguous_and_partition_the_rows(tmp_path, n, m, c):
    meta = make_meta(num_samples=n, layers_count=m, chunk_size=c, source={"sha256": "0"},
                     dtypes={k: v for k, v in DTYPES.items() if k != "layers" or m})
    cache = Cache.create_or_resume(str(tmp_path / "c.zarr"), meta, [str(i) for i in range(n)])
    index = layer_sample_indices(n, m)
    assert len(index) == m and np.all(np.diff(index) > 0) and (m == 0 or index[-1] < n)
    rows = [cache.layer_rows(k) for k in range(cache.num_chunks)]
    assert rows[0][0] == 0 and rows[-1][1] == m and all(a[1] == b[0] for a, b in zip(rows, rows[1:]))
    for k, (j0, j1) in enumerate(rows):  # row j belongs to the chunk that holds its sample
        start, stop = cache.sample_range(k)
        assert np.all((index[j0:j1] >= start) & (index[j0:j1] < stop))


def test_chunk_ownership_covers_every_chunk_once():
    for world in (1, 2, 3, 8):
        owned = [k for r in range(world) for k in chunks_of_rank(11, r, world)]
        assert sorted(owned) == list(range(11))


def test_write_read_verify_roundtrip(tmp_path):
    url = str(tmp_path / "c.zarr")
    assert probe(url) == "absent"
    cache = Cache.create_or_resume(url, make_meta(), [f"a/{i}.png" for i in range(10)])
    full = fill(cache)
    assert cache.missing_chunks("extract") == []
    with pytest.raises(ValueError, match="incomplete"):
        Cache.open(url)
    cache.update_meta(complete=True)
    reopened = Cache.open(url)
    for name, values in full.items():
        np.testing.assert_array_equal(reopened.read(name), values)
    np.testing.assert_array_equal(reopened.read("layers_index"), [0, 3, 6])
    assert reopened.source_paths(2, 4) == ["a/2.png", "a/3.png"]
    assert reopened.array("patches").chunks == (4, 16, 32) and reopened.array("layers").chunks == (1, 16, 128)
    assert verify(url) == []
    text = info(url)
    assert "patches" in text and "B/image" in text and "complete" in text


def test_verify_names_a_deleted_and_a_corrupted_chunk(tmp_path):
    url = str(tmp_path / "c.zarr")
    cache = Cache.create_or_resume(url, make_meta(), [str(i) for i in range(10)])
    fill(cache)
    cache.update_meta(complete=True)
    os.remove(tmp_path / "c.zarr/vae_moments/c/1/0/0/0")
    with open(tmp_path / "c.zarr/cls/c/2/0", "r+b") as f:
        f.seek(8)
        f.write(b"\xff" * 8)
    problems = verify(url)
    assert len(problems) == 2
    assert "chunk 1 " in problems[0] and "vae_moments" in problems[0]
    assert "chunk 2 " in problems[1] and "cls" in problems[1]


def test_a_torn_chunk_has_no_marker_and_is_reported_missing(tmp_path):
    cache = Cache.create_or_resume(str(tmp_path / "c.zarr"), make_meta(), [str(i) for i in range(10)])
    fill(cache)
    cache.delete_marker("extract", 1)  # as if killed after the arrays, before the marker
    assert cache.missing_chunks("extract") == [1]
    assert cache.verify_chunk("extract", 1) == "no done marker"


def test_resume_rules(tmp_path):
    url = str(tmp_path / "c.zarr")
    paths = [str(i) for i in range(10)]
    Cache.create_or_resume(url, make_meta(), paths)
    before = sorted((p, os.path.getmtime(p)) for p in map(str, (tmp_path / "c.zarr").rglob("*")))
    assert Cache.create_or_resume(url, make_meta(), paths).meta == make_meta()  # same config: reopened
    with pytest.raises(ValueError, match="layers_count: store has 3, this run wants 5") as e:
        Cache.create_or_resume(url, make_meta(layers_count=5), paths)
    assert "nothing was changed" in str(e.value)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a reglue cache"):
        Cache.create_or_resume(str(other), make_meta(), paths)
    assert (other / "notes.txt").read_text() == "mine" and len(list(other.iterdir())) == 1
    after = sorted((p, os.path.getmtime(p)) for p in map(str, (tmp_path / "c.zarr").rglob("*")))
    assert before == after


def test_creation_cut_short_is_redone(tmp_path):
    url = str(tmp_path / "c.zarr")
    cache = Cache.create_or_resume(url, make_meta(), [str(i) for i in range(10)])
    root = json.loads((tmp_path / "c.zarr/zarr.json").read_text())
    root["attributes"] = {"reglue_creating": True}  # as if killed before the metadata was written
    (tmp_path / "c.zarr/zarr.json").write_text(json.dumps(root))
    assert probe(url) == "partial"
    assert Cache.create_or_resume(url, make_meta(), [str(i) for i in range(10)]).meta == cache.meta


def test_fsspec_url(tmp_path):
    url = "memory://reglue-test/c.zarr"
    cache = Cache.create_or_resume(url, make_meta(), [str(i) for i in range(10)])
    full = fill(cache)
    cache.update_meta(complete=True)
    np.testing.assert_array_equal(Cache.open(url).read("cls", 4, 8), full["cls"][4:8])
    assert verify(url) == []


def test_decode_patches_matches_the_codec():
    x = torch.randn(3, 16, 32)
    q, scale = codec.encode_tokens(x)
    got = decode_patches(q.numpy(), scale.numpy())
    assert got.dtype == torch.float32 and torch.equal(got, codec.decode_tokens(q, scale))
    assert torch.nn.functional.cosine_similarity(got, x, dim=-1).min() > 0.999


def test_meta_roundtrips_through_json():
    meta = make_meta(skipped=({"index": 3, "path": "b/x.jpg", "reason": "empty file"},), complete=True)
    assert CacheMeta.from_dict(json.loads(json.dumps(meta.to_dict()))) == meta
    with pytest.raises(ValueError, match="unknown keys"):
        CacheMeta.from_dict(meta.to_dict() | {"from_the_future": 1})


def test_a_folder_holding_only_dot_files_is_a_valid_output(tmp_path):
    """`reglue extract SRC --out cache/`: the repository's cache/ holds only its .gitignore."""
    out = tmp_path / "cache"
    out.mkdir()
    (out / ".gitignore").write_text("*\n!.gitignore\n")
    assert probe(str(out)) == "absent"
    Cache.create_or_resume(str(out), make_meta(), [str(i) for i in range(10)])
    assert probe(str(out)) == "cache"
    assert (out / ".gitignore").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert probe(str(tmp_path / "other")) == "other"


# ---- damage never reaches a reader as data (issue 12 items 1, 4, 8b) ------------------------------

def complete_store(tmp_path, **changes) -> tuple[str, dict[str, np.ndarray]]:
    url = str(tmp_path / "c.zarr")
    cache = Cache.create_or_resume(url, make_meta(**changes), [str(i) for i in range(10)])
    full = fill(cache)
    cache.update_meta(complete=True)
    return url, full


def flip(path, offset=None):
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset  # mid-frame: plain zstd decoded this silently
    data[offset:offset + 8] = bytes(b ^ 0xFF for b in data[offset:offset + 8])
    path.write_bytes(bytes(data))


def test_open_refuses_a_missing_chunk_file_or_marker_in_one_line(tmp_path):
    url, _ = complete_store(tmp_path)
    chunk = tmp_path / "c.zarr/vae_moments/c/1/0/0/0"
    saved = chunk.read_bytes()
    os.remove(chunk)
    with pytest.raises(DamagedCache, match=r"chunk 1 of 'vae_moments' \(samples 4..7\) has no file") as e:
        Cache.open(url)
    assert "rerun the same `reglue extract` command to repair" in str(e.value) and "\n" not in str(e.value)
    assert "DAMAGED: chunk 1 of 'vae_moments'" in info(url)
    chunk.write_bytes(saved)
    Cache.open(url)
    Cache.open(url, allow_incomplete=True).delete_marker("extract", 2)
    with pytest.raises(DamagedCache, match=r"1 of 3 chunks have no done marker \(extract chunks 2\)"):
        Cache.open(url)
    assert "complete, but DAMAGED" in info(url) and "done 2" in info(url)


def test_read_refuses_a_vanished_or_undecodable_chunk(tmp_path):
    url, full = complete_store(tmp_path)
    cache = Cache.open(url)
    flip(tmp_path / "c.zarr/cls/c/2/0")
    with pytest.raises(DamagedCache, match=r"chunk 2 of 'cls' \(samples 8..9\) cannot be decoded .*checksum") as e:
        cache.read("cls", 0, 10)  # a multi-chunk read names the chunk that fails
    assert "rerun the same `reglue extract`" in str(e.value) and "\n" not in str(e.value)
    os.remove(tmp_path / "c.zarr/patches/c/0/0/0")  # vanished after open
    with pytest.raises(DamagedCache, match=r"chunk 0 of 'patches' \(samples 0..3\) has no file"):
        cache.read("patches", 1, 3)
    with pytest.raises(DamagedCache, match=r"row 1 of 'layers' \(sample 3, chunk 0\) has no file"):
        os.remove(tmp_path / "c.zarr/layers/c/1/0/0")
        cache.read("layers")
    np.testing.assert_array_equal(cache.read("vae_moments", 2, 9), full["vae_moments"][2:9])  # the rest reads


def test_all_zero_chunks_of_older_stores_still_read(tmp_path):
    """Stores written before every chunk was stored lack the files of all-zero chunks (zarr's default):
    their markers say the chunk was zeros, so they are not damage, and verify agrees."""
    url, full = complete_store(tmp_path)
    cache = Cache.open(url, mode="r+", allow_incomplete=True)
    zeros = {n: np.zeros_like(v[slice(*cache.region(n, 1))]) for n, v in full.items()}
    zeros["valid"][:] = False  # an all-skipped chunk: every array is zeros
    cache.write_chunk("extract", 1, zeros)
    for name in zeros:  # what the older writer left: no files
        for c in range(*cache.region(name, 1)) if name == "layers" else [1]:
            os.remove(tmp_path / "c.zarr" / cache.chunk_key(name, c))
    reopened = Cache.open(url)
    assert not reopened.read("cls", 4, 8).any() and not reopened.read("valid", 4, 8).any()
    assert reopened.read("layers").shape == (3, 16, 128) and verify(url) == []


def test_truncated_metadata_is_one_line_naming_the_file(tmp_path):
    url, _ = complete_store(tmp_path)
    for rel in ("vae_moments/zarr.json", "zarr.json"):
        meta = tmp_path / "c.zarr" / rel
        meta.write_text(meta.read_text()[:40])
        with pytest.raises(DamagedCache, match=f"{rel} is damaged \\(not valid JSON") as e:
            Cache.open(url).read("vae_moments")
        assert "\n" not in str(e.value)
    url, _ = complete_store(tmp_path / "markers")
    marker = tmp_path / "markers/c.zarr/_markers/extract/0000001/zarr.json"
    marker.write_text(marker.read_text()[:30])
    assert sorted(Cache.open(url).markers("extract")) == [0, 2]  # a torn marker: chunk 1 is redone
    assert verify(url) == ["extract chunk 1 (samples 4..7): no done marker"]
