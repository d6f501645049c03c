"""Model-based search's choice (pure): the values of the next trial, from Optuna's sampler and
everything recorded before it (track/search_record.py keeps the record; submit/search.py asks).

The study is rebuilt in memory at each ask, never stored: finished trials with their value (a
pruned one with the values it reported at its rungs, as Optuna's pruners report them), trials
still running as RUNNING (TPE's constant liar takes them as bad, so trials asked at the same
time spread out), and the sampler rebuilt from the sweep file's seed and the state the previous
ask left (state_of: its random generators' states and the study's system attributes, numbers
and strings, never a pickle: a record anyone can write must not run code in every job, and a
class Optuna moves must not break it), so a sequence of asks is the sequence `study.optimize`
would make. The state is read by the Optuna version that wrote it (check): another version may
draw otherwise from the same state, so a sweep is asked by one version. Why not an
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
from dataclasses import dataclass, field
from typing import Optional

from ..base.errors import UserError
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
    state: dict
    """The sampler's state after this ask (state_of), data the next ask starts from."""


class RecordMismatch(UserError):
    """The record's sampler state cannot be read here: written by another Optuna version, or by
    an older qarac_dist that pickled the sampler."""


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
            "qmc": lambda: optuna.samplers.QMCSampler(seed=seed),
            "random": lambda: optuna.samplers.RandomSampler(seed=seed)}[search.sampler]()


def _generators(sampler, prefix: str = ""):
    """(path, generator) for each random generator of a sampler and of the samplers it holds
    (TPE's and GP's random sampler for their first trials, QMC's for keys outside its space)."""
    from optuna.samplers import BaseSampler
    from optuna.samplers._lazy_random_state import LazyRandomState

    for name, value in sorted(vars(sampler).items()):
        if isinstance(value, LazyRandomState):
            yield prefix + name, value.rng
        elif isinstance(value, BaseSampler):
            yield from _generators(value, f"{prefix}{name}.")


def state_of(sampler, study_attrs: dict) -> dict:
    """A sampler's state as data: each generator's Mersenne Twister state (its 624 words in
    base64, position, cached Gaussian) and the study's system attributes (QMC's position in its
    sequence). What else a sampler holds is a cache (GP's fitted kernel, a starting guess for the
    next fit) or comes from the sweep file."""
    import optuna

    rngs = {}
    for path, rng in _generators(sampler):
        _, words, pos, has_gauss, gauss = rng.get_state()
        rngs[path] = {"words": base64.b64encode(words.astype("<u4").tobytes()).decode(), "pos": int(pos),
                      "gauss": float(gauss) if has_gauss else None}
    return {"optuna": optuna.__version__, "rngs": rngs, "study_attrs": study_attrs}


def _check(state: dict, where: str) -> None:
    """RecordMismatch, in one line, when this process cannot go on from `state` exactly."""
    import optuna

    if "optuna" not in state:
        raise RecordMismatch(f"{where}: written by an older qarac_dist that kept the sampler as a pickle, which "
                             f"is no longer read (a record must not run code); start a new sweep (--name), with "
                             f"search.warm_start naming this one to keep its results")
    if state.get("optuna") != optuna.__version__:
        raise RecordMismatch(f"{where}: the sampler's state was recorded by Optuna {state.get('optuna')}, this is "
                             f"Optuna {optuna.__version__}, which may draw otherwise from it; install "
                             f"optuna=={state.get('optuna')} (constraints.txt pins it) or start a new sweep")


MT_WORDS = 624
"""A Mersenne Twister's state: 624 32-bit words and a position in them, 0 to 624."""
_SCALAR = (str, int, float, bool, type(None))


def restored(search: Search, state: Optional[dict], where: str):
    """A new sampler from the sweep file with the generators' states `state` recorded. Every
    value is checked before numpy sees it (it reads past its array on a bad position)."""
    import numpy as np

    sampler = new_sampler(search)
    if state is None:  # the first ask: as the seed starts it
        return sampler
    _check(state, where)
    rngs, attrs = state.get("rngs"), state.get("study_attrs", {})
    generators = dict(_generators(sampler))
    if not isinstance(rngs, dict) or set(generators) != set(rngs):
        raise RecordMismatch(f"{where}: the sampler's state holds generators "
                             f"{sorted(rngs) if isinstance(rngs, dict) else repr(rngs)[:60]}, search.sampler "
                             f"{search.sampler} has {sorted(generators)}")
    if not isinstance(attrs, dict) or not all(isinstance(k, str) and isinstance(v, _SCALAR) for k, v in attrs.items()):
        raise RecordMismatch(f"{where}: the sampler's study attributes are damaged ({repr(attrs)[:80]}); start a "
                             f"new sweep, with search.warm_start naming this one to keep its results")
    for path, rng in generators.items():
        problem = _state_problem(rngs[path])
        if problem:
            raise RecordMismatch(f"{where}: the sampler's state of {path} is damaged ({problem}); start a new "
                                 f"sweep, with search.warm_start naming this one to keep its results")
        saved = rngs[path]
        words = np.frombuffer(base64.b64decode(saved["words"], validate=True), dtype="<u4")
        rng.set_state(("MT19937", words, saved["pos"], saved["gauss"] is not None, float(saved["gauss"] or 0.0)))
    return sampler


def _state_problem(saved) -> Optional[str]:
    """What is wrong with one generator's recorded state, or None."""
    if not isinstance(saved, dict) or set(saved) != {"words", "pos", "gauss"}:
        return "expected words, pos and gauss"
    try:
        raw = base64.b64decode(saved["words"], validate=True) if isinstance(saved["words"], str) else None
    except ValueError:
        raw = None
    if raw is None or len(raw) != MT_WORDS * 4 or not raw.strip(b"\0"):
        return f"expected {MT_WORDS} words in base64, not all zero"
    pos, gauss = saved["pos"], saved["gauss"]
    if type(pos) is not int or not 0 <= pos <= MT_WORDS:
        return f"expected a position from 0 to {MT_WORDS}, got {repr(pos)[:40]}"
    if gauss is not None and (type(gauss) is not float or not math.isfinite(gauss)):
        return f"expected a cached Gaussian (a finite number) or null, got {gauss!r}"
    return None


def choose(search: Search, mode: str, history: list[Told], previous: Optional[dict], warm: list[Told] = (),
           where: str = "the search record") -> Choice:
    """The next trial's values. `history`: this sweep's trials in the order they were asked;
    `previous`: the state the previous ask left (None: the first ask); `warm`: another sweep's
    finished trials, told first; `where`: the record, for errors."""
    import optuna
    from optuna.trial import TrialState, create_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = restored(search, previous, where)
    check_history(search, history, where)
    study = optuna.create_study(direction="maximize" if mode == "max" else "minimize", sampler=sampler)
    for key, value in ((previous or {}).get("study_attrs") or {}).items():
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
    return Choice(dict(trial.params), state_of(sampler, dict(study._storage.get_study_system_attrs(study._study_id))))


def check_history(search: Search, history: list[Told], where: str) -> None:
    """RecordMismatch when a recorded trial's values are not of this search's space (the file's
    search.params edited since, or the record): the sampler cannot be told them."""
    for n, told in enumerate(history):
        if not in_space(told.params, search):
            raise RecordMismatch(f"{where}: trial {n + 1} in the order asked has values outside search.params "
                                 f"({repr(told.params)[:120]}); the record is of another space: start a new sweep, "
                                 f"with search.warm_start naming this one to keep what fits")


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
