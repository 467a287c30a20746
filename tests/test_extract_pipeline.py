"""`reglue extract` end to end on a generated folder with bad files (tiny preset, 64 px, CPU):
contents, skips, info/verify, errors that change nothing, 2 processes == 1, SIGKILL then resume,
and `fill_compressed`."""

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from reglue.cli import app
from reglue.pipeline.compressor import EncoderDecoder, save_compressor, save_norm_stats
from reglue.pipeline.encoders import EncoderSpec, FeatureEncoder
from reglue.pipeline.extract import TEST_DELAY_ENV, ExtractConfig, default_workers, extract, fill_compressed
from reglue.pipeline.sources import load_image
from reglue.pipeline.store import Cache, decode_patches, layer_sample_indices, verify

RES, CHUNK, BATCH, LAYERS_LIMIT = 64, 4, 3, 5
BAD = {"bee/empty.jpg": "empty file", "bee/text.jpg": "cannot identify", "bee/truncated.jpg": "truncated"}
ARGS = ["--weights", "tiny", "--resolution", str(RES), "--chunk-size", str(CHUNK), "--batch-size", str(BATCH),
        "--layers-limit", str(LAYERS_LIMIT), "--num-workers", "0"]
REPO = Path(__file__).resolve().parents[1]


def make_source(root: Path) -> Path:
    """21 files in 3 classes: odd sizes, every convertible mode, 3 undecodable files, an empty class."""
    rng = np.random.default_rng(0)
    pixels = lambda h, w, *c: rng.integers(0, 256, (h, w, *c), dtype=np.uint8)
    for name in ("ant", "bee", "cow"):
        (root / name).mkdir(parents=True)
    for i, (w, h) in enumerate([(64, 64), (100, 80), (17, 300), (301, 67), (520, 390)] * 2):
        Image.fromarray(pixels(h, w, 3)).save(root / f"ant/{i:02d}.{'jpg' if i % 2 else 'png'}")
    Image.fromarray(pixels(70, 90)).save(root / "bee/gray.png")
    Image.fromarray(pixels(70, 90, 3)).convert("CMYK").save(root / "bee/cmyk.jpg")
    Image.fromarray(pixels(70, 90, 4)).save(root / "bee/rgba.png")
    Image.fromarray(rng.integers(0, 65536, (70, 90), dtype=np.uint16)).save(root / "bee/deep16.png")
    Image.fromarray(pixels(70, 90, 3)).convert("P").save(root / "bee/palette.png")
    Image.fromarray(pixels(65, 129, 3)).save(root / "bee/wide.jpg")
    Image.fromarray(pixels(66, 66, 3)).save(root / "bee/zz.png")
    (root / "bee/empty.jpg").write_bytes(b"")
    (root / "bee/text.jpg").write_text("this is not an image")
    (root / "bee/truncated.jpg").write_bytes((root / "ant/01.jpg").read_bytes()[:300])
    Image.fromarray(pixels(80, 80, 3)).save(root / "bee/after.png")
    return root


def config(src: Path, out: Path, **kw) -> ExtractConfig:
    return ExtractConfig(str(src), str(out), EncoderSpec.tiny(RES), layers_limit=LAYERS_LIMIT,
                         chunk_size=CHUNK, batch_size=BATCH, **kw)


def assert_same_arrays(a: Cache, b: Cache) -> None:
    assert a.meta.dtypes == b.meta.dtypes and a.meta.skipped == b.meta.skipped
    for name in [*a.meta.dtypes, "paths", "layers_index"]:
        x, y = a.read(name), b.read(name)
        assert x.shape == y.shape and x.tobytes() == y.tobytes(), name


def cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "reglue.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Every run here uses one CPU thread per process, as torchrun sets it (OMP_NUM_THREADS=1): CPU
    kernels may round differently with another thread count, and the comparisons are bitwise."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return make_source(tmp_path_factory.mktemp("images") / "src")


@pytest.fixture(scope="module")
def clean(source, tmp_path_factory) -> Cache:
    """One uninterrupted single-process run (with a decoding worker): the reference for the others."""
    out = tmp_path_factory.mktemp("clean") / "cache.zarr"
    summary = extract(config(source, out, num_workers=1))
    assert summary.complete and summary.written == 21
    return Cache.open(str(out))


