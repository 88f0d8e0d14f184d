"""IDAP++ (METHODS.md section 3): divergence-aware filter pruning, then whole-layer removal, under a budget.

Stage 1 (filters, neurons, heads): at step ``t`` score every remaining unit with the flow
``divergence`` score, rank them globally, cut the fraction ``p_t = p0 (1 + t/T)^alpha`` of the
units that remain (:func:`schedule_fraction`), re-estimate BatchNorm, recover by cross-entropy
plus ``0.5 *`` L1 feature distillation from the previous model at a few intermediate taps
(AdamW 1e-3, stopped early as soon as the budget holds again -- after BatchNorm re-estimation,
so a cut that already holds the budget gets no recovery at all), then check the budget.

Stage 2 (layers): rank the removable blocks (:mod:`flowprune.pruning.layers`) by increasing layer
divergence ``D_i``; try each in turn: replace it by the identity, re-estimate BatchNorm, and keep
it at once if the budget holds; otherwise recover briefly (distilling from the model before the
removal at the outputs of the blocks' containers) and keep it only if the budget now holds, else
restore the exact previous model and mark the block essential.

**Budget** (:class:`Budget`), measured on the validation split against the dense model:
``max_drop`` (top-1 accuracy drop, a fraction: 0.01 = one point) and/or ``max_output_error``
(``sum_x ||N0(x) - N(x)||^2 <= Delta * sum_x ||N0(x)||^2`` on the logits). A violation rolls back
to the last model within budget (exact weights: an in-memory copy); in stage 2 it rejects that block.
In stage 1 the violating step is then **retried** from the rolled-back model with half the
fraction (``retry_factor``), up to ``max_retries`` times in a row (default 2: ``p_t``, ``p_t/2``,
``p_t/4``); every try is recorded in the history (``retry`` = 0, 1, 2, ...) and the stage ends only
when the last retry also violates (``max_retries=0``: the paper's stop at the first violation).
An accepted retry moves on to step ``t + 1`` with the full scheduled fraction again. A target reduction (``target_macs``, ``target_params``: factors, 3.0 = 3x
fewer) ends the run as soon as it is reached. Every stop records its reason.

Choices the paper leaves open, as options with defaults: distillation taps (the outputs of up to
``num_taps`` unit root layers spread over depth, compared on the channels that survive the cut;
retries after a violation (``max_retries``, ``retry_factor``: not in the paper, which stops);
stage 2: the outputs of the containers of the blocks), the recovery budget (``recover_epochs``,
``recover_batches``), a schedule that ends after ``T`` steps (``max_steps``), the final fine-tune
(``final_epochs``, kept only if it stays within budget and does not lower validation accuracy).

Checkpoints: with ``checkpoint_dir`` the current model (``flowprune.io`` format) and the run state
are written after every step; calling :func:`idap` again with the same arguments resumes there.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flowprune.data import DataSplits, make_loader
from flowprune.errors import FlowpruneError, check_positive_int
from flowprune.measure import accuracy, count_macs_params, eval_mode, predict
from flowprune.pruning.layers import RemovableBlock, find_removable_blocks, rank_blocks, remove_block
from flowprune.train import TrainConfig, fit, reestimate_bn

log = logging.getLogger(__name__)

STATE_FILE = "idap_state.json"


# ---------------------------------------------------------------------------------------- schedule
def schedule_fraction(t: int, p0: float = 0.05, T: int = 10, alpha: float = 1.5) -> float:
    """``p_t = p0 * (1 + t/T)^alpha``: the fraction of the *remaining* units cut at step ``t`` (0-based)."""
    if t < 0:
        raise FlowpruneError(f"step t must be >= 0, got {t}")
    return float(p0 * (1.0 + t / T) ** alpha)


# ------------------------------------------------------------------------------------------ budget
@dataclass
class Budget:
    """What a pruned model must satisfy, and when to stop early.

    Attributes:
        max_drop: largest allowed drop of validation top-1 accuracy vs the dense model, as a
            fraction (0.01 = one point); None = not checked.
        max_output_error: largest allowed ``sum ||N0(x)-N(x)||^2 / sum ||N0(x)||^2`` over the
            validation logits; None = not checked.
        target_macs: stop once MACs <= dense MACs / ``target_macs`` (a factor > 1); None = no target.
        target_params: the same for parameters.
    """

    max_drop: float | None = 0.01
    max_output_error: float | None = None
    target_macs: float | None = None
    target_params: float | None = None

    def validate(self) -> Budget:
        if self.max_drop is None and self.max_output_error is None:
            raise FlowpruneError("a budget needs max_drop or max_output_error (or both); both were None")
        for name in ("max_drop", "max_output_error"):
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise FlowpruneError(f"{name} must be a finite number >= 0, got {v!r}")
            if v < 0:
                raise FlowpruneError(f"{name} must be >= 0 (a budget below zero cannot be met), got {v!r}")
        if self.max_drop is not None and self.max_drop >= 1:
            raise FlowpruneError(f"max_drop is a fraction of accuracy in [0, 1) (0.01 = one point), got {self.max_drop!r}")
        for name in ("target_macs", "target_params"):
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 1:
                raise FlowpruneError(f"{name} is a reduction factor > 1 (3.0 = 3x fewer), got {v!r}")
        return self


def min_val_samples(budget: Budget) -> int:
    """Validation samples needed to measure ``budget``: 20, and one sample must not exceed ``max_drop``."""
    n = 20
    if budget.max_drop:
        n = max(n, math.ceil(1.0 / budget.max_drop - 1e-9))
    return n


class BudgetMeter:
    """Measures a model against the dense reference on the validation split.

    ``measure(model)`` -> ``{"accuracy", "drop", "output_error", "macs", "params", "within",
    "violations": [...]}``. The dense logits are computed once.
    """

    def __init__(self, dense: nn.Module, val_batches: list, budget: Budget, input_shape: Sequence[int]):
        self.budget = budget
        self.val = val_batches
        self.input_shape = tuple(input_shape)
        self.ref_logits, self.labels = predict(dense, val_batches)
        self.ref_accuracy = float((self.ref_logits.argmax(1) == self.labels).float().mean())
        self.ref_sq = float(self.ref_logits.pow(2).sum())
        self.dense_macs, self.dense_params = count_macs_params(dense, self.input_shape)

    def quality(self, model: nn.Module) -> dict:
        logits, _ = predict(model, self.val)
        acc = float((logits.argmax(1) == self.labels).float().mean())
        err = float((logits - self.ref_logits).pow(2).sum()) / max(self.ref_sq, 1e-12)
        violations = []
        if self.budget.max_drop is not None and self.ref_accuracy - acc > self.budget.max_drop + 1e-9:
            violations.append("max_drop")
        if self.budget.max_output_error is not None and err > self.budget.max_output_error:
            violations.append("max_output_error")
        return {"accuracy": acc, "drop": self.ref_accuracy - acc, "output_error": err,
                "within": not violations, "violations": violations}

    def measure(self, model: nn.Module) -> dict:
        q = self.quality(model)
        macs, params = count_macs_params(model, self.input_shape)
        q.update(macs=macs, params=params, macs_reduction=self.dense_macs / max(macs, 1),
                 params_reduction=self.dense_params / max(params, 1))
        return q

    def target_reached(self, stats: dict) -> str | None:
        b = self.budget
        if b.target_macs is not None and stats["macs_reduction"] >= b.target_macs:
            return f"target_macs reached ({stats['macs_reduction']:.2f}x >= {b.target_macs}x)"
        if b.target_params is not None and stats["params_reduction"] >= b.target_params:
            return f"target_params reached ({stats['params_reduction']:.2f}x >= {b.target_params}x)"
        return None


# -------------------------------------------------------------------------------------- distillation
class FeatureDistiller:
    """``0.5 * mean_taps L1(student_tap, teacher_tap[:, keep])`` as an ``extra_loss`` for :func:`fit`.

    Args:
        teacher: the previous model (frozen, eval mode, not changed).
        student: the model being recovered (hooks are attached to it; call :meth:`close`).
        taps: ``[(module_name, keep, dim)]``: ``keep`` = indices of the teacher's features along
            ``dim`` that survive in the student (None = same shape).
        weight: the loss weight (0.5, the authors').
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, taps: list[tuple[str, torch.Tensor | None, int]],
                 weight: float = 0.5):
        self.teacher = teacher.eval()  # run under no_grad; its requires_grad flags are left alone
        self.taps = taps
        self.weight = weight
        self._s: dict[str, torch.Tensor] = {}
        self._t: dict[str, torch.Tensor] = {}
        self._handles = []
        smods, tmods = dict(student.named_modules()), dict(teacher.named_modules())
        for name, _keep, _dim in taps:
            self._handles.append(smods[name].register_forward_hook(self._store(self._s, name)))
            self._handles.append(tmods[name].register_forward_hook(self._store(self._t, name)))

    @staticmethod
    def _store(d: dict, name: str):
        def hook(_m, _i, out):
            d[name] = out[0] if isinstance(out, (tuple, list)) else out
        return hook

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if not self.taps:
            return logits.new_zeros(())
        with torch.no_grad():
            self.teacher(x)
        total = logits.new_zeros(())
        n = 0
        for name, keep, dim in self.taps:
            s, t = self._s.get(name), self._t.get(name)
            if s is None or t is None:
                continue
            if keep is not None:
                t = t.index_select(dim % t.dim(), keep.to(t.device))
            if s.shape != t.shape:
                continue
            total = total + F.l1_loss(s, t.detach())
            n += 1
        return self.weight * total / max(n, 1)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _unit_taps(units: Sequence, cuts: dict, num_taps: int) -> list[tuple[str, torch.Tensor | None, int]]:
    """Up to ``num_taps`` unit root layers spread over depth, with their surviving channel indices."""
    cand = [u for u in units if u.kind in ("channel", "neuron")]
    if not cand or num_taps <= 0:
        return []
    picks = sorted({round(i * (len(cand) - 1) / max(num_taps - 1, 1)) for i in range(min(num_taps, len(cand)))})
    taps = []
    for i in picks:
        u = cand[i]
        removed = set(int(j) for j in cuts.get(u.name, []))
        keep = torch.tensor([j for j in range(int(u.size)) if j not in removed], dtype=torch.long)
        taps.append((u.name, keep, 1 if u.kind == "channel" else -1))
    return taps


