"""Rows of one Zarr chunk read straight into the caller's buffers: the loader's one read per array span.

A span is rows [start, stop) of one chunk of an array chunked along its first axis only (every cache
array, `store.array_layout`). `dest` says where its rows go: pairs (out, offsets), out[i] = row
start + offsets[i], `out` a C-contiguous block of whole rows (of a batch buffer). By the array's codecs
(its own `zarr.json`, so a store written with other codecs reads the same, only slower):
- stored raw with a crc32c checksum (`store.CODECS`), in a local store: every row of the chunk file is
  read by `preadv` in file order, the wanted ones straight into `out`, the others and the checksum into
  a per-thread buffer, and the crc32c of the whole chunk is checked (~25 GB/s): no decode buffer, no
  copy but the kernel's from the page cache (BENCHMARKS.md, "Loader profile"). Stored raw without a
  checksum: only the wanted rows are read.
- zstd or blosc (stores written before, or an array that keeps a codec), local: the file is read
  whole into a per-thread buffer and decoded into another (zstd's frame checksum checked), then one
  vectorised take per destination.
- anything else (an fsspec URL, other codecs): read through Zarr, then the same take.
A chunk without a file is an error (`MissingChunk`), unless `may_be_absent(key)` says it may hold only
the fill value (Zarr skips such chunks unless told otherwise): then its rows are that value. A file
that is short, fails its checksum or does not decode is `DamagedChunk`, naming it.
"""

from __future__ import annotations

import math
import os
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import google_crc32c
import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, Endian, ZstdCodec
from zarr.storage import LocalStore

Dest = Sequence[tuple[np.ndarray, np.ndarray]]
"""(out, offsets) pairs: out[i] receives row start + offsets[i] of the span."""

DECODERS = {ZstdCodec: numcodecs.Zstd, BloscCodec: numcodecs.Blosc}  # both decode from the frame alone
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 16  # buffers per preadv call (Linux: 1024)
_scratch = threading.local()


class MissingChunk(Exception):
    """A chunk file that is not there (zarr would serve the fill value)."""

    def __init__(self, key: str):
        super().__init__(f"chunk file {key} is missing")
        self.key = key


class DamagedChunk(ValueError):
    """Chunk `k` of an array is there but unusable: `why` says how (short, checksum, decode)."""

    def __init__(self, k: int, why: str):
        super().__init__(why)
        self.k, self.why = k, why


def take_rows(block: np.ndarray, dest: Dest) -> None:
    """Copy rows of `block` (the span's rows, in order) into `dest`: one vectorised take per destination."""
    for out, offsets in dest:
        if len(offsets) and not (0 <= offsets.min() and offsets.max() < len(block)):
            raise IndexError(f"row offsets {offsets.min()}..{offsets.max()} outside a span of {len(block)} rows")
        # mode="clip": with the default "raise", numpy stages `out` through a temporary (an extra copy).
        np.take(block, offsets, axis=0, out=out, mode="clip")


