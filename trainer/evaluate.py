"""`reglue fid` and `reglue fid-ref`: ADM-protocol metrics of a sample batch, reference statistics,
and the periodic FID-Nk that `reglue train` logs.

Which numbers follow ADM (guided-diffusion evaluator.py, the evaluator REGLUE reports with):
- FID: ADM's definition on NVIDIA's TorchScript port of ADM's TF Inception (clean-fid
  `legacy_tensorflow`, TF-FID parity ~3e-6 relative), against the reference `mu`/`sigma`;
  statistics and the Frechet distance in float64 (matches ADM's on golden `frechet` to ~1e-6).
- sFID: ADM's definition (mixed_6/conv, 7 channels, NHWC) on the same port, re-running its layers;
  whether TF's `mixed_6/conv:0` is the post-ReLU tensor (as taken here) is inferred, not verified.
- IS: ADM's head (pool_3 @ W, no bias, 1008 classes) and splits of 5000, in float64.
- precision/recall: ADM's k=3 manifold estimator with float16 distances, on the reference's 10K
  `arr_0` images (or `acts` saved by `reglue fid-ref`); float16 GEMM rounding differs from TF's.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from reglue.trainer.inception import Inception, inception_file
from reglue.trainer.metrics import (
    FeatureStats,
    Reference,
    frechet_distance,
    inception_score,
    load_reference,
    precision_recall,
    save_reference,
)
from reglue.trainer.npz import check_images, iter_npz, npz_shape

PROTOCOL = {
    "fid": "ADM definition; TorchScript port of ADM's TF Inception (clean-fid legacy_tensorflow)",
    "sfid": "ADM definition (mixed_6/conv[..., :7], NHWC); post-ReLU tap inferred, not verified against TF",
    "inception_score": "ADM definition (no-bias 1008-way softmax, splits of 5000)",
    "precision": "ADM k=3 manifold estimator, float16 distances",
    "recall": "ADM k=3 manifold estimator, float16 distances",
}


# ---- the ADM reference batches ------------------------------------------------------------------

ADM_REFS = {256: "VIRTUAL_imagenet256_labeled.npz", 512: "VIRTUAL_imagenet512.npz"}
"""The ADM evaluator's ImageNet reference batches by resolution (guided-diffusion evaluations/README.md)."""
ADM_REF_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/{resolution}/{name}"
ADM_CLASSES = 1000
FID_REF_ENV = "REGLUE_FID_REF"
"""A reference npz, or a folder holding the ADM batches (what `reglue download` prints)."""


def reference_file(ref: str | None, resolution: int, num_classes: int | None, download: bool = True) -> Path:
    """Reference statistics for samples of `resolution` px from a model of `num_classes` classes (None:
    unknown): `ref`, else $REGLUE_FID_REF (a file, or a folder holding the ADM batch), else the ADM batch
    for that resolution in reglue's cache folder, downloaded once from its official source."""
    from reglue.weights import find_file

    given = ref or os.environ.get(FID_REF_ENV)
    name = ADM_REFS.get(resolution) if num_classes in (None, ADM_CLASSES) else None
    if given and not Path(given).is_dir():
        if not Path(given).is_file():
            raise FileNotFoundError(f"reference statistics {given} not found; pass the ADM reference batch "
                                    f"({name or ADM_REFS[256]}) or make one with `reglue fid-ref`")
        adm = {v: k for k, v in ADM_REFS.items()}.get(Path(given).name)
        if adm is not None and adm != resolution:
            raise ValueError(f"{given} is the ADM reference batch for {adm} px but the samples are {resolution} px; "
                             f"pass {name or 'reference statistics of your images (`reglue fid-ref`)'} instead")
        return Path(given)
    if name is None:
        what = f"{resolution} px" if num_classes in (None, ADM_CLASSES) else f"a model of {num_classes} classes"
        raise ValueError(f"the ADM protocol has no reference batch for {what} (only ImageNet at 256 and 512 px): "
                         f"build one from your images with `reglue fid-ref IMAGES --out ref.npz --resolution "
                         f"{resolution}` and pass --ref ref.npz (or set {FID_REF_ENV})")
    return find_file(name, ADM_REF_URL.format(resolution=resolution, name=name), given=given, env=FID_REF_ENV,
                     option="--ref", what=f"ADM reference batch (ImageNet {resolution} px)", download=download)


def default_device(cpu: bool = False) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and not cpu else "cpu")


