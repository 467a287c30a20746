"""Parity with the official code: every golden case folder found, driven by its case.json.

Select with `pytest -k golden`. Runners live in `tests/golden_*.py`, one file per area.
"""

import golden
import golden_models  # noqa: F401  (registers runners)
import golden_pipeline  # noqa: F401
import golden_sampling  # noqa: F401
import golden_train  # noqa: F401
import pytest

FOLDERS = golden.case_folders()


@pytest.mark.parametrize("folder", FOLDERS, ids=[f.name for f in FOLDERS])
def test_golden(folder):
    case = golden.load_case(folder)
    run = golden.RUNNERS.get(case.kind)
    if run is None:
        pytest.skip(f"golden case kind {case.kind!r} has no runner yet ({folder})")
    run(case)


def test_golden_dir_has_cases():
    assert FOLDERS, f"no golden cases under {golden.golden_dir()} (set REGLUE_GOLDEN_DIR)"
