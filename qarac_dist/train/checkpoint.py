"""Resumable checkpoints: DeepSpeed engine state from every rank, per-rank RNG, and our state;
the trial's policy over them is `Checkpointer` (what the training loop calls).

DeepSpeed writes its `latest` file before every rank has finished its shards, and
`load_checkpoint` only warns when nothing is there. So a checkpoint directory counts as
loadable only once our COMPLETE marker exists, written by rank 0 after a barrier that every
rank reaches after its own files are on disk. A partial directory (a rank killed mid-write)
has no marker and is skipped.

The marker also records every file's size, as measured by the rank that wrote it (so it holds
on a shared filesystem, where another node's view of a new file may lag). A file that a
failing disk or a full quota lost or cut short after the marker was written makes the
checkpoint damaged: resume says so in one line and takes the newest intact one instead.
Sizes cost a stat per file; a checksum would catch silent corruption too but costs a full
read (bench/checkpoint.py measures it).
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from ..base.files import writing_folder
from ..config import UserError
from ..track.trial_dir import TrialDir
from . import faults

MARKER = "COMPLETE"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def complete_tags(directory: Path) -> list[str]:
    """Tags of complete checkpoints, oldest first."""
    if not directory.is_dir():
        return []
    return sorted(p.parent.name for p in directory.glob(f"step*/{MARKER}"))


def saved_world_size(directory: Path, tag: str) -> Optional[int]:
    return _marker(directory, tag).get("world_size")


def _marker(directory: Path, tag: str) -> dict:
    try:
        data = json.loads((directory / tag / MARKER).read_text())
    except (OSError, ValueError):
        return {"damaged": f"{MARKER} unreadable"}
    return data if isinstance(data, dict) else {"damaged": f"{MARKER} is not a JSON object"}


def damage(directory: Path, tag: str) -> Optional[str]:
    """Why checkpoint `tag` cannot be loaded, or None when every recorded file is there whole."""
    marker = _marker(directory, tag)
    if "damaged" in marker:
        return marker["damaged"]
    for name, size in sorted(marker.get("files", {}).items()):
        try:
            actual = (directory / tag / name).stat().st_size
        except FileNotFoundError:
            return f"{name} is missing"
        if actual != size:
            return f"{name} has {actual} bytes, {size} were written"
    return None


def newest_intact(directory: Path, at_most: Optional[int] = None) -> tuple[Optional[str], list[str]]:
    """The newest complete checkpoint whose files are whole (of step `at_most` or before, if
    given), and a line per newer one passed over: damaged, or never completed (a save cut short
    by a kill has no marker)."""
    passed = []
    complete = set(complete_tags(directory))
    tags = sorted(p.name for p in directory.glob("step*") if p.is_dir()) if directory.is_dir() else []
    for tag in reversed(tags):
        if at_most is not None and int(tag[4:12]) > at_most:
            continue
        if tag not in complete:
            passed.append(f"{tag} was never completed (no {MARKER} marker: its save was cut short)")
            continue
        problem = damage(directory, tag)
        if problem is None:
            return tag, passed
        passed.append(f"{tag} is damaged ({problem})")
    return None, passed


def _own_files(tag_dir: Path, rank: int) -> dict[str, int]:
    """The files of this checkpoint that `rank` wrote, with their sizes: DeepSpeed's per-rank
    shards (`zero_pp_rank_<rank>_...`) and our RNG file; rank 0 also the model states."""
    out = {}
    for path in sorted(tag_dir.rglob("*")):
        name = path.relative_to(tag_dir).as_posix()
        if not path.is_file() or name == MARKER:
            continue
        mine = f"zero_pp_rank_{rank}_" in name or name == f"rng_rank{rank}.pt"
        anyones = "zero_pp_rank_" in name or name.startswith("rng_rank")
        if mine or (rank == 0 and not anyones):
            out[name] = path.stat().st_size
    return out


def universal(directory: Path, tag: str) -> str:
    """Convert checkpoint `tag` to a DeepSpeed universal checkpoint (once); returns its tag.

    A ZeRO checkpoint is partitioned by data-parallel rank; only the universal form loads on
    another number of ranks (deepspeed/checkpoint/ds_to_universal.py). Call on rank 0 only."""
    import subprocess
    import sys

    target = f"{tag}_universal"
    if (directory / target / MARKER).exists():
        return target
    shutil.rmtree(directory / target, ignore_errors=True)
    proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                           str(directory / tag), "--output_folder", str(directory / target), "--inject_missing_state"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"checkpointing: {directory / tag} was saved on another number of ranks and could not be "
                        f"converted to a universal checkpoint: {last}")
    files = {path.relative_to(directory / target).as_posix(): path.stat().st_size
             for path in sorted((directory / target).rglob("*")) if path.is_file()}
    (directory / target / MARKER).write_text(json.dumps({**_marker(directory, tag), "files": files}))
    return target


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine, directory: Path, step: int, client_state: dict, rank: int, keep_last: int,
         keep: Optional[str] = None, step_examples: Optional[int] = None) -> str:
    """Save on every rank; returns the tag. `keep` names a tag never pruned (the best);
    `step_examples`, the examples one step takes (what a resume on other ranks must keep)."""
    tag = tag_for(step)
    engine.save_checkpoint(str(directory), tag=tag, client_state=client_state, save_latest=False)
    faults.once("checkpoint-write", step, rank, directory)
    torch.save(rng_state(), directory / tag / f"rng_rank{rank}.pt")
    dist.barrier()  # every rank's shards and RNG file are on disk
    sizes: list = [None] * dist.get_world_size()
    dist.all_gather_object(sizes, _own_files(directory / tag, rank))
    if rank == 0:
        files = {name: size for own in sizes for name, size in own.items()}
        (directory / tag / MARKER).write_text(json.dumps({"step": step, "world_size": dist.get_world_size(),
                                                         "step_examples": step_examples, "files": files}))
        tags = complete_tags(directory)
        for old in tags[:-keep_last]:
            if old != keep:
                shutil.rmtree(directory / old, ignore_errors=True)
    dist.barrier()
    return tag


def load(engine, directory: Path, tag: str, rank: int) -> dict:
    """Load a complete checkpoint into the engine; restores this rank's RNG; returns client state."""
    # DeepSpeed reads a universal checkpoint only when its config says so, and a job that resumed
    # from one may later roll back to one of its own: the tag decides, each time.
    engine._config.load_universal_checkpoint = tag.endswith("_universal")
    path, client_state = engine.load_checkpoint(str(directory), tag=tag)
    if path is None:
        raise RuntimeError(f"checkpoint {directory / tag} could not be loaded")
    # A universal checkpoint carries no RNG files: after a world-size change the ranks are new.
    rng_file = directory / tag / f"rng_rank{rank}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return client_state