def test_contents_match_the_encoders(clean, source):
    m = clean.meta
    paths = clean.source_paths()
    assert m.num_samples == 21 and m.class_names == ("ant", "bee", "cow") and m.num_classes == 3
    assert m.source["empty_classes"] == ["cow"] and m.latent_size == 8 and m.grid == 4 and m.num_patches == 16
    assert {s["path"]: s["reason"] for s in m.skipped}.keys() == BAD.keys()
    for s in m.skipped:
        assert BAD[s["path"]] in s["reason"].lower() and paths[s["index"]] == s["path"]
    valid = clean.read("valid")
    assert [p for p, v in zip(paths, valid) if not v] == sorted(BAD)
    np.testing.assert_array_equal(clean.read("labels"), [0] * 10 + [1] * 11)
    np.testing.assert_array_equal(clean.read("layers_index"), layer_sample_indices(21, LAYERS_LIMIT))

    encoder = FeatureEncoder(EncoderSpec.tiny(RES), "cpu")
    picks = [0, 3, 12, 14, 20]  # incl. grey, 16-bit and the last sample; 0 and 12 keep their layers
    images = torch.stack([torch.from_numpy(load_image(source / paths[i], RES)) for i in picks])
    want = encoder.encode(images, with_layers=True)
    torch.testing.assert_close(torch.from_numpy(clean.read("cls")[picks]), want["cls"], atol=1e-5, rtol=1e-5)
    moments = torch.from_numpy(clean.read("vae_moments")[picks]).float()
    torch.testing.assert_close(moments, torch.cat([want["vae_mean"], want["vae_std"]], 1), atol=2e-3, rtol=2e-3)
    patches = decode_patches(clean.read("patches")[picks], clean.read("patches_scale")[picks])
    assert torch.nn.functional.cosine_similarity(patches, want["patches"], dim=-1).min() > 0.999
    rows = {int(s): j for j, s in enumerate(clean.read("layers_index"))}
    for n, i in enumerate(picks):
        if i in rows:
            got = torch.from_numpy(clean.read("layers", rows[i], rows[i] + 1)[0]).float()
            torch.testing.assert_close(got, want["layers"][n], atol=2e-3, rtol=2e-3)
    assert not clean.read("cls")[~valid].any()  # skipped samples hold zeros


def test_info_and_verify_commands(clean, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["cache", "info", clean.url])
    assert result.exit_code == 0
    for word in ("vae_moments", "patches_scale", "layers", "B/image", "skipped 3", "bee/text.jpg"):
        assert word in result.output
    assert runner.invoke(app, ["cache", "verify", clean.url]).exit_code == 0

    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(clean.url, damaged)
    os.remove(damaged / "patches/c/2/0/0")  # chunk 2 of patches gone
    with open(damaged / "vae_moments/c/4/0/0/0", "r+b") as f:  # chunk 4 of vae_moments flipped
        f.seek(20)
        f.write(b"\x00\xff" * 8)
    result = runner.invoke(app, ["cache", "verify", str(damaged)])
    assert result.exit_code == 1
    assert "chunk 2 " in result.output and "patches" in result.output
    assert "chunk 4 " in result.output and "vae_moments" in result.output


def test_errors_change_nothing(clean, source, tmp_path, monkeypatch):
    runner = CliRunner()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = runner.invoke(app, ["extract", str(source), "--out", str(tmp_path / "real.zarr"), "--resolution", "64"])
    assert result.exit_code == 1 and "sd-vae-ft-mse" in result.output and "local" in result.output
    assert not (tmp_path / "real.zarr").exists()

    result = runner.invoke(app, ["extract", str(tmp_path / "nowhere"), "--out", str(tmp_path / "c.zarr"), *ARGS])
    assert result.exit_code == 1 and "does not exist" in result.output and not (tmp_path / "c.zarr").exists()

    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    result = runner.invoke(app, ["extract", str(source), "--out", str(other), *ARGS])
    assert result.exit_code == 1 and "not a reglue cache" in result.output
    assert [p.name for p in other.iterdir()] == ["notes.txt"]

    before = {p: p.stat().st_mtime_ns for p in Path(clean.url).rglob("*")}
    with pytest.raises(ValueError, match="layers_count: store has 5, this run wants 7"):
        extract(ExtractConfig(str(source), clean.url, EncoderSpec.tiny(RES), layers_limit=7,
                              chunk_size=CHUNK, batch_size=BATCH, num_workers=0))
    assert {p: p.stat().st_mtime_ns for p in Path(clean.url).rglob("*")} == before
    assert extract(config(source, Path(clean.url), num_workers=0)).written == 0  # same config: nothing to do
    assert {p: p.stat().st_mtime_ns for p in Path(clean.url).rglob("*")} == before


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2:len(data) // 2 + 8] = bytes(b ^ 0xFF for b in data[len(data) // 2:len(data) // 2 + 8])
    path.write_bytes(bytes(data))