# ------------------------------------------------------------------------------------------- result
@dataclass
class IdapResult:
    """What :func:`idap` returns: the pruned model and everything that happened."""

    model: nn.Module
    dense: dict
    final: dict
    steps: list[dict] = field(default_factory=list)
    removed_blocks: list[str] = field(default_factory=list)
    essential_blocks: list[str] = field(default_factory=list)
    stage_reasons: dict[str, str] = field(default_factory=dict)
    stop_reason: str = ""
    stages: tuple[int, ...] = (1, 2)

    def to_dict(self) -> dict:
        return {"dense": self.dense, "final": self.final, "steps": self.steps, "removed_blocks": self.removed_blocks,
                "essential_blocks": self.essential_blocks, "stage_reasons": self.stage_reasons,
                "stop_reason": self.stop_reason, "stages": list(self.stages)}


# ---------------------------------------------------------------------------------------- the method
@dataclass
class _Config:
    stages: tuple[int, ...]
    budget: dict
    p0: float
    T: int
    alpha: float
    max_steps: int
    kinds: tuple[str, ...]
    score: str
    min_width: int
    round_to: int
    normalize: str
    recover_epochs: int
    recover_batches: int | None
    stage2_recover_batches: int | None
    final_epochs: int
    calib_batches: int
    calib_batch_size: int
    num_taps: int
    lr: float
    seed: int
    max_retries: int = 2
    retry_factor: float = 0.5