class Checkpointer:
    """A trial's checkpoint policy: which checkpoint a job resumes from (the newest complete and
    intact one, converted to a universal checkpoint when it was saved on another number of
    ranks), loading it, and saving one (keeping the newest `keep_last` and the best)."""

    def __init__(self, checkpointing, zero_stage: int, trial: TrialDir, rank: int, world_size: int, training):
        self.checkpointing, self.zero_stage, self.trial = checkpointing, zero_stage, trial
        self.rank, self.world_size = rank, world_size
        self.step_examples = training.micro_batch_size * training.gradient_accumulation_steps * world_size
        """Examples one optimizer step takes (micro batch x accumulation x ranks)."""
        self.directory = trial.checkpoints

    def choose(self) -> Optional[str]:
        """The tag to resume from, or None to start fresh. Rank 0 decides and every rank
        follows. A trial that saved a checkpoint before but finds none it can load fails: it
        never starts over silently."""
        if not self.checkpointing.resume:
            return None
        return self._decided(self._choose)

    def newest(self, at_most: int) -> Optional[str]:
        """The newest complete and intact checkpoint of step `at_most` or before (what a
        rollback goes back to); rank 0 decides and every rank follows."""
        return self._decided(lambda: newest_intact(self.directory, at_most)[0])

    def _decided(self, decide):
        """`decide()` on rank 0, its answer (or its UserError) on every rank."""
        outcome: list = [None]
        if self.rank == 0:
            try:
                outcome[0] = decide()
            except UserError as err:
                outcome[0] = err
        if self.world_size > 1:
            dist.broadcast_object_list(outcome, src=0)  # every rank waits for rank 0's choice
        if isinstance(outcome[0], UserError):
            raise outcome[0]
        return outcome[0]

    def _choose(self) -> Optional[str]:
        tag, passed = newest_intact(self.directory)
        damaged = [line for line in passed if "is damaged" in line]
        status = self.trial.status()
        expected = status.last_checkpoint if status is not None else None
        if tag is None and (damaged or expected is not None):
            what = (f"no checkpoint of it can be loaded: {'; '.join(damaged)}" if damaged else
                    f"this trial saved a checkpoint at step {expected}, but {self.directory} holds no complete "
                    f"checkpoint")
            raise UserError(f"checkpointing: {what}; it will not start over. Restore the checkpoints, or remove "
                            f"{self.trial.state_file} to start from scratch")
        if passed:
            print(f"qarac_dist: {'; '.join(passed)}; {f'resuming from {tag}' if tag else 'starting from scratch'}",
                  file=sys.stderr, flush=True)
        if tag is None:
            return None
        saved = saved_world_size(self.directory, tag)
        self._same_data_order(tag, saved)
        if saved in (None, self.world_size) or self.zero_stage == 0:
            return tag  # ZeRO-0 keeps whole optimizer states: it loads on any number of ranks
        return universal(self.directory, tag)

    def _same_data_order(self, tag: str, saved_world: Optional[int]) -> None:
        """A step's examples are drawn per step (train/data.py): the epoch goes on exactly where
        it stopped only if a step still takes as many examples (another micro batch or
        accumulation, or another number of ranks, may keep that or break it)."""
        saved = _marker(self.directory, tag).get("step_examples")
        if saved is None:  # saved before the marker recorded it: what it was is known only across ranks
            if saved_world in (None, self.world_size):
                return
            saved = self.step_examples // self.world_size * saved_world
        if saved != self.step_examples:
            raise UserError(
                f"checkpointing: {self.directory / tag} was saved on {saved_world} ranks taking {saved} examples a "
                f"step; this job has {self.world_size} ranks taking {self.step_examples}, so the rest of the epoch "
                f"would see some examples twice and others never. Make training.micro_batch_size x "
                f"gradient_accumulation_steps x {self.world_size} ranks equal {saved} to resume here "
                f"(training.global_batch_size: {saved} holds every job of the trial to it)")

    def load(self, engine, tag: str) -> dict:
        """Load `tag` into the engine on every rank; returns our state saved with it."""
        return load(engine, self.directory, tag, self.rank)

    def save(self, engine, step: int, state: dict, best_step: Optional[int]) -> None:
        keep = tag_for(best_step) if best_step is not None else None
        # A save cut short (a full disk) is removed: it never had a marker, so it was never
        # loadable, and its space lets the trial record why it failed.
        with writing_folder(self.directory / tag_for(step)):
            save(engine, self.directory, step, state, self.rank, self.checkpointing.keep_last, keep=keep,
                 step_examples=self.step_examples)
        if self.rank == 0:
            self.trial.update(last_checkpoint=step)
