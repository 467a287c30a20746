"""A careful user's bad day on the run side (issue 12): resume reads no pickled code, a damaged checkpoint
falls back to an intact one, `sample` is never stale, `fid` refuses what it would misread, a full disk
and bad input end in one line. Tiny preset, method sit, CPU fp32; the kill and lock cases are
subprocesses in tests/test_train_loop.py (test_resume_after_sigkill_is_exact)."""

import builtins
import errno
import json
import os
import shutil

import numpy as np
import pytest
import torch
from images import write_class_images
from safetensors.torch import load_file
from test_models_checkpoints import Exploit
from test_sampling_generate import FAST, KWARGS, tiny_checkpoint, tiny_sit  # noqa: F401  (fixture)
from typer.testing import CliRunner

from reglue.cli import app
from reglue.pipeline.encoders import EncoderSpec
from reglue.pipeline.extract import ExtractConfig, extract
from reglue.trainer import npz
from reglue.trainer.checkpoints import save_snapshot
from reglue.trainer.loop import TrainConfig, raise_if_non_finite, train
from reglue.trainer.models import preset_kwargs
from reglue.trainer.objective import get_method
from reglue.trainer.runfolder import checkpoints
from reglue.trainer.statefiles import seal, verify

N, BATCH = 16, 8
READ_ON_RESUME = ("model.safetensors", "optimizer.pt", "ema.pt", "state.json", "rng-0.pt", "manifest.json")
ACCELERATE_FILES = ("custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "random_states_0.pkl", "optimizer.bin",
                    "scaler.pt", "pytorch_model.bin")  # what Accelerate's load_state would unpickle


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("runsafe")
    write_class_images(root / "images", N, classes=2, shape=(64, 64, 3), seed=1)
    out = str(root / "cache.zarr")
    extract(ExtractConfig(str(root / "images"), out, EncoderSpec(preset="tiny", resolution=64), chunk_size=BATCH,
                          batch_size=BATCH, num_workers=0))
    return out


def config(cache, out, **kw):
    base = dict(method="sit", flip=False, model="SiT-tiny/2", global_batch=BATCH, precision="fp32", max_steps=6,
                log_every=1, ckpt_every=3, snapshot_every=100, sample_every=0, trackers=())
    return TrainConfig(cache, str(out), **{**base, **kw})


def cli_args(cache, out, *extra):
    return ["train", "--cache", cache, "--out", str(out), "--method", "sit", "--no-flip", "--model", "SiT-tiny/2",
            "--global-batch", str(BATCH), "--precision", "fp32", "--max-steps", "6", "--ckpt-every", "3",
            "--sample-every", "0", "--snapshot-every", "100", "--trackers", "", *extra]


@pytest.fixture(scope="module")
def six_steps(cache, tmp_path_factory):
    """A run of 6 steps with checkpoints at 3 and 6 (copied by each case, never changed)."""
    run = tmp_path_factory.mktemp("six") / "run"
    train(config(cache, run))
    return run


def one_line_error(result) -> str:
    """Exit 1 with one line on stderr (stdout may hold `train`'s recipe line)."""
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def error_after_progress(result) -> str:
    """After progress lines: exit 1, no traceback, one error line."""
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert result.exit_code == 1 and len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


def weights(run, step=6):
    return load_file(run / "checkpoints" / f"step-{step:07d}" / "model.safetensors")


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- item 0: resume never runs code --------------------------------------------------------------

