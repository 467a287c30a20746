"""Labelled image folders of random pixels for the end-to-end tests."""

from pathlib import Path

import numpy as np
from PIL import Image


def write_class_images(folder: Path, count: int, classes: int, shape=(72, 80, 3), seed: int = 0,
                       name: str = "{i}.png") -> Path:
    """`count` random RGB PNGs in `folder`/class<k> (image i in class i % classes); returns `folder`."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        sub = folder / f"class{i % classes}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random(shape) * 255).astype(np.uint8)).save(sub / name.format(i=i))
    return folder
