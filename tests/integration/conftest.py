"""Everything here runs real processes: DeepSpeed ranks, SLURM jobs, MLflow servers, chromium.

With `pytest -n 2 --dist loadgroup` (what CI and the README run) the tests that submit to the
local SLURM cluster run one after another on one worker, so that they never compete for its
four CPU slots, while the tests of local processes run on the other. The two local tests of
test_faults.py (checkpoints resumed on another number of ranks) join the cluster's worker, which
has less to do.
"""

import pytest


def pytest_collection_modifyitems(items):
    for item in items:
        if "/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
            slurm = "cluster" in getattr(item, "fixturenames", ()) or item.fspath.basename == "test_faults.py"
            item.add_marker(pytest.mark.xdist_group("slurm" if slurm else "local"))
