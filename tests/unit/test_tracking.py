"""Tracking pieces in process: the secret screen, and the batched MLflow sender against a real
sqlite store."""

from __future__ import annotations

from qarac_dist.track.mlflow_client import client, create_run, experiment_id
from qarac_dist.track.mlflow_logger import MlflowLogger
from qarac_dist.base.secrets import screen


def _history(c, run_id, key):
    return sorted(m.step for m in c.get_metric_history(run_id, key))


def test_params_never_hold_secrets(monkeypatch):
    monkeypatch.setenv("QARAC_TEST_TOKEN", "hf_supersecret_value")
    flat = {"optimizer.lr": 0.001, "model.factory_kwargs.api_key": "abc123", "model.factory_kwargs.hub_password": "pw",
            "model.factory_kwargs.note": "hf_supersecret_value", "deepspeed.config.aws_secret": "s",
            "model.factory_kwargs.auth_header": "Bearer hf_supersecret_value"}
    assert screen(flat) == {"optimizer.lr": "0.001"}


def test_batched_logger_sends_every_point_in_few_requests(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = client(uri)
    run_id = create_run(c, experiment_id(c, "e"), "r", {})
    logger = MlflowLogger(uri, run_id, tmp_path)
    calls = []
    send = logger._send
    logger._send = lambda points: calls.append(len(points)) or send(points)
    for step in range(1, 1201):
        logger.log(step, {"loss": 1.0 / step, "lr": 0.1})
    assert logger.close() == 0
    assert _history(c, run_id, "loss") == list(range(1, 1201))
    assert _history(c, run_id, "lr") == list(range(1, 1201))
    assert max(calls) <= 1000 and len(calls) <= 10
