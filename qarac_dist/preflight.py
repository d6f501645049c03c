"""Preflight: find dead gradients and inconsistent configs on your own machine, in seconds,
before a job is submitted.

    python -m qarac_dist.preflight CONFIG_OR_SWEEP.yaml [dotted.key=value ...]

`audit_gradients(model, batch)` runs one forward and backward on CPU and reports every
trainable parameter that got no gradient (`missing`), a gradient of exact zeros (`zero`), or a
NaN/inf gradient (`nonfinite`); parameters with requires_grad False are `frozen`. Names are
grouped by module with the likely cause. The sweep runs this once per distinct architecture
before it submits anything (skip with --no-preflight).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Optional

NEVER_CALLED = "its module was never called in forward"
NO_GRAD = "its module ran under torch.no_grad() (or with grad disabled)"
CUT = ("its module's output never reaches the loss: cut by .detach(), a trip through numpy, a "
       "non-differentiable op such as argmax, or simply unused")
UNUSED = "the parameter is not used by its module's forward"


@dataclass
class GradientReport:
    missing: list[str] = field(default_factory=list)
    """Trainable parameters that got no gradient."""
    zero: list[str] = field(default_factory=list)
    """Trainable parameters whose gradient is exactly zero everywhere."""
    nonfinite: list[str] = field(default_factory=list)
    """Parameters with a NaN or inf gradient."""
    frozen: list[str] = field(default_factory=list)
    """Parameters with requires_grad False (reported, not an error)."""
    allowed: list[str] = field(default_factory=list)
    """Missing parameters that `allow_no_grad` patterns accept."""
    causes: dict[str, str] = field(default_factory=dict)
    """Module name -> likely cause, for modules with missing parameters."""

    @property
    def ok(self) -> bool:
        return not self.missing and not self.nonfinite

    def by_module(self, names: list[str]) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = defaultdict(list)
        for name in names:
            module, _, leaf = name.rpartition(".")
            groups[module].append(leaf)
        return dict(groups)

    def lines(self) -> list[str]:
        out = []
        for title, names in (("no gradient", self.missing), ("NaN/inf gradient", self.nonfinite),
                             ("all-zero gradient", self.zero)):
            for module, leaves in self.by_module(names).items():
                cause = f" ({self.causes[module]})" if title == "no gradient" and module in self.causes else ""
                out.append(f"{title}: {module or '<root>'}.{{{', '.join(leaves)}}}{cause}")
        return out


def _loss_of(output, loss_fn: Optional[Callable]):
    if loss_fn is not None:
        return loss_fn(output)
    if isinstance(output, dict) or hasattr(output, "keys"):
        return output["loss"]
    return output.loss


def audit_gradients(model, batch: dict, loss_fn: Optional[Callable] = None,
                    allow_no_grad: list[str] = ()) -> GradientReport:
    """One forward (`model(**batch)`) and backward on CPU; see the module docstring."""
    import torch

    calls: dict[str, list[bool]] = defaultdict(list)  # module name -> grad enabled at each call
    reached: dict[str, bool] = {}
    hooks = []
    outputs: dict[str, list] = defaultdict(list)

    def tensors(value):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            for v in value:
                yield from tensors(v)
        elif isinstance(value, dict) or hasattr(value, "values"):
            for v in value.values():
                yield from tensors(v)

    for name, module in model.named_modules():
        def hook(mod, args, output, name=name):
            calls[name].append(torch.is_grad_enabled())
            outputs[name].extend(t for t in tensors(output) if t.requires_grad)
        hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    model.train()
    model.zero_grad(set_to_none=True)
    try:
        loss = _loss_of(model(**batch), loss_fn)
        graph = _graph_nodes(loss.grad_fn)
        for name, outs in outputs.items():
            reached[name] = any(t.grad_fn in graph for t in outs if t.grad_fn is not None)
        loss.backward()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)

    report = GradientReport()
    owners = {}
    for module_name, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            owners[f"{module_name}.{pname}" if module_name else pname] = module_name
    for name, p in model.named_parameters():
        if not p.requires_grad:
            report.frozen.append(name)
        elif p.grad is None:
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in allow_no_grad):
                report.allowed.append(name)
                continue
            report.missing.append(name)
            owner = owners.get(name, "")
            report.causes[owner] = _cause(owner, calls, reached)
        elif not torch.isfinite(p.grad).all():
            report.nonfinite.append(name)
        elif not p.grad.any():
            report.zero.append(name)
    model.zero_grad(set_to_none=True)
    return report


def _graph_nodes(root) -> set:
    seen, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_fn for next_fn, _ in getattr(node, "next_functions", ()))
    return seen


def _cause(module: str, calls: dict, reached: dict) -> str:
    if not calls.get(module):
        return NEVER_CALLED
    if not any(calls[module]):
        return NO_GRAD
    if not reached.get(module, False):
        return CUT
    return UNUSED


# ---------------------------------------------------------------- memory plan

def saved_activation_bytes(model, batch: dict) -> int:
    """Bytes of activations one forward keeps for backward: distinct storages saved through
    autograd (parameters excluded), plus the inputs that non-reentrant checkpointed layers keep
    for their recomputation (their own saved tensors are recomputed, not kept)."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}
    recording = [True]

    def remember(t) -> None:
        if recording[0] and isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    def keep_inputs(module, args, kwargs) -> None:
        for value in (*args, *kwargs.values()):
            remember(value)

    def pack(t):
        remember(t)
        return t

    hooks = [m.register_forward_pre_hook(keep_inputs, with_kwargs=True) for m in _checkpointed_layers(model)]
    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = _loss_of(model(**batch), None)
        recording[0] = False
        loss.backward()
    finally:
        for h in hooks:
            h.remove()
        model.zero_grad(set_to_none=True)
    return sum(seen.values())


