import sys
from pathlib import Path

import torch

# Test helpers (`golden`, `golden_*`) import as plain modules.
sys.path.insert(0, str(Path(__file__).parent))

# Tiny tensors run much faster on one intra-op thread on a shared 2-core machine, and the golden
# vectors were produced with one thread (golden README, "Precision and reproducibility").
torch.set_num_threads(1)
