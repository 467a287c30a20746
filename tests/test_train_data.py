"""The cache loader's order, sharding, reads and resumable position, on an in-memory stand-in for
`pipeline.store.Cache` (the same `read_into` / `row_spec` / `meta` / `valid_indices` interface), and
its batch stream on small real stores (also covered end to end by test_train_loop.py)."""

import hashlib
import threading
import time
import tracemalloc
from types import SimpleNamespace
from unittest.mock import patch

import numpy as np
import pytest
import torch
from test_store_format import make_meta
from zarr.codecs import ZstdCodec

from reglue.pipeline import store
from reglue.pipeline.chunkio import take_rows
from reglue.pipeline.store import Cache, array_layout
from reglue.trainer.data import CacheLoader, _Recycler, epoch_order, read_rows
from reglue.trainer.ema import EMA
from reglue.trainer.pca import pca_from_moments


class ArrayCache:
    """`x[i] = (i, i, i)` for N samples in chunks of C; records every read."""

    def __init__(self, n: int, chunk: int, invalid=()):
        self.x = np.repeat(np.arange(n, dtype=np.float32)[:, None], 3, axis=1)
        self.valid = np.ones(n, bool)
        self.valid[list(invalid)] = False
        self.meta = SimpleNamespace(chunk_size=chunk)
        self.reads: list[tuple[int, int]] = []

    def read(self, name, start, stop):
        self.reads.append((start, stop))
        return self.x[start:stop]

    def row_spec(self, name):
        return self.x.shape[1:], self.x.dtype

    def read_into(self, name, start, stop, dest):
        take_rows(self.read(name, start, stop), dest)

    def valid_indices(self):
        return np.flatnonzero(self.valid)


def take(loader, steps):
    batches = [next(loader) for _ in range(steps)]
    loader.close()
    return batches


def stream(loader, steps):
    return np.concatenate([b["index"].numpy() for b in take(loader, steps)])


def test_each_epoch_covers_every_valid_sample_exactly_once():
    cache = ArrayCache(37, 5, invalid=(3, 20))
    valid = cache.valid_indices()
    got = stream(CacheLoader(cache, ["x"], 7, seed=1, window=10), 20)  # 140 samples: 4 epochs of 35 (+0)
    for e in range(4):
        epoch = got[e * 35:(e + 1) * 35]
        assert sorted(epoch) == list(valid), f"epoch {e} is not a permutation of the valid samples"
    assert not np.array_equal(got[:35], got[35:70]), "every epoch must reshuffle"


def test_rows_are_the_stored_rows():
    cache = ArrayCache(40, 8)
    for batch in take(CacheLoader(cache, ["x"], 8, seed=0, window=16), 6):
        assert torch.equal(batch["x"][:, 0], batch["index"].float())


