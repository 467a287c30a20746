"""The cache contract: the one module both stages share.

A cache is a Zarr v3 group (any fsspec URL; a local folder by default). The full format, with the
measurements behind chunking and codecs, is in docs/cache-format.md. N = planned samples, P = patch
tokens, D = DINOv2 width, L = number of multi-layer features, zc = VAE latent channels, h = latent side:

  vae_moments   [N, 2*zc, h, h]   float16   posterior mean (ch 0..zc-1) then std (zc..2zc-1), unscaled
  vae_moments_flip [N, 2*zc, h, h] float16  the same for the horizontally mirrored crop; optional (--flip)
  cls           [N, D]            float32   DINOv2 last-layer [CLS] after the final norm
  patches       [N, P, D]         int8      last-layer patch tokens (REPA target), `meta.patches_encoding`
  patches_scale [N, P]            float16   their per-token scale (present when the encoding has one)
  layers        [M, P, L*D]       float16   layers 8..11 (normed), channel order [L8|L9|L10|L11], subset only
  layers_index  [M]               int64     global sample index of each `layers` row: floor(j*N/M)
  compressed    [N, c, g, g]      float16   compressor output at the DINO grid (g = sqrt(P)); optional
  labels        [N]               int64     class index (sorted class folders), -1 when unlabelled
  valid         [N]               bool      False for a source that could not be decoded (skipped)
  paths         [N]               str       source path relative to `meta.source["root"]`

Chunk k covers samples [k*C, (k+1)*C) of every per-sample array and the `layers` rows whose sample
falls there; one process writes all of it, then a done marker `_markers/<namespace>/<k>` holding
the sha256 of every array region it wrote. `meta.complete` is set only once every marker verifies.

Readers never see a fill value for a chunk that should hold data: `Cache.open` refuses a store whose
chunks are not all marked and present (one listing), and `Cache.read` turns a chunk that is missing
or fails to decode into `DamagedCache`, one line naming the array, the chunk and the fix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import torch
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.storage import WrapperStore

from reglue.pipeline import codec
from reglue.pipeline.chunkio import DamagedChunk, Dest, MissingChunk, SpanReader
from reglue.pipeline.compressor import describe_key

FORMAT_VERSION = 1
ATTR = "reglue"
CREATING_ATTR = "reglue_creating"  # set while arrays are being created; a store left so is re-created
MARKERS = "_markers"
LAYER_ARRAYS = ("layers",)  # arrays indexed by layers row j, not by sample

# Codecs per array, chosen by measurement (bench/codec_choice.py, BENCHMARKS.md "Codecs per array"): a
# codec is kept where the share of the bytes it saves exceeds the share of the loader's CPU it adds. None
# does: zstd saves ~8 % of int8 `patches` (87 % of a sample's bytes) for ~10x the CPU of reading them
# raw with a checksum (+220 % of the loader's CPU), ~8-10 % of the fp16 arrays for ~10x; blosc-lz4 saves
# nothing on these near-random bytes; `layers` rows (read by train-compressor, 6 GB per step) save ~8 %
# for ~10x. So chunks are stored raw, read by `preadv` straight into the batch buffers
# (pipeline/chunkio.py), each with a crc32c checksum (4 B per chunk, checked at every read at ~25 GB/s):
# a damaged chunk fails its read, as zstd's frame checksum makes it fail to decode (without one, 2 of 3
# flipped byte positions tried read silently as wrong values).
COMPRESSORS = (ZstdCodec(level=3, checksum=True),)  # arrays read outside training: `paths` (~3x smaller)
CODECS: dict[str, tuple] = dict.fromkeys(
    ("vae_moments", "vae_moments_flip", "cls", "patches", "patches_scale", "labels", "valid", "compressed",
     "layers"), (Crc32cCodec(),))
"""Compressors of each array written per chunk. Each array's `zarr.json` records its own, so a store
written with other codecs (zstd-3 on every array, before these) reads the same."""
PATHS_CHUNK = 65536


# ---- metadata --------------------------------------------------------------------------------

@dataclass(frozen=True)
class CacheMeta:
    """Everything needed to consume and to reproduce a cache (group attribute `reglue`)."""

    num_samples: int
    """N: planned samples, one per listed source file (skipped ones stay, with valid=False)."""
    chunk_size: int
    """C: samples per chunk of every per-sample array; also the unit of work and of resume."""
    resolution: int
    """Side of the square ADM center crop fed to both encoders."""
    latent_channels: int
    """zc: VAE latent channels; `vae_moments` has 2*zc (mean then std)."""
    latent_size: int
    """h: latent side (resolution // 8)."""
    vae_scaling_factor: float
    """Multiply a posterior sample by this before the SiT sees it (0.18215, reference train.py:184)."""
    dino_dim: int
    """D: the vision encoder's token width (768 for DINOv2-B, the reference's; `encoders["encoder"]` names it)."""
    num_patches: int
    """P: patch tokens per image (grid**2)."""
    grid: int
    """g: the encoder's patch grid side (resolution / 16)."""
    layers: tuple[int, ...]
    """Block indices of the multi-layer features (the encoder's last four by default: 8..11 for ViT-B)."""
    layers_count: int
    """M: samples that keep the multi-layer features (`layers` rows); 0 = none."""
    num_classes: int
    """Number of classes (class folders, empty ones included); 0 for unlabelled sources."""
    class_names: tuple[str, ...]
    """Class folder names in label order."""
    encoders: dict
    """The FeatureEncoder's `meta()` plus its EncoderSpec: model ids, revisions, the encoder's architecture and
    preprocessing, precision. (Caches of reglue before the encoder was a choice name it under "dino".)"""
    patches_encoding: str
    """Name of the token encoding of `patches`/`patches_scale` (pipeline/codec.py)."""
    dtypes: dict
    """Stored dtype of every array written per chunk, by name; an array is present iff listed here."""
    source: dict
    """root (absolute), kind, count, sha256 of the (path, label) listing, empty_classes."""
    versions: dict
    """Package versions of the run that created the store."""
    compressed_channels: int = 0
    """c: channels of `compressed` (0 when absent)."""
    compressor: dict | None = None
    """Provenance of `compressed`: compressor file name, sha256, channel list; and its norm stats'."""
    skipped: tuple[dict, ...] = ()
    """Samples that could not be decoded: {index, path, reason}; filled when the store completes."""
    complete: bool = False
    """True once every chunk of the extract namespace has a verified done marker."""
    format_version: int = FORMAT_VERSION
    """Version of this layout; readers refuse a version they do not know."""

    @classmethod
    def from_dict(cls, d: dict) -> CacheMeta:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"cache metadata has unknown keys {sorted(unknown)} (written by a newer reglue?)")
        d = dict(d)
        for key in ("layers", "class_names", "skipped"):
            d[key] = tuple(d.get(key, ()))
        return cls(**d)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # tuples -> lists, as stored

    @property
    def encoder(self) -> dict:
        """The vision encoder's record: name, preset, source, revision, architecture (`encoders["encoder"]`)."""
        return encoder_record(self.encoders)

    @property
    def encoder_depth(self) -> int:
        """The encoder's number of blocks (its last one gives the [CLS] token and the REPA target)."""
        return self.encoder.get("depth") or self.encoders.get("dino_depth") or self.layers[-1] + 1

    def encoder_key(self) -> dict:
        """What norm stats and a compressor must have been made from to be used on this cache's features."""
        return make_encoder_key(self.encoder.get("name"), self.encoders.get("preset"), self.layers, self.dino_dim,
                                self.grid)

    def describe_encoder(self) -> str:
        """One line for `reglue cache info`: the encoder, its weights, tokens, layers and preprocessing."""
        e, pre = self.encoder, self.encoders.get("preprocessing", {}).get("encoder")
        tokens = (f"{e['class']} /{e['patch_size']}, depth {e['depth']}, [CLS] + {e['registers']} registers, "
                  if "class" in e else "")
        resize = (pre or {}).get("resize")
        prep = ("" if pre is None else f"; input x/255, mean {pre['mean']} std {pre['std']}, "
                + (f"{resize['mode']} resize to {resize['size']} (no antialias)" if resize else "no resize"))
        return (f"encoder {e.get('name')} ({self.encoders.get('preset')} weights from {e.get('source')}, revision "
                f"{e.get('revision')}): {tokens}width {self.dino_dim}, grid {self.grid}x{self.grid}, "
                f"layers {list(self.layers)}{prep}")

    def identity(self) -> dict:
        """The fields that decide what `extract` stores: a rerun may resume a store only if they match.

        Compressed features added later by `fill_compressed` are not part of it."""
        d = self.to_dict()
        if (d["compressor"] or {}).get("stage") == "fill":
            d["compressor"], d["dtypes"] = None, {k: v for k, v in d["dtypes"].items() if k != "compressed"}
        keep = ("format_version", "num_samples", "chunk_size", "resolution", "layers", "layers_count",
                "encoders", "patches_encoding", "dtypes", "compressor")
        return {k: d[k] for k in keep} | {"source": d["source"]["sha256"]}


