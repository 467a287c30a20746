"""Streaming `.npz` I/O for 50K-image sample batches (~9.8 GB at 256^2) in bounded memory.

The files are plain uncompressed npz, as `np.savez` writes them and the ADM evaluator reads them
(`arr_0` uint8 NHWC); the writer streams chunks into the zip member and the reader streams batches
out of it, as the ADM evaluator's `StreamingNpzArrayReader` does.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np


def write_npz(path: str | os.PathLike, arrays: dict[str, tuple[tuple, np.dtype, Iterable[np.ndarray]]]) -> Path:
    """Write `{key: (shape, dtype, chunks along axis 0)}` as `key.npy` members, atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, (shape, dtype, chunks) in arrays.items():
            with zf.open(f"{key}.npy", "w", force_zip64=True) as f:
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                          "shape": tuple(shape)}
                np.lib.format.write_array_header_1_0(f, header)
                rows = 0
                for chunk in chunks:
                    chunk = np.ascontiguousarray(chunk, dtype=dtype)
                    if chunk.shape[1:] != tuple(shape[1:]):
                        raise ValueError(f"{key}: chunk of shape {chunk.shape} in an array of shape {shape}")
                    f.write(chunk.tobytes())
                    rows += len(chunk)
                if rows != shape[0]:
                    raise ValueError(f"{key}: wrote {rows} rows, the header says {shape[0]}")
    os.replace(tmp, path)
    return path


@contextmanager
def _member(path: str | os.PathLike, key: str):
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in read:
            raise ValueError(f"{path}:{key} has .npy format {version}; expected 1.0 or 2.0")
        shape, fortran, dtype = read[version](f)
        if fortran:
            raise ValueError(f"{path}:{key} is Fortran-ordered; save it C-ordered (np.savez does)")
        yield f, tuple(shape), dtype


def npz_shape(path: str | os.PathLike, key: str = "arr_0") -> tuple[int, ...]:
    """Shape of one member, read from its header only."""
    with _member(path, key) as (_, shape, _):
        return shape


def iter_npz(path: str | os.PathLike, key: str = "arr_0", batch: int = 64) -> Iterator[np.ndarray]:
    """Batches of rows of one member, without loading the whole array."""
    with _member(path, key) as (f, shape, dtype):
        row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        for start in range(0, shape[0], batch):
            n = min(batch, shape[0] - start)
            yield np.frombuffer(bytearray(f.read(n * row)), dtype=dtype).reshape(n, *shape[1:])  # writable
