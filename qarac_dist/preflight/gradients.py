"""The gradient-flow audit: one forward and backward on CPU, and every trainable parameter that
got no gradient (`missing`), a gradient of exact zeros (`zero`), or a NaN/inf gradient
(`nonfinite`), grouped by module with the likely cause. Parameters with requires_grad False are
`frozen`.
"""

from __future__ import annotations

import fnmatch
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Optional

NEVER_CALLED = "its module was never called in forward"
NO_GRAD = "its module ran under torch.no_grad() (or with grad disabled)"
CUT = ("its module's output never reaches the loss: cut by .detach(), a trip through numpy, a "
       "non-differentiable op such as argmax, or simply unused")
UNUSED = "the parameter is not used by its module's forward"
ZERO = ("its gradient is exactly zero: it reaches the loss only through values that cancel out or are masked "
        "(a shift before a softmax, a product with zero, masked positions)")


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

    def findings(self, explained_zero: Optional[dict[str, str]] = None) -> list["Finding"]:
        """Each finding with its level and cause: a parameter without gradient or with a NaN one
        fails; an all-zero gradient is a warning, or a note where `explained_zero` gives the
        reason it is expected; parameters allowed without gradient, and frozen ones, are notes."""
        explained = explained_zero or {}
        out = []
        for module, leaves in self.by_module(self.missing).items():
            out.append(Finding("fail", f"no gradient: {_names(module, leaves)}", self.causes.get(module, UNUSED)))
        for module, leaves in self.by_module(self.nonfinite).items():
            out.append(Finding("fail", f"NaN/inf gradient: {_names(module, leaves)}",
                               "the loss or an activation overflowed, or a value divides by zero"))
        notes = [n for n in self.zero if n in explained]
        for reason in dict.fromkeys(explained[n] for n in notes):
            names = [n for n in notes if explained[n] == reason]
            out.append(Finding("note", f"all-zero gradient: {_siblings(self.by_module(names))}",
                               f"{reason}; expected, not a failure"))
        for module, leaves in self.by_module([n for n in self.zero if n not in explained]).items():
            out.append(Finding("warn", f"all-zero gradient: {_names(module, leaves)}", ZERO))
        if self.allowed:
            out.append(Finding("note", f"allowed without gradient (preflight.allow_no_grad): {len(self.allowed)} "
                                       f"parameters", "you said they are unused"))
        if self.frozen:
            out.append(Finding("note", f"frozen: {len(self.frozen)} parameters", "requires_grad is False"))
        return out

    def lines(self) -> list[str]:
        return [str(f) for f in self.findings()]


@dataclass(frozen=True)
class Finding:
    level: str
    """fail (nothing is submitted), warn (worth a look), note (expected, said so you know)."""
    text: str
    reason: str

    def __str__(self) -> str:
        return f"{self.level}: {self.text} ({self.reason})"


def _names(module: str, leaves: list[str]) -> str:
    return f"{module or '<root>'}.{{{', '.join(leaves)}}}"


def _siblings(groups: dict[str, list[str]]) -> str:
    """Modules with one parent and the same parameter names, written once:
    `a.self.{query, key}.{weight, bias}`."""
    parents: dict[tuple, list[str]] = defaultdict(list)
    for module, leaves in groups.items():
        parent, _, child = module.rpartition(".")
        parents[(parent, tuple(leaves))].append(child)
    return "; ".join(f"{parent}.{{{', '.join(children)}}}.{{{', '.join(leaves)}}}" if len(children) > 1
                     else _names(f"{parent}.{children[0]}" if parent else children[0], list(leaves))
                     for (parent, leaves), children in parents.items())


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
        def hook(_module, args, output, name=name):
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