def make_encoder_key(name: str | None, preset: str | None, layers, width: int, grid: int) -> dict:
    """The identity of a set of encoder features: encoder id, weights preset, layers, width and grid. Norm
    stats and a compressor record the key of the features they were made from (pipeline.compressor)."""
    return {"encoder": name, "preset": preset, "layers": list(layers), "width": width, "grid": grid}


def encoder_record(encoders: dict) -> dict:
    """The vision encoder's record in a cache's `encoders` metadata (stores of reglue before the encoder was
    a choice name it "dino")."""
    return encoders.get("encoder") or encoders.get("dino") or {}


def digest(obj: Any) -> str:
    """sha256 of a JSON value (sorted keys) or of an array's C-order bytes."""
    if isinstance(obj, np.ndarray):
        return hashlib.sha256(np.ascontiguousarray(obj).view(np.uint8).data).hexdigest()
    h = hashlib.sha256()
    for piece in _json_pieces(obj):
        h.update(piece.encode())
    return h.hexdigest()


def _json_pieces(obj: Any, size: int = 65536) -> Iterator[str]:
    """`json.dumps(obj, sort_keys=True)` in pieces, a long list `size` items at a time: the listing of
    ImageNet-21K's 14M paths would otherwise be one ~1 GB string."""
    if not isinstance(obj, (list, tuple)) or (len(obj) <= size and not any(
            isinstance(x, (list, tuple)) and len(x) > size for x in obj)):
        yield json.dumps(obj, sort_keys=True)
        return
    yield "["
    long = len(obj) > size
    for i in range(0, len(obj), size if long else 1):
        if i:
            yield ", "
        if long:
            yield json.dumps(list(obj[i:i + size]), sort_keys=True)[1:-1]
        else:
            yield from _json_pieces(obj[i], size)
    yield "]"


def describe_difference(stored: dict, wanted: dict) -> str:
    """Name every (dotted, nested) key whose value differs, with both values (shortened)."""
    stored, wanted = _flatten(stored), _flatten(wanted)
    short = lambda v: (s if len(s := json.dumps(v, sort_keys=True)) <= 120 else s[:117] + "...")
    return "; ".join(f"{k}: store has {short(stored.get(k))}, this run wants {short(wanted.get(k))}"
                     for k in sorted(set(stored) | set(wanted)) if stored.get(k) != wanted.get(k))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out |= _flatten(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v}
    return out


