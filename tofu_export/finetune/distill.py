"""Self-distillation with the token reduction in the loop: the pure training step, no files, no CLI.

The student is the user's model patched with ToFu; the teacher is the same model unpatched, whose outputs on the
training images are computed once and handed in as targets. The loss is one minus the cosine of the student's
output to the teacher's, the fidelity every report of this tool measures, so no labels are needed and what is
trained is exactly what ``eval`` and ``calibrate`` score. By default only the model's vector parameters train
(LayerNorm weights and biases, every bias, LayerScale gammas: 0.3% of a ViT-S, as in BitFit): the
reduction shifts the tokens' statistics, which those parameters scale and offset, and on a few hundred images so
few weights stay close to the unreduced model where all of them drift away (on DINOv2 ViT-S/14 at r=24 the
vectors won back 30% of the fidelity lost, every weight lost more: bench/results/finetune_dinov2*/).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # torch is imported where a function runs: the settings are checked before it is loaded
    from torch import Tensor, nn

TrainedWeights = Literal["vectors", "all"]
TRAINED_WEIGHTS: tuple[str, ...] = ("vectors", "all")


@dataclass(frozen=True)
class DistillSettings:
    """How the student trains: ``steps`` AdamW steps of ``batch`` images drawn at random (seeded) from the
    training images, at learning rate ``lr`` (constant after a warm-up of ``warmup`` steps), on the ``weights``
    named (``vectors``: 1-D parameters only; ``all``)."""

    steps: int = 150
    batch: int = 16
    lr: float = 1e-4
    weights: TrainedWeights = "vectors"
    warmup: int = 10
    seed: int = 0


def trained_parameters(model: nn.Module, weights: TrainedWeights) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of what trains: every parameter (``all``), or the 1-D ones (``vectors``: norm weights
    and biases, biases, LayerScale gammas)."""
    return [(name, p) for name, p in model.named_parameters() if weights == "all" or p.ndim == 1]


def cosine_loss(output: Tensor, target: Tensor) -> Tensor:
    """Mean of ``1 - cos`` between rows of ``output [B, D]`` and ``target [B, D]`` (a model's pooled output)."""
    from torch import nn

    return (1 - nn.functional.cosine_similarity(output.flatten(1), target.flatten(1), dim=-1)).mean()


def distill(student: nn.Module, images: Tensor, targets: Tensor, settings: DistillSettings,
            on_step: Callable[[int, float], None] = lambda step, loss: None) -> list[float]:
    """Train ``student`` (patched, in place) towards ``targets [N, D]``, the unreduced model's outputs on
    ``images [N, 3, H, W]``; returns the loss of every step. Only the parameters ``settings.weights`` names are
    updated (the others are frozen for the duration and left bit-identical). The student runs in eval mode
    throughout: dropout and stochastic depth stay off, as in the teacher whose outputs it fits. ``on_step(step,
    loss)`` hears each step as it ends."""
    import torch

    if len(images) != len(targets):
        raise ValueError(f"{len(images)} images but {len(targets)} targets")
    trained = [p for _, p in trained_parameters(student, settings.weights)]
    was_trainable = {id(p): p.requires_grad for p in student.parameters()}
    ids = {id(p) for p in trained}
    for p in student.parameters():
        p.requires_grad_(id(p) in ids)
    optimizer = torch.optim.AdamW(trained, lr=settings.lr, weight_decay=0.0)  # decay would pull the gammas to 0
    warmup = max(settings.warmup, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    generator = torch.Generator().manual_seed(settings.seed)
    losses: list[float] = []
    student.eval()
    try:
        for step in range(settings.steps):
            pick = torch.randint(len(images), (min(settings.batch, len(images)),), generator=generator)
            loss = cosine_loss(student(images[pick]), targets[pick])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
            on_step(step, losses[-1])
    finally:
        for p in student.parameters():
            p.requires_grad_(was_trainable[id(p)])
    return losses
