"""Whether the sweep directory's locks hold across nodes, checked once per sweep before its
trials run as steps (packed jobs, a search): runners on several nodes take each other's trials
under `.claims.lock`, ask the search record under its lock, and decide rungs under theirs
(base/lock.py). Lustre mounted with `localflock` grants fcntl locks per node, silently: two
runners would then start one trial twice.

The driver holds a lock on a probe file and runs a tiny step on a compute node that tries to
take it without waiting: refused there, the lock is seen (recorded in the sweep directory, not
asked again); granted, the locks are node-local and the sweep is refused, in one line. A step
that cannot be placed within IMMEDIATE_S (a busy cluster) or fails otherwise leaves the
question open: said in one line, asked again by the next run of the sweep.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time

from ..base.errors import UserError
from ..base.files import DamagedFile, read_json, write_json
from ..base.layout import SweepLayout
from ..base.lock import locked
from ..config.sweep import Resources

IMMEDIATE_S = 120
"""srun --immediate: how long the probe may wait for a place on a compute node."""
NOT_SEEN = 10
"""The probe's exit code when it was granted the lock the driver holds."""
MARK = "qarac_dist lock probe:"
PROBE = ("import fcntl, os, sys\n"
         "f = open(sys.argv[1], 'a')\n"
         "try:\n"
         "    fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
         "except OSError:\n"
         f"    print('{MARK} seen on', os.uname().nodename); sys.exit(0)\n"
         f"print('{MARK} not seen on', os.uname().nodename); sys.exit({NOT_SEEN})\n")
"""Tries the lock and says, in a line only it prints, whether it was refused (seen) or granted."""


def check(layout: SweepLayout, resources: Resources, python: str = sys.executable) -> None:
    """UserError (one line) when a lock taken here is not seen from a compute node."""
    try:
        if (read_json(layout.lock_check) or {}).get("seen"):
            return
    except DamagedFile:
        pass  # asked again, and written whole
    where = [f"--{key}={getattr(resources, key)}" for key in ("partition", "account", "qos")
             if getattr(resources, key) is not None]
    command = ["srun", f"--immediate={IMMEDIATE_S}", "--nodes=1", "--ntasks=1", "--time=1",
               f"--job-name={layout.root.name}-lock-check", *where, python, "-c", PROBE, str(layout.lock_probe)]
    with locked(layout.lock_probe):
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=IMMEDIATE_S + 60)
        except (OSError, subprocess.TimeoutExpired) as err:
            proc = subprocess.CompletedProcess(command, -1, "", f"{type(err).__name__}: {err}")
    said = next((line for line in proc.stdout.splitlines() if line.startswith(MARK)), "")
    here, node = socket.gethostname(), said.rpartition(" on ")[2]
    if proc.returncode == 0 and said.startswith(f"{MARK} seen on "):
        write_json(layout.lock_check, {"seen": True, "from": here, "on": node, "time": time.time()})
    elif proc.returncode == NOT_SEEN and said.startswith(f"{MARK} not seen on "):
        raise UserError(f"{layout.root}: a lock taken on {here} is not seen on {node}: the file system of runs_dir "
                        f"grants fcntl locks per node (Lustre mounted with localflock does), and packed jobs or a "
                        f"search on several nodes would start one trial twice; mount it with -o flock, use a "
                        f"runs_dir on NFS, or run without pack and search")
    else:
        first = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}, no answer from the probe"])[0]
        print(f"qarac_dist: could not check that locks hold across nodes ({first}); going on, and asking again on "
              f"the next run of the sweep", file=sys.stderr)