def layer_sample_indices(num_samples: int, count: int) -> np.ndarray:
    """Global sample index of each `layers` row: j -> floor(j*N/M), evenly spread, strictly increasing."""
    count = min(count, num_samples)
    return (np.arange(count, dtype=np.int64) * num_samples) // max(count, 1)


# ---- locating a store ------------------------------------------------------------------------

def _local(url: str) -> str:
    # zarr's fsspec store does not create parent folders for file:// URLs; a plain path does.
    return url.removeprefix("file://")


def probe(url: str) -> str:
    """What is at `url`: "absent" (or a folder holding only dot-files, like the repository's
    `cache/.gitignore`), "cache", "partial" (creation was cut), "other"."""
    fs, path = fsspec.core.url_to_fs(_local(url))
    if not fs.exists(path) or (fs.isdir(path) and not _visible_entries(fs, path)):
        return "absent"
    if fs.isfile(path) or not fs.exists(f"{path}/zarr.json"):
        return "other"
    attrs = _load_json(fs, f"{path}/zarr.json").get("attributes", {})
    return "cache" if ATTR in attrs else "partial" if CREATING_ATTR in attrs else "other"


def _load_json(fs, path: str) -> dict:
    """A metadata file, or an error naming it (not the bare `Expecting ':' delimiter` of a truncated one)."""
    try:
        return json.loads(fs.cat_file(path))
    except (ValueError, UnicodeDecodeError) as e:
        raise DamagedCache(f"{path} is damaged (not valid JSON: {e}); nothing was changed. Restore it from a "
                           "copy of the store, or extract again into a new --out") from None


def _visible_entries(fs, path: str) -> list[str]:
    return [p for p in fs.ls(path, detail=False) if not p.rstrip("/").rsplit("/", 1)[-1].startswith(".")]


def refuse_foreign(url: str) -> str:
    """`probe(url)`, raising if something other than a cache is there (it is never touched)."""
    state = probe(url)
    if state == "other":
        raise FileExistsError(f"{url} exists and is not a reglue cache; nothing was changed. "
                              "Choose another --out, or remove it yourself")
    return state


# ---- damage: what readers must never see as data --------------------------------------------

class DamagedCache(ValueError):
    """A chunk that is missing, has no done marker or does not decode, or a damaged metadata file:
    one line naming it and the fix (the CLI prints ValueErrors as `error: ...`)."""


class _StrictStore(WrapperStore):
    """A zarr store that reads a missing chunk as an error instead of as the fill value (zarr 3.1 has no
    option for this; zarr-python PR #3748 adds one later). `may_be_absent(key)` names the chunks that may
    legitimately have no file: all-zero chunks that stores written before `write_empty_chunks` skipped."""

    def __init__(self, store, may_be_absent: Callable[[str], bool] = lambda key: False):
        super().__init__(store)
        self.may_be_absent = may_be_absent

    def _with_store(self, store):
        return type(self)(store, self.may_be_absent)

    async def get(self, key, prototype, byte_range=None):
        value = await self._store.get(key, prototype, byte_range)
        if value is None and "/c/" in f"/{key}" and not self.may_be_absent(key):
            raise MissingChunk(key)
        return value


def repair_command(namespace: str = "extract") -> str:
    """How to repair a chunk of `namespace`: rerun the command that wrote it (it redoes exactly the
    chunks that fail verification)."""
    return ("rerun the same `reglue extract` command" if namespace == "extract" else
            "rerun `reglue fill-compressed` with the same compressor (or `reglue train-compressor --fill`)")


def repair_hint(url: str, namespace: str = "extract") -> str:
    return f"{repair_command(namespace)} to repair it (`reglue cache verify {url}` lists every damaged chunk)"


# ---- the store -------------------------------------------------------------------------------

