"""Preflight on a trial: build its real model and a real batch of its data on CPU, audit the
gradients, check the config against them, and (with `resources.gpu_memory_gb`) plan its memory.
Each distinct architecture of a sweep is audited once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import re
from dataclasses import dataclass, field
from typing import Optional

from ..config import config_to_dict
from ..plan.micro_batch import memory_key
from .checks import check_config, warnings_for
from .gradients import Finding, GradientReport, audit_gradients
from .memory import MemoryPlan, gib, memory_advice, memory_plan, model_state_bytes


@dataclass
class Result:
    name: str
    report: GradientReport
    problems: list[str]
    """Config and memory problems: each one fails the trial."""
    notes: list[str]
    """Warnings about the config (fp16 on Longformer, ...)."""
    memory: Optional[MemoryPlan] = None
    explained_zero: dict = field(default_factory=dict)
    """Parameter -> why its all-zero gradient is expected (a note, not a warning)."""
    facts: list[str] = field(default_factory=list)
    """What the data holds that a reader should know, and need not fix (a few tokens cut)."""

    @property
    def ok(self) -> bool:
        return self.report.ok and not self.problems

    def findings(self) -> list[Finding]:
        return [*self.report.findings(self.explained_zero),
                *(Finding("fail", *_split(p)) for p in self.problems),
                *(Finding("warn", *_split(n)) for n in self.notes),
                *(Finding("note", *_split(n)) for n in self.facts)]


def _split(line: str) -> tuple[str, str]:
    key, _, what = line.partition(": ")
    return key, what


LONGFORMER_LAST_LAYER = ("the classifier reads only the first token, which attends globally: in the last layer its "
                         "output comes from the global projections (query_global, key_global, value_global), so the "
                         "local query, key and value cannot change the loss")


def explain_zero(model, zero: list[str]) -> dict[str, str]:
    """Causes of all-zero gradients known to be expected, by parameter name."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != "longformer":
        return {}
    last = re.compile(rf"(^|\.)encoder\.layer\.{config.num_hidden_layers - 1}\.attention\.self\."
                      rf"(query|key|value)\.(weight|bias)$")
    return {name: LONGFORMER_LAST_LAYER for name in zero if last.search(name)}


def audit_key(config: dict) -> str:
    """Trials with the same key build the same model on the same inputs, allow the same
    parameters without gradient and plan the same memory: audited once."""
    return json.dumps([memory_key(config), config.get("preflight"), config["training"]["micro_batch_size"]])


