"""The memory plan: model states per GPU (DeepSpeed's estimators) plus activations, measured on
CPU as the peak of live tensor bytes over a real forward and backward, and which switch would
make a trial fit its GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from .gradients import _loss_of


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