class Cache:
    """A feature cache: read side for the trainer, chunk writes and markers for extraction."""

    def __init__(self, group: zarr.Group, url: str):
        self.group, self.url = group, url
        self.meta = CacheMeta.from_dict(group.attrs[ATTR])
        if self.meta.format_version != FORMAT_VERSION:
            raise ValueError(f"{url}: cache format version {self.meta.format_version}, this reglue reads "
                             f"version {FORMAT_VERSION}; re-extract or use a matching reglue")
        self._arrays: dict[str, zarr.Array] = {}
        self._strict: zarr.Group | None = None  # set by `require_intact`: reads refuse missing chunks
        self._readers: dict[str, zarr.Array] = {}
        self._absent: set[str] | None = None  # with `_strict`: the chunk files that may be absent
        self._spans: dict[tuple[str, bool], SpanReader] = {}
        self._fs, self._root = fsspec.core.url_to_fs(_local(url))
        self._root = self._root.rstrip("/")

    # -- opening and creating

    @classmethod
    def open(cls, url: str, *, mode: str = "r", allow_incomplete: bool = False) -> Cache:
        """Open an existing cache; refuses an incomplete one unless `allow_incomplete`."""
        state = probe(url)
        if state != "cache":
            raise FileNotFoundError(f"{url} is not a reglue cache ({state}); create one with `reglue extract`")
        cache = cls(zarr.open_group(_local(url), mode=mode, zarr_format=3), url)
        if allow_incomplete:
            return cache
        cache.require_complete()
        cache.require_intact()
        return cache

    def require_complete(self) -> None:
        if not self.meta.complete:
            raise ValueError(f"{self.url} is incomplete (extraction still running or stopped early): rerun the "
                             "same `reglue extract` command to finish it, or check `reglue cache info`")
        if self.meta.patches_encoding != codec.ENCODING:
            raise ValueError(f"{self.url} encodes patches as {self.meta.patches_encoding!r}; this reglue decodes "
                             f"{codec.ENCODING!r} only")

    def require_intact(self, namespaces: Iterable[str] | None = None) -> None:
        """Refuse in one line a store whose chunks are not all marked done and present: a listing (one
        stat per chunk file on a local disk), no chunk is read. From then on `read` refuses a chunk file
        that vanished or does not decode, instead of reading zarr's fill value."""
        problems, absent = self.inspect(namespaces)
        if problems:
            ns, text = problems[0]
            more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
            raise DamagedCache(f"{self.url}: {text}{more}; {repair_hint(self.url, ns)}")
        absent |= self._zero_layer_rows()
        self._strict = zarr.open_group(_StrictStore(self.group.store, absent.__contains__), mode="r", zarr_format=3)
        self._readers, self._absent, self._spans = {}, absent, {}

    @classmethod
    def create_or_resume(cls, url: str, meta: CacheMeta, paths: list[str], *, create: bool = True) -> Cache:
        """The store for `meta`: created if absent, reopened if it holds the same config, else an error.

        Nothing is changed when the answer is an error. With `create=False` (non-zero ranks, after rank
        0 has created it) an absent store is an error too."""
        state = refuse_foreign(url)
        if state == "cache":
            cache = cls.open(url, mode="r+", allow_incomplete=True)
            stored, wanted = cache.meta.identity(), meta.identity()
            if cache.meta.encoder_key() != meta.encoder_key():
                raise ValueError(f"{url} holds features of encoder {describe_key(cache.meta.encoder_key())}; this run "
                                 f"asks for {describe_key(meta.encoder_key())}. A store holds one encoder: nothing "
                                 "was changed; choose another --out for the new encoder")
            if stored != wanted:
                raise ValueError(f"{url} holds a cache made with a different config; nothing was changed. "
                                 f"Differences: {describe_difference(stored, wanted)}. Rerun with the store's "
                                 "settings, or choose another --out")
            return cache
        if not create:
            raise FileNotFoundError(f"{url} was not created by process 0")
        return cls._create(url, meta, paths)

    @classmethod
    def _create(cls, url: str, meta: CacheMeta, paths: list[str]) -> Cache:
        if len(paths) != meta.num_samples:
            raise ValueError(f"{len(paths)} paths for {meta.num_samples} samples")
        # Mode "a" plus clearing the group's members, not mode "w": a cut creation is redone, and a
        # folder's dot-files (the repository's `cache/.gitignore`) survive.
        # Born with the creating mark: another process probing meanwhile sees "partial", never "other".
        group = zarr.open_group(_local(url), mode="a", zarr_format=3, attributes={CREATING_ATTR: True})
        with warnings.catch_warnings():  # dot-files (lock files, .gitignore) are not zarr nodes, and stay
            warnings.filterwarnings("ignore", message=".*not recognized as a component of a Zarr hierarchy")
            names = list(group.keys())
        for name in names:
            del group[name]
        group.attrs.put({CREATING_ATTR: True})
        for name, (shape, dtype, chunks) in array_layout(meta).items():
            _create_array(group, name, shape, dtype, chunks)
        stored = group.create_array("paths", shape=(len(paths),), dtype=str,
                                    chunks=(min(PATHS_CHUNK, max(len(paths), 1)),), compressors=COMPRESSORS)
        for i in range(0, len(paths), PATHS_CHUNK):  # a chunk at a time: 14M paths as one array are ~2 GB
            stored[i:i + PATHS_CHUNK] = np.asarray(paths[i:i + PATHS_CHUNK], dtype=str)
        if meta.layers_count:
            group.create_array("layers_index", data=layer_sample_indices(meta.num_samples, meta.layers_count),
                               compressors=COMPRESSORS)
        group.require_group(f"{MARKERS}/extract")
        # The meta goes in last: a store without it was cut during creation and is re-created.
        group.attrs.put({ATTR: meta.to_dict()})
        return cls(group, url)

    def prepare_fill(self, provenance: dict) -> None:
        """Create the `compressed` array for `fill_compressed` (process 0), replacing an unfinished fill
        made with another compressor."""
        existing = self.group.get("compressed")
        if existing is not None and dict(existing.attrs).get("compressor") != provenance:
            del self.group["compressed"]
            if self.group.get(f"{MARKERS}/compressed") is not None:
                del self.group[f"{MARKERS}/compressed"]
            existing = None
        if existing is None:
            meta = dataclasses.replace(self.meta, compressed_channels=provenance["channels"][-1],
                                       dtypes={"compressed": "float16"})
            shape, dtype, chunks = array_layout(meta)["compressed"]
            _create_array(self.group, "compressed", shape, dtype, chunks).attrs["compressor"] = provenance
        self.group.require_group(f"{MARKERS}/compressed")

    def check_fill(self, provenance: dict) -> None:
        """Raise FileNotFoundError until process 0 has prepared the fill for this compressor."""
        node = self.group.get("compressed")
        if node is None or dict(node.attrs).get("compressor") != provenance:
            raise FileNotFoundError(f"{self.url}: the `compressed` array is not prepared yet")
        self._arrays.pop("compressed", None)
        self._spans = {key: r for key, r in self._spans.items() if key[0] != "compressed"}

    def update_meta(self, **changes: Any) -> None:
        """Rewrite the metadata (process 0 only: the attribute file has a single writer)."""
        self.meta = dataclasses.replace(self.meta, **changes)
        self.group.attrs.put({ATTR: self.meta.to_dict()})

    # -- reading

    def array(self, name: str) -> zarr.Array:
        """The zarr array `name` as stored (writes go here; reads for training go through `read`)."""
        if name not in self._arrays:
            try:
                node = self.group[name]
            except ValueError as e:  # json.JSONDecodeError: a truncated or damaged metadata file
                raise DamagedCache(f"{self._root}/{name}/zarr.json is damaged (not valid JSON: {e}); nothing was "
                                   "changed. Restore it from a copy of the store, or extract again into a "
                                   "new --out") from None
            # Every chunk a writer touches is stored, zeros included: a missing chunk file then always
            # means damage (zarr's default skips all-zero chunks, which then read as the fill value).
            self._arrays[name] = node.with_config({"write_empty_chunks": True})
        return self._arrays[name]

    def has(self, name: str) -> bool:
        """Whether `name` holds data (`compressed` joins `meta.dtypes` only once filled for every sample)."""
        return name in self.meta.dtypes or name == "paths" or (name == "layers_index" and self.meta.layers_count > 0)

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Raw stored values of rows [start, stop) (samples, or `layers` rows for layers/layers_index).

        Every read of stored values for training goes through here: a chunk that is missing or does not
        decode raises `DamagedCache` naming it and the fix, never a fill value or a codec traceback."""
        self._require(name)
        spans = self._span_reader(name)
        reader = self._reader(name)
        try:
            if spans.mode == "zarr":
                return reader[start:stop]
            return self._read_spans(spans, start, stop)
        except (MissingChunk, DamagedChunk, RuntimeError, ValueError) as e:  # zstd: RuntimeError; size: ValueError
            raise self._damage(reader, name, start, stop, e) from e

    def read_into(self, name: str, start: int, stop: int, dest: Dest) -> None:
        """Rows [start, stop) of `name`, within one chunk, into `dest` ((out, offsets) pairs: out[i] = row
        start + offsets[i]), straight from the chunk file where it is stored raw (pipeline/chunkio.py),
        with the checks of `read`. The trainer's loader reads every row through this, one call per array
        and chunk span."""
        self._require(name)
        try:
            self._span_reader(name).read_into(start, stop, dest)
        except (MissingChunk, DamagedChunk, RuntimeError, ValueError) as e:
            raise self._damage(self._reader(name), name, start, stop, e) from e

    def _require(self, name: str) -> None:
        if not self.has(name):
            raise KeyError(f"{self.url} has no {name!r} array (present: {sorted(self.meta.dtypes)})")

    def row_spec(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        """Shape and dtype of one row of `name` (a sample, or a `layers` row)."""
        a = self.array(name)
        return tuple(a.shape[1:]), np.dtype(a.dtype)

    def _span_reader(self, name: str, strict: bool | None = None) -> SpanReader:
        """The chunk-file reader of `name`: refusing missing chunks once `require_intact` has run (or as
        `strict` says)."""
        strict = self._strict is not None if strict is None else strict
        if (name, strict) not in self._spans:
            absent = (self._absent or set()).__contains__ if strict else (lambda key: True)
            self._spans[name, strict] = SpanReader(self.array(name), absent)
        return self._spans[name, strict]

    @staticmethod
    def _read_spans(spans: SpanReader, start: int, stop: int | None) -> np.ndarray:
        """Rows [start, stop) chunk by chunk through `spans` (at ImageNet-21K scale Zarr's own read of
        `valid` alone takes minutes: BENCHMARKS.md, "At scale")."""
        start, stop, _ = slice(start, stop).indices(spans.array.shape[0])
        out = np.empty((max(stop - start, 0), *spans.row_shape), spans.dtype)
        a = start
        while a < stop:  # one span per chunk
            b = min(a - a % spans.chunk_rows + spans.chunk_rows, stop)
            spans.read_into(a, b, [(out[a - start:b - start], np.arange(b - a))])
            a = b
        return out

    def _reader(self, name: str) -> zarr.Array:
        if self._strict is None:
            return self.array(name)
        if name not in self._readers:
            self._readers[name] = self._strict[name]
        return self._readers[name]

    def _damage(self, reader: zarr.Array, name: str, start: int, stop: int | None, error: Exception) -> DamagedCache:
        """The one-line error for a failed read of rows [start, stop) of `name`: which chunk, why, the fix."""
        rows = reader.chunks[0]
        if isinstance(error, MissingChunk):
            c, why = int(error.key.split("/c/", 1)[1].split("/")[0]), "has no file"
        elif isinstance(error, DamagedChunk):
            c, why = error.k, error.why
        else:
            stop = reader.shape[0] if stop is None else stop
            c = next((c for c in range(start // rows, -(-stop // rows)) if _fails(reader, c)), start // rows)
            why = f"cannot be decoded ({type(error).__name__}: {error})"
        ns = next((ns for ns, names in self.written_arrays().items() if name in names), "extract")
        return DamagedCache(f"{self.url}: {self._chunk_name(name, c, rows)} {why}; {repair_hint(self.url, ns)}")

    def _chunk_name(self, name: str, c: int, rows: int) -> str:
        if name in LAYER_ARRAYS:
            sample = int(self.array("layers_index")[c])
            return f"row {c} of {name!r} (sample {sample}, chunk {sample // self.meta.chunk_size})"
        start, stop = c * rows, min((c + 1) * rows, self.array(name).shape[0])
        return f"chunk {c} of {name!r} (samples {start}..{stop - 1})"

    def valid_indices(self) -> np.ndarray:
        """Indices of the samples that were decoded (valid=True), ascending."""
        return np.flatnonzero(self.read("valid"))

    def source_paths(self, start: int = 0, stop: int | None = None) -> list[str]:
        return [str(p) for p in self.array("paths")[start:stop]]

    def stored_bytes(self) -> dict[str, int]:
        """Bytes on storage per array (chunk files and array metadata), by name: one walk of each array's
        folder (Zarr's `nbytes_stored` awaits a call per file: a minute at ImageNet-21K's 221,831 chunks)."""
        names = sorted(n for n in set(self.meta.dtypes) | {"paths", "layers_index"} if self.has(n))
        if "://" in _local(self.url):
            return {n: self._fs.du(f"{self._root}/{n}", total=True) for n in names}
        return {n: _folder_bytes(os.path.join(self._root, n)) for n in names}

    # -- chunks

    @property
    def num_chunks(self) -> int:
        return -(-self.meta.num_samples // self.meta.chunk_size)

    def sample_range(self, k: int) -> tuple[int, int]:
        C, N = self.meta.chunk_size, self.meta.num_samples
        return k * C, min((k + 1) * C, N)

    def layer_rows(self, k: int) -> tuple[int, int]:
        """The `layers` rows j whose sample floor(j*N/M) lies in chunk k: a contiguous range.

        floor(j*N/M) >= s  <=>  j*N >= s*M  <=>  j >= ceil(s*M/N), for integer s."""
        N, M = self.meta.num_samples, min(self.meta.layers_count, self.meta.num_samples)
        start, stop = self.sample_range(k)
        return -(-start * M // N), -(-stop * M // N)

    def region(self, name: str, k: int) -> tuple[int, int]:
        return self.layer_rows(k) if name in LAYER_ARRAYS else self.sample_range(k)

    def write_chunk(self, namespace: str, k: int, data: dict[str, np.ndarray], **extra: Any) -> None:
        """Write chunk k of every array in `data`, then its done marker (checksums + `extra`)."""
        self.delete_marker(namespace, k)
        sums = {}
        for name, values in data.items():
            start, stop = self.region(name, k)
            arr = self.array(name)
            values = np.ascontiguousarray(values, dtype=arr.dtype)
            if values.shape != (stop - start, *arr.shape[1:]):
                raise ValueError(f"chunk {k} of {name}: got shape {values.shape}, "
                                 f"region needs {(stop - start, *arr.shape[1:])}")
            if stop > start:
                arr[start:stop] = values
            sums[name] = digest(values)
        marker = {"chunk": k, "checksums": sums, **extra}
        self.group.create_group(self._marker_path(namespace, k), attributes=marker, overwrite=True)

    def _marker_path(self, namespace: str, k: int) -> str:
        return f"{MARKERS}/{namespace}/{k:07d}"

    def marker(self, namespace: str, k: int) -> dict | None:
        return self._read_markers(namespace, [k]).get(k)

    def markers(self, namespace: str) -> dict[int, dict]:
        """Every done marker of `namespace`, by chunk; a torn or damaged marker file counts as none (its
        chunk is redone). (A store's config never changes after creation, so a marker always belongs to it.)"""
        base = f"{self._root}/{MARKERS}/{namespace}"
        listed = self._fs.ls(base, detail=False) if self._fs.isdir(base) else []
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in listed]
        return self._read_markers(namespace, [int(n) for n in names if n.isdigit()])

    def _read_markers(self, namespace: str, chunks: list[int]) -> dict[int, dict]:
        paths = [f"{self._root}/{self._marker_path(namespace, k)}/zarr.json" for k in chunks]
        with ThreadPoolExecutor(min(16, max(len(paths), 1))) as pool:  # latency-bound on network storage
            texts = list(pool.map(lambda p: _cat_or_none(self._fs, p), paths))
        out = {}
        for k, text in zip(chunks, texts):
            try:
                out[k] = json.loads(text)["attributes"]
            except (TypeError, ValueError, KeyError):
                continue
        return out

    def unmarked(self, namespace: str) -> list[int]:
        """Chunks of `namespace` without a done marker file: one stat per chunk, no marker is read."""
        keys = {k: f"{self._marker_path(namespace, k)}/zarr.json" for k in range(self.num_chunks)}
        present = self._existing(list(keys.values()))
        return [k for k, key in keys.items() if key not in present]

    def delete_marker(self, namespace: str, k: int) -> None:
        path = f"{self._root}/{self._marker_path(namespace, k)}"
        if self._fs.exists(path):
            self._fs.rm(path, recursive=True)

    def verify_chunk(self, namespace: str, k: int, marker: dict | None = None) -> str | None:
        """None if chunk k matches its marker, else why not (missing marker, unreadable, mismatch)."""
        marker = marker or self.marker(namespace, k)
        if marker is None:
            return "no done marker"
        for name, expected in marker["checksums"].items():
            start, stop = self.region(name, k)
            try:  # as written: a chunk file that is not there reads as zeros, and fails its checksum
                spans = self._span_reader(name, strict=False)
                got = digest(self._read_spans(spans, start, stop) if spans.mode != "zarr" else
                             self.array(name)[start:stop])
            except Exception as e:  # a damaged chunk file fails in the codec with many error types
                return f"{name}: cannot read ({type(e).__name__}: {e})"
            if got != expected:
                return f"{name}: checksum mismatch (chunk file changed or missing)"
        return None

    def verify_chunks(self, namespace: str, chunks: Iterable[int], markers: dict[int, dict],
                      threads: int | None = None) -> dict[int, str]:
        """`verify_chunk` of each of `chunks` in threads (zstd and sha256 release the GIL): chunk -> why it fails."""
        chunks = list(chunks)
        threads = threads or min(8, os.cpu_count() or 1, max(len(chunks), 1))
        with ThreadPoolExecutor(threads) as pool:
            reasons = list(pool.map(lambda k: self.verify_chunk(namespace, k, markers.get(k)), chunks))
        return {k: reason for k, reason in zip(chunks, reasons) if reason}

    def missing_chunks(self, namespace: str) -> list[int]:
        """Chunks of `namespace` with no valid done marker."""
        done = self.markers(namespace)
        return [k for k in range(self.num_chunks) if k not in done]

    # -- the cheap check

    def written_arrays(self) -> dict[str, list[str]]:
        """Marker namespace -> the chunk-written arrays its markers cover."""
        extract = list(self.meta.identity()["dtypes"])
        fill = ["compressed"] if "compressed" in self.meta.dtypes and "compressed" not in extract else []
        return {"extract": extract} | ({"compressed": fill} if fill else {})

    def inspect(self, namespaces: Iterable[str] | None = None) -> tuple[list[tuple[str, str]], set[str]]:
        """Without reading any chunk: (problems as (namespace, text), keys of chunk files that may be absent).

        A chunk must have its done marker and a file in every per-sample array its namespace writes; an
        absent file is fine only if its marker says the chunk was all zeros (stores written before every
        chunk was stored). `layers` rows (one file each) are checked at read."""
        problems, absent = [], set()
        for ns, names in self.written_arrays().items():
            if namespaces is not None and ns not in namespaces:
                continue
            unmarked = self.unmarked(ns)
            if unmarked:
                problems.append((ns, f"{len(unmarked)} of {self.num_chunks} chunks have no done marker "
                                     f"({ns} chunks {_few(unmarked)})"))
            files = {(name, k): self.chunk_key(name, k)
                     for name in names if name not in LAYER_ARRAYS for k in range(self.num_chunks)}
            present, skip = self._existing(list(files.values())), set(unmarked)
            for (name, k), key in files.items():
                if key in present or k in skip:
                    continue
                if self._zero_by_marker(ns, name, k):
                    absent.add(key)
                else:
                    start, stop = self.sample_range(k)
                    problems.append((ns, f"chunk {k} of {name!r} (samples {start}..{stop - 1}) has no file ({key})"))
        return problems, absent

    def chunk_key(self, name: str, c: int) -> str:
        """Store key of zarr chunk `c` (along the row axis) of `name`, e.g. `cls/c/3/0`."""
        arr = self.array(name)
        return f"{name}/{arr.metadata.encode_chunk_key((c,) + (0,) * (arr.ndim - 1))}"

    def _existing(self, keys: list[str]) -> set[str]:
        """Which of `keys` exist: one stat each on a local disk (threads hide network file system latency),
        one recursive listing per folder on object stores."""
        if not keys:
            return set()
        if "://" not in _local(self.url):
            paths = [os.path.join(self._root, k) for k in keys]
            parts = [paths[i::16] for i in range(16)]
            with ThreadPoolExecutor(16) as pool:
                found = [p for part in pool.map(lambda ps: [p for p in ps if os.path.exists(p)], parts) for p in part]
            return {p[len(self._root) + 1:] for p in found}
        prefixes = {"/".join(k.split("/")[:2]) for k in keys}
        listed = set()
        for prefix in prefixes:
            listed |= {self._fs._strip_protocol(p)[len(self._root) + 1:]
                       for p in self._fs.find(f"{self._root}/{prefix}")}
        return listed & set(keys)

    def _zero_by_marker(self, ns: str, name: str, k: int) -> bool:
        """Whether chunk k of `name` holds only zeros according to its done marker."""
        marker = self.marker(ns, k)
        if marker is None or name not in marker.get("checksums", {}):
            return False
        start, stop = self.region(name, k)
        zeros = np.zeros((stop - start, *self.array(name).shape[1:]), self.array(name).dtype)
        return marker["checksums"][name] == digest(zeros)

    def _zero_layer_rows(self) -> set[str]:
        """Files of `layers` rows that are zeros by construction (skipped samples), which stores written
        before every chunk was stored have not written."""
        if "layers" not in self.meta.dtypes:
            return set()
        index = self.array("layers_index")[:]
        invalid = np.flatnonzero(~self.read("valid")[index])
        return {self.chunk_key("layers", int(j)) for j in invalid}


