"""Recovery after a cut: the training a pruned model gets, under one name per recipe.

A pruned network still has the dense model it came from. The recipes:

* ``finetune`` -- plain fine-tuning: cross-entropy, SGD at lr 0.01 with cosine decay, no warm-up
  (what ``prune`` and ``compare`` did before recipes existed; kept by name).
* ``kd`` -- logit knowledge distillation from the dense model (the teacher, in eval mode, no
  gradient): loss ``(1 - alpha) * CE(s, y) + alpha * T^2 * KL(softmax(t / T) || softmax(s / T))``
  (Hinton et al. 2015), with a linear learning-rate warm-up over ``warmup_fraction`` of the
  recovery steps and cosine decay (:func:`flowprune.train.lr_factor`). Every teacher forward
  pass is counted (``teacher_forwards``, in samples) and reported as extra compute.

The budget is counted in epochs over the training split; ``k`` cut/recover steps share one
budget ``E`` by :func:`split_epochs`. Which recipe is the default (:data:`DEFAULT_RECOVERY`) was
chosen by measurement: docs/recovery.md and docs/results/recovery.md.

Feature distillation on the kept channels is not offered: it was not measured in this version
(docs/recovery.md says so).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from flowprune.errors import FlowpruneError, bad_choice, check_fraction

RECOVERIES = ("finetune", "kd")
DEFAULT_RECOVERY = "kd"
RECOVERY_OPTIONS = ("temperature", "alpha", "warmup_fraction", "lr")


@dataclass(frozen=True)
class RecoveryRecipe:
    """A validated recovery recipe: ``name`` and its options (defaults per recipe)."""

    name: str = DEFAULT_RECOVERY
    temperature: float = 4.0
    alpha: float = 0.9
    warmup_fraction: float = 0.1
    lr: float = 0.01

    @property
    def uses_teacher(self) -> bool:
        return self.name == "kd"

    def to_dict(self) -> dict:
        out = {"name": self.name, "lr": self.lr}
        if self.uses_teacher:
            out.update(temperature=self.temperature, alpha=self.alpha, warmup_fraction=self.warmup_fraction)
        return out


def make_recipe(name: str | None = None, options: Mapping | None = None) -> RecoveryRecipe:
    """A :class:`RecoveryRecipe` from a name (default :data:`DEFAULT_RECOVERY`) and an options dict.

    Raises FlowpruneError, before any work, for an unknown name, an unknown option or a bad value.
    """
    name = DEFAULT_RECOVERY if name is None else name
    if name not in RECOVERIES:
        raise bad_choice("recovery", name, RECOVERIES)
    opts = dict(options or {})
    for k in opts:
        if k not in RECOVERY_OPTIONS:
            raise bad_choice("recovery option", k, RECOVERY_OPTIONS)
    if name == "finetune":
        extra = [k for k in opts if k != "lr"]
        if extra:
            raise FlowpruneError(f"recovery option {extra[0]!r} applies to recovery='kd' only; 'finetune' takes: lr")
        opts.setdefault("warmup_fraction", 0.0)
    recipe = RecoveryRecipe(name=name, **opts)
    t = recipe.temperature
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not (math.isfinite(t) and t > 0):
        raise FlowpruneError(f"recovery option temperature must be a positive number, got {t!r}")
    check_fraction("recovery option alpha", recipe.alpha, high_open=False)
    check_fraction("recovery option warmup_fraction", recipe.warmup_fraction)
    lr = recipe.lr
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
        raise FlowpruneError(f"recovery option lr must be a positive number, got {lr!r}")
    return recipe


def split_epochs(total: int, steps: int) -> list[int]:
    """Share a budget of ``total`` epochs among ``steps`` cut/recover steps (sum = ``total``).

    Every step gets ``total // steps`` epochs and the last step the remainder as well (the final
    recovery is the longest). ``total < steps`` raises FlowpruneError: every step needs >= 1 epoch.
    """
    for nm, v in (("recovery_epochs", total), ("steps", steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if nm == "recovery_epochs" else 1):
            raise FlowpruneError(f"{nm} must be an integer >= {0 if nm == 'recovery_epochs' else 1}, got {v!r}")
    if total == 0:
        return [0] * steps
    if total < steps:
        raise FlowpruneError(f"recovery_epochs={total} cannot be shared by steps={steps}: every step needs at "
                             f"least one epoch; give recovery_epochs >= {steps} or steps <= {total}")
    base = total // steps
    return [base] * (steps - 1) + [total - base * (steps - 1)]


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(t / T) || softmax(s / T))``, averaged over the batch (Hinton et al. 2015)."""
    t = float(temperature)
    log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean") * (t * t)