def _check_stages(stages) -> tuple[int, ...]:
    if isinstance(stages, int):
        stages = (stages,)
    try:
        st = tuple(int(s) for s in stages)
    except (TypeError, ValueError):
        raise FlowpruneError(f"stages must be a sequence of 1 and/or 2, e.g. (1, 2), got {stages!r}") from None
    if not st or any(s not in (1, 2) for s in st) or len(set(st)) != len(st):
        raise FlowpruneError(f"stages must be one of (1,), (2,), (1, 2), (2, 1); got {stages!r}")
    return st


def _load_state(ckpt: Path, cfg: dict) -> dict | None:
    f = ckpt / STATE_FILE
    if not f.exists():
        return None
    state = json.loads(f.read_text())
    if state.get("config") != cfg:
        raise FlowpruneError(f"checkpoint {f} was written by an idap run with other settings; "
                             "use a fresh checkpoint directory or the same arguments")
    return state


def _save_state(ckpt: Path, state: dict, model: nn.Module) -> None:
    from flowprune import io
    from flowprune.distributed import is_main

    if not is_main():
        return

    io.save(model, ckpt / "model", metadata={"method": "idap", "checkpoint": True})
    tmp = ckpt / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, ckpt / STATE_FILE)


def idap(model: nn.Module, data: DataSplits, *, stages: Sequence[int] | int = (1, 2), max_drop: float | None = 0.01,
         max_output_error: float | None = None, target_macs: float | None = None,
         target_params: float | None = None, p0: float = 0.05, T: int = 10, alpha: float = 1.5,
         max_steps: int | None = None, kinds: Sequence[str] = ("channel", "neuron", "head"),
         score: str = "divergence", normalize: str = "none", min_width: int = 1, round_to: int = 1, recover_epochs: int = 2,
         recover_batches: int | None = None, stage2_recover_batches: int | None = None, final_epochs: int = 0,
         calib_batches: int = 4, calib_batch_size: int = 64, num_taps: int = 3, lr: float = 1e-3,
         checkpoint_dir: str | os.PathLike | None = None, seed: int = 0, progress: bool | None = False,
         reference: nn.Module | None = None, max_retries: int = 2, retry_factor: float = 0.5,
         device: str | torch.device | None = None) -> IdapResult:
    """Prune ``model`` with IDAP++ within a budget; the caller's model is never changed.

    Args:
        model: a trained model (built by :func:`flowprune.build_model` when ``checkpoint_dir`` is given).
        data: the data splits; recovery trains on ``train``, the budget is measured on ``val``.
        stages: ``(1,)`` filters only, ``(2,)`` layers only, ``(1, 2)`` (default) or ``(2, 1)``.
        max_drop, max_output_error, target_macs, target_params: the :class:`Budget`.
        p0, T, alpha: the schedule ``p_t = p0 (1 + t/T)^alpha``.
        max_steps: most stage-1 steps (default ``T``).
        kinds: unit kinds pruned in stage 1.
        score: registry name of the stage-1 score (``divergence``; any registered score works).
        normalize: global-ranking normalisation passed to :func:`flowprune.plan.plan_cuts`: ``none``
            (default: the raw divergence, whose ``1/(C*H*W)`` factor is the authors' cross-layer
            normalisation), ``unit`` or ``block``.
        min_width, round_to: passed to :func:`flowprune.plan.plan_cuts` (global budget).
        recover_epochs: most recovery epochs after each stage-1 step (stopped early once within budget).
        recover_batches: cap on batches per recovery epoch (None = the whole train split).
        stage2_recover_batches: batches of the single recovery epoch after a block removal that
            broke the budget (default: ``recover_batches``; 0 = no recovery, accept only removals that
            hold the budget right after BatchNorm re-estimation).
        final_epochs: a final fine-tune (CE, AdamW ``lr``) kept only when it stays within budget and
            does not lower validation accuracy.
        calib_batches, calib_batch_size: training batches used for scores, BN re-estimation and the
            layer ranking.
        num_taps: distillation taps in stage 1.
        lr: AdamW learning rate of every recovery.
        checkpoint_dir: write the model and the run state after every step; resume from there.
        seed: seeds the calibration batches and every recovery.
        reference: the model the budget and the reductions are measured against (default: ``model``
            itself). Pass the dense model to continue pruning an already pruned ``model`` within the
            original budget (e.g. stage 2 on a stage-1 result).
        max_retries: after a stage-1 step violates the budget (and is rolled back), retry it from the
            rolled-back model with the fraction times ``retry_factor``, at most this many times in a
            row (0 = stop at the first violation, as in the paper). Every try is one history entry.
        retry_factor: the fraction multiplier of each retry, in (0, 1) (0.5 = half).
        device: where the work runs (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``; default: the
            model's device). Under torchrun scores, recovery and the budget's accuracy are shared by
            the ranks (:mod:`flowprune.distributed`) and only rank 0 writes ``checkpoint_dir``.

    Returns:
        :class:`IdapResult`.

    Raises:
        FlowpruneError: a budget below zero, bad stages, a validation split too small to measure
            the budget, stage 2 asked for on a model with no removable block -- all before any work.
    """
    st = _check_stages(stages)
    budget = Budget(max_drop, max_output_error, target_macs, target_params).validate()
    if not isinstance(data, DataSplits):
        raise FlowpruneError("idap needs a DataSplits (train for recovery, val for the budget), e.g. load_dataset('mnist5k')")
    need = min_val_samples(budget)
    if len(data.val) < need:
        raise FlowpruneError(f"the validation split has {len(data.val)} samples; measuring the budget "
                             f"(max_drop={budget.max_drop}) needs at least {need}. Raise --val-fraction or loosen the budget")
    if not (isinstance(p0, (int, float)) and 0 < p0 < 1):
        raise FlowpruneError(f"p0 must lie in (0, 1), got {p0!r}")
    check_positive_int("T", T)
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha)):
        raise FlowpruneError(f"alpha must be a finite number, got {alpha!r}")
    max_steps = T if max_steps is None else max_steps
    check_positive_int("max_steps", max_steps)
    check_positive_int("recover_epochs", recover_epochs)
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise FlowpruneError(f"max_retries must be an integer >= 0, got {max_retries!r}")
    if isinstance(retry_factor, bool) or not isinstance(retry_factor, (int, float)) or not 0 < retry_factor < 1:
        raise FlowpruneError(f"retry_factor must lie in (0, 1) (0.5 = half the fraction), got {retry_factor!r}")
    check_positive_int("calib_batches", calib_batches)
    check_positive_int("calib_batch_size", calib_batch_size)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
        raise FlowpruneError(f"lr must be a positive number, got {lr!r}")
    if recover_batches is not None:
        check_positive_int("recover_batches", recover_batches)
    s2rb = recover_batches if stage2_recover_batches is None else stage2_recover_batches
    if s2rb is not None and (isinstance(s2rb, bool) or not isinstance(s2rb, int) or s2rb < 0):
        raise FlowpruneError(f"stage2_recover_batches must be an integer >= 0, got {stage2_recover_batches!r}")
    if not isinstance(final_epochs, int) or final_epochs < 0:
        raise FlowpruneError(f"final_epochs must be an integer >= 0, got {final_epochs!r}")
    shape = tuple(data.input_shape)
    base = getattr(model, "flowprune_base", None)
    if base is not None and tuple(base.get("input_shape", shape)) != shape:
        raise FlowpruneError(f"the model takes inputs {tuple(base['input_shape'])} but data {data.name!r} has {shape}")
    if checkpoint_dir is not None and base is None:
        raise FlowpruneError("checkpoint_dir needs a model built by flowprune.build_model (it has no flowprune_base)")
    if 1 in st:
        from flowprune.scores import get_score

        get_score(score)  # unknown name -> error before work
    from flowprune.device import resolve_device

    dev = resolve_device(device, model)
    calib = data.calibration_batches(calib_batch_size, calib_batches, seed=seed, split="train")
    dense = copy.deepcopy(model).to(dev).eval()
    ref = dense if reference is None else copy.deepcopy(reference).to(dev).eval()
    if 2 in st and not find_removable_blocks(dense, calib[:1]):
        raise FlowpruneError(f"the model ({type(model).__name__}) has no removable block for stage 2: no residual "
                             "block with an identity shortcut, no transformer block and no shape-preserving "
                             "layer; run stage 1 alone (stages=(1,), --stages 1)")

    cfg = _Config(st, asdict(budget), p0, T, alpha, max_steps, tuple(kinds), score, min_width, round_to, normalize,
                  recover_epochs, recover_batches, s2rb, final_epochs, calib_batches, calib_batch_size, num_taps,
                  lr, seed, max_retries, float(retry_factor))
    cfg_json = json.loads(json.dumps(asdict(cfg)))
    val = make_loader(data.val, 256)
    val_batches = list(val)
    meter = BudgetMeter(ref, val_batches, budget, shape)
    dense_stats = meter.measure(ref)
    rec_cfg = TrainConfig(epochs=recover_epochs, lr=lr, optimizer="adamw", weight_decay=0.0,
                          batch_size=calib_batch_size, augment=False, schedule="constant", seed=seed)
    ctx = _Run(meter=meter, data=data, calib=calib, cfg=cfg, rec_cfg=rec_cfg, progress=progress)

    current = dense
    state = {"config": cfg_json, "stage_pos": 0, "t": 0, "retry": 0, "steps": [], "removed": [], "essential": [],
             "ranking": None, "tried": 0, "stage_reasons": {}, "stop_reason": "", "done": False,
             "final_done": False}
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt is not None:
        ckpt.mkdir(parents=True, exist_ok=True)
        loaded = _load_state(ckpt, cfg_json)
        if loaded is not None:
            from flowprune import io

            state = loaded
            current = io.load(ckpt / "model")
            log.info("idap: resuming from %s (stage position %d, %d steps done)", ckpt, state["stage_pos"],
                     len(state["steps"]))

    def checkpoint() -> None:
        if ckpt is not None:
            _save_state(ckpt, state, ctx.last_model if ctx.last_model is not None else current)

    while not state["done"] and state["stage_pos"] < len(st):
        stage = st[state["stage_pos"]]
        if stage == 1:
            current, reason = ctx.stage1(current, state, checkpoint)
        else:
            current, reason = ctx.stage2(current, state, checkpoint)
        state["stage_reasons"][str(stage)] = reason
        state["stop_reason"] = reason
        if reason.startswith("target_"):
            state["done"] = True
        state["stage_pos"] += 1
        current = ctx.last_model
        checkpoint()
    if final_epochs > 0 and not state["final_done"]:
        current = ctx.final_finetune(current, state)
        state["final_done"] = True
        checkpoint()
    final_stats = meter.measure(current)
    final_stats["test_accuracy"] = accuracy(current, make_loader(data.test, 256)) if len(data.test) else None
    dense_stats["test_accuracy"] = accuracy(ref, make_loader(data.test, 256)) if len(data.test) else None
    stop = state["stop_reason"]
    if len(st) > 1:
        stop = "; ".join(f"stage {k}: {v}" for k, v in state["stage_reasons"].items())
    current.flowprune_metadata = {"method": "idap", "stages": list(st), "removed_blocks": state["removed"],
                                  "essential_blocks": state["essential"], "stop_reason": stop}
    if base is not None:
        current.flowprune_base = base
    return IdapResult(model=current, dense=dense_stats, final=final_stats, steps=state["steps"],
                      removed_blocks=list(state["removed"]), essential_blocks=list(state["essential"]),
                      stage_reasons=dict(state["stage_reasons"]), stop_reason=stop, stages=st)


