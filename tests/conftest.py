import sys
from pathlib import Path

import pytest
import torch

# Test helpers (`golden`, `golden_*`) import as plain modules.
sys.path.insert(0, str(Path(__file__).parent))

# Tiny tensors run much faster on one intra-op thread on a shared 2-core machine, and the golden
# vectors were produced with one thread (golden README, "Precision and reproducibility").
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def standin_inception(tmp_path_factory):
    """The random-weight Inception stand-in (trainer.inception.save_standin), scripted once per session: its
    TorchScript compilation is the slow part of every FID test."""
    from reglue.trainer.inception import INCEPTION_FILE, save_standin

    return save_standin(tmp_path_factory.mktemp("inception") / INCEPTION_FILE)
