"""`reglue download`: every file the real flow loads, fetched in one go on a machine online.

The SD-VAEs (ft-MSE encodes the cache, ft-EMA decodes samples) and DINOv2 go into a Hugging Face cache,
the FID Inception and the ADM reference batches into a plain folder, where each loader looks for them
anyway (weights.py, trainer/inception.py, trainer/evaluate.py). With `--to DIR` both live under DIR, to
copy to an offline cluster; the last line printed is the environment that points every command there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Item:
    """One file (or Hugging Face repository) of the real flow."""

    what: str
    source: str
    """A Hugging Face repository id, or a URL."""
    files: tuple[str, ...] = ()
    """The files of a Hugging Face repository that reglue reads (empty for a URL)."""
    name: str = ""
    """The file name of a URL download."""


def plan(resolutions: tuple[int, ...] = (256,)) -> list[Item]:
    """What the real flow loads: extract's VAE and DINOv2, sample's VAE, fid's Inception and references."""
    from reglue.trainer.evaluate import ADM_REF_URL, ADM_REFS
    from reglue.trainer.generate import DECODE_VAE
    from reglue.trainer.inception import INCEPTION_FILE, INCEPTION_URL
    from reglue.weights import DEFAULT_ENCODER, DEFAULT_VAE, encoder_arch

    unknown = sorted(set(resolutions) - set(ADM_REFS))
    if unknown:
        raise ValueError(f"no ADM reference batch at {unknown} px; choose from {sorted(ADM_REFS)}")
    vae_files = ("config.json", "diffusion_pytorch_model.safetensors")
    items = [Item("SD-VAE ft-MSE (extract encodes with it)", DEFAULT_VAE, vae_files),
             Item("SD-VAE ft-EMA (sample, fid and train grids decode with it)", DECODE_VAE, vae_files),
             Item(f"vision encoder {DEFAULT_ENCODER} (extract, train-compressor)",
                  encoder_arch(DEFAULT_ENCODER).hf_hub_id, (encoder_arch(DEFAULT_ENCODER).hf_hub_filename,)),
             Item("FID Inception (NVIDIA's TorchScript of the ADM evaluator's)", INCEPTION_URL, name=INCEPTION_FILE)]
    items += [Item(f"ADM reference batch, ImageNet {r} px", ADM_REF_URL.format(resolution=r, name=ADM_REFS[r]),
                   name=ADM_REFS[r]) for r in resolutions]
    return items


def download(to: str | None, resolutions: tuple[int, ...] = (256,), dry_run: bool = False) -> list[str]:
    """Fetch (or with `dry_run` list) every item; returns the lines to print, the environment last."""
    from huggingface_hub import constants

    from reglue.weights import WeightsUnavailable, cache_dir, hub_endpoint, why_offline

    hub = Path(to) / "huggingface" / "hub" if to else Path(constants.HF_HUB_CACHE)
    files = Path(to) if to else cache_dir()
    items = plan(resolutions)
    where = lambda item: f"{hub} ({item.source})" if item.files else str(files / item.name)  # noqa: E731
    lines = [f"{item.what}: {item.source if item.name else 'https://huggingface.co/' + item.source} -> {where(item)}"
             for item in items]
    env = (f"export HF_HOME={Path(to).resolve() / 'huggingface'} HF_HUB_OFFLINE=1 "
           f"REGLUE_INCEPTION_WEIGHTS={files.resolve()} REGLUE_FID_REF={files.resolve()}" if to
           else "export HF_HUB_OFFLINE=1")
    if dry_run:
        return lines + [env]
    for url in {hub_endpoint(), *(item.source for item in items if item.name)}:
        if why := why_offline(url):  # every host first: offline fails in seconds, before any partial download
            raise WeightsUnavailable(f"reglue download needs the network and {why}; run it on a machine online "
                                     f"(`reglue download --to DIR`) and copy DIR here")
    for item in items:
        print(f"{item.what} ...", flush=True)
        _fetch(item, hub, files)
    return lines + [env]


def _fetch(item: Item, hub: Path, files: Path) -> None:
    from huggingface_hub import hf_hub_download

    from reglue.weights import download_file

    for name in item.files:
        hf_hub_download(item.source, name, cache_dir=hub)
    if item.name and not (files / item.name).is_file():
        download_file(item.source, files / item.name)