def test_resume_reads_no_pickled_code(cache, six_steps, tmp_path, capsys):
    marker = tmp_path / "pwned"
    assert sorted(p.name for p in (six_steps / "checkpoints" / "step-0000006").iterdir()) == sorted(READ_ON_RESUME)
    # An attacker who rewrites a file and then the manifest (so that it verifies): every file resume reads.
    for name in (*READ_ON_RESUME, "all of Accelerate's"):
        run = tmp_path / name
        shutil.copytree(six_steps, run)
        ckpt = run / "checkpoints" / "step-0000006"
        for planted in (ACCELERATE_FILES if name.startswith("all") else [name]):
            torch.save(Exploit(marker), ckpt / planted)
        if name != "manifest.json":
            seal(ckpt, step=6, processes=1)
        capsys.readouterr()
        train(config(cache, run))
        said = capsys.readouterr().out
        assert not marker.exists(), name
        if name.startswith("all"):  # never read: the run resumes from step 6 as if they were not there
            assert "resumed from" in said and "warning" not in said
        else:  # refused, set aside, resumed from step 3 and retrained to the same weights
            assert f"checkpoint {ckpt} is damaged" in said and "resuming from step-0000003" in said, said
            assert (run / "checkpoints" / "damaged-step-0000006").is_dir()
            assert same(weights(run), weights(six_steps)), name
    # With no intact checkpoint left: one line, nothing changed, nothing run.
    run = tmp_path / "only"
    shutil.copytree(six_steps, run)
    shutil.rmtree(run / "checkpoints" / "step-0000003")
    ckpt = run / "checkpoints" / "step-0000006"
    for name in (*READ_ON_RESUME[:-1], *ACCELERATE_FILES):
        torch.save(Exploit(marker), ckpt / name)
    seal(ckpt, step=6, processes=1)
    line = one_line_error(CliRunner().invoke(app, cli_args(cache, run)))
    assert "no checkpoint in" in line and "step-0000006: cannot be loaded" in line and "nothing was changed" in line
    assert not marker.exists() and [p.name for p in checkpoints(run)] == ["step-0000006"]


# ---- item 2b: a damaged checkpoint is never resumed -----------------------------------------------

def flip(path, count=64):
    data = bytearray(path.read_bytes())
    for i in np.random.default_rng(0).choice(len(data) - 200, count, replace=False) + 100:
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = [(flip, "optimizer.pt", "sha256"), (truncate, "model.safetensors", "bytes"), (truncate, "ema.pt", "bytes")]


@pytest.mark.parametrize("damage, name, why", DAMAGE)
def test_a_damaged_checkpoint_falls_back_to_the_newest_intact_one(cache, six_steps, tmp_path, capsys, damage, name,
                                                                  why):
    run = tmp_path / "run"
    shutil.copytree(six_steps, run)
    damage(run / "checkpoints" / "step-0000006" / name)
    # The NaN stop names the newest checkpoint that verifies, the one a rerun resumes from.
    with pytest.raises(FloatingPointError, match="last good checkpoint is .*step-0000003"):
        raise_if_non_finite(type("One", (), {"reduce": staticmethod(lambda t, op: t)}), torch.tensor(5), run)
    train(config(cache, run))
    said = capsys.readouterr().out
    assert f"{name} " in said and why in said and "set aside as damaged-step-0000006" in said, said
    assert "resumed from" in said and "step-0000003 at step 3" in said
    assert same(weights(run), weights(six_steps)) and verify(run / "checkpoints" / "step-0000006") is None
    if name == "ema.pt":  # `sample` refuses the damaged folder in one line
        args = ["sample", str(run / "checkpoints" / "damaged-step-0000006"), "--num", "2", *FAST]
        assert "is damaged (ema.pt has" in one_line_error(CliRunner().invoke(app, args))


# ---- items 6, 8b: refuse before touching the disk -------------------------------------------------

