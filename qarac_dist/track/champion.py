"""A sweep's champion: its chosen model, registered once per sweep and choice, under an alias.

With `tracking.register_model: NAME`, a sweep's trials register nothing; when the sweep closes
(every trial ended), the model its parent run names as best (`best_run_id`: the best trial, or
with repeats the chosen configuration's best seed) becomes a version of NAME, tagged with the
sweep's run and the trial, and NAME's alias `champion` points at it. A re-run that closes on the
same choice registers nothing and leaves the alias where it is (a later sweep may hold it); one
whose choice changed registers the new one, or finds its earlier version, and moves the alias.
The parent run names the version (`champion`, `champion_version`). Only a sweep whose trials all
ended well crowns one: a failed or cancelled sweep's best of the rest never takes the alias.
"""

from __future__ import annotations

import sys
from typing import Optional

ALIAS = "champion"


def crown(uri: str, mlflow_client, parent_run_id: str, names: dict[str, str], alias: str = ALIAS) -> Optional[str]:
    """Register the parent's best trial's logged model under its `tracking.register_model`
    (`names`: trial id -> name, for trials that have one) and point `alias` (the sweep file's
    final.alias) at it; returns the version, or None when there is nothing to register."""
    from mlflow.entities import RunTag
    from mlflow.exceptions import MlflowException

    parent_tags = mlflow_client.get_run(parent_run_id).data.tags
    best_run_id = parent_tags.get("best_run_id")
    if not best_run_id:
        return None
    best = mlflow_client.get_run(best_run_id)
    trial, model_id = best.data.tags.get("trial_id", ""), best.data.tags.get("best_model_id")
    name = names.get(trial)
    if name is None:
        return None
    if model_id is None:
        print(f"qarac_dist: trial {trial} is the sweep's best but logged no MLflow model; nothing is registered as "
              f"{name}@{alias}", file=sys.stderr)
        return None
    ours = {"sweep_run_id": parent_run_id, "trial_id": trial}
    known = [v for v in mlflow_client.search_model_versions(f"run_id = '{best_run_id}'")
             if v.name == name and all(v.tags.get(k) == t for k, t in ours.items())]
    if known:
        version = known[0].version
        if parent_tags.get("champion_version") == f"models:/{name}/{version}" and \
                parent_tags.get("champion") == f"models:/{name}@{alias}":
            return str(version)  # the same choice closed again: the alias stays where it is now (another sweep's)
    else:
        import mlflow

        mlflow.set_tracking_uri(uri)  # the registry reads the logged model through the default client
        try:
            mlflow_client.create_registered_model(name)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = mlflow_client.create_model_version(name, f"models:/{model_id}", run_id=best_run_id, tags=ours,
                                                     model_id=model_id).version
    mlflow_client.set_registered_model_alias(name, alias, version)
    mlflow_client.log_batch(parent_run_id, tags=[RunTag("champion", f"models:/{name}@{alias}"),
                                                 RunTag("champion_version", f"models:/{name}/{version}")])
    return str(version)