def peak_activation_bytes(model, batch: dict) -> int:
    """Peak bytes of tensors alive at once during one forward and backward, over what was alive
    before: saved activations, backward's gradients of them, the layers that checkpointing
    recomputes, workspace of each op. What the GPU allocator's peak would show for the step,
    less the parameters' gradients (the model states count those).

    Every tensor an op creates is counted from its creation until its storage is freed (a
    TorchDispatchMode sees each op; a finalizer on each output tensor sees it die). The
    timeline is kept, and the peak is taken at the end, once it is known which tensors became
    parameters' gradients."""
    import itertools
    import weakref

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class LiveBytes(TorchDispatchMode):
        def __init__(self, existing: set[int]):
            super().__init__()
            self.existing = existing  # storages alive before (parameters, buffers, the batch)
            self.live: dict[int, list[int]] = {}  # data_ptr -> [allocation id, bytes, tensors on it]
            self.events: list[tuple[int, int]] = []  # (allocation id, +bytes or -bytes), in order
            self.gradients: set[int] = set()  # allocations that became parameters' gradients
            self.ids = itertools.count()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.device.type != "meta":
                    self.track(t)
            return out

        def track(self, t) -> None:
            key = t.untyped_storage().data_ptr()
            if not key or key in self.existing:
                return
            entry = self.live.get(key)
            if entry is None:
                entry = self.live[key] = [next(self.ids), t.untyped_storage().nbytes(), 0]
                self.events.append((entry[0], entry[1]))
            entry[2] += 1
            weakref.finalize(t, self.release, key, entry)

        def release(self, key: int, entry: list[int]) -> None:
            entry[2] -= 1
            if entry[2] == 0 and self.live.get(key) is entry:
                self.events.append((entry[0], -entry[1]))
                del self.live[key]

        def gradient(self, t) -> None:
            entry = self.live.get(t.untyped_storage().data_ptr())
            if entry is not None:
                self.gradients.add(entry[0])

        def peak(self) -> int:
            now = peak = 0
            for allocation, change in self.events:
                if allocation not in self.gradients:
                    now += change
                    peak = max(peak, now)
            return peak

    existing = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers(), *batch.values())
                if isinstance(t, torch.Tensor)}
    tracker = LiveBytes(existing)
    hooks = [p.register_post_accumulate_grad_hook(lambda p: tracker.gradient(p.grad))
             for p in model.parameters() if p.requires_grad]
    model.train()
    try:
        with tracker:
            loss = _loss_of(model(**batch), None)
            loss.backward()
            del loss
    finally:
        for h in hooks:
            h.remove()
        model.zero_grad(set_to_none=True)
    return tracker.peak()