def test_train_refuses_a_foreign_out_and_a_bad_config_before_writing(cache, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's")
    line = one_line_error(CliRunner().invoke(app, cli_args(cache, mine)))
    assert "is a folder that is not a reglue run folder" in line and "nothing was changed" in line
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert "exists and is not a folder" in one_line_error(CliRunner().invoke(app, cli_args(cache, afile)))
    assert afile.read_text() == "x"
    for bad, what in (("--lr", "lr must be a positive"), ("--global-batch", "global_batch must be positive")):
        line = one_line_error(CliRunner().invoke(app, cli_args(cache, tmp_path / "new", bad, "-1")))
        assert what in line and not (tmp_path / "new").exists()
    result = CliRunner().invoke(app, ["models", "--method", "bogus"])  # a usage error: click's exit 2
    errors = [line for line in result.output.splitlines() if "bogus" in line]
    assert result.exit_code == 2 and "Traceback" not in result.output and len(errors) == 1
    assert "'bogus' is not one of 'sit', 'repa', 'reg', 'redi', 'reglue'" in errors[0]


# ---- item 9: a full disk during a checkpoint -----------------------------------------------------

class DiskFills:
    """A file on a disk with `room` bytes left (shared by the files of one checkpoint): a partial write,
    then ENOSPC, as the kernel does."""

    room = 300_000  # model.safetensors (~200 KB) fits, optimizer.pt (~430 KB) does not

    def __init__(self, f):
        self.f = f

    def write(self, data):
        data = memoryview(data).cast("B")
        if len(data) > DiskFills.room:
            self.f.write(data[:DiskFills.room])
            DiskFills.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        DiskFills.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_a_full_disk_during_a_checkpoint_keeps_the_last_one(cache, tmp_path, monkeypatch):
    run, real_open = tmp_path / "run", builtins.open

    def full_at_step_6(path, mode="r", *args, **kw):
        f = real_open(path, mode, *args, **kw)
        return DiskFills(f) if ".tmp-step-0000006" in str(path) and "w" in mode else f

    monkeypatch.setattr(builtins, "open", full_at_step_6)
    line = error_after_progress(CliRunner().invoke(app, cli_args(cache, run)))
    assert "No space left on device" in line and ".tmp-step-0000006/optimizer.pt" in line and "rerun" in line
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-0000003"]  # no tmp, no step-6
    monkeypatch.undo()
    result = CliRunner().invoke(app, cli_args(cache, run))
    assert result.exit_code == 0 and "at step 3" in result.output, result.output
    assert verify(run / "checkpoints" / "step-0000006") is None
    # Samples land beside a checkpoint folder by default (step-0000006-sde3-...npz): still a resumable run.
    sample = CliRunner().invoke(app, ["sample", str(run / "checkpoints" / "step-0000006"), "--num", "1", *FAST])
    assert sample.exit_code == 0 and list((run / "checkpoints").glob("step-0000006-sde3-*.npz")), sample.output
    assert "at step 6" in CliRunner().invoke(app, cli_args(cache, run)).output


# ---- item 2c: sample is never stale ------------------------------------------------------------------

def test_sample_records_its_config_and_is_never_stale(tiny_checkpoint, tmp_path):  # noqa: F811
    run = lambda *a: CliRunner().invoke(app, ["sample", str(tiny_checkpoint), "--num", "2", *FAST, *map(str, a)])  # noqa: E731
    first = run()
    assert first.exit_code == 0, first.output
    made = sorted(tiny_checkpoint.parent.glob("*.npz"))
    assert len(made) == 1 and made[0].name.startswith("0000100-sde3-cfg2.3-seed0-2-")  # tiny VAE: hashed suffix
    with np.load(made[0]) as z:
        record, images = json.loads(str(z["config"][0])), z["arr_0"]
    assert record["cls_cfg_scale"] == 2.3 and record["labels"] == "random" and len(record["checkpoint_sha256"]) == 64
    # Other settings that change pixels: a new file each, sampled with them (not the old arrays).
    for key, extra in (("cls_cfg_scale", ["--cls-cfg-scale", "0"]), ("guidance_high", ["--guidance-high", "0.5"]),
                       ("labels", ["--labels", "balanced"])):
        assert run(*extra).exit_code == 0
        (new,) = set(tiny_checkpoint.parent.glob("*.npz")) - set(made)
        with np.load(new) as z:
            assert json.loads(str(z["config"][0]))[key] == type(record[key])(extra[1])
            if key == "labels":
                assert not np.array_equal(z["arr_0"], images) and z["arr_1"].tolist() == [0, 1]
        made.append(new)
    # The same settings: nothing to do. Into an existing file of another config: one line, the file kept.
    assert "exists with this configuration" in run().output
    line = one_line_error(run("--out", made[0], "--cfg-scale", "1.5"))
    assert "another configuration" in line and "cfg_scale: 2.3 there, 1.5 now" in line
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, arr_0=images)
    assert "records no sampling configuration" in one_line_error(run("--out", foreign))
    # The checkpoint changed under the same name: refused, not returned.
    save_snapshot(tiny_checkpoint, tiny_sit(seed=1), model_kwargs={**preset_kwargs("SiT-tiny/2"), **KWARGS},
                  method=get_method("reglue", feature_channels=4), step=100,
                  meta=dict(latent_channels=4, resolution=64, vae_scaling_factor=0.18215))
    assert "checkpoint_sha256" in one_line_error(run())


