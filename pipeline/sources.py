"""Image sources: which files, with which labels, and how one file becomes a uint8 crop.

Three source kinds, all ordered deterministically (edm2 `dataset_tools.py:65-95`, which the
reference's `convert` step uses):
- a class-folder tree (ImageNet layout): label = index of the top-level folder in sorted order;
- a flat folder (no sub-folders): label -1;
- a text file list: one `path [label]` per line, paths relative to the list's folder or absolute.
Every image goes through `load_image`: decode, convert to RGB, ADM center crop. EXIF orientation is
not applied, as the reference's `PIL.Image.open(f).convert('RGB')` (edm2 `dataset_tools.py`) does not.

Each file read is also stamped (size, modification time, a hash of its bytes) so that a rerun of
`extract` can tell a source changed in place from one it has already encoded (`file_stamp`).
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

Image.init()
IMAGE_EXTENSIONS = frozenset(Image.EXTENSION)
"""Every file extension Pillow can open (lower case, with the dot), as edm2 `is_image_ext`."""


class BadImage(ValueError):
    """A source file that cannot become an RGB crop (unreadable, truncated, not an image)."""

    def __init__(self, reason: str, stamp: tuple[int, int, str] | None = None):
        super().__init__(reason)
        self.reason, self.stamp = reason, stamp


# ---- listing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceList:
    """The ordered samples of one source; sample i is `paths[i]` with `labels[i]`."""

    root: Path
    """Folder the paths are relative to (the source folder, or the list file's folder)."""
    paths: tuple[str, ...]
    """Per sample: path relative to `root`, '/'-separated (absolute if the list gave one)."""
    labels: tuple[int, ...]
    """Per sample: class index, -1 when unlabelled."""
    class_names: tuple[str, ...] = ()
    """Class folder names in label order (empty for flat folders and file lists)."""
    empty_classes: tuple[str, ...] = ()
    """Class folders holding no image file; they still take their label index."""
    kind: str = "classes"
    """How the source was read: "classes", "flat" or "list"."""

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        """Class count: the class folders, else one more than the largest label given."""
        return len(self.class_names) or max(self.labels, default=-1) + 1

    def path(self, index: int) -> Path:
        return self.root / self.paths[index]


def is_image_file(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _image_files(folder: Path) -> list[str]:
    """Image files below `folder`, recursively, as sorted '/'-separated relative paths.

    Sorting the relative path strings gives edm2's order (it sorts full paths with a common prefix).
    Hidden entries (".name") are skipped, so that e.g. `.ipynb_checkpoints` never becomes a class.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = Path(dirpath).relative_to(folder).as_posix()
        prefix = "" if rel == "." else rel + "/"  # string joins: a Path per file costs minutes at 14M files
        found += [prefix + f for f in filenames if not f.startswith(".") and is_image_file(f)]
    return sorted(found)


def _scan_folder(root: Path) -> SourceList:
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        paths = _image_files(root)
        return SourceList(root, tuple(paths), (-1,) * len(paths), kind="flat")
    stray = [p for p in _image_files(root) if "/" not in p]
    if stray:
        raise ValueError(f"{root} mixes class folders with top-level images ({stray[0]!r}, ...): "
                         "move the images into a class folder, or pass a file list")
    paths, labels, empty = [], [], []
    # Labels are the index among ALL sorted class folders, empty ones included, so that ImageNet's
    # sorted wnids give 0..999 even if a class folder is empty (edm2 would renumber; we do not).
    for label, name in enumerate(classes):
        files = _image_files(root / name)
        paths += [f"{name}/{f}" for f in files]
        labels += [label] * len(files)
        if not files:
            empty.append(name)
    return SourceList(root, tuple(paths), tuple(labels), tuple(classes), tuple(empty), "classes")


def _scan_list(list_file: Path) -> SourceList:
    paths, labels, seen = [], [], {}
    parent = os.path.normpath(str(list_file.parent.absolute()))
    for n, line in enumerate(_lines(list_file), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        head, _, last = line.rpartition(" ")
        if head and last.lstrip("-").isdigit():
            path, label = head.strip(), int(last)
        else:
            path, label = line, -1
        if label < -1:
            raise ValueError(f"{list_file}:{n}: label {label} must be >= 0 (or -1 for none)")
        # A repeated file would be one sample twice (and maybe with two labels): refused, not kept. The key
        # is the normalized path relative to the list's folder (absolute outside it); a plain relative
        # path is its own key (no string built per line: a 14M-line list would double its RAM).
        normal = _normal(path)
        if normal and not path.startswith("/") and ".." not in path.split("/"):
            where = path
        else:
            where = os.path.normpath(os.path.join(parent, path))
            where = where[len(parent) + 1:] if where.startswith(parent + "/") else where
        if where in seen:
            raise ValueError(f"{list_file}:{n}: {path} is the same file as line {seen[where]}; remove the repeated "
                             "line (a cache holds each source file once)")
        seen[where] = n
        paths.append(path if normal else Path(path).as_posix())
        labels.append(label)
    return SourceList(list_file.parent, tuple(paths), tuple(labels), kind="list")


def _lines(path: Path) -> Iterator[str]:
    """`path.read_text().splitlines()`, read a line at a time: a 14M-line list held whole, text and
    lines, is ~1.5 GB."""
    with open(path) as f:
        for line in f:
            yield from line.splitlines() or [""]


def _normal(path: str) -> bool:
    """Whether `Path(path).as_posix() == path` is certain without building the Path (~3 us each: a
    minute for a 14M-line list): no empty or "." component, no trailing slash."""
    return not ("//" in path or "/./" in path or path.startswith("./") or path.endswith(("/", "/."))
                or path in ("", "."))


def scan(src: str | Path) -> SourceList:
    """List the samples of a class-folder tree, a flat folder, or a text file list."""
    src = Path(src)
    if src.is_dir():
        return _scan_folder(src)
    if src.is_file():
        return _scan_list(src)
    raise FileNotFoundError(f"image source {src} does not exist (give a folder or a text file list)")


# ---- decoding --------------------------------------------------------------------------------


def center_crop(img: Image.Image, resolution: int) -> np.ndarray:
    """ADM center crop (edm2 `center_crop_imagenet`, `dataset_tools.py:168-187`) -> uint8 [R,R,3].

    BOX-halve while the short side is >= 2R, BICUBIC-resize the short side to R (Python `round`,
    half to even), then take the central RxR window. Bitwise equal to the reference with Pillow.
    """
    while min(img.size) >= 2 * resolution:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.Resampling.BOX)
    scale = resolution / min(img.size)
    size = tuple(round(x * scale) for x in img.size)
    if size[0] * size[1] > Image.MAX_IMAGE_PIXELS:
        # e.g. a 1x100000 strip would upsample to 256x25.6M pixels: refuse instead of exhausting memory
        raise BadImage(f"aspect ratio {img.size[0]}x{img.size[1]} too extreme to crop")
    arr = np.asarray(img.resize(size, resample=Image.Resampling.BICUBIC))
    y, x = (arr.shape[0] - resolution) // 2, (arr.shape[1] - resolution) // 2
    return arr[y:y + resolution, x:x + resolution]


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB as the reference's `convert('RGB')` (alpha dropped, CMYK/palette/grey converted).

    Exception: 16-bit and 32-bit integer / float greyscale, which `convert` would clip at 255; they
    are rescaled so that full scale maps to 255.
    """
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        a = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            full = 1.0 if a.max(initial=0.0) <= 1.0 else 255.0  # float images: [0,1] or [0,255]
        else:
            full = 255.0 if a.max(initial=0.0) <= 255 else 65535.0  # "I" may hold 8- or 16-bit data
        a = np.clip(np.rint(a * (255.0 / full)), 0, 255).astype(np.uint8)
        img = Image.fromarray(a, mode="L")
    return img if img.mode == "RGB" else img.convert("RGB")


MISSING = (-1, 0, "")
"""The stamp of a file that is not there (or a dangling symlink)."""


def file_stamp(path: str | Path) -> tuple[int, int]:
    """(size, modification time in ns) of the file `path` names (symlinks followed), or MISSING[:2]."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return MISSING[:2]
    return st.st_size, st.st_mtime_ns


def content_hash(data: bytes) -> str:
    """A short hash of a file's bytes (blake2b, 64 bits: change detection, not security)."""
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def read_source(path: str | Path) -> tuple[bytes, tuple[int, int, str]]:
    """A file's bytes and its stamp (size, mtime_ns, content hash) taken from the open file itself, so
    that the stamp describes the bytes read even if the file is replaced meanwhile."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read()
    except (FileNotFoundError, NotADirectoryError) as e:
        raise BadImage(f"{type(e).__name__}: {e}", MISSING) from e
    except OSError as e:
        raise BadImage(f"{type(e).__name__}: {e}", (*file_stamp(path), "")) from e
    return data, (st.st_size, st.st_mtime_ns, content_hash(data))


def decode_image(data: bytes, resolution: int) -> np.ndarray:
    """A file's bytes -> uint8 [3,R,R] crop, or `BadImage` saying why it cannot be used."""
    if not data:
        raise BadImage("empty file (0 bytes)")
    try:
        # No ImageOps.exif_transpose: the reference ignores EXIF orientation (edm2 dataset_tools.py).
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # decode now: a truncated file fails here, not later
            rgb = to_rgb(img)
        return np.ascontiguousarray(center_crop(rgb, resolution).transpose(2, 0, 1))
    except BadImage:
        raise
    except UnidentifiedImageError as e:  # its message names the in-memory buffer: say it without
        raise BadImage(f"{type(e).__name__}: cannot identify image file (not an image format Pillow reads)") from e
    except Exception as e:  # Pillow raises many types (OSError, SyntaxError, ValueError, DecompressionBombError)
        raise BadImage(f"{type(e).__name__}: {e}") from e


def load_image(path: str | Path, resolution: int) -> np.ndarray:
    """Decode one file to a uint8 [3,R,R] crop, or raise `BadImage` saying why it cannot be used."""
    return decode_image(read_source(path)[0], resolution)


class ImageDataset(torch.utils.data.Dataset):
    """Crops for DataLoader workers: item = (index, uint8 [3,R,R], ok, reason), plus with `stamps` the
    file's (size, mtime_ns, hash) as read (`read_source`).

    A file that fails to decode gives zeros, ok=False and the reason, so a bad file never kills a
    worker; the caller records it as skipped.
    """

    def __init__(self, sources: SourceList, resolution: int, indices: Sequence[int] | None = None,
                 stamps: bool = False):
        self.sources = sources
        self.resolution = resolution
        self.indices = list(range(len(sources))) if indices is None else list(indices)
        self.stamps = stamps

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple:
        index, stamp = self.indices[i], None
        try:
            data, stamp = read_source(self.sources.path(index))
            item = index, torch.from_numpy(decode_image(data, self.resolution)), True, ""
        except BadImage as e:
            stamp = e.stamp or stamp
            item = index, torch.zeros(3, self.resolution, self.resolution, dtype=torch.uint8), False, e.reason
        return (*item, stamp) if self.stamps else item
