"""Streaming `.npz` I/O for 50K-image sample batches (~9.8 GB at 256^2) in bounded memory.

The files are plain uncompressed npz, as `np.savez` writes them and the ADM evaluator reads them
(`arr_0` uint8 NHWC); the writer streams chunks into the zip member and the reader streams batches
out of it, as the ADM evaluator's `StreamingNpzArrayReader` does. `check_images` refuses, in one line,
an image member the evaluator would misread (float, NCHW, greyscale, missing or truncated).
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np


def write_npz(path: str | os.PathLike, arrays: dict[str, tuple[tuple, np.dtype, Iterable[np.ndarray]]]) -> Path:
    """Write `{key: (shape, dtype, chunks along axis 0)}` as `key.npy` members, atomically: on any error
    (a full disk) the partial `.tmp` file is removed and `path` is untouched."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        _write_members(tmp, arrays)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and not e.filename:  # name the file (a failed write() does not)
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    os.replace(tmp, path)
    return path


def _write_members(tmp: Path, arrays: dict[str, tuple[tuple, np.dtype, Iterable[np.ndarray]]]) -> None:
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


def check_images(path: str | os.PathLike, key: str = "arr_0") -> tuple[int, ...]:
    """The shape of `key`, which must be uint8 images [N,H,W,3] (what the ADM evaluator and `reglue sample`
    use); else a one-line ValueError saying what was found and what to do."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; give an npz of uint8 images [N,H,W,3] (`reglue sample`)")
    expected = f"expected {key}: uint8 images [N,H,W,3] in 0..255, as `reglue sample` and the ADM evaluator use"
    try:
        with zipfile.ZipFile(path) as zf:
            members = [n.removesuffix(".npy") for n in zf.namelist()]
            if key not in members:
                raise ValueError(f"{path} has no {key} (it holds {members}); {expected}")
            stored = zf.getinfo(f"{key}.npy").file_size
        with _member(path, key) as (f, shape, dtype):
            header = f.tell()
            first = np.frombuffer(f.read(min(64 * 1024, stored - header)), np.uint8)
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise ValueError(f"{path} is not a complete npz (truncated or damaged: {e}); {expected}") from None
    if header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize != stored:
        raise ValueError(f"{path}: {key} holds {stored - header} bytes of data, its header {shape} {dtype} needs "
                         f"{int(np.prod(shape)) * dtype.itemsize} (truncated or damaged); {expected}")
    found = f"{path}: {key} is {dtype} {list(shape)}"
    if dtype != np.uint8:
        values = first[:len(first) // dtype.itemsize * dtype.itemsize].view(dtype) if dtype.kind in "fiu" else []
        seen = f" with values in [{values.min():.3g}, {values.max():.3g}] at its start" if len(values) else ""
        fix = " (images in [0, 1]: multiply by 255, round, clip, cast)" if dtype.kind == "f" else ""
        raise ValueError(f"{found}{seen}; {expected}{fix}")
    if len(shape) != 4 or shape[-1] != 3:
        why = ("greyscale" if len(shape) == 3 or (len(shape) == 4 and shape[-1] == 1) else
               "channels first (NCHW): transpose to NHWC with x.transpose(0, 2, 3, 1)" if len(shape) == 4
               and shape[1] in (1, 3) else "RGBA: drop the alpha channel" if len(shape) == 4 and shape[-1] == 4
               else "not an image batch")
        raise ValueError(f"{found} ({why}); {expected}")
    return shape


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