def test_rerun_repairs_exactly_the_damaged_chunks(clean, source, tmp_path):
    """Issue 12 item 3: a missing chunk file, flipped bytes and a lost marker; verify names the fix."""
    out = tmp_path / "damaged.zarr"
    shutil.copytree(clean.url, out)
    os.remove(out / "patches/c/2/0/0")
    flip(out / "vae_moments/c/4/0/0/0")
    Cache.open(str(out), allow_incomplete=True).delete_marker("extract", 1)
    result = CliRunner().invoke(app, ["cache", "verify", str(out)])
    assert result.exit_code == 1 and "to repair: rerun the same `reglue extract` command" in result.output
    with pytest.raises(ValueError, match="rerun the same `reglue extract` command to repair"):
        Cache.open(str(out))
    summary = extract(config(source, out, num_workers=0))
    assert summary.complete and summary.written == 3 * CHUNK  # chunks 1, 2 and 4, nothing else
    assert verify(str(out)) == [] and "DAMAGED" not in CliRunner().invoke(app, ["cache", "info", str(out)]).output
    assert_same_arrays(Cache.open(str(out)), clean)


def test_missing_and_damaged_chunks_stop_training_in_one_line(clean, tmp_path):
    """Issue 12 items 1 and 4, through `reglue train` (sit: VAE moments and labels only)."""
    args = ["--model", "SiT-tiny/2", "--method", "sit", "--no-flip", "--global-batch", "4", "--precision", "fp32",
            "--max-steps", "2", "--sample-every", "0", "--trackers", ""]
    missing, damaged = tmp_path / "missing.zarr", tmp_path / "damaged.zarr"
    shutil.copytree(clean.url, missing)
    shutil.copytree(clean.url, damaged)
    os.remove(missing / "vae_moments/c/3/0/0/0")
    flip(damaged / "vae_moments/c/3/0/0/0")
    for cache, why in ((missing, "has no file"), (damaged, "cannot be decoded")):
        result = CliRunner().invoke(app, ["train", "--cache", str(cache), "--out", str(tmp_path / cache.stem), *args])
        assert result.exit_code == 1 and "Traceback" not in result.output
        errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, result.output  # other lines: what train prints before it reads
        line = errors[0]
        assert f"chunk 3 of 'vae_moments' (samples 12..15) {why}" in line
        assert "rerun the same `reglue extract` command to repair it" in line


def test_a_full_disk_is_one_line_and_the_rerun_finishes(clean, source, tmp_path, monkeypatch):
    """Issue 12 item 8: ENOSPC while writing chunk 2; the rerun with space completes the same store."""
    from zarr.storage import LocalStore

    set_ = LocalStore.set

    async def full_disk(self, key, value):
        if key.startswith("cls/c/2/"):
            raise OSError(errno.ENOSPC, "No space left on device", key)
        return await set_(self, key, value)

    monkeypatch.setattr(LocalStore, "set", full_disk)
    out = tmp_path / "full.zarr"
    result = CliRunner().invoke(app, ["extract", str(source), "--out", str(out), *ARGS])
    last = result.output.strip().splitlines()[-1]  # after the progress bar: one line, no traceback
    assert result.exit_code == 1 and "Traceback" not in result.output and last.startswith("error: "), result.output
    assert "No space left on device: writing chunk 2" in last and "rerun the same command" in last
    monkeypatch.setattr(LocalStore, "set", set_)
    summary = extract(config(source, out, num_workers=0))
    assert summary.complete and summary.written < 21
    assert_same_arrays(Cache.open(str(out)), clean)


def test_bad_options_change_nothing(source, tmp_path, monkeypatch):
    """Issue 12 item 8b: --chunk-size 0 and a file list with a repeated path; workers from the cores."""
    runner, out = CliRunner(), tmp_path / "c.zarr"
    result = runner.invoke(app, ["extract", str(source), "--out", str(out), *ARGS, "--chunk-size", "0"])
    assert result.exit_code == 1 and "chunk_size must be >= 1, got 0" in result.output and not out.exists()
    listed = tmp_path / "list.txt"
    listed.write_text(f"{source}/ant/00.png 0\n{source}/ant/01.jpg 0\n{source}/ant/00.png 0\n")
    result = runner.invoke(app, ["extract", str(listed), "--out", str(out), *ARGS])
    assert result.exit_code == 1 and "list.txt:3:" in result.output and not out.exists()

    for cores, local_world, want in ((2, 1, 1), (1, 1, 0), (64, 1, 8), (16, 8, 1)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)))
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
        assert ExtractConfig(str(source)).num_workers == want
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when workers exceed the cores
        torch.utils.data.DataLoader(range(2), num_workers=default_workers()).check_worker_number_rationality()


@pytest.mark.slow
def test_two_processes_equal_one(clean, source, tmp_path):
    out = tmp_path / "two.zarr"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                          "reglue.cli", "extract", str(source), "--out", str(out), *ARGS],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert_same_arrays(Cache.open(str(out)), clean)
    assert verify(str(out)) == []