def _checkpointed_layers(model) -> list:
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # transformers < 4.52: no common layer class to find
        return []
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]


@dataclass
class MemoryPlan:
    model_states: int
    """Bytes per GPU for parameters, gradients and optimizer states (DeepSpeed's estimators)."""
    activations: int
    """Peak bytes of activations (and backward's transients) for one micro batch, measured on
    CPU and scaled."""

    @property
    def total(self) -> int:
        return self.model_states + self.activations


def model_state_bytes(num_params: int, largest_layer: int, stage: int, gpus_per_node: int, nodes: int,
                      offload_optimizer: bool, offload_param: bool, dtype: str) -> int:
    """Per-GPU model states. DeepSpeed's estimators assume 16-bit training (2-byte weights on
    the GPU); fp32 keeps 4-byte weights, counted here on top."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    gpus = max(1, gpus_per_node) * max(1, nodes)
    if stage == 3:
        _, gpu, _ = estimate_zero3_model_states_mem_needs(num_params, largest_layer, max(1, gpus_per_node), nodes,
                                                          offload_optimizer, offload_param, True)
    elif stage in (1, 2):
        _, gpu = estimate_zero2_model_states_mem_needs(num_params, max(1, gpus_per_node), nodes, offload_optimizer)
    else:  # plain data parallel: every GPU holds everything
        gpu = 18 * num_params
    if dtype == "fp32" and not (stage == 3 and offload_param):
        gpu += 2 * num_params if stage != 3 else 2 * num_params // gpus
    return int(gpu)


def memory_plan(cfg, model, batch_one: dict, gpus_per_node: int, nodes: int) -> MemoryPlan:
    """Peak device memory per GPU for the trial: model states plus activations of one micro
    batch (the peak of live tensor bytes over a forward and backward, measured at batch size 1
    and the trial's length, times the micro batch; halved for 16-bit training)."""
    params = list(model.parameters())
    num_params = sum(p.numel() for p in params)
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    states = model_state_bytes(num_params, largest, cfg.deepspeed.zero_stage, gpus_per_node, nodes,
                               cfg.deepspeed.offload_optimizer, cfg.deepspeed.offload_param, cfg.precision.dtype)
    per_example = peak_activation_bytes(model, batch_one)
    scale = 0.5 if cfg.precision.dtype in ("bf16", "fp16") else 1.0
    return MemoryPlan(states, int(per_example * cfg.training.micro_batch_size * scale))


def gib(n: int) -> str:
    """Bytes as GiB with two significant digits or one decimal, whichever says more."""
    value = n / 2**30
    return f"{value:.1f} GiB" if value >= 10 else f"{value:.2g} GiB"


def memory_advice(plan: MemoryPlan, budget: int, alternatives: dict[str, MemoryPlan]) -> list[str]:
    """What would make the plan fit in `budget` bytes, cheapest switch first."""
    if plan.total <= budget:
        return []
    lines = [f"resources.gpu_memory_gb: the trial needs about {gib(plan.total)} per GPU "
             f"(model states {gib(plan.model_states)} + activations {gib(plan.activations)}), "
             f"{gib(plan.total - budget)} more than {gib(budget)}"]
    fits = [f"{switch} ({gib(alt.total)})" for switch, alt in alternatives.items() if alt.total <= budget]
    lines.append("  it would fit with: " + (", ".join(fits) if fits else "none of checkpointing, ZeRO-3, offload or "
                                                                         "micro batch 1 alone; combine them or use more GPUs"))
    return lines


# ---------------------------------------------------------------- consistency checks

def check_config(cfg, tokenizer=None, model=None, world_size: int = 1) -> list[str]:
    """Rules that need more than the config's own fields: the tokenizer, the model, the world."""
    problems = []
    t = cfg.training
    if t.global_batch_size is not None:
        actual = t.micro_batch_size * t.gradient_accumulation_steps * world_size
        if actual != t.global_batch_size:
            problems.append(f"training.global_batch_size: {t.global_batch_size} != training.micro_batch_size x "
                            f"training.gradient_accumulation_steps x world size ({t.micro_batch_size} x "
                            f"{t.gradient_accumulation_steps} x {world_size} = {actual})")
    config = getattr(model, "config", None)
    if tokenizer is not None and config is not None and getattr(config, "vocab_size", None):
        if len(tokenizer) > config.vocab_size:
            problems.append(f"tokenizer: {len(tokenizer)} tokens, more than the model's embeddings "
                            f"(model vocab_size {config.vocab_size}); set model.config.vocab_size or tokenizer.name_or_path")
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None:
        offset = 2 if getattr(config, "model_type", "") in ("roberta", "longformer", "xlm-roberta") else 0
        if cfg.data.max_length + offset > positions:
            problems.append(f"data.max_length: {cfg.data.max_length} tokens, beyond the model's "
                            f"{positions - offset} positions (model max_position_embeddings {positions})")
    if getattr(config, "model_type", None) == "longformer":
        window = config.attention_window
        windows = window if isinstance(window, (list, tuple)) else [window]
        if any(w % 2 for w in windows):
            problems.append(f"model.config.attention_window: {window} must be even")
    return problems


def warnings_for(cfg, model=None) -> list[str]:
    notes = []
    config = getattr(model, "config", None)
    if cfg.precision.dtype == "fp16" and getattr(config, "model_type", None) == "longformer":
        notes.append("precision.dtype: fp16 with Longformer is known to stall or go NaN "
                     "(transformers#21449); prefer bf16 where the GPU has it")
    if cfg.deepspeed.zero_stage == 3 and cfg.model.activation_checkpointing:
        notes.append("model.activation_checkpointing: qarac_dist uses non-reentrant checkpointing, which ZeRO-3 needs "
                     "(reentrant checkpointing breaks ZeRO-3's parameter gathering)")
    return notes


# ---------------------------------------------------------------- running it on a config

@dataclass
class Result:
    name: str
    report: GradientReport
    problems: list[str]
    notes: list[str]
    memory: Optional[MemoryPlan] = None

    @property
    def ok(self) -> bool:
        return self.report.ok and not self.problems


def architecture_key(config: dict) -> str:
    """Trials with the same key build the same model and use the same memory: audited once."""
    import json

    keep = {"model": config["model"], "data": {k: config["data"].get(k) for k in ("max_length", "text_pair_column",
                                                                                "synthetic")},
            "tokenizer": config["tokenizer"], "preflight": config.get("preflight"),
            "memory": [config["deepspeed"], config["precision"], config["training"]["micro_batch_size"]]}
    return json.dumps(keep, sort_keys=True, default=str)


def run(cfg, world_size: int = 1, resources=None) -> Result:
    """Build the trial's model and a real batch of its data; audit and check them. With
    `resources.gpu_memory_gb` set, also plan the memory per GPU."""
    import os

    import torch

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from . import data, models

    torch.manual_seed(cfg.training.seed)
    small = _with_small_data(cfg)
    splits = data.prepare(small)
    model = models.build_model(small, splits.num_labels, splits.tokenizer)
    spec = models.input_spec(model)
    collate = data.Collator(splits.tokenizer.pad_token_id, spec.pad_multiple, spec.global_first_token,
                            cfg.model.task == "regression")
    rows = splits.train[list(range(min(len(splits.train), max(2, min(cfg.training.micro_batch_size, 4)))))]
    report = audit_gradients(model, collate(rows), allow_no_grad=cfg.preflight.allow_no_grad)
    problems = check_config(cfg, splits.tokenizer, model, world_size)
    plan = None
    if resources is not None and resources.gpu_memory_gb and not problems:
        plan, advice = _plan_memory(cfg, model, collate, splits.train[[0]], resources)
        problems += advice
    return Result(cfg.name, report, problems, warnings_for(cfg, model), plan)


def _plan_memory(cfg, model, collate, row: dict, resources) -> tuple[MemoryPlan, list[str]]:
    """The trial's plan, and the switches that would make it fit (each measured or estimated)."""
    import dataclasses

    from .models import enable_activation_checkpointing

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
    import dataclasses

    d = dataclasses.replace(cfg.data, max_train_examples=min(cfg.data.max_train_examples or 64, 64),
                            max_validation_examples=min(cfg.data.max_validation_examples or 8, 8))
    return dataclasses.replace(cfg, data=d)


def print_result(result: Result, out=sys.stdout) -> None:
    status = "ok" if result.ok else "FAILED"
    print(f"preflight {result.name}: {status}", file=out)
    for line in result.report.lines():
        print(f"  {line}", file=out)
    if result.report.allowed:
        print(f"  allowed without gradient (preflight.allow_no_grad): {len(result.report.allowed)} parameters", file=out)
    if result.report.frozen:
        print(f"  frozen: {len(result.report.frozen)} parameters", file=out)
    if result.memory is not None:
        print(f"  memory per GPU: about {gib(result.memory.total)} (model states "
              f"{gib(result.memory.model_states)}, activations {gib(result.memory.activations)})",
              file=out)
    for problem in result.problems:
        print(f"  {problem}", file=out)
    for note in result.notes:
        print(f"  warning: {note}", file=out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qarac_dist.preflight", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a training config or a sweep file (YAML)")
    parser.add_argument("overrides", nargs="*", metavar="dotted.key=value")
    parser.add_argument("--find-batch-size", action="store_true",
                        help="sweep files: find the largest micro batch that fits, with real steps on one GPU "
                             "of the sweep's resources (a SLURM job), and plan the sweep with it")
    args = parser.parse_intermixed_args(argv)
    from .config import config_from_dict, load_config
    from .schema import ConfigError, UserError, read_yaml

    try:
        raw = read_yaml(args.config)
        if args.find_batch_size:
            return find_batch_size(args.config, args.overrides)
        if "grid" in raw or "base" in raw:
            from .plan import load_sweep, plan

            spec, base = load_sweep(args.config, args.overrides)
            trials = plan(spec, base, args.config)
            configs = [config_from_dict(t.config, args.config) for t in trials]
            world, resources = spec.resources.nodes * spec.resources.tasks_per_node, spec.resources
        else:
            configs, world, resources = [load_config(args.config, args.overrides)], 1, None
        results = run_many(configs, world, resources)
    except (ConfigError, UserError) as err:
        print(err if isinstance(err, ConfigError) else f"{args.config}: {err}", file=sys.stderr)
        return 2
    for result in results:
        print_result(result)
    return 0 if all(r.ok for r in results) else 1


def find_batch_size(source: str, overrides: list[str]) -> int:
    from . import batchsize
    from .plan import load_sweep, plan
    from .schema import UserError, read_yaml
    from .sweep import resolve_executor, sweep_dir

    raw = read_yaml(source)
    if not ("grid" in raw or "base" in raw):
        raise UserError("--find-batch-size: give a sweep file (it writes into the sweep's directory)")
    spec, base = load_sweep(source, overrides)
    trials = plan(spec, base, source)
    directory = sweep_dir(spec)
    results = batchsize.find(spec, trials, resolve_executor(spec, source), directory)
    for key, result in results.items():
        model = json.loads(key)["model"]
        what = model.get("name_or_path") or model.get("factory") or (model.get("config") or {}).get("model_type")
        peak = f", peak {gib(result['peak_bytes'])}" if result["peak_bytes"] else ""
        print(f"{what}: largest micro batch that fits {result['micro_batch_size']} on {result['device']}{peak} "
              f"(budget {gib(result['budget_bytes'])}; tried {', '.join(result['tried'])})")
    print(f"written to {directory / 'micro_batch.json'}; the sweep plans with it from now on")
    return 0 if all(r["micro_batch_size"] for r in results.values()) else 1


def run_many(configs: list, world_size: int = 1, resources=None) -> list[Result]:
    """Audit each distinct architecture once."""
    from .config import config_to_dict

    seen: dict[str, Result] = {}
    for cfg in configs:
        key = architecture_key(config_to_dict(cfg))
        if key not in seen:
            seen[key] = run(cfg, world_size, resources)
    return list(seen.values())


if __name__ == "__main__":
    sys.exit(main())