def check_teacher(teacher: nn.Module, student: nn.Module, example: torch.Tensor) -> None:
    """Raise FlowpruneError unless ``teacher`` and ``student`` give the same number of output classes
    (under torchrun :func:`flowprune.train.fit` scales the distillation term per rank like the CE)."""
    if not isinstance(teacher, nn.Module):
        raise FlowpruneError(f"teacher must be a torch nn.Module, got {type(teacher).__name__}")
    with torch.no_grad():
        was_t, was_s = teacher.training, student.training
        teacher.eval()
        student.eval()
        try:
            nt = teacher(example.to(next(teacher.parameters()).device)).shape[-1]
            ns = student(example.to(next(student.parameters()).device)).shape[-1]
        finally:
            teacher.train(was_t)
            student.train(was_s)
    if nt != ns:
        raise FlowpruneError(f"the teacher gives {nt} output classes but the student {ns}; distillation needs the "
                             "same classes (give the dense model the student was pruned from)")


def _example_of(data, model: nn.Module) -> torch.Tensor:
    """One training input (for the teacher/student class check)."""
    from flowprune.data import DataSplits

    x = data.train.tensors[0][:1] if isinstance(data, DataSplits) else next(iter(data))[0][:1]
    return x.to(next(model.parameters()).device)


class _Distiller:
    """``extra_loss`` for :func:`flowprune.train.fit`: turns CE into the KD loss.

    ``fit`` adds the returned term to ``CE``; returning ``alpha * (T^2 KL - CE)`` makes the total
    ``(1 - alpha) * CE + alpha * T^2 KL``.
    """

    def __init__(self, teacher: nn.Module, recipe: RecoveryRecipe, label_smoothing: float = 0.0):
        self.teacher, self.recipe, self.ls = teacher, recipe, label_smoothing

    def __call__(self, model, x, y, logits):
        with torch.no_grad():
            t_logits = self.teacher(x)
        ce = F.cross_entropy(logits, y, label_smoothing=self.ls)
        return self.recipe.alpha * (kd_loss(logits, t_logits, self.recipe.temperature) - ce)


def recover(model: nn.Module, data, epochs: int, recipe: RecoveryRecipe | None = None, *,
            teacher: nn.Module | None = None, seed: int = 0, train_config=None, checkpoint_dir=None,
            progress: bool | None = None, device=None, amp: str | None = None,
            max_batches_per_epoch: int | None = None) -> dict:
    """Recover ``model`` **in place** for ``epochs`` epochs with ``recipe``; returns a record.

    ``train_config``: a :class:`flowprune.train.TrainConfig` whose fields other than epochs, lr,
    warm-up and seed are kept (batch size, optimizer, augmentation); default ``TrainConfig()``.
    ``teacher`` (needed by ``kd``) is used in eval mode under ``torch.no_grad`` and never changed
    (a copy is put in eval mode). The record holds ``recovery`` (the recipe), ``epochs``,
    ``seconds``, ``teacher_forwards`` (samples through the teacher) and ``teacher_params``.
    """
    from flowprune.train import TrainConfig, fit

    recipe = recipe or make_recipe()
    rec = {"recovery": recipe.to_dict(), "epochs": int(epochs), "teacher_forwards": 0, "teacher_params": 0}
    if epochs <= 0:
        return rec
    base = train_config or TrainConfig()
    cfg = TrainConfig(**{**base.__dict__, "epochs": int(epochs), "lr": recipe.lr, "seed": seed,
                         "warmup_epochs": recipe.warmup_fraction * int(epochs)}).validate()
    extra = None
    if recipe.uses_teacher:
        if teacher is None:
            raise FlowpruneError("recovery='kd' needs a teacher (the dense model the student was pruned from)")
        check_teacher(teacher, model, _example_of(data, model))
        dev = next(model.parameters()).device if device is None else device
        t_model = copy.deepcopy(teacher).to(dev).eval()
        for p in t_model.parameters():
            p.requires_grad_(False)
        extra = _Distiller(t_model, recipe, cfg.label_smoothing)
        rec["teacher_params"] = sum(p.numel() for p in t_model.parameters())
    t0 = time.perf_counter()
    hist = fit(model, data, cfg, checkpoint_dir=checkpoint_dir, progress=progress, extra_loss=extra, device=device,
               amp=amp, max_batches_per_epoch=max_batches_per_epoch)
    rec["seconds"] = time.perf_counter() - t0
    if extra is not None:  # every training sample of every epoch went through the teacher once, resumed epochs too
        rec["teacher_forwards"] = sum(int(e.get("samples", 0)) for e in hist.get("epochs", []))
    return rec
