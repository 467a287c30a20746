"""Checkpoints named on the Hugging Face Hub, for `reglue sample`, `reglue fid` and `train --init-from`.

Two spellings: `hf://owner/repo[@revision]/path/in/repo.pt` names one file; `owner/repo[@revision]`
names a repository that holds exactly one checkpoint file (.pt, .pth or .safetensors). The file is
downloaded once into the Hugging Face cache (HF_HOME) and read from there afterwards, offline as
well; offline and not cached, one line says which file and how to supply it.
"""

from __future__ import annotations

import re
from pathlib import Path

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".safetensors")
_REPO = r"[A-Za-z0-9][\w.-]*/[\w.-]+"
_ID = re.compile(rf"^(?P<repo>{_REPO})(?:@(?P<revision>[\w.-]+))?$")
_PATH = re.compile(rf"^hf://(?P<repo>{_REPO})(?:@(?P<revision>[\w.-]+))?/(?P<file>.+)$")


def is_hub_source(source: str) -> bool:
    """hf://... always; owner/repo only when no local file or folder has that name."""
    return source.startswith("hf://") or (bool(_ID.match(source)) and not Path(source).exists())


def parse(source: str) -> tuple[str, str | None, str | None]:
    """(repo, revision or None, file in the repo or None)."""
    if m := _PATH.match(source):
        return m["repo"], m["revision"], m["file"]
    if m := _ID.match(source):
        return m["repo"], m["revision"], None
    raise ValueError(f"{source}: a Hugging Face checkpoint is hf://owner/repo/path/to/file.pt or owner/repo")


def local_name(source: str) -> str:
    """A file-name stem for outputs made from a hub checkpoint (they go in the current folder, not the cache)."""
    repo, revision, file = parse(source)
    parts = [*repo.split("/"), *([revision] if revision else []), *([Path(file).stem] if file else [])]
    return "-".join(parts)


def resolve_checkpoint(source: str | Path) -> Path:
    """The local path of a checkpoint: `source` itself, or its copy in the Hugging Face cache."""
    if not is_hub_source(str(source)):
        return Path(source)
    repo, revision, file = parse(str(source))
    return Path(_download(repo, file or _only_checkpoint(repo, revision), revision))


def _download(repo: str, file: str, revision: str | None) -> str:
    from huggingface_hub import hf_hub_download

    from reglue.weights import hub_endpoint, why_offline

    try:
        return hf_hub_download(repo, file, revision=revision, local_files_only=True)
    except OSError:
        why = why_offline(hub_endpoint())
        if why is None:
            try:
                return hf_hub_download(repo, file, revision=revision)
            except OSError as e:
                why = f"the download failed ({e})"
    raise _unavailable(repo, file, why)


def _only_checkpoint(repo: str, revision: str | None) -> str:
    """The one checkpoint file of a repository: from its cached snapshot, else from the Hub's file list."""
    from huggingface_hub import HfApi, snapshot_download

    from reglue.weights import hub_endpoint, why_offline

    try:
        root = Path(snapshot_download(repo, revision=revision, local_files_only=True))
        files = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
    except OSError:
        if why := why_offline(hub_endpoint()):
            raise _unavailable(repo, None, why) from None
        try:
            files = HfApi().list_repo_files(repo, revision=revision)
        except OSError as e:
            raise _unavailable(repo, None, f"listing its files failed ({e})") from e
    found = sorted(f for f in files if f.endswith(CHECKPOINT_SUFFIXES))
    if len(found) != 1:
        listed = ", ".join(found[:8]) + (" ..." if len(found) > 8 else "") if found else "none"
        raise ValueError(f"Hugging Face repository {repo} holds {len(found)} checkpoint files ({listed}); "
                         f"name one as hf://{repo}/FILE")
    return found[0]


def _unavailable(repo: str, file: str | None, why: str):
    from reglue.weights import OFFLINE_HINT, WeightsUnavailable

    what = f"hf://{repo}/{file}" if file else f"Hugging Face repository {repo}"
    return WeightsUnavailable(f"checkpoint {what} is not in the local Hugging Face cache and {why}. Download it on "
                              f"a machine online (`hf download {repo}{' ' + file if file else ''}`) and pass the "
                              f"local file, or set HF_HOME to a Hugging Face cache that holds it; {OFFLINE_HINT}.")
