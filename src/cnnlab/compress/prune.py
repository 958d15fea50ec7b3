"""Pruning with a prune -> fine-tune schedule: unstructured (zeros) or structured (channels removed).

    >>> from cnnlab.compress.prune import PruneConfig, prune
    >>> result = prune(model, PruneConfig(amount=0.5, structured=True, steps=3),
    ...                example_input=torch.randn(1, 3, 64, 64), finetune=my_finetune)

``finetune(model, step)`` trains the model in place between steps (the CLI uses
``cnnlab.engine.train(config, model=model, data=data)``); see docs/pruning.md.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cnnlab._errors import CnnlabError
from cnnlab.compress.prune_structured import (ChannelPruner, StructuredReport, apply_structure, count,
                                              structure_of, structured_report)
from cnnlab.compress.prune_unstructured import (SCOPES, SparsityReport, check_amount, make_permanent,
                                                prune_unstructured, sparsity_report)

FineTune = Callable[[nn.Module, int], None]  # (model, step 1..N): train the model in place


@dataclass
class PruneConfig:
    """What to prune and how.

    Args:
        amount: the fraction removed at the end, in [0, 1): of the chosen weights (unstructured) or of
            the channels of each prunable group (structured).
        structured: remove channels (Torch-Pruning) instead of zeroing single weights.
        scope: ``layer`` (every layer/group loses ``amount``) or ``global`` (one magnitude ranking).
        steps: prune ``amount * k / steps`` at step k, fine-tuning after each step (Han et al. 2015).
        ignored: module names left alone (structured: their outputs are kept; default the classifier).
        round_to: structured only, keep channel counts multiples of this.
    """

    amount: float = 0.5
    structured: bool = False
    scope: str = "layer"
    steps: int = 1
    ignored: tuple[str, ...] | None = None
    round_to: int | None = None

    def validate(self) -> None:
        check_amount(self.amount)
        if self.scope not in SCOPES:
            raise CnnlabError(f"scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise CnnlabError(f"steps must be an integer >= 1, got {self.steps!r}")
        if self.round_to is not None and not self.structured:
            raise CnnlabError("round_to is for structured pruning (channel counts); unstructured pruning has none")


@dataclass
class PruneResult:
    """The pruned model's numbers after the last step.

    Args:
        history: per step, the amount reached, parameters, MACs (when an example input was given) and the
            sparsity of the conv/linear weights; sparsity: the final zeros per layer and sizes;
            structured: channels and parameter/MAC drop (structured pruning only); structure: the
            per-layer channel counts that rebuild the pruned model (:func:`rebuild_pruned`).
    """

    config: PruneConfig
    history: list[dict[str, Any]]
    sparsity: SparsityReport
    structured: StructuredReport | None = None
    structure: dict[str, dict[str, Any]] | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"config": vars(self.config), "history": self.history, "sparsity": self.sparsity.to_dict(),
                "structured": self.structured.to_dict() if self.structured else None}


def prune(model: nn.Module, config: PruneConfig, *, example_input: torch.Tensor | None = None,
          finetune: FineTune | None = None) -> PruneResult:
    """Prune ``model`` in place in ``config.steps`` steps, calling ``finetune(model, step)`` after each.

    Unstructured: the masks stay on while ``finetune`` runs (pruned weights stay zero), then are made
    permanent. Structured needs ``example_input`` (Torch-Pruning traces the model on it).
    """
    if not isinstance(config, PruneConfig):
        raise CnnlabError(f"prune() takes a PruneConfig, got {type(config).__name__}")
    config.validate()
    if config.structured and example_input is None:
        raise CnnlabError("structured pruning needs example_input, a batch the model takes (e.g. "
                          "torch.randn(1, 3, 64, 64)): Torch-Pruning traces the model on it")
    input_size = tuple(example_input.shape[1:]) if example_input is not None else None

    def numbers(step: int, amount: float) -> dict[str, Any]:
        row: dict[str, Any] = {"step": step, "amount": amount}
        if input_size is not None:
            row["params"], row["macs"] = count(model, input_size)
        else:
            row["params"] = sum(p.numel() for p in model.parameters())
        row["sparsity"] = sparsity_report(model).sparsity
        return row

    history = [numbers(0, 0.0)]
    if config.structured:
        pruner = ChannelPruner(model, config.amount, example_input=example_input, scope=config.scope,
                               ignored=config.ignored, round_to=config.round_to, steps=config.steps)
        for step in range(1, config.steps + 1):
            pruner.step()
            if finetune is not None:
                finetune(model, step)
            history.append(numbers(step, config.amount * step / config.steps))
        report = structured_report(pruner, history[0]["params"], history[0].get("macs", 0))
        return PruneResult(config, history, sparsity_report(model), report, structure_of(model))
    for step in range(1, config.steps + 1):
        amount = config.amount * step / config.steps
        prune_unstructured(model, amount, scope=config.scope, ignored=config.ignored or (), permanent=False)
        if finetune is not None:
            finetune(model, step)  # the masks hold the zeros while it trains
        make_permanent(model)
        history.append(numbers(step, amount))
    return PruneResult(config, history, sparsity_report(model))


def rebuild_pruned(model: nn.Module, structure: dict[str, dict[str, Any]] | None,
                   state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Load a pruned model's saved weights into a fresh build of its architecture (structured: reshaped first)."""
    from cnnlab.models import load_weights

    if structure:
        apply_structure(model, structure, state_dict)
    load_weights(model, state_dict)
    return model


def parse_amounts(text: str | Sequence[float]) -> list[float]:
    """``"0.25,0.5"`` (or a list) -> checked fractions in [0, 1), in the order given."""
    parts = text.split(",") if isinstance(text, str) else list(text)
    amounts = []
    for part in parts:
        try:
            value = float(part)
        except (TypeError, ValueError):
            raise CnnlabError(f"pruning amount {part!r} is not a number; expected fractions in [0, 1) such as "
                              "0.5 or 0.25,0.5,0.75") from None
        amounts.append(check_amount(value))
    if not amounts:
        raise CnnlabError("no pruning amount given; expected fractions in [0, 1) such as 0.5 or 0.25,0.5,0.75")
    return amounts

