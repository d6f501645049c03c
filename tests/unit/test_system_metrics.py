"""A trial's node load (track/system_metrics.py) with NVML faked at the nvidia-ml-py boundary
(`pynvml`): a node of four GPUs, of which the trial's CUDA_VISIBLE_DEVICES names some."""

from __future__ import annotations

import sys
import types
from collections import namedtuple

import pytest

from qarac_dist.track import system_metrics

Memory = namedtuple("Memory", "used total")
Rates = namedtuple("Rates", "gpu memory")


def _fake_nvml(monkeypatch, devices: int = 4, init_fails: bool = False):
    """Device i: uuid GPU-<i>, utilisation 10*(i+1) %, (i+1) GiB used of 80."""

    class NVMLError(Exception):
        pass

    def init():
        if init_fails:
            raise NVMLError("NVML Shared Library Not Found")

    def by_index(i):
        if not 0 <= i < devices:
            raise NVMLError("Invalid Argument")
        return i

    def by_uuid(uuid):
        if not uuid.startswith("GPU-") or not uuid[4:].isdigit() or int(uuid[4:]) >= devices:
            raise NVMLError("Not Found")
        return int(uuid[4:])

    nvml = types.SimpleNamespace(
        NVMLError=NVMLError, nvmlInit=init, nvmlDeviceGetCount=lambda: devices, nvmlDeviceGetHandleByIndex=by_index,
        nvmlDeviceGetHandleByUUID=by_uuid, nvmlDeviceGetUtilizationRates=lambda h: Rates(10 * (h + 1), 0),
        nvmlDeviceGetMemoryInfo=lambda h: Memory((h + 1) << 30, 80 << 30))
    monkeypatch.setitem(sys.modules, "pynvml", nvml)


@pytest.mark.parametrize("visible, sampled", [("1,3", [1, 3]), ("GPU-2", [2]), (None, [0, 1, 2, 3]), ("", []),
                                              ("2,9,1", [2]), ("-1", []), (" 0 , GPU-3", [0, 3])])
def test_only_the_trials_own_devices_are_sampled(monkeypatch, visible, sampled):
    _fake_nvml(monkeypatch)
    environ = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    sampler = system_metrics.Sampler(0, environ)
    row = sampler.sample()
    gpus = {k: v for k, v in row.items() if k.startswith("system/gpu_")}
    assert gpus == {key: value for index, device in enumerate(sampled) for key, value in (
        (f"system/gpu_{index}_utilization_percentage", 10 * (device + 1)),
        (f"system/gpu_{index}_memory_usage_megabytes", (device + 1) * 1024),
        (f"system/gpu_{index}_memory_usage_percentage", 100 * (device + 1) / 80))}
    assert 0 <= row["system/cpu_utilization_percentage"] <= 100 and row["system/system_memory_usage_megabytes"] > 0


def test_without_nvml_cpu_and_memory_are_sampled_and_nothing_fails(monkeypatch):
    _fake_nvml(monkeypatch, init_fails=True)
    row = system_metrics.Sampler(0, {"CUDA_VISIBLE_DEVICES": "0"}).sample()
    assert sorted(row) == ["system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
                           "system/system_memory_usage_percentage"]


def test_a_sample_rides_a_row_once_every_period_and_never_the_rows_replayed_at_the_start(monkeypatch):
    _fake_nvml(monkeypatch, devices=0)
    clock = [100.0]
    monkeypatch.setattr(system_metrics.time, "monotonic", lambda: clock[0])
    rows = []
    logger = system_metrics.sampled(types.SimpleNamespace(log=lambda step, m: rows.append((step, sorted(m))),
                                                          replays_record=True, close=lambda: None), 10)
    assert logger.replays_record
    for step, at in ((1, 100.0), (2, 105.0), (3, 110.0), (4, 111.0), (5, 125.0)):
        clock[0] = at
        logger.log(step, {"loss": 1.0})
    assert [step for step, keys in rows if "system/cpu_utilization_percentage" in keys] == [3, 5]
    assert system_metrics.sampled(logger, 0) is logger  # 0: no sampling


def test_a_mig_instance_has_its_memory_sampled_though_it_has_no_utilisation(monkeypatch):
    _fake_nvml(monkeypatch, devices=2)
    nvml = sys.modules["pynvml"]

    def no_rates(handle):
        raise nvml.NVMLError("Not Supported")

    monkeypatch.setattr(nvml, "nvmlDeviceGetUtilizationRates", no_rates)
    row = system_metrics.Sampler(0, {"CUDA_VISIBLE_DEVICES": "GPU-1"}).sample()
    assert sorted(k for k in row if k.startswith("system/gpu_")) == ["system/gpu_0_memory_usage_megabytes",
                                                                     "system/gpu_0_memory_usage_percentage"]