def _fails(arr: zarr.Array, c: int) -> bool:
    rows = arr.chunks[0]
    try:
        arr[c * rows:(c + 1) * rows]
    except Exception:  # noqa: BLE001 - any failure means this chunk is the damaged one
        return True
    return False


def _folder_bytes(path: str) -> int:
    """Total size of the files below a local folder."""
    total, folders = 0, [path]
    while folders:
        with os.scandir(folders.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    folders.append(entry.path)
                else:
                    total += entry.stat(follow_symlinks=False).st_size
    return total


def _few(items: list[int], n: int = 8) -> str:
    return ", ".join(map(str, items[:n])) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def _cat_or_none(fs, path: str) -> bytes | None:
    try:
        return fs.cat_file(path)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def array_layout(meta: CacheMeta) -> dict[str, tuple[tuple[int, ...], str, tuple[int, ...]]]:
    """name -> (shape, dtype, zarr chunks) for every array in `meta.dtypes`, derived from the meta.

    Per-sample arrays are chunked by `chunk_size` samples, so that chunk files never span two owners;
    `layers` (1.5 MiB/sample at ViT-B) gets one row per file for the same reason."""
    N, C, P, D = meta.num_samples, meta.chunk_size, meta.num_patches, meta.dino_dim
    g, h, zc = meta.grid, meta.latent_size, meta.latent_channels
    tails = {"vae_moments": (2 * zc, h, h), "vae_moments_flip": (2 * zc, h, h), "cls": (D,), "patches": (P, D),
             "patches_scale": (P,), "labels": (), "valid": (), "compressed": (meta.compressed_channels, g, g),
             "layers": (P, len(meta.layers) * D)}
    layout = {}
    for name, dtype in meta.dtypes.items():
        rows, chunk = (meta.layers_count, 1) if name in LAYER_ARRAYS else (N, C)
        layout[name] = ((rows, *tails[name]), dtype, (max(min(chunk, rows), 1), *tails[name]))
    return layout


def _create_array(group: zarr.Group, name: str, shape, dtype, chunks) -> zarr.Array:
    return group.create_array(name, shape=shape, dtype=dtype, chunks=chunks, fill_value=0,
                              compressors=CODECS.get(name, COMPRESSORS))


def decode_patches(q, scale) -> torch.Tensor:
    """Stored `patches`, `patches_scale` (numpy or torch, any device) -> float32 tokens [..., P, D]."""
    return codec.decode_tokens(torch.as_tensor(q), torch.as_tensor(scale))


# ---- verify and info -------------------------------------------------------------------------

def verify(url: str) -> list[str]:
    """Re-hash every chunk against its marker; returns problems (empty = the cache is intact)."""
    cache = Cache.open(url, allow_incomplete=True)
    problems = []
    namespaces = ["extract"] + (["compressed"] if cache.group.get(f"{MARKERS}/compressed") is not None else [])
    for ns in namespaces:
        markers = cache.markers(ns)
        failed = {k: "no done marker" for k in range(cache.num_chunks) if k not in markers}
        failed |= cache.verify_chunks(ns, markers, markers)
        for k, reason in sorted(failed.items()):
            start, stop = cache.sample_range(k)
            problems.append(f"{ns} chunk {k} (samples {start}..{stop - 1}): {reason}")
    if not cache.meta.complete:
        problems.append("the store is not marked complete (rerun the extract command to finish it)")
    return problems


def repair_advice(problems: list[str]) -> str:
    """The fix for what `verify` found: rerun the command that wrote the failing chunks."""
    namespaces = sorted({"compressed" if p.startswith("compressed ") else "extract" for p in problems})
    return "; ".join(f"{repair_command(ns)}: it recomputes exactly the {ns} chunks that fail" for ns in namespaces)


def info(url: str) -> str:
    """A human summary: arrays (shape, dtype, chunks, codec, bytes), counts, config, progress."""
    cache = Cache.open(url, allow_incomplete=True)
    m, N = cache.meta, cache.meta.num_samples
    problems, _ = cache.inspect()
    state = ("INCOMPLETE" if not m.complete else "complete, but DAMAGED (see below)" if problems else "complete")
    lines = [f"cache {url}  (format {m.format_version}, {state})",
             f"samples {N}: valid {int(cache.read('valid').sum())}, skipped {len(m.skipped)}; chunks "
             f"{cache.num_chunks} x {m.chunk_size} samples, "
             f"done {cache.num_chunks - len(cache.unmarked('extract'))}",
             f"{'array':<14}{'shape':<22}{'dtype':<9}{'chunks':<22}{'codec':<10}{'stored':>12}{'B/image':>11}"]
    sizes = cache.stored_bytes()
    for name, stored in sizes.items():
        a = cache.array(name)
        codec = ",".join(f"{type(c).__name__.removesuffix('Codec').lower()}{getattr(c, 'level', '')}"
                         for c in a.compressors) or "none"
        lines.append(f"{name:<14}{str(a.shape):<22}{str(a.dtype):<9}{str(a.chunks):<22}{codec:<10}"
                     f"{stored:>12,}{stored / max(N, 1):>11,.0f}")
    total = sum(sizes.values())
    lines.append(f"{'total':<89}{total:>12,}{total / max(N, 1):>11,.0f}")
    enc = m.encoders
    lines += [m.describe_encoder(),
              f"resolution {m.resolution}, latent {m.latent_channels}x{m.latent_size}x{m.latent_size} "
              f"(scale {m.vae_scaling_factor}), encoder D={m.dino_dim} P={m.num_patches} (grid {m.grid}), "
              f"layers {list(m.layers)} kept for {m.layers_count} samples, compressed channels {m.compressed_channels}",
              f"encoders: {json.dumps({k: enc[k] for k in sorted(enc) if k in ('preset', 'vae', 'precision')})}",
              f"patches encoding {m.patches_encoding}; classes {m.num_classes}; source {m.source.get('root')} "
              f"({m.source.get('kind')}, {m.source.get('count')} files)"]
    if m.compressor:
        lines.append(f"compressor: {json.dumps(m.compressor)}")
    lines += [f"skipped {s['path']}: {s['reason']}" for s in m.skipped]
    if m.complete:  # an unfinished store lacks markers by design; the first line says so
        lines += [f"DAMAGED: {text}; {repair_hint(url, ns)}" for ns, text in problems]
    return "\n".join(lines)


def chunks_of_rank(num_chunks: int, rank: int, world: int) -> range:
    """Chunks owned by one process: k = rank (mod world), so ranks never share a chunk file."""
    return range(rank, num_chunks, world)


def merge_skipped(markers: Iterable[dict]) -> tuple[dict, ...]:
    """The skipped samples recorded in the chunk markers, by sample index."""
    return tuple(sorted((s for m in markers for s in m.get("skipped", ())), key=lambda s: s["index"]))
