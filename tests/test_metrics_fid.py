"""`reglue fid` / `fid-ref` end to end on a tiny checkpoint, with a random-weight Inception of the
real architecture saved as the real file's TorchScript, and the Inception weights lookup."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_sampling_generate import run_cli, tiny_checkpoint  # noqa: F401  (fixture)

from reglue import weights
from reglue.trainer import inception as inc
from reglue.trainer.generate import GenerateConfig
from reglue.trainer.inception import INCEPTION_FILE, Inception, inception_file
from reglue.weights import WeightsUnavailable


@pytest.fixture(autouse=True)
def one_thread():
    """Inception on 299^2 inputs: one thread is ~4x faster than two on a shared, loaded 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def standin(standin_inception):
    return standin_inception


def test_inception_file_lookup_and_offline_errors(tmp_path, monkeypatch, standin):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(inc.INCEPTION_ENV, raising=False)
    assert inception_file(standin) == standin and inception_file(standin.parent) == standin
    monkeypatch.setenv(inc.INCEPTION_ENV, str(standin))
    assert inception_file() == standin
    monkeypatch.setenv(inc.INCEPTION_ENV, str(tmp_path / "nowhere.pt"))
    with pytest.raises(WeightsUnavailable, match="nowhere.pt.*inception-2015-12-05.pt.*--inception"):
        inception_file()
    monkeypatch.delenv(inc.INCEPTION_ENV)
    with pytest.raises(WeightsUnavailable, match=str(tmp_path / "cache" / "reglue" / INCEPTION_FILE)):
        inception_file(download=False)

    def offline(url, file):
        raise OSError("Name or service not known")

    monkeypatch.setattr(weights, "why_offline", lambda url: None)  # as if online, and then the download fails
    monkeypatch.setattr(weights, "download_file", offline)
    with pytest.raises(WeightsUnavailable, match="download failed.*Name or service.*nvlabs-fi-cdn"):
        inception_file()
    renamed = tmp_path / "inception.pt"
    renamed.write_bytes(standin.read_bytes())
    with pytest.raises(ValueError, match="must be named"):
        inception_file(renamed)


def test_one_pass_features_equal_the_networks_own(standin):
    net = Inception(standin)
    images = torch.randint(0, 256, (2, 3, 48, 40), dtype=torch.uint8)  # any size: resized to 299 inside
    pool, spatial = net.pool_and_spatial(images)
    torch.testing.assert_close(pool, net.pool(images), rtol=0, atol=0)
    assert spatial.shape == (2, 17 * 17 * 7) and net.spatial_checked
    probs = net.probs(pool)
    assert probs.shape == (2, 1008) and torch.allclose(probs.sum(1), torch.ones(2))


def test_fid_end_to_end_on_a_tiny_checkpoint(tiny_checkpoint, standin, tmp_path):  # noqa: F811
    real = tmp_path / "real"
    real.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):  # odd sizes: fid-ref applies the ADM center crop
        Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(real / f"{i}.png")
    common = ["--inception", standin, "--cpu"]
    run_cli("fid-ref", real, "--out", tmp_path / "ref.npz", "--resolution", 64, *common)
    out = run_cli("fid", tiny_checkpoint, "--ref", tmp_path / "ref.npz", "--num", 4, "--weights", "tiny", *common)
    samples = sorted(tiny_checkpoint.parent.glob("*.npz"))
    assert [p.name for p in samples] == [GenerateConfig(str(tiny_checkpoint), num=4, vae_preset="tiny").out_path.name]
    assert samples[0].name.startswith("0000100-sde250-cfg2.3-seed0-4-")  # beside the checkpoint; tiny VAE hashed
    report = json.loads(samples[0].with_suffix(".metrics.json").read_text())
    metrics = report["metrics"]
    assert set(metrics) == {"fid", "sfid", "inception_score", "precision", "recall"} and not report["not_computed"]
    assert metrics["fid"] > 0 and metrics["sfid"] > 0 and 1 <= metrics["inception_score"] <= 1008
    assert "FID-4 " in out and report["summary"] in out and report["num_samples"] == 4

    # The samples against their own statistics: FD ~ 0 and full precision/recall.
    run_cli("fid-ref", samples[0], "--out", tmp_path / "self.npz", *common)
    run_cli("fid", samples[0], "--ref", tmp_path / "self.npz", "--no-sfid", "--out", tmp_path / "m.json", *common)
    metrics = json.loads((tmp_path / "m.json").read_text())["metrics"]
    assert abs(metrics["fid"]) < 1e-6 and metrics["precision"] == metrics["recall"] == 1.0
    assert json.loads((tmp_path / "m.json").read_text())["not_computed"] == {"sfid": "turned off"}


def test_fid_during_training_matches_the_samples_it_draws(standin, tmp_path):
    from test_sampling_generate import tiny_sit

    from reglue import weights
    from reglue.trainer.evaluate import fid_during_training
    from reglue.trainer.generate import generate_images
    from reglue.trainer.metrics import FeatureStats, Reference, frechet_distance
    from reglue.trainer.sampling import SamplerConfig

    model, vae, net = tiny_sit(), weights.load_vae(preset="tiny"), Inception(standin)
    ref = Reference(mu=np.zeros(2048), sigma=np.eye(2048) * 1e-3)
    kw = dict(latent_channels=4, scaling_factor=0.18215, sampler=SamplerConfig(num_steps=2), seed=5)
    got = fid_during_training(model, num=3, reference=ref, inception=net, vae=vae, batch_size=2, **kw)
    images, labels = generate_images(model, vae, [0, 1, 2], labels="balanced", **kw)
    mu, sigma = FeatureStats(2048).update(net.pool(images.permute(0, 3, 1, 2))).mu_sigma()
    assert got["name"] == "FID-3" and labels.tolist() == [0, 1, 2]
    assert got["fid"] == pytest.approx(frechet_distance(mu, sigma, ref.mu, ref.sigma), rel=1e-9)


def test_features_keep_rows_at_positions_but_statistics_of_all():
    from reglue.trainer.evaluate import features
    from reglue.trainer.metrics import statistics

    class Fake:  # pool_3 stand-in: the per-image channel sums, tiled to 2048
        device = torch.device("cpu")

        def pool(self, images):
            return images.float().sum((2, 3)).repeat(1, 683)[:, :2048]

    images = np.random.default_rng(0).integers(0, 256, (8, 4, 4, 3), dtype=np.uint8)
    out = features(Fake(), iter([images[:3], images[3:6], images[6:]]), 8, spatial=False, keep=np.array([0, 4, 7]))
    every = Fake().pool(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_array_equal(out.rows, every[[0, 4, 7]])
    np.testing.assert_allclose(out.pool.mu_sigma()[1], statistics(every)[1], rtol=1e-10, atol=1e-8)
    assert out.spatial is None and out.pool.n == 8