def run(cfg, world_size: int = 1, resources=None) -> Result:
    """Build the trial's model and a real batch of its data; audit and check them. With
    `resources.gpu_memory_gb` set, also plan the memory per GPU."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from ..train.build import build_parts
    from ..train.data import report_lines

    parts = build_parts(_with_small_data(cfg))
    splits, model, collate = parts.splits, parts.model, parts.collate
    rows = splits.train[list(range(min(len(splits.train), max(2, min(cfg.training.micro_batch_size, 4)))))]
    report = audit_gradients(model, collate(rows), allow_no_grad=cfg.preflight.allow_no_grad)
    problems = check_config(cfg, splits.tokenizer, model, world_size)
    plan = None
    if resources is not None and resources.gpu_memory_gb and not problems:
        plan, advice = _plan_memory(cfg, model, collate, splits.train[[0]], resources)
        problems += advice
    # Truncation as measured on the rows read here, not the whole split.
    data_lines = [(level, f"{line}, in the rows preflight reads" if line.startswith("data.max_length") else line)
                  for level, line in report_lines(splits.report, cfg.data.max_length)]
    return Result(cfg.name, report, problems, warnings_for(cfg, model) + [line for level, line in data_lines
                                                                          if level == "warn"],
                  plan, explain_zero(model, report.zero), [line for level, line in data_lines if level == "note"])


def _plan_memory(cfg, model, collate, row: dict, resources) -> tuple[MemoryPlan, list[str]]:
    """The trial's plan, and the switches that would make it fit (each measured or estimated)."""
    from ..train.models import enable_activation_checkpointing

    length = cfg.data.max_length
    full = {k: [(v[0] * (length // max(1, len(v[0])) + 1))[:length]] if k.startswith(("input_ids", "token_type_ids"))
            else v for k, v in row.items()}
    batch = collate(full)
    gpus, nodes = resources.gpus_per_node, resources.nodes
    plan = memory_plan(cfg, model, batch, gpus, nodes)
    alternatives = {}
    if not cfg.model.activation_checkpointing:
        enable_activation_checkpointing(model)
        alternatives["model.activation_checkpointing=true"] = memory_plan(cfg, model, batch, gpus, nodes)
    per_example = plan.activations // max(1, cfg.training.micro_batch_size)
    if cfg.training.micro_batch_size > 1:
        alternatives["training.micro_batch_size=1"] = MemoryPlan(plan.model_states, per_example)

    def states(**change):
        ds = dataclasses.replace(cfg.deepspeed, **change)
        num = sum(p.numel() for p in model.parameters())
        largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
        return model_state_bytes(num, largest, ds.zero_stage, gpus, nodes, ds.offload_optimizer, ds.offload_param,
                                 cfg.precision.dtype)

    if cfg.deepspeed.zero_stage != 3:
        alternatives["deepspeed.zero_stage=3"] = MemoryPlan(states(zero_stage=3), plan.activations)
    if not cfg.deepspeed.offload_optimizer:
        stage = max(cfg.deepspeed.zero_stage, 1)
        alternatives[f"deepspeed.offload_optimizer=true (ZeRO-{stage})"] = MemoryPlan(
            states(zero_stage=stage, offload_optimizer=True), plan.activations)
    return plan, memory_advice(plan, int(resources.gpu_memory_gb * 2**30), alternatives)


def _with_small_data(cfg):
    """The same config, reading few examples: the audit needs one batch, not the data set."""
    d = dataclasses.replace(cfg.data, max_train_examples=min(cfg.data.max_train_examples or 64, 64),
                            max_validation_examples=min(cfg.data.max_validation_examples or 8, 8))
    return dataclasses.replace(cfg, data=d)


def print_result(result: Result, out=None) -> None:
    """`preflight NAME: ok` or `FAILED`, then one line per finding, level first; an ok report
    with notes says that they are expected."""
    out = out or sys.stdout
    findings = result.findings()
    levels = [f.level for f in findings]
    if not result.ok:
        head = "FAILED"
    elif "warn" in levels:
        head = f"ok, with {levels.count('warn')} warning(s) to look at"
    elif levels:
        head = f"ok; {len(levels)} note(s), expected and not failures"
    else:
        head = "ok"
    print(f"preflight {result.name}: {head}", file=out)
    for finding in findings:
        print(f"  {finding}", file=out)
    if result.memory is not None:
        print(f"  memory per GPU: about {gib(result.memory.total)} (model states "
              f"{gib(result.memory.model_states)}, activations {gib(result.memory.activations)})", file=out)


def run_many(configs: list, world_size: int = 1, resources=None) -> list[Result]:
    """Audit each distinct architecture once."""
    seen: dict[str, Result] = {}
    for cfg in configs:
        key = audit_key(config_to_dict(cfg))
        if key not in seen:
            seen[key] = run(cfg, world_size, resources)
    return list(seen.values())



def audit_sweep(spec, configs: list[dict], source: str) -> tuple[str, bool]:
    """Audit each distinct architecture among a sweep's trials about to be submitted; print the
    report and return it with whether every audit passed."""
    import io

    from ..config import UserError, config_from_dict

    typed = [config_from_dict(c, source) for c in configs]
    try:
        results = run_many(typed, spec.resources.world_size, spec.resources)
    except UserError as err:
        raise UserError(f"{source}: preflight: {err}") from None
    out = io.StringIO()
    for result in results:
        print_result(result, out)
    print(out.getvalue(), end="")
    return out.getvalue(), all(r.ok for r in results)
