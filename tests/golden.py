"""Golden-case plumbing shared by every parity test.

A case is a folder holding `case.json` (and usually `tensors.safetensors`) produced by running the
official code (see the golden README). Cases are found under `$REGLUE_GOLDEN_DIR`
(default: `../shared/golden` next to the repository) and dispatched on `case.json["case"]` to a
runner registered with `@runner("<kind>")`. A kind with no runner is skipped with a reason.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_GOLDEN_DIR = REPO.parent / "shared" / "golden"


def golden_dir() -> Path:
    return Path(os.environ.get("REGLUE_GOLDEN_DIR", DEFAULT_GOLDEN_DIR))


def case_folders() -> list[Path]:
    root = golden_dir()
    if not root.is_dir():
        return []
    return sorted(p.parent for p in root.glob("*/case.json"))


@dataclass
class Case:
    folder: Path
    meta: dict
    tensors: dict[str, torch.Tensor]

    @property
    def kind(self) -> str:
        return self.meta["case"]

    def state(self, prefix: str = "state.") -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    def tol(self) -> dict:
        t = self.meta.get("tolerance", {})
        return {"atol": t.get("atol", 0.0), "rtol": t.get("rtol", 0.0)}

    def sibling(self, name: str) -> Case:
        """A case this one shares weights with (e.g. `siloss` -> `../sit_forward`)."""
        return load_case(self.folder.parent / name)


def load_case(folder: Path) -> Case:
    from safetensors.torch import load_file

    meta = json.loads((folder / "case.json").read_text())
    tfile = folder / meta.get("tensor_file", "tensors.safetensors")
    tensors = load_file(str(tfile)) if tfile.exists() else {}
    return Case(folder, meta, tensors)


def make_input(grid, width: int, height: int):
    """The golden README's integer-only image recipe (`inputs.input_recipe`), verbatim in effect."""
    import numpy as np

    gh, gw, _ = grid.shape
    G = grid.astype(np.int64)
    ys = np.arange(height, dtype=np.int64) * (gh - 1)
    iy, ry = ys // (height - 1), ys % (height - 1)
    xs = np.arange(width, dtype=np.int64) * (gw - 1)
    ix, rx = xs // (width - 1), xs % (width - 1)
    iy1, ix1 = np.minimum(iy + 1, gh - 1), np.minimum(ix + 1, gw - 1)
    wy0, wy1 = (height - 1 - ry)[:, None, None], ry[:, None, None]
    wx0, wx1 = (width - 1 - rx)[None, :, None], rx[None, :, None]
    acc = (G[iy][:, ix] * wy0 * wx0 + G[iy1][:, ix] * wy1 * wx0
           + G[iy][:, ix1] * wy0 * wx1 + G[iy1][:, ix1] * wy1 * wx1)
    base = acc // ((height - 1) * (width - 1))
    yy = np.arange(height, dtype=np.int64)[:, None, None]
    xx = np.arange(width, dtype=np.int64)[None, :, None]
    cc = np.arange(3, dtype=np.int64)[None, None, :]
    texture = (xx * 37 + yy * 61 + cc * 17) % 13 - 6
    return np.clip(base + texture, 0, 255).astype(np.uint8)


RUNNERS: dict[str, Callable[[Case], None]] = {}


def runner(kind: str):
    def register(fn: Callable[[Case], None]):
        RUNNERS[kind] = fn
        return fn
    return register