@dataclass
class _Run:
    meter: BudgetMeter
    data: DataSplits
    calib: list
    cfg: _Config
    rec_cfg: TrainConfig
    progress: bool = False
    last_model: nn.Module | None = None

    # -- recovery ------------------------------------------------------------------------------
    def recover(self, student: nn.Module, teacher: nn.Module, taps: list, *, epochs: int,
                batches: int | None, seed: int) -> dict:
        """CE + 0.5 L1 distillation, in place, stopped at the first epoch end within budget.

        BatchNorm statistics are re-estimated on the calibration batches at every epoch end (and so
        at the end): after a few large steps on a freshly cut model the running averages lag far
        behind the weights (measured: 91% train-mode vs 10% eval-mode accuracy on a cut ResNet-20),
        and the budget check must see the model as it will be used. ``fit``'s own per-epoch
        accuracy is taken on one calibration batch only (the budget check replaces it).
        """
        distill = FeatureDistiller(teacher, student, taps)
        meter, calib = self.meter, self.calib

        def on_epoch_end(_epoch: int, m: nn.Module, _history: dict) -> bool:
            reestimate_bn(m, calib)
            return bool(meter.quality(m)["within"])

        try:
            hist = fit(student, self.data, self.rec_cfg, epochs=epochs, seed=seed, extra_loss=distill,
                       on_epoch_end=on_epoch_end, max_batches_per_epoch=batches, val_data=calib[:1],
                       progress=self.progress)
        finally:
            distill.close()
        return {"epochs": len(hist["epochs"]), "stopped_early": hist["stopped_early"]}

    # -- stage 1 -------------------------------------------------------------------------------
    def stage1(self, model: nn.Module, state: dict, checkpoint) -> tuple[nn.Module, str]:
        from flowprune.plan import plan_cuts
        from flowprune.pruning.structural import apply_cuts
        from flowprune.scores import get_score
        from flowprune.units import find_units

        cfg = self.cfg
        score_fn = get_score(cfg.score)
        example = self.calib[0][0][:1]
        self.last_model = model
        reason = f"schedule finished ({cfg.max_steps} steps)"
        while state["t"] < cfg.max_steps:
            t = state["t"]
            retry = int(state.get("retry", 0))
            frac = min(schedule_fraction(t, cfg.p0, cfg.T, cfg.alpha), 0.9) * cfg.retry_factor ** retry
            units = find_units(model, example, kinds=cfg.kinds)
            if not units:
                reason = "no prunable unit left"
                break
            scores = score_fn(model, units, self.calib)
            cuts = plan_cuts(model, units, scores, example_inputs=example, ratio=frac, budget="global",
                             min_width=cfg.min_width, round_to=cfg.round_to,
                             normalize=cfg.normalize)
            cuts = {k: v for k, v in cuts.items() if len(v) > 0}
            if not cuts:
                reason = ("nothing left to prune (every unit at min_width)" if retry == 0 else
                          f"budget violated at step {t}; retry {retry} (fraction {frac:.4f}) cuts nothing; "
                          "rolled back to the previous model")
                break
            cand = apply_cuts(model, cuts, example_inputs=example)
            reestimate_bn(cand, self.calib)
            rec = {"epochs": 0}
            if not self.meter.quality(cand)["within"]:  # early stopping at epoch 0: no recovery needed
                taps = _unit_taps(units, cuts, cfg.num_taps)
                rec = self.recover(cand, model, taps, epochs=cfg.recover_epochs, batches=cfg.recover_batches,
                                   seed=cfg.seed * 1000 + t + 100_000 * retry)
            stats = self.meter.measure(cand)
            step = {"stage": 1, "step": t, "retry": retry, "fraction": frac,
                    "units_cut": int(sum(len(v) for v in cuts.values())), "recovery_epochs": rec["epochs"],
                    **_public(stats)}
            if not stats["within"]:
                step["accepted"] = False
                state["steps"].append(step)
                why = (f"{', '.join(stats['violations'])}: drop {100 * stats['drop']:.2f} pts, "
                       f"output error {stats['output_error']:.4f}")
                if retry < cfg.max_retries:  # roll back (``model`` is untouched) and retry with a smaller cut
                    state["retry"] = retry + 1
                    log.info("idap stage 1: step %d (fraction %.4f) violated the budget (%s); rolled back, "
                             "retry %d", t, frac, why, retry + 1)
                    checkpoint_model(self, state, checkpoint, model)
                    continue
                state["t"] = t + 1
                state["retry"] = 0
                tries = f" after {retry} retr{'y' if retry == 1 else 'ies'}" if retry else ""
                reason = f"budget violated at step {t}{tries} ({why}); rolled back to the previous model"
                log.info("idap stage 1: %s", reason)
                break
            state["t"] = t + 1
            state["retry"] = 0
            step["accepted"] = True
            state["steps"].append(step)
            model = cand
            self.last_model = model
            checkpoint_model(self, state, checkpoint, model)
            hit = self.meter.target_reached(stats)
            if hit:
                reason = hit
                break
        self.last_model = model
        return model, reason

    # -- stage 2 -------------------------------------------------------------------------------
    def stage2(self, model: nn.Module, state: dict, checkpoint) -> tuple[nn.Module, str]:
        cfg = self.cfg
        self.last_model = model
        if state.get("ranking") is None:
            blocks = rank_blocks(find_removable_blocks(model, self.calib))
            state["ranking"] = [b.to_dict() for b in blocks]
            state["tried"] = 0
        ranking = [RemovableBlock(name=d["name"], kind=d["kind"], cls=d["cls"], shape=tuple(d["shape"]),
                                  divergence=d["divergence"], input_nonnegative=d["input_nonnegative"],
                                  companions=tuple(d["companions"])) for d in state["ranking"]]
        if not ranking:
            return model, "no removable block"
        current = self.meter.measure(model)
        hit = self.meter.target_reached(current)
        if hit:
            return model, hit
        reason = f"all {len(ranking)} removable blocks tried"
        while state["tried"] < len(ranking):
            i = state["tried"]
            b = ranking[i]
            cand = remove_block(model, b)
            reestimate_bn(cand, self.calib)
            stats = self.meter.quality(cand)
            recovered = 0
            if not stats["within"] and cfg.stage2_recover_batches != 0:
                taps = _container_taps(model, b)
                rec = self.recover(cand, model, taps, epochs=1, batches=cfg.stage2_recover_batches,
                                   seed=cfg.seed * 1000 + 500 + i)
                recovered = rec["epochs"]
                stats = self.meter.quality(cand)
            step = {"stage": 2, "step": i, "block": b.name, "kind": b.kind, "divergence": b.divergence,
                    "recovered": bool(recovered)}
            state["tried"] = i + 1
            if stats["within"]:
                current = self.meter.measure(cand)
                step.update(accepted=True, **_public(current))
                model = cand
                self.last_model = model
                state["removed"].append(b.name)
            else:
                step.update({**_public(current), "accepted": False, "rejected_accuracy": stats["accuracy"],
                             "rejected_output_error": stats["output_error"], "violations": stats["violations"]})
                state["essential"].append(b.name)
            state["steps"].append(step)
            checkpoint_model(self, state, checkpoint, model)
            if stats["within"]:
                hit = self.meter.target_reached(current)
                if hit:
                    reason = hit
                    break
        self.last_model = model
        return model, reason

    # -- final fine-tune -------------------------------------------------------------------------
    def final_finetune(self, model: nn.Module, state: dict) -> nn.Module:
        before = self.meter.quality(model)
        cand = copy.deepcopy(model)
        fit(cand, self.data, self.rec_cfg, epochs=self.cfg.final_epochs, seed=self.cfg.seed * 1000 + 999,
            schedule="cosine", max_batches_per_epoch=self.cfg.recover_batches, val_data=self.calib[:1],
            progress=self.progress)
        reestimate_bn(cand, self.calib)
        after = self.meter.quality(cand)
        keep = after["within"] and after["accuracy"] >= before["accuracy"]
        state["steps"].append({"stage": "final", "accepted": keep, "accuracy_before": before["accuracy"],
                               "accuracy_after": after["accuracy"]})
        self.last_model = cand if keep else model
        return self.last_model


