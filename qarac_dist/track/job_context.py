"""What the sweep hands a trial's job, beside the user's training config and never inside it:
which submission this is, the MLflow store and runs made for it, where the sweep's shared records are,
and what picks the sweep's best trial. A training config run on its own has none of it
(`JobContext()`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from ..base.layout import SweepLayout


@dataclass(frozen=True)
class JobContext:
    attempt: Optional[int] = None
    """Which submission of the trial this job is; written into state.json, so the sweep never
    takes an earlier attempt's verdict for this one's."""
    tracking_uri: Optional[str] = None
    """The sweep's MLflow store (its tracking section, made absolute); over the config's own."""
    experiment: Optional[str] = None
    """The sweep's MLflow experiment."""
    run_id: Optional[str] = None
    """The trial's MLflow run, made when the sweep submitted it."""
    parent_run_id: Optional[str] = None
    """The sweep's parent run, whose best trial is updated when this trial ends."""
    sweep_dir: Optional[str] = None
    """The sweep's directory: its rung records and the lock for parent-run updates."""
    select_metric: Optional[str] = None
    """The metric that picks the sweep's best trial (default: the trial's evaluation.metric)."""
    select_mode: Optional[str] = None
    """max or min (default: the trial's evaluation.mode)."""
    tags: dict = field(default_factory=dict)
    """Run tags the sweep sets (sweep, trial_id, executor)."""
    step: Optional[str] = None
    """The job step that runs the trial in a packed job (`<array>_<task>.<step>`, as squeue -s
    shows it); None: the trial is its job."""
    gpus: int = 0
    """GPUs the trial holds (all its nodes'), as the sweep asked for them: its usage clock's."""
    cpus: int = 0
    """CPU cores the trial holds (all its tasks')."""
    configuration: Optional[str] = None
    """With repeats: the configuration the trial is a seed of (plan/expand.py's Trial.configuration)."""
    configuration_run_id: Optional[str] = None
    """With repeats: that configuration's MLflow run, the parent of this trial's (a search gives
    it the values asked: submit/search.py)."""
    seeds: dict = field(default_factory=dict)
    """With repeats: every seed of that configuration, this trial's included, with the attempt
    submitted when this job was made; successive halving decides a rung on their mean
    (track/rungs.py)."""
    retrain_steps: Optional[int] = None
    """A retraining of the final evaluation (final.retrain: true, submit/retrain.py): train on
    train + validation for this many steps, on the trial's learning-rate schedule, never
    validate, and export the model of the last step as best/."""

    @property
    def sweep(self) -> Optional[SweepLayout]:
        return SweepLayout(Path(self.sweep_dir)) if self.sweep_dir else None

    def to_dict(self) -> dict:
        return asdict(self)