def fid_name(n: int) -> str:
    """FID-50K, FID-10K, FID-1234: FID is biased upward at small N, so the count is in the name."""
    return f"FID-{n // 1000}K" if n % 1000 == 0 else f"FID-{n}"


# ---- features of an image stream ----------------------------------------------------------------

@dataclass
class Features:
    """What one pass of the Inception over an image stream keeps."""

    pool: FeatureStats
    """float64 statistics of pool_3 (FID)."""
    spatial: FeatureStats | None
    """float64 statistics of the sFID features, if asked for."""
    rows: np.ndarray
    """pool_3 rows [M,2048] float32 at the kept positions (all by default: IS, precision/recall)."""


def features(inception: Inception, batches: Iterator[np.ndarray], total: int, spatial: bool = True,
             keep: np.ndarray | None = None, desc: str = "Inception") -> Features:
    """Inception features of uint8 NHWC batches: statistics over all images, rows only at `keep`
    (positions in the stream), so that 1.28M reference images need no 10 GB of rows."""
    out = Features(FeatureStats(2048, inception.device), FeatureStats(2023, inception.device) if spatial else None,
                   np.zeros((0, 2048), np.float32))
    rows, seen = [], 0
    with tqdm(total=total, desc=desc, unit="img") as bar:
        for batch in batches:
            images = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2)
            if out.spatial is None:
                pool = inception.pool(images)
            else:
                pool, spatial_feats = inception.pool_and_spatial(images)
                out.spatial.update(spatial_feats)
            out.pool.update(pool)
            pool = pool.cpu().numpy()
            rows.append(pool if keep is None else pool[keep[(keep >= seen) & (keep < seen + len(pool))] - seen])
            seen += len(pool)
            bar.update(len(batch))
        bar.update(total - bar.n)  # undecodable files are left out of a folder's batches: the bar still ends full
    out.rows = np.concatenate([out.rows, *rows])
    return out


# ---- reglue fid ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class FidConfig:
    """`reglue fid`: score a sample batch against reference statistics."""

    samples: str
    """Sample batch `.npz` with `arr_0` uint8 [N,H,W,3] (what `reglue sample` writes)."""
    ref: str | None = None
    """Reference npz: the ADM batch or `reglue fid-ref` output; default $REGLUE_FID_REF, then the ADM batch
    for the samples' resolution (VIRTUAL_imagenet256_labeled.npz at 256 px) from reglue's cache folder,
    downloaded once."""
    inception: str | None = None
    """inception-2015-12-05.pt (file or folder); default $REGLUE_INCEPTION_WEIGHTS, then the cache."""
    batch_size: int = 100
    """Images per Inception batch."""
    sfid: bool = True
    """Compute sFID (when the reference has mu_s/sigma_s)."""
    precision_recall: bool = True
    """Compute precision/recall (when the reference has images or acts)."""
    out: str | None = None
    """Metrics JSON; default `<samples>.metrics.json`, beside the samples (and the checkpoint)."""
    cpu: bool = False
    """Run on the CPU even when a GPU is present."""


