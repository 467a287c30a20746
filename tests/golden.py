"""Golden-case plumbing shared by every parity test.

A case is a folder holding `case.json` (and usually `tensors.safetensors`) produced by running the
official code (see tests/golden/README.md). Cases are found under `$REGLUE_GOLDEN_DIR`, by default
the public cases shipped in `tests/golden/`, and dispatched on `case.json["case"]` to a runner
registered with `@runner("<kind>")`. A kind with no runner is skipped with a reason.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from reglue.trainer.draws import Draws

DEFAULT_GOLDEN_DIR = Path(__file__).resolve().parent / "golden"


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

    def tol(self, quantity: str | None = None) -> dict:
        """assert_close kwargs from `tolerance` (or its `quantity` entry, for a per-quantity tolerance)."""
        t = self.meta.get("tolerance", {})
        if quantity is not None:
            t = t[quantity]
        return {"atol": t.get("atol", 0.0), "rtol": t.get("rtol", 0.0)}

    def sibling(self, name: str) -> Case:
        """A case this one shares weights with (e.g. `siloss` -> `../sit_forward`)."""
        return load_case(self.folder.parent / name)

    def model_state(self) -> dict[str, torch.Tensor]:
        """The SiT weights a case names under `model.source` ("... (folder ../sit_forward)")."""
        found = re.search(r"folder \.\./([\w.-]+)", self.meta["model"]["source"])
        return self.sibling(found.group(1) if found else "sit_forward").state()


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


class Replay(Draws):
    """Recorded draws served through the production seam (trainer.draws.Draws) in the case's order.

    `order` is the case's list of "torch.<fn>(...) -> <name>" strings; `tensor(name)` returns the
    recorded value. Every call must be the next one listed, by the same torch function and with the
    same shape, so a step that draws in another order, or a draw too many or too few, fails."""

    CALLS = {"posterior": "torch.randn_like", "time": "torch.rand", "time_normal": "torch.randn",
             "noise": "torch.randn_like", "noise_cls": "torch.randn_like", "label_drop": "torch.rand"}

    def __init__(self, order: list[str], tensor: Callable[[str], torch.Tensor]):
        self.pending = [(call.split("(")[0].strip(), name.strip()) for call, name in (o.split("->") for o in order)]
        self.tensor, self.served = tensor, []

    def _serve(self, role: str, shape, like: torch.Tensor | None = None) -> torch.Tensor:
        where = f"draw {len(self.served)} ({role})"
        assert self.pending, f"{where}: the reference drew nothing more (served {self.served})"
        call, name = self.pending.pop(0)
        assert call == self.CALLS[role], f"{where}: the step calls {self.CALLS[role]}, the reference {call} -> {name}"
        value = self.tensor(name)
        assert tuple(value.shape) == tuple(shape), f"{where}: shape {tuple(shape)}, {name} {tuple(value.shape)}"
        self.served.append(name)
        value = value.float() if value.dtype == torch.float16 else value
        return value if like is None else value.to(like)

    def posterior(self, mean):
        return self._serve("posterior", mean.shape, mean)

    def time(self, shape):
        return self._serve("time", shape)

    def time_normal(self, shape):
        return self._serve("time_normal", shape)

    def noise(self, x):
        return self._serve("noise", x.shape, x)

    def noise_cls(self, cls):
        return self._serve("noise_cls", cls.shape, cls)

    def label_drop(self, labels):
        return self._serve("label_drop", labels.shape).to(labels.device)

    def finished(self) -> None:
        assert not self.pending, f"the step drew fewer values than the reference: {self.pending} left"


RUNNERS: dict[str, Callable[[Case], None]] = {}


def runner(kind: str):
    def register(fn: Callable[[Case], None]):
        RUNNERS[kind] = fn
        return fn
    return register