def checkpoint_model(run: _Run, state: dict, checkpoint, model: nn.Module) -> None:
    run.last_model = model
    checkpoint()


def _sizes(meter: BudgetMeter, model: nn.Module) -> dict:
    macs, params = count_macs_params(model, meter.input_shape)
    return {"macs": macs, "params": params, "macs_reduction": meter.dense_macs / max(macs, 1),
            "params_reduction": meter.dense_params / max(params, 1)}


def _public(stats: dict) -> dict:
    keys = ("accuracy", "drop", "output_error", "macs", "params", "macs_reduction", "params_reduction", "violations")
    return {k: stats[k] for k in keys if k in stats}


def _container_taps(model: nn.Module, block: RemovableBlock) -> list[tuple[str, None, int]]:
    """Stage-2 distillation taps: the output of the container holding the removed block (same shape)."""
    parent = block.name.rpartition(".")[0]
    return [(parent, None, 1)] if parent else []


@torch.no_grad()
def output_error(reference: nn.Module, model: nn.Module, batches: list) -> float:
    """``sum ||N0(x) - N(x)||^2 / sum ||N0(x)||^2`` over the batches' logits."""
    with eval_mode(reference), eval_mode(model):
        a, _ = predict(reference, batches)
        b, _ = predict(model, batches)
    return float((a - b).pow(2).sum() / a.pow(2).sum().clamp_min(1e-12))