def evaluate(cfg: FidConfig) -> dict:
    """All metrics of cfg.samples; writes the JSON and returns it (with a one-line `summary`)."""
    shape = check_images(cfg.samples)  # uint8 NHWC RGB, else one line
    cfg = replace(cfg, ref=str(reference_file(cfg.ref, shape[1], None)))
    n, ref = shape[0], load_reference(cfg.ref)
    device = default_device(cfg.cpu)
    inception = Inception(cfg.inception, device)
    skipped = _not_computed(cfg, ref, n)
    feats = features(inception, iter_npz(cfg.samples, "arr_0", cfg.batch_size), n, "sfid" not in skipped)
    metrics = {"fid": frechet_distance(*feats.pool.mu_sigma(), ref.mu, ref.sigma),
               "inception_score": inception_score(inception.probs(torch.from_numpy(feats.rows)).cpu())}
    if feats.spatial is not None:
        metrics["sfid"] = frechet_distance(*feats.spatial.mu_sigma(), ref.mu_s, ref.sigma_s)
    if "precision_recall" not in skipped:
        ref_acts = ref.acts if ref.acts is not None else features(
            inception, iter_npz(ref.images, "arr_0", cfg.batch_size), npz_shape(ref.images)[0],
            spatial=False, desc="reference").rows
        metrics["precision"], metrics["recall"] = precision_recall(ref_acts, feats.rows, device=device)
    result = {"samples": str(cfg.samples), "num_samples": n, "reference": str(cfg.ref), "metrics": metrics,
              "protocol": {k: PROTOCOL[k] for k in metrics},
              "not_computed": skipped, "inception": str(inception.file),
              "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    result["summary"] = summary_line(n, metrics, Path(cfg.ref).name)
    out = Path(cfg.out) if cfg.out else Path(cfg.samples).with_suffix(".metrics.json")
    out.write_text(json.dumps(result, indent=1))
    result["file"] = str(out)
    return result


def evaluate_source(cfg: FidConfig, generate_cfg=None) -> dict | None:
    """`reglue fid`: with a GenerateConfig, first sample the checkpoint (every process of the launch)
    into its npz, then score it on the main process (others return None)."""
    from accelerate import PartialState

    from reglue.trainer.checkpoints import load_model
    from reglue.trainer.generate import generate

    state = PartialState()
    # The reference and the Inception are found (or downloaded, once per node) before any sampling.
    with state.local_main_process_first():
        if generate_cfg is None:
            resolution, classes = check_images(cfg.samples)[1], None  # uint8 NHWC RGB, else one line
        else:
            _, info = load_model(generate_cfg.checkpoint)
            resolution, classes = info.resolution, info.num_classes
        cfg = replace(cfg, ref=str(reference_file(cfg.ref, resolution, classes)),
                      inception=str(inception_file(cfg.inception)))
    if generate_cfg is not None:
        cfg = replace(cfg, samples=str(generate(generate_cfg)))
    return evaluate(cfg) if state.is_main_process else None


def _not_computed(cfg: FidConfig, ref: Reference, n: int) -> dict:
    """Metrics left out, and why."""
    why = {}
    if not cfg.sfid or ref.mu_s is None:
        why["sfid"] = "turned off" if not cfg.sfid else "the reference has no mu_s/sigma_s"
    ref_rows = len(ref.acts) if ref.acts is not None else check_images(ref.images)[0] if ref.images else 0
    if not cfg.precision_recall:
        why["precision_recall"] = "turned off"
    elif not ref_rows:
        why["precision_recall"] = "the reference has no images (arr_0) or acts"
    elif min(n, ref_rows) <= 3:
        why["precision_recall"] = f"k=3 needs more than 3 rows ({n} samples, {ref_rows} reference)"
    return why


def summary_line(n: int, metrics: dict, ref_name: str) -> str:
    names = {"fid": fid_name(n), "sfid": "sFID", "inception_score": "IS", "precision": "Prec", "recall": "Rec"}
    parts = [f"{names[k]} {metrics[k]:.4g}" for k in names if k in metrics]
    return " | ".join(parts) + f"  (N={n}, ref={ref_name})"


# ---- reglue fid-ref -----------------------------------------------------------------------------

@dataclass(frozen=True)
class RefConfig:
    """`reglue fid-ref`: reference statistics from images."""

    source: str
    """An npz with `arr_0` uint8 NHWC (e.g. the ADM reference batch), an image folder (class folders
    or flat; ADM center crop), or a feature cache (its VAE posterior means, decoded)."""
    out: str
    """Output npz: mu, sigma, mu_s, sigma_s, acts (and mu/sigma of the source npz kept if it has them)."""
    resolution: int = 256
    """Crop size for image folders."""
    num: int | None = None
    """Use the first `num` images only (default all)."""
    acts: int = 10_000
    """Keep the pool features of this many evenly spread images, for precision/recall (ADM: 10K)."""
    inception: str | None = None
    """inception-2015-12-05.pt, as for `reglue fid`."""
    vae: str = "stabilityai/sd-vae-ft-ema"
    """Decoder for a cache source (the samples' decoder, so that both sides are decoded alike)."""
    vae_preset: Literal["real", "tiny"] = "real"
    """"real" or "tiny" (tests)."""
    batch_size: int = 100
    """Images per batch."""
    cpu: bool = False
    """Run on the CPU even when a GPU is present."""


def reference_stats(cfg: RefConfig) -> Path:
    """Compute and save reference statistics; keeps a source npz's own mu/sigma (the ADM batch's are
    over all of ImageNet, its 10K images only feed precision/recall)."""
    device = default_device(cfg.cpu)
    total, batches = _image_source(cfg, device)  # first: a missing source is named before the Inception is sought
    inception = Inception(cfg.inception, device)
    keep = np.linspace(0, total - 1, min(cfg.acts, total)).round().astype(int)
    feats = features(inception, batches, total, spatial=True, keep=keep, desc="reference")
    ref = Reference(*feats.pool.mu_sigma(), *feats.spatial.mu_sigma(), acts=feats.rows)
    if cfg.source.endswith(".npz"):
        with np.load(cfg.source) as z:
            for key in ("mu", "sigma", "mu_s", "sigma_s"):
                if key in z:
                    setattr(ref, key, z[key].astype(np.float64))
    return save_reference(cfg.out, ref)


def _image_source(cfg: RefConfig, device: torch.device) -> tuple[int, Iterator[np.ndarray]]:
    """(count, uint8 NHWC batches) of an npz, an image folder or a cache."""
    src = cfg.source
    if src.endswith(".npz"):
        n = min(check_images(src)[0], cfg.num or math.inf)
        return n, _take(iter_npz(src, "arr_0", cfg.batch_size), n)
    from reglue.pipeline.store import probe

    if probe(src) == "cache":
        return _cache_images(cfg, device)
    return _folder_images(cfg)


def _take(batches: Iterator[np.ndarray], n: int) -> Iterator[np.ndarray]:
    for batch in batches:
        yield batch[:n]
        n -= len(batch)
        if n <= 0:
            return


def _folder_images(cfg: RefConfig) -> tuple[int, Iterator[np.ndarray]]:
    # The ADM center crop has one home, pipeline.sources (the evaluation reads images like extraction).
    from reglue.pipeline.sources import ImageDataset, scan

    sources = scan(cfg.source)
    n = min(len(sources), cfg.num or len(sources))
    loader = torch.utils.data.DataLoader(ImageDataset(sources, cfg.resolution, range(n)),
                                         batch_size=cfg.batch_size, num_workers=min(8, os.cpu_count() or 1))

    def batches():
        for _, images, ok, _ in loader:
            yield images[ok].permute(0, 2, 3, 1).numpy()  # undecodable files are left out

    return n, batches()


def _cache_images(cfg: RefConfig, device: torch.device) -> tuple[int, Iterator[np.ndarray]]:
    from reglue import weights
    from reglue.pipeline.store import Cache
    from reglue.trainer.sampling import decode

    cache = Cache.open(cfg.source)
    zc, valid = cache.meta.latent_channels, cache.valid_indices()
    valid = valid[:cfg.num or len(valid)]
    vae = weights.load_vae(cfg.vae, cfg.vae_preset).to(device)

    def batches():
        for i in range(0, len(valid), cfg.batch_size):
            rows = valid[i:i + cfg.batch_size]
            moments = cache.read("vae_moments", int(rows[0]), int(rows[-1]) + 1)[rows - rows[0]]
            mean = torch.from_numpy(moments[:, :zc]).float().to(device)  # the posterior mean, unscaled
            yield decode(vae, mean, zc, 1.0).cpu().numpy()

    return len(valid), batches()


# ---- FID-Nk during training ---------------------------------------------------------------------

@torch.no_grad()
def fid_during_training(model, *, num: int, reference: Reference, inception: Inception, vae,
                        latent_channels: int, scaling_factor: float, sampler=None, seed: int = 0,
                        batch_size: int = 32, accelerator=None) -> dict:
    """FID-Nk of `model` (the EMA, unwrapped, eval) with samples split over the processes.

    Call on every process; all return {"name": "FID-10K", "fid": value, "num": num}. Samples are the
    same as `reglue sample`'s for (seed, index) with balanced labels, so the number is reproducible."""
    from reglue.trainer.generate import generate_images
    from reglue.trainer.sampling import SamplerConfig

    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    device = inception.device
    stats = FeatureStats(2048, device)
    mine = list(range(rank, num, world))
    for i in range(0, len(mine), batch_size):
        images, _ = generate_images(model, vae, mine[i:i + batch_size], seed=seed, latent_channels=latent_channels,
                                    scaling_factor=scaling_factor, sampler=sampler or SamplerConfig(),
                                    labels="balanced", device=device)
        stats.update(inception.pool(images.permute(0, 3, 1, 2)))
    if accelerator is not None:
        stats.all_reduce(accelerator)
    return {"name": fid_name(num), "fid": frechet_distance(*stats.mu_sigma(), reference.mu, reference.sigma),
            "num": num}