class SpanReader:
    """Reads spans of one array (see the module doc). Thread-safe: reads are positional."""

    def __init__(self, array: zarr.Array, may_be_absent: Callable[[str], bool] = lambda key: True):
        self.array, self.may_be_absent = array, may_be_absent
        self.row_shape, self.dtype = tuple(array.shape[1:]), np.dtype(array.dtype)
        self.chunk_rows = array.chunks[0]
        self.row_bytes = self.dtype.itemsize * math.prod(self.row_shape)
        self.fill_value = array.fill_value
        store, codecs = array.store_path.store, array.metadata.codecs
        # The chunk file's bytes are the rows in C order, as in memory: rows-only chunks of a fixed-size,
        # little-endian dtype on a little-endian machine (the bytes codec first).
        plain = (isinstance(store, LocalStore) and tuple(array.chunks[1:]) == self.row_shape
                 and isinstance(codecs[0], BytesCodec) and codecs[0].endian in (None, Endian.little)
                 and sys.byteorder == "little" and self.dtype.kind in "biuf" and hasattr(os, "preadv"))
        tail = tuple(type(c) for c in codecs[1:])
        self.mode, self.decoder = "zarr", None
        if plain and tail in ((), (Crc32cCodec,)):
            self.mode, self.checked = "raw", bool(tail)
        elif plain and len(tail) == 1 and tail[0] in DECODERS:
            self.mode, self.decoder = "decode", DECODERS[tail[0]]()
        self.root = Path(store.root) / array.store_path.path if isinstance(store, LocalStore) else None

    def chunk_key(self, k: int) -> str:
        return self.array.metadata.encode_chunk_key((k,) + (0,) * len(self.row_shape))

    def chunk_file(self, k: int) -> Path:
        return self.root / self.chunk_key(k)

    def read_into(self, start: int, stop: int, dest: Dest) -> None:
        k = start // self.chunk_rows
        if stop <= start or (stop - 1) // self.chunk_rows != k:
            raise ValueError(f"rows {start}..{stop - 1} are not one span of a {self.chunk_rows}-row chunk")
        if self.mode == "zarr":
            return take_rows(self.array[start:stop], dest)
        try:
            fd = os.open(self.chunk_file(k), os.O_RDONLY)
        except FileNotFoundError:
            key = f"{self.array.store_path.path}/{self.chunk_key(k)}"
            if not self.may_be_absent(key):
                raise MissingChunk(key) from None
            for out, _ in dest:  # never written: all fill value
                out[...] = self.fill_value
            return
        try:
            first = start - k * self.chunk_rows
            if self.mode == "raw" and not _overlapping(dest):
                return self._preadv(fd, k, first, dest)
            return take_rows(self._whole(fd, k)[first:], dest)
        finally:
            os.close(fd)

    def _preadv(self, fd: int, k: int, first: int, dest: Dest) -> None:
        """The wanted rows from their places in the chunk file into their `out` rows, in file order, one
        call per run of consecutive rows (at most IOV_MAX buffers; a destination whose rows are consecutive
        in the file is one buffer). With a checksum, the rows in between and the checksum are read too,
        into this thread's buffer, and the whole chunk is checked."""
        pieces = []  # (first row in the chunk, rows, buffer)
        for out, offsets in dest:
            if len(offsets) and offsets[-1] - offsets[0] == len(offsets) - 1 and np.all(np.diff(offsets) == 1):
                pieces.append((first + int(offsets[0]), len(offsets), out))
            else:
                pieces += [(first + int(o), 1, out[i:i + 1]) for i, o in enumerate(offsets)]
        pieces.sort(key=lambda p: p[0])
        if self.checked:  # fill the gaps: the checksum covers every row
            gap = _buffer("gap", self.chunk_rows * self.row_bytes + 4)
            rows, row = [], 0
            for piece in [*pieces, (self.chunk_rows, 0, None)]:
                if piece[0] > row:
                    rows.append((row, piece[0] - row, gap[row * self.row_bytes:piece[0] * self.row_bytes]))
                rows.append(piece)
                row = piece[0] + piece[1]
            pieces = rows[:-1] + [(self.chunk_rows, 0, gap[-4:])]  # the stored crc32c, after the rows
        run: list = []
        for i, piece in enumerate(pieces):
            run.append(piece)
            if i + 1 == len(pieces) or len(run) == IOV_MAX or pieces[i + 1][0] != piece[0] + piece[1]:
                want = sum(p[2].nbytes for p in run)
                if os.preadv(fd, [p[2] for p in run], run[0][0] * self.row_bytes) != want:
                    raise DamagedChunk(k, f"cannot be decoded (the file is shorter than its "
                                          f"{self.chunk_rows * self.row_bytes:,} bytes)")
                run = []
        if self.checked and _crc32c(p[2] for p in pieces[:-1]) != pieces[-1][2].tobytes():
            raise DamagedChunk(k, "cannot be decoded (its crc32c checksum does not match: the file changed "
                                 "after it was written)")

    def _whole(self, fd: int, k: int) -> np.ndarray:
        """The whole chunk in this thread's buffer (reused: fresh large buffers cost page faults), checked
        and decoded."""
        size = os.fstat(fd).st_size
        src = _buffer("src", size)
        if os.preadv(fd, [src], 0) != size:
            raise DamagedChunk(k, "cannot be decoded (the file changed while being read)")
        block = _buffer("block", self.chunk_rows * self.row_bytes)
        try:
            if self.mode == "raw":
                if size != block.nbytes + 4 * self.checked:
                    raise ValueError(f"{size:,} bytes instead of {block.nbytes + 4 * self.checked:,}")
                if self.checked and _crc32c([src[:-4]]) != src[-4:].tobytes():
                    raise ValueError("its crc32c checksum does not match: the file changed after it was written")
                block[:] = src[:block.nbytes]
            else:
                self.decoder.decode(src, out=block)
        except Exception as e:  # a damaged chunk fails in the codec with many error types
            raise DamagedChunk(k, f"cannot be decoded ({type(e).__name__}: {e})") from e
        return block.view(self.dtype).reshape(self.chunk_rows, *self.row_shape)


def _crc32c(buffers) -> bytes:
    """crc32c of the buffers' bytes one after the other, as Zarr's Crc32cCodec stores it (little-endian)."""
    crc = 0
    for buf in buffers:
        view = buf.view()
        view.flags.writeable = False  # google_crc32c takes read-only buffers only
        crc = google_crc32c.extend(crc, view)
    return np.uint32(crc).astype("<u4").tobytes()


def _overlapping(dest: Dest) -> bool:
    """Whether two destinations ask for the same row (then the chunk is read whole and taken from)."""
    if len(dest) == 1 and (len(dest[0][1]) < 2 or np.all(np.diff(dest[0][1]) > 0)):
        return False  # one destination, increasing rows (`Cache.read`'s spans)
    offsets = np.concatenate([o for _, o in dest]) if dest else np.empty(0, np.int64)
    return len(np.unique(offsets)) != len(offsets)


def _buffer(name: str, nbytes: int) -> np.ndarray:
    """This thread's reusable byte buffer `name`, exactly `nbytes` long (a view of one grown as needed)."""
    buf = getattr(_scratch, name, None)
    if buf is None or len(buf) < nbytes:
        buf = np.empty(nbytes, np.uint8)
        setattr(_scratch, name, buf)
    return buf[:nbytes]
