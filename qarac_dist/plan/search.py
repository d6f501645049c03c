"""Model-based search's choice (pure): the values of the next trial, from Optuna's sampler and
everything recorded before it (track/search_record.py keeps the record; submit/search.py asks).

The study is rebuilt in memory at each ask, never stored: finished trials with their value (a
pruned one with the values it reported at its rungs, as Optuna's pruners report them), trials
still running as RUNNING (TPE's constant liar takes them as bad, so trials asked at the same
time spread out), and the sampler as it was after the previous ask (its random state, pickled
into the record), so a sequence of asks is the sequence `study.optimize` would make. Why not an
Optuna storage: SQLite must not live on a shared filesystem, the journal file backends lost or
interleaved lines on NFS and left locks behind killed processes; our record has one writer at a
time under an fcntl lock, which the kernel releases when its holder dies.

A configuration this sweep has already tried is not trained again (optuna #2021: nothing in
Optuna's samplers skips one, and on a space of choices TPE keeps asking its incumbent): the
sampler is told the earlier result as the answer to the repeat, or the repeat is left running
beside the running one, and asked again, up to REASKS times.
"""

from __future__ import annotations

import base64
import json
import math
import pickle
from dataclasses import dataclass, field
from typing import Optional

from ..config.sweep import Distribution, Search

REASKS = 32
"""Asks at most per slot that land on a configuration already tried; after that the repeat is
trained (a space of choices nearly used up)."""


@dataclass(frozen=True)
class Told:
    """A trial the sampler learns from: its values and how it ended."""

    params: dict
    state: str
    """COMPLETE, PRUNED, FAIL, or RUNNING (asked, not ended)."""
    value: Optional[float] = None
    intermediate: dict = field(default_factory=dict)
    """Step -> the select metric at each validation (what a pruned trial is ranked by)."""


@dataclass(frozen=True)
class Choice:
    params: dict
    sampler: str
    """The sampler after this ask (base64 of its pickle): the next ask starts from it."""
    study_attrs: dict
    """The study's system attributes after this ask (QMC keeps its sequence position there)."""


def distributions(params: dict[str, Distribution]) -> dict:
    """Optuna's distribution for each searched key, in the order the sweep file gives."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out = {}
    for key, d in params.items():
        if d.distribution == "choice":
            out[key] = CategoricalDistribution(d.values)
        elif d.distribution == "randint":
            out[key] = IntDistribution(int(d.low), int(d.high))
        else:
            out[key] = FloatDistribution(d.low, d.high, log=d.distribution == "loguniform")
    return out


def new_sampler(search: Search):
    """The sampler as a search starts it (its state afterwards travels in the record)."""
    import optuna

    seed = search.seed
    startup = {} if search.startup_trials is None else {"n_startup_trials": search.startup_trials}
    return {"tpe": lambda: optuna.samplers.TPESampler(seed=seed, constant_liar=True, **startup),
            "gp": lambda: optuna.samplers.GPSampler(seed=seed, **startup),
            "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed, **startup),
            "qmc": lambda: optuna.samplers.QMCSampler(seed=seed),
            "random": lambda: optuna.samplers.RandomSampler(seed=seed)}[search.sampler]()


def encode(sampler) -> str:
    """A sampler as the record keeps it (Choice.sampler): base64 of its pickle."""
    return base64.b64encode(pickle.dumps(sampler)).decode()


def choose(search: Search, mode: str, history: list[Told], sampler: Optional[str], study_attrs: dict,
           warm: list[Told] = ()) -> Choice:
    """The next trial's values. `history`: this sweep's trials in the order they were asked;
    `sampler` and `study_attrs`: as the previous ask left them (None: the first ask); `warm`:
    another sweep's finished trials, told first."""
    import optuna
    from optuna.trial import TrialState, create_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    state = pickle.loads(base64.b64decode(sampler)) if sampler else new_sampler(search)
    study = optuna.create_study(direction="maximize" if mode == "max" else "minimize", sampler=state)
    for key, value in study_attrs.items():
        study._storage.set_study_system_attr(study._study_id, key, value)
    space = distributions(search.params)
    trials = []
    for told in [*warm, *history]:
        if told.state == "COMPLETE" and (told.value is None or not math.isfinite(told.value)):
            told = Told(told.params, "FAIL")
        trials.append(create_trial(state=TrialState[told.state], params=told.params, distributions=space,
                                   value=told.value if told.state == "COMPLETE" else None,
                                   intermediate_values={int(k): v for k, v in told.intermediate.items()
                                                        if math.isfinite(v)}))
    study.add_trials(trials)
    trial = study.ask(space)
    live = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    tried = {_key(t.params): t for t in trials[len(warm):] if t.state in live}
    for _ in range(REASKS):
        earlier = tried.get(_key(trial.params))
        if earlier is None:
            break
        if earlier.state != TrialState.RUNNING:
            for step, v in earlier.intermediate_values.items():
                trial.report(v, step)
            study.tell(trial, earlier.value, state=earlier.state)
        trial = study.ask(space)
    return Choice(dict(trial.params), encode(state),
                  dict(study._storage.get_study_system_attrs(study._study_id)))


def _key(params: dict) -> str:
    return json.dumps(params, sort_keys=True)


def in_space(params: dict, search: Search) -> bool:
    """Whether a warm-start trial's values lie in this search's space (same keys, in range)."""
    space = distributions(search.params)
    if set(params) != set(space):
        return False
    try:
        return all(space[k]._contains(space[k].to_internal_repr(v)) for k, v in params.items())
    except (ValueError, TypeError):  # a value of another kind: not this space
        return False