def test_order_depends_only_on_seed_and_epoch():
    rows = np.arange(64)
    a, bounds = epoch_order(rows, 8, 2, seed=3, epoch=5)
    b, _ = epoch_order(rows, 8, 2, seed=3, epoch=5)
    assert np.array_equal(a, b) and list(bounds) == [0, 16, 32, 48]
    assert not np.array_equal(a, epoch_order(rows, 8, 2, seed=4, epoch=5)[0])
    # a window holds exactly the samples of its two chunks: the read locality the trade-off buys
    for lo in bounds:
        assert len(np.unique(a[lo:lo + 16] // 8)) == 2


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_split_each_global_batch_and_together_equal_one_process(world):
    cache = ArrayCache(50, 6, invalid=(7,))
    one = [b["index"].numpy() for b in take(CacheLoader(cache, ["x"], 8, seed=2, window=12), 12)]
    ranks = [[b["index"].numpy()
              for b in take(CacheLoader(cache, ["x"], 8, seed=2, window=12, rank=r, world=world), 12)]
             for r in range(world)]
    for k in range(12):
        assert all(len(ranks[r][k]) == 8 // world for r in range(world))
        assert np.array_equal(np.concatenate([ranks[r][k] for r in range(world)]), one[k])


def test_global_batch_must_divide_among_processes():
    with pytest.raises(ValueError, match="divisible"):
        CacheLoader(ArrayCache(16, 4), ["x"], 6, world=4)


def test_position_resumes_the_stream_exactly():
    cache = ArrayCache(45, 5)
    straight = stream(CacheLoader(cache, ["x"], 6, seed=9, window=10), 12)
    first = CacheLoader(cache, ["x"], 6, seed=9, window=10)
    take(first, 7)
    state = first.state_dict()
    assert state["position"] == 42 and (state["epoch"], state["offset"]) == (0, 42)
    resumed = CacheLoader(cache, ["x"], 6, seed=9, window=10)
    resumed.load_state_dict(state)
    assert np.array_equal(stream(resumed, 5), straight[42:])


def test_reads_are_contiguous_spans_one_per_chunk_touched():
    cache = ArrayCache(64, 8)
    take(CacheLoader(cache, ["x"], 16, seed=0, window=32), 4)  # one epoch (the thread may read ahead)
    first_epoch = cache.reads[:8]
    assert sorted(start // 8 for start, _ in first_epoch) == list(range(8)), "each chunk once per epoch"
    assert all(start // 8 == (stop - 1) // 8 for start, stop in cache.reads)


def test_read_rows_keeps_the_requested_order():
    cache = ArrayCache(30, 4)
    ids = np.array([17, 2, 29, 3, 16])
    assert np.array_equal(read_rows(cache, ["x"], ids, 4)["x"][:, 0], ids)


def test_loader_thread_errors_reach_the_consumer():
    class Broken(ArrayCache):
        def read(self, name, start, stop):
            raise OSError("chunk file missing")

    with pytest.raises(OSError, match="chunk file missing"):
        next(CacheLoader(Broken(16, 4), ["x"], 4))


@pytest.mark.parametrize("read_ahead", [False, True])
def test_a_later_window_s_read_error_follows_the_earlier_batches(read_ahead):
    class FailsLater(ArrayCache):  # the first window's two chunks read, then every read fails
        def read(self, name, start, stop):
            if len(self.reads) >= 2:
                raise OSError("chunk file missing")
            return super().read(name, start, stop)

    loader = CacheLoader(FailsLater(16, 4), ["x"], 4, window=8, read_ahead=read_ahead)
    assert [len(next(loader)["index"]) for _ in range(2)] == [4, 4]
    with pytest.raises(OSError, match="chunk file missing"):
        next(loader)


def test_ema_starts_as_a_copy_and_follows_the_reference_update():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, 0.9)
    assert all(torch.equal(a, b) for a, b in zip(ema.model.parameters(), model.parameters()))
    before = [p.clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for old, new, p in zip(before, ema.model.parameters(), model.parameters()):
        assert torch.allclose(new, 0.9 * old + 0.1 * p)


def test_pca_recovers_the_dominant_direction_of_standardized_tokens():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 5, generator=gen, dtype=torch.float64)
    x[:, 2] += 3 * x[:, 0]  # channels 0 and 2 correlated: the first component mixes them
    x = x * torch.tensor([1.0, 2.0, 5.0, 1.0, 0.5], dtype=torch.float64) + 7
    pca = pca_from_moments(x.sum(0), x.T @ x, len(x), 2)
    assert torch.allclose(pca.mean.double(), x.mean(0), atol=1e-5)
    assert torch.allclose(pca.std.double(), x.std(0, unbiased=False), rtol=1e-5)
    first = pca.components[0].abs()
    assert set(first.topk(2).indices.tolist()) == {0, 2}
    z = pca.project(x.float().reshape(1000, 4, 5))  # (B, k, 2, 2)
    assert z.shape == (1000, 2, 2, 2)


def test_a_rank_reads_about_its_share_of_the_window():
    cache = ArrayCache(4096, 64)  # 64 chunks, one window (no read-ahead: the next epoch's reads stay out)
    loader = CacheLoader(cache, ["x"], 256, rank=3, world=8, window=4096, prefetch=1, read_ahead=False)
    next(loader)  # the whole window's rows of this rank are read before its first batch
    first_window = len(cache.reads)
    loader.close()
    assert first_window <= 64 // 8 + 1, f"rank read {first_window} of 64 chunks for 1/8 of the rows"


@pytest.mark.parametrize("read_ahead, windows", [(False, 1.6), (True, 2.5)])
def test_a_rank_holds_about_one_window_or_two_reading_ahead(read_ahead, windows):
    class Wide(ArrayCache):  # 4 KB per sample, so the window dominates the traced memory
        def read(self, name, start, stop):
            return np.repeat(self.x[start:stop, :1], 1000, axis=1)

        def row_spec(self, name):
            return (1000,), self.x.dtype

    cache = Wide(8192, 16)  # 4 windows of 2048 samples (8 MB each)
    window_bytes = 2048 * 4000
    take(CacheLoader(cache, ["x"], 64, window=2048), 1)  # first-use imports are not the loader's memory
    loader = CacheLoader(cache, ["x"], 64, window=2048, prefetch=2, read_ahead=read_ahead)
    tracemalloc.start()
    try:
        for _ in range(3 * 32):  # 3 windows, each batch dropped once checked
            batch = next(loader)
            assert torch.equal(batch["x"][:, 999], batch["index"].float())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        loader.close()
        tracemalloc.stop()
    # One more window's rows kept while the next is read, or every decoded block of a window queued
    # beside it (Executor.map), would each peak above the bound (measured: ~1.15 and ~2.27 windows).
    assert peak < windows * window_bytes, f"peak {peak / window_bytes:.2f} windows"


@pytest.mark.parametrize("kw", [dict(), dict(rank=1, world=2), dict(local_reads=False, chunk_size=1)],
                         ids=["one-process", "rank-1-of-2", "compressor"])
def test_reading_ahead_changes_no_batch_and_resumes_mid_window(kw):
    cache = ArrayCache(45, 5, invalid=(3, 20))  # 43 samples, windows of 10: batches straddle both
    loader = lambda read_ahead: CacheLoader(cache, ["x"], 6, seed=4, window=10, read_ahead=read_ahead, **kw)
    plain, ahead = take(loader(False), 20), take(loader(True), 20)  # ~2.8 epochs, 13 windows
    for a, b in zip(plain, ahead, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    first = loader(True)
    take(first, 7)
    state = first.state_dict()
    assert state["position"] == 42 and 42 not in epoch_order(cache.valid_indices(), 5, 2, seed=4, epoch=0)[1]
    resumed = loader(True)
    resumed.load_state_dict(state)
    for a, b in zip(plain[7:], take(resumed, 13), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_reading_ahead_overlaps_the_reads_with_training():
    class Slow(ArrayCache):  # 15 ms per chunk read
        def read(self, name, start, stop):
            time.sleep(0.015)
            return super().read(name, start, stop)

    def train(read_ahead):  # 8 windows of 8 chunks (8 batches each), 15 ms per step
        loader = CacheLoader(Slow(256, 4), ["x"], 4, window=32, prefetch=1, threads=1, read_ahead=read_ahead)
        next(loader)  # the first window's read overlaps nothing either way
        began = time.perf_counter()
        for _ in range(63):
            time.sleep(0.015)
            next(loader)
        loader.close()
        return time.perf_counter() - began

    before = set(threading.enumerate())  # other tests' unclosed loaders are not this one's
    plain, ahead = train(False), train(True)
    # Without read-ahead each later window's read (~0.12 s) waits until its predecessor's steps (~0.12 s)
    # are done but the one queued: ~1.65 s; with it, the steps alone: ~0.95 s (measured 1.0-1.05 s under
    # a load of 3 on 2 cores).
    assert ahead < 0.75 * plain, f"read-ahead {ahead:.2f} s vs {plain:.2f} s without"
    left = [t.name for t in set(threading.enumerate()) - before if t.name.startswith("reglue")]
    assert not left, f"close() left threads {left}"


def test_a_one_row_read_unit_shuffles_fully():
    cache = ArrayCache(256, 64)  # 4 chunks of 64
    chunked = take(CacheLoader(cache, ["x"], 32, window=32), 1)[0]["index"].numpy()
    rowwise = take(CacheLoader(cache, ["x"], 32, window=32, chunk_size=1), 1)[0]["index"].numpy()
    assert len(np.unique(chunked // 64)) == 1  # a window smaller than a chunk: one chunk's rows
    assert len(np.unique(rowwise // 64)) == 4  # 32 random rows of all 256 (a seed missing a chunk: p < 1e-3)
    assert all(start + 1 == stop for start, stop in cache.reads[-32:])  # one read per row


# The index streams of the loader before it read rows straight into the batches (commit 8c8eeb0, the
# same configurations on `ArrayCache(150, 8, invalid=(5, 77, 140))`): sha256 of the int64 indices.
STREAMS = {"one-process": "d16db220c4bf0edf543bb4349cd5292ae5ee9d1c467bab435cd0a59972eeaaf8",
           "rank-1-of-3": "f4ad16055a8efdac0448a4175cd0b42c90da1b1fffe1a30309a6fcadac2d0264",
           "rowwise": "ec83d67aaf9d6e886e05930717ccfd7f47ee6d57e3b490846f8d00d904169fba"}
LOADERS = {"one-process": {}, "rank-1-of-3": dict(rank=1, world=3), "rowwise": dict(local_reads=False, chunk_size=1)}


@pytest.fixture(scope="module")
def small_stores(tmp_path_factory):
    """The same 150 samples (5, 77, 140 invalid) in chunks of 8, stored raw as extract writes them now
    and with zstd-3 on every array as before."""
    root = tmp_path_factory.mktemp("stores")
    meta = make_meta(num_samples=150, chunk_size=8, layers_count=0,
                     dtypes={k: v for k, v in make_meta().dtypes.items() if k != "layers"})
    rng = np.random.default_rng(0)
    full = {name: (rng.standard_normal((150, *shape)) * 50).astype(dtype)
            for name, (shape, dtype, _) in ((n, (s[1:], d, c)) for n, (s, d, c) in array_layout(meta).items())}
    full["valid"][:] = True
    full["valid"][[5, 77, 140]] = False
    stores = {}
    for kind, codecs in {"raw": None, "zstd": (ZstdCodec(level=3),)}.items():
        with patch.dict(store.CODECS, {name: codecs for name in store.CODECS} if codecs else {}):
            cache = Cache.create_or_resume(str(root / f"{kind}.zarr"), meta, [str(i) for i in range(150)])
        for k in range(cache.num_chunks):
            cache.write_chunk("extract", k, {n: v[slice(*cache.sample_range(k))] for n, v in full.items()})
        cache.update_meta(complete=True)
        stores[kind] = Cache.open(cache.url)
    return stores


@pytest.mark.parametrize("kind", ["raw", "zstd"])
@pytest.mark.parametrize("case", list(LOADERS))
def test_the_batch_stream_is_unchanged_and_holds_the_stored_rows(small_stores, kind, case):
    cache = small_stores[kind]
    names = ("vae_moments", "cls", "patches", "patches_scale", "labels")
    batches = take(CacheLoader(cache, names, 12, seed=7, window=24, **LOADERS[case]), 30)  # ~2.4 epochs
    index = np.concatenate([b["index"].numpy() for b in batches])
    assert hashlib.sha256(index.astype("<i8").tobytes()).hexdigest() == STREAMS[case]
    stored = {name: cache.read(name) for name in names}  # Zarr's own read of the whole array
    for batch in batches:
        for name in names:
            want = stored[name][batch["index"].numpy()]
            assert batch[name].dtype == torch.from_numpy(want).dtype
            np.testing.assert_array_equal(batch[name].numpy(), want)


def test_a_batch_its_consumer_holds_is_never_overwritten():
    cache = ArrayCache(64, 4)
    loader = CacheLoader(cache, ["x"], 8, window=16, prefetch=1)
    held = next(loader)
    view = held["x"][2:5]
    for _ in range(40):  # 5 epochs, each batch dropped once checked: its buffers are reused
        batch = next(loader)
        assert torch.equal(batch["x"][:, 0], batch["index"].float())
    loader.close()
    assert torch.equal(held["x"][:, 0], held["index"].float()) and torch.equal(view, held["x"][2:5])


def test_batch_buffers_are_reused_once_every_tensor_and_view_of_them_is_gone():
    recycler, shapes = _Recycler(limit=4), {"x": ((4, 3), np.dtype(np.float32))}
    first = recycler.get(shapes)
    tensor = torch.from_numpy(first["x"])
    view = tensor[1:]
    assert recycler.get(shapes) is not first
    del tensor
    assert recycler.get(shapes) is not first, "a view still refers to the buffer"
    del view
    assert recycler.get(shapes) is first


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs a CUDA device")
def test_pinned_batches_are_the_same_batches(small_stores):
    cache = small_stores["raw"]
    plain = take(CacheLoader(cache, ("patches", "labels"), 12, window=24), 15)
    pinned = take(CacheLoader(cache, ("patches", "labels"), 12, window=24, pin_memory=True), 15)
    for a, b in zip(plain, pinned, strict=True):
        assert all(b[k].is_pinned() and torch.equal(a[k], b[k]) for k in a)
