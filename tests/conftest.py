import sys
from pathlib import Path

# Test helpers (`golden`, `golden_*`, `helpers`) import as plain modules.
sys.path.insert(0, str(Path(__file__).parent))