# ---- item 9: a full disk during `sample` ----------------------------------------------------------

def test_a_full_disk_during_the_sample_merge_keeps_the_parts(tiny_checkpoint, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "s.npz"
    args = ["sample", tiny_checkpoint, "--num", "4", "--batch-size", "2", "--part-size", "2", "--out", out, *FAST]
    real = npz._write_members

    def full_at_merge(tmp, arrays):
        if tmp.name == "s.npz.tmp":
            tmp.write_bytes(b"PK" + bytes(1000))  # what a full disk leaves: a partial file
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(tmp, arrays)

    monkeypatch.setattr(npz, "_write_members", full_at_merge)
    line = error_after_progress(CliRunner().invoke(app, list(map(str, args))))
    assert "No space left on device" in line and f"'{out}'" in line
    assert not out.exists() and not out.with_name("s.npz.tmp").exists()
    assert sorted(p.name for p in (tmp_path / "s.npz.parts").iterdir()) == ["config.json", "part-00000.npz",
                                                                             "part-00001.npz"]
    monkeypatch.undo()
    monkeypatch.setattr("reglue.trainer.generate.generate_images", lambda *a, **k: pytest.fail("resampled"))
    assert CliRunner().invoke(app, list(map(str, args))).exit_code == 0
    assert npz.check_images(out) == (4, 64, 64, 3)


# ---- item 2d: fid scores only uint8 NHWC RGB -------------------------------------------------------

def test_fid_refuses_what_it_would_misread(tmp_path):
    rng = np.random.default_rng(0)
    good = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    cases = {"float": (dict(arr_0=good / 255.0), "float64 [4, 16, 16, 3] with values in [0"),
             "nchw": (dict(arr_0=good.transpose(0, 3, 1, 2)), "channels first (NCHW)"),
             "grey": (dict(arr_0=good[..., 0]), "greyscale"),
             "grey1": (dict(arr_0=good[..., :1]), "greyscale"),
             "noarr": (dict(images=good), "has no arr_0 (it holds ['images'])")}
    for name, (arrays, found) in cases.items():
        np.savez(tmp_path / f"{name}.npz", **arrays)
        line = one_line_error(CliRunner().invoke(app, ["fid", str(tmp_path / f"{name}.npz"), "--ref", "none.npz"]))
        assert found in line and "expected arr_0: uint8 images [N,H,W,3]" in line, line
    np.savez(tmp_path / "ok.npz", arr_0=good)
    (tmp_path / "cut.npz").write_bytes((tmp_path / "ok.npz").read_bytes()[:2000])
    line = one_line_error(CliRunner().invoke(app, ["fid", str(tmp_path / "cut.npz"), "--ref", "none.npz"]))
    assert "not a complete npz" in line
    assert npz.check_images(tmp_path / "ok.npz") == (4, 16, 16, 3)
    # fid-ref names a missing source before it looks for the Inception weights.
    line = one_line_error(CliRunner().invoke(app, ["fid-ref", str(tmp_path / "gone"), "--out", "r.npz"]))
    assert str(tmp_path / "gone") in line and "does not exist" in line


# ---- item 8: a text file or an unsafe pickle as a model file -------------------------------------

def test_unsafe_or_foreign_model_files_end_in_one_line(cache, tmp_path):
    marker = tmp_path / "pwned"
    text, evil = tmp_path / "notes.pt", tmp_path / "evil.pth"
    text.write_text("not a checkpoint\n")
    torch.save({"ema": {}, "args": Exploit(marker)}, evil)
    assert "not a readable torch file" in one_line_error(CliRunner().invoke(app, ["sample", str(text), *FAST]))
    assert "refused to load" in one_line_error(CliRunner().invoke(app, ["sample", str(evil), *FAST]))
    line = one_line_error(CliRunner().invoke(app, ["fill-compressed", "--cache", cache, "--compressor", str(evil),
                                                   "--norm-stats", str(evil)]))
    assert "refused to load" in line and "posix.system" in line
    assert not marker.exists()