@pytest.mark.slow
def test_sigkill_then_rerun_equals_a_clean_run(clean, source, tmp_path):
    """Also issue 12 items 2 and 5: a second extract on the store stops at once while the first runs; the
    killed run's lock does not block the rerun; two images overwritten in a finished chunk are re-extracted."""
    src, out = tmp_path / "src", tmp_path / "killed.zarr"
    shutil.copytree(source, src)
    env = os.environ | {TEST_DELAY_ENV: "0.4", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "reglue.cli", "extract", str(src), "--out", str(out), *ARGS],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    markers = out / "_markers/extract"
    deadline = time.monotonic() + 120
    while not (markers.is_dir() and len([p for p in markers.iterdir() if p.is_dir()]) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, "extract ended before it could be killed"
        time.sleep(0.05)
    second = CliRunner().invoke(app, ["extract", str(src), "--out", str(out), *ARGS])
    assert second.exit_code == 1 and f"in use by pid {proc.pid} on " in second.output, second.output
    assert "delete" in second.output and len(second.output.strip().splitlines()) == 1
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len([p for p in markers.iterdir() if p.is_dir()])
    assert 2 <= done < 6
    with pytest.raises(ValueError, match="incomplete"):
        Cache.open(str(out))
    rng = np.random.default_rng(7)  # two images of the finished chunk 0 change in place, same names
    for name in ("ant/00.png", "ant/02.png"):
        Image.fromarray(rng.integers(0, 256, (70, 70, 3), dtype=np.uint8)).save(src / name)
    summary = extract(config(src, out, num_workers=0))
    assert summary.complete and summary.written <= 21 - (done - 1) * CHUNK
    got = Cache.open(str(out))
    assert verify(str(out)) == [] and got.meta.skipped == clean.meta.skipped
    changed = [0, 2]
    for name in [*got.meta.dtypes, "paths", "layers_index"]:
        same = np.ones(len(got.read(name)), bool)
        same[changed if name != "layers" else [0]] = False  # layers row 0 is sample 0
        assert got.read(name)[same].tobytes() == clean.read(name)[same].tobytes(), name
    encoder = FeatureEncoder(EncoderSpec.tiny(RES), "cpu")
    images = torch.stack([torch.from_numpy(load_image(src / got.source_paths()[i], RES)) for i in changed])
    want = encoder.encode(images)["cls"]
    torch.testing.assert_close(torch.from_numpy(got.read("cls")[changed]), want, atol=1e-5, rtol=1e-5)
    assert not np.allclose(got.read("cls")[changed], clean.read("cls")[changed], atol=1e-3)


def test_fill_compressed_equals_extract_with_a_compressor(clean, source, tmp_path):
    torch.manual_seed(0)
    channels = [4 * clean.meta.dino_dim, 24, 6]
    save_compressor(tmp_path / "compression_model.pth", EncoderDecoder(channels).eval())
    save_norm_stats(tmp_path / "stats.pth", torch.randn(channels[0]) * 0.1, torch.rand(channels[0]) + 0.5)
    paths = dict(compressor=str(tmp_path / "compression_model.pth"), norm_stats=str(tmp_path / "stats.pth"))

    direct = extract(config(source, tmp_path / "direct.zarr", num_workers=0, **paths))
    filled = tmp_path / "filled.zarr"
    shutil.copytree(clean.url, filled)
    fill_compressed(str(filled), paths["compressor"], paths["norm_stats"], num_workers=0)

    a, b = Cache.open(direct.url), Cache.open(str(filled))
    assert b.has("compressed") and b.meta.compressed_channels == 6 and b.meta.compressor["stage"] == "fill"
    assert a.read("compressed").shape == (21, 6, 4, 4)
    np.testing.assert_allclose(b.read("compressed").astype(np.float32), a.read("compressed").astype(np.float32),
                               atol=2e-3, rtol=2e-3)
    assert not b.read("compressed")[~b.read("valid")].any() and b.read("compressed")[b.valid_indices()].any()
    assert verify(str(filled)) == []
    assert extract(config(source, filled, num_workers=0)).written == 0  # still the same extract config

    flip(filled / "compressed/c/3/0/0/0")  # repair of a filled chunk: by rerunning the fill
    with pytest.raises(ValueError, match=r"chunk 3 of 'compressed' .* rerun `reglue fill-compressed`"):
        Cache.open(str(filled)).read("compressed")
    assert fill_compressed(str(filled), paths["compressor"], paths["norm_stats"], num_workers=0).written == 4
    assert verify(str(filled)) == []
    assert Cache.open(str(filled)).read("compressed").tobytes() == b.read("compressed").tobytes()
