"""Everything here runs real processes: DeepSpeed ranks, SLURM jobs, MLflow servers, chromium.

CI and the README run `pytest tests -n 2 --dist worksteal`: a worker that runs out of tests
takes some from the other (with `load`, the first worker's initial chunk holds every
integration test, which then run one after another). Three workers on these two cores were
slower: a CI run (a benchmark ran beside it at the lowest priority) measured load averages of
5-6, and its integration tests were still running after 37 minutes.

Tests on the local SLURM cluster may run at the same time as each other: a job that finds the
cluster's CPUs taken stays PENDING until they free, and every test waits on job states, never
on a fixed time. (xdist's `loadgroup` would keep them on one worker, but with pytest 9.2 it
silently stops grouping: pytest-xdist #1386.)
"""

import pytest


def pytest_collection_modifyitems(items):
    for item in items:
        if "/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
