"""State folders that resume without running code and never from a damaged file.

A state folder (a training checkpoint, trainer.runfolder) holds files of three kinds, each read back
with no unpickling of code:
- `NAME.safetensors`: a flat {name: tensor} dict (a JSON header and raw bytes);
- `NAME.json`: plain values;
- `NAME.pt`: plain containers of tensors and primitives (torch.save), read back with
  `torch.load(weights_only=True)` and no extra globals (pipeline.compressor.safe_load).
`manifest.json` is written last, with the size and sha256 of every other file: a folder is used
only once its manifest verifies, so a file truncated, flipped or swapped after the fact is seen
before it is loaded. Accelerate's save_state/load_state is not used: it pickles the registered
objects (`custom_checkpoint_*.pkl`, loaded with weights_only=False, i.e. any code runs) and the RNG
states, and it skips an unreadable RNG file silently.

A failed write raises the OSError naming the file (ENOSPC on a full disk; pipeline.compressor.torch_save
recovers it from torch's writer, which reports only "unexpected pos").
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reglue.pipeline.compressor import safe_load, torch_save

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class DamagedState(ValueError):
    """A state file does not match its manifest, or cannot be read (a ValueError: one line on the CLI)."""


# ---- writing ------------------------------------------------------------------------------------

def write(folder: str | os.PathLike, name: str, obj: Any) -> Path:
    """Write `obj` as `folder/name`, in the format its suffix names (.safetensors, .json or .pt)."""
    path = Path(folder) / name
    if not name.endswith((".safetensors", ".json", ".pt")):
        raise ValueError(f"{name}: a state file is .safetensors, .json or .pt")
    if name.endswith(".pt"):
        torch_save(obj, path)
        return path
    try:
        with open(path, "wb") as f:
            if name.endswith(".safetensors"):
                from safetensors.torch import save
                f.write(save({k: v.detach().cpu().contiguous() for k, v in obj.items()}))
            else:
                f.write(json.dumps(obj, indent=1).encode())
    except OSError as e:  # name the file (a failed write() does not)
        raise OSError(e.errno, e.strerror, str(path)) from None
    return path


def seal(folder: str | os.PathLike, **info) -> dict:
    """Write the manifest (size and sha256 of every other file, plus `info`), last."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)
    digests = _sha256_all(files)
    manifest = {"format": FORMAT_VERSION, **info,
                "files": {p.name: {"bytes": p.stat().st_size, "sha256": h} for p, h in zip(files, digests)}}
    write(folder, MANIFEST, manifest)
    return manifest


# ---- checking and reading -------------------------------------------------------------------------

def manifest(folder: str | os.PathLike) -> dict:
    """The folder's manifest; DamagedState when it is missing or unreadable."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise DamagedState(f"{path} is missing (the folder was cut short, or written by an older reglue)")
    try:
        found = json.loads(path.read_text())
        files = found["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not a mapping")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise DamagedState(f"{path} is unreadable ({type(e).__name__}: {e})") from None
    return found


def verify(folder: str | os.PathLike, names: list[str] | None = None) -> str | None:
    """None when every file the manifest lists (or `names` of them) is there with its size and sha256;
    else what is wrong, in a few words naming the file."""
    folder = Path(folder)
    try:
        files = manifest(folder)["files"]
    except DamagedState as e:
        return str(e)
    names = sorted(files) if names is None else names
    for name in names:
        path, want = folder / name, files.get(name)
        if want is None:
            return f"{name} is not in {MANIFEST}"
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, {MANIFEST} says {want['bytes']} (truncated or changed)"
    for name, digest in zip(names, _sha256_all([folder / n for n in names])):
        if digest != files[name]["sha256"]:
            return f"{name} does not match its sha256 in {MANIFEST} (damaged)"
    return None


def read(folder: str | os.PathLike, name: str) -> Any:
    """The inverse of `write`, with no code run; DamagedState (or UnsafeFileError) names the file."""
    path = Path(folder) / name
    if name.endswith(".pt"):
        return safe_load(path)  # its errors name the file in one line (UnsafeFileError included)
    try:
        if name.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(str(path))
        return json.loads(path.read_text())
    except Exception as e:  # SafetensorError, JSONDecodeError, UnicodeDecodeError, OSError
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise DamagedState(f"{path} cannot be read ({type(e).__name__}: {first})") from None


def sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _sha256_all(paths: list[Path]) -> list[str]:
    # hashlib releases the GIL on large buffers: the files of a checkpoint hash in parallel.
    with ThreadPoolExecutor(max(1, min(8, len(paths)))) as pool:
        return list(pool.map(sha256, paths))


# ---- the RNG states of this process, as plain values and tensors ---------------------------------

def rng_state() -> dict:
    """Python, NumPy, torch CPU and (when present) every CUDA generator of this process."""
    version, py_state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(py_state), gauss],
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
