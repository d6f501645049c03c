"""What a trial's job ran on, as its run's `environment.json` artifact: the interpreter and every
installed package (importlib.metadata: what `pip freeze` lists, editable installs included),
torch with its CUDA and NCCL, DeepSpeed, transformers, the GPUs the job sees with the driver,
and the exact sbatch script of its job (submitit's, in the sweep directory). Secrets in it
(a setup line's `export HF_TOKEN=...`) are redacted when it is logged.

In a sweep the packages are kept once per set: the list goes to the sweep directory as
`packages/<sha256>.txt` (base/layout.py), which the parent run holds as an artifact, and the
trial's record names it by that digest; a trial whose interpreter differs (another node's
environment, another container) has a file of its own."""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
import sys
from typing import Optional

from ..base.files import replace_with
from ..base.layout import SweepLayout


def runtime_record(sweep: Optional[SweepLayout], job_id: Optional[str]) -> dict:
    import torch

    versions = {}
    for name in ("deepspeed", "transformers", "datasets", "mlflow", "qarac_dist"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    cuda = torch.cuda.is_available()
    return {
        "python": sys.version, "platform": platform.platform(), "host": platform.node(),
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None, **versions,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "gpu_driver": _driver(),
        "packages": _packages(sweep, sorted(f"{d.metadata['Name']}=={d.version}"
                                            for d in importlib.metadata.distributions() if d.metadata["Name"])),
        "sbatch": _script(sweep, job_id),
    }


def _packages(sweep: Optional[SweepLayout], packages: list[str]):
    """The list; in a sweep, its digest and where it is kept once (written by the first trial)."""
    if sweep is None:
        return packages
    text = "".join(f"{p}\n" for p in packages)
    digest = hashlib.sha256(text.encode()).hexdigest()
    path = sweep.packages / f"{digest}.txt"
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            replace_with(path, lambda tmp: tmp.write_text(text))
    except OSError:  # the list stays in the record itself
        return packages
    return {"count": len(packages), "sha256": digest, "file": f"packages/{digest}.txt on the sweep's parent run"}


def _driver() -> Optional[str]:
    try:
        import pynvml

        pynvml.nvmlInit()
        return str(pynvml.nvmlSystemGetDriverVersion())
    except Exception:  # noqa: BLE001 - no NVML, no driver: a CPU node
        return None


def _script(sweep: Optional[SweepLayout], job_id: Optional[str]) -> Optional[str]:
    """The sbatch script of the job `<array>_<task>` (or `<job>`), as submitit wrote it."""
    if sweep is None or not job_id:
        return None
    try:
        return sweep.submission_script(job_id.split("_")[0].split(".")[0]).read_text(errors="replace")
    except OSError:  # the local executor's jobs have none
        return None
