"""Everything here runs real processes: DeepSpeed ranks, SLURM jobs, MLflow servers, chromium.

CI and the README run `pytest tests -n 2 --dist loadgroup`. No test is in a group (with pytest
9.2 xdist's groups are silently ignored anyway: pytest-xdist #1386), so xdist's scope scheduler
hands each worker the next test as it frees up, the integration tests first, since they are
collected first. Measured on 2 cores: the landing CI of stop 27 took 38 minutes in all this way;
`--dist worksteal` took 39 minutes of pytest alone (42 in all) in one run; three workers were
slower still (load averages of 5-6, a benchmark beside it at the lowest priority); and with
plain `--dist load` the first worker's initial chunk holds every integration test.

The two workers keep both cores busy (idle 3-5% of the time, measured), so what costs is CPU,
and most of it is Python processes starting: a trial's imports of torch, transformers,
DeepSpeed and MLflow take about 15 s of CPU, a driver's about 9 (MLflow, and its migrations
on a new sqlite store). So a test starts as few trials and drivers as its point needs, tests
that leave an MLflow server running share one per worker (tests/conftest.py), and slow steps
(tests/helpers/faults.py) stop sleeping once the interruption a test is about is behind it.
Fresh-clone CI runs at stop 30 took 36.6 and 33.4 minutes in all (pytest 33:32 and 30:47)
for the same tests, against 36.6 and 38.0 at stop 29: a run differs from the next by minutes
here. In the first, the tests changed at stop 30 took 792 s against 919 at stop 29. Stop 30's
landing CI took 31.5 minutes; a fresh-clone run at stop 31, 35.8 (pytest 33:20).

Tests on the local SLURM cluster may run at the same time as each other: a job that finds the
cluster's CPUs taken stays PENDING until they free, and every test waits on job states, never
on a fixed time.
"""

import pytest


def pytest_collection_modifyitems(items):
    for item in items:
        if "/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
