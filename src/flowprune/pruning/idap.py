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
restore the exact previous model and mark the block essential. A model without removable blocks
skips stage 2 with a message (an error only when stage 2 is the only stage asked for).

**Budget** (:class:`Budget`), measured against the dense model: ``max_drop`` (top-1 accuracy
drop, a fraction: 0.01 = one point) and/or ``max_output_error`` (``sum_x ||N0(x) - N(x)||^2 <=
Delta * sum_x ||N0(x)||^2`` on the logits). **Two splits** (``val_split="split"``, the default):
the validation split is divided, stratified, into a *stop* half and an *accept* half. The
recovery's early stop (and the "does this cut need recovery" check) look only at the stop half;
every accept/reject decision looks only at the accept half, so a decision is not made on the
images that tuned the model for it (``val_split="shared"``: both on the whole split, the
behaviour before issue 11, which overfitted the budget). ``confidence_z`` (default 1) tightens the
accuracy check to a one-sided paired bound: ``drop + z * se <= max_drop`` with ``se`` the
standard error of the paired (dense vs pruned, same images) accuracy difference. With
``track_test`` every decision also records the *test* accuracy and drop (never used to decide).

A violation rolls back to the last model within budget (exact weights: an in-memory copy); in
stage 2 it rejects that block. In stage 1 the violating step is then **retried** from the
rolled-back model with the fraction times ``retry_factor``, up to ``max_retries`` times in a row
(default 2: ``p_t``, ``p_t/2``, ``p_t/4``); a retry reuses the scores of the rolled-back model
(they are the same model). Every try is recorded in the history (``retry`` = 0, 1, 2, ...). A
target reduction (``target_macs``, ``target_params``: factors, 3.0 = 3x fewer) ends the run as
soon as it is reached. Every stop records its reason; a budget that no step meets returns the
input model unchanged and says so.

Choices the paper leaves open, as options with defaults (:class:`IdapConfig`): distillation taps
(the outputs of up to ``num_taps`` unit root layers spread over depth, compared on the channels
that survive the cut; stage 2: the outputs of the containers of the blocks), the recovery budget
(``recover_epochs``, ``recover_batches``), retries, a schedule that ends after ``T`` steps
(``max_steps``), the final fine-tune (``final_epochs``, kept only if it stays within budget and
does not lower validation accuracy).

Checkpoints: with ``checkpoint_dir`` the current model (``flowprune.io`` format) and the run state
are written atomically after every decision (:class:`flowprune.runstate.RunState`); calling
:func:`idap` again with the same settings resumes there.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from flowprune.config import ProcedureConfig, ProcedureResult
from flowprune.data import DataSplits, make_loader
from flowprune.errors import FlowpruneError, check_positive_int
from flowprune.measure import count_macs_params, eval_mode, predict
from flowprune.pruning.layers import RemovableBlock, find_removable_blocks, rank_blocks, remove_block
from flowprune.train import TrainConfig, fit, reestimate_bn

log = logging.getLogger(__name__)

STATE_FILE = "idap_state.json"
VAL_SPLITS = ("split", "shared")


# ---------------------------------------------------------------------------------------- schedule
def schedule_fraction(t: int, p0: float = 0.05, T: int = 10, alpha: float = 1.5) -> float:
    """``p_t = p0 * (1 + t/T)^alpha``: the fraction of the *remaining* units cut at step ``t`` (0-based)."""
    if t < 0:
        raise FlowpruneError(f"step t must be >= 0, got {t}")
    return float(p0 * (1.0 + t / T) ** alpha)


# ------------------------------------------------------------------------------------------ budget
CONFIDENCE_Z = 1.0  # the one default of Budget.confidence_z and IdapConfig.confidence_z


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
        confidence_z: accept an accuracy drop only when ``drop + confidence_z * se <= max_drop``
            (``se``: standard error of the paired accuracy difference); 0 = the point estimate.
            Default :data:`CONFIDENCE_Z` (1), as :class:`IdapConfig`.
    """

    max_drop: float | None = 0.01
    max_output_error: float | None = None
    target_macs: float | None = None
    target_params: float | None = None
    confidence_z: float = CONFIDENCE_Z

    def validate(self) -> Budget:
        if self.max_drop is None and self.max_output_error is None:
            raise FlowpruneError("a budget needs max_drop or max_output_error (or both); both were None")
        for name in ("max_drop", "max_output_error", "confidence_z"):
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


def split_validation(val: TensorDataset, seed: int) -> tuple[TensorDataset, TensorDataset]:
    """Two disjoint halves of ``val`` (the *stop* and the *accept* split), stratified by label, from ``seed``."""
    x, y = val.tensors[0], val.tensors[1]
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(int(seed) + 7919))
    order = perm[torch.sort(y[perm], stable=True).indices]  # shuffled within every class
    a, b = order[0::2], order[1::2]
    return TensorDataset(x[a], y[a]), TensorDataset(x[b], y[b])


def paired_drop_se(ref_correct: torch.Tensor, correct: torch.Tensor) -> float:
    """Standard error of ``mean(ref_correct) - mean(correct)`` on the same samples (paired)."""
    n = len(correct)
    d = ref_correct.float() - correct.float()
    if n < 2:
        return 0.0
    return float(d.std(unbiased=True) / math.sqrt(n))


class BudgetMeter:
    """Measures a model against the dense reference on one split.

    ``measure(model)`` -> ``{"accuracy", "drop", "drop_bound", "output_error", "macs", "params",
    "within", "violations": [...]}``. The dense logits are computed once.
    """

    def __init__(self, dense: nn.Module, batches: list, budget: Budget, input_shape: Sequence[int]):
        self.budget = budget
        self.val = batches
        self.input_shape = tuple(input_shape)
        self.ref_logits, self.labels = predict(dense, batches)
        self.ref_correct = self.ref_logits.argmax(1) == self.labels
        self.ref_accuracy = float(self.ref_correct.float().mean())
        self.ref_sq = float(self.ref_logits.pow(2).sum())
        self.dense_macs, self.dense_params = count_macs_params(dense, self.input_shape)

    def quality(self, model: nn.Module) -> dict:
        logits, _ = predict(model, self.val)
        correct = logits.argmax(1) == self.labels
        acc = float(correct.float().mean())
        err = float((logits - self.ref_logits).pow(2).sum()) / max(self.ref_sq, 1e-12)
        bound = self.ref_accuracy - acc + self.budget.confidence_z * paired_drop_se(self.ref_correct, correct)
        violations = []
        if self.budget.max_drop is not None and bound > self.budget.max_drop + 1e-9:
            violations.append("max_drop")
        if self.budget.max_output_error is not None and err > self.budget.max_output_error:
            violations.append("max_output_error")
        return {"accuracy": acc, "drop": self.ref_accuracy - acc, "drop_bound": bound, "output_error": err,
                "within": not violations, "violations": violations}

    def measure(self, model: nn.Module) -> dict:
        q = self.quality(model)
        q.update(_sizes(self, model))
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


# ------------------------------------------------------------------------------------------- config
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


def _check_int(name: str, v, lo: int = 0) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise FlowpruneError(f"{name} must be an integer >= {lo}, got {v!r}")


@dataclass
class IdapConfig(ProcedureConfig):
    """The settings of :func:`idap` (every field is also a keyword override of ``idap``).

    Attributes:
        stages: ``(1,)`` filters only, ``(2,)`` layers only, ``(1, 2)`` (default) or ``(2, 1)``.
        max_drop, max_output_error, target_macs, target_params, confidence_z: the :class:`Budget`.
        val_split: ``split`` (default): recovery early stop on one half of the validation split,
            accept/reject on the other; ``shared``: both on the whole split (overfits the budget).
        track_test: record the test accuracy next to every decision (never used to decide).
        p0, T, alpha: the schedule ``p_t = p0 (1 + t/T)^alpha``; max_steps: most stage-1 steps (default T).
        kinds: unit kinds pruned in stage 1; score: registry name of the stage-1 score.
        normalize, min_width, round_to: passed to :func:`flowprune.plan.plan_cuts` (global budget).
        recover_epochs: most recovery epochs after each stage-1 step (stopped early once within budget).
        recover_batches: cap on batches per recovery epoch (None = the whole train split).
        stage2_recover_batches: batches of the one recovery epoch after a block removal that broke
            the budget (None: ``recover_batches``; 0 = no recovery).
        final_epochs: a final fine-tune kept only when within budget and not worse on validation.
        calib_batches, calib_batch_size: training batches for scores, BN re-estimation, the ranking.
        num_taps: distillation taps in stage 1; lr: AdamW learning rate of every recovery.
        seed: seeds the calibration batches, the validation halves and every recovery.
        max_retries, retry_factor: after a stage-1 violation retry with the fraction times
            ``retry_factor``, at most ``max_retries`` times in a row (0 = stop, as in the paper).
    """

    stages: tuple[int, ...] = (1, 2)
    max_drop: float | None = 0.01
    max_output_error: float | None = None
    target_macs: float | None = None
    target_params: float | None = None
    confidence_z: float = CONFIDENCE_Z
    val_split: str = "split"
    track_test: bool = True
    p0: float = 0.05
    T: int = 10
    alpha: float = 1.5
    max_steps: int | None = None
    kinds: tuple[str, ...] = ("channel", "neuron", "head")
    score: str = "divergence"
    normalize: str = "none"
    min_width: int = 1
    round_to: int = 1
    recover_epochs: int = 2
    recover_batches: int | None = None
    stage2_recover_batches: int | None = None
    final_epochs: int = 0
    calib_batches: int = 4
    calib_batch_size: int = 64
    num_taps: int = 3
    lr: float = 1e-3
    seed: int = 0
    max_retries: int = 2
    retry_factor: float = 0.5

    def budget(self) -> Budget:
        return Budget(self.max_drop, self.max_output_error, self.target_macs, self.target_params,
                      self.confidence_z)

    @property
    def steps(self) -> int:
        return self.T if self.max_steps is None else self.max_steps

    @property
    def s2_batches(self) -> int | None:
        return self.recover_batches if self.stage2_recover_batches is None else self.stage2_recover_batches

    def validate(self) -> IdapConfig:
        self.stages = _check_stages(self.stages)
        self.kinds = (self.kinds,) if isinstance(self.kinds, str) else tuple(self.kinds)
        self.budget().validate()
        if self.val_split not in VAL_SPLITS:
            raise FlowpruneError(f"val_split must be one of {', '.join(VAL_SPLITS)}, got {self.val_split!r}")
        if not (isinstance(self.p0, (int, float)) and not isinstance(self.p0, bool) and 0 < self.p0 < 1):
            raise FlowpruneError(f"p0 must lie in (0, 1), got {self.p0!r}")
        if isinstance(self.alpha, bool) or not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha)):
            raise FlowpruneError(f"alpha must be a finite number, got {self.alpha!r}")
        for name in ("T", "recover_epochs", "calib_batches", "calib_batch_size"):
            check_positive_int(name, getattr(self, name))
        check_positive_int("max_steps", self.steps)
        if self.recover_batches is not None:
            check_positive_int("recover_batches", self.recover_batches)
        for name in ("max_retries", "final_epochs", "num_taps", "seed"):
            _check_int(name, getattr(self, name))
        _check_int("min_width", self.min_width, 1)
        _check_int("round_to", self.round_to, 1)
        if self.s2_batches is not None:
            _check_int("stage2_recover_batches", self.s2_batches)
        if isinstance(self.retry_factor, bool) or not isinstance(self.retry_factor, (int, float)) \
                or not 0 < self.retry_factor < 1:
            raise FlowpruneError(f"retry_factor must lie in (0, 1) (0.5 = half the fraction), got {self.retry_factor!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not (math.isfinite(self.lr) and self.lr > 0):
            raise FlowpruneError(f"lr must be a positive number, got {self.lr!r}")
        if not isinstance(self.track_test, bool):
            raise FlowpruneError(f"track_test must be True or False, got {self.track_test!r}")
        return self


# ------------------------------------------------------------------------------------------- result
@dataclass
class IdapResult(ProcedureResult):
    """What :func:`idap` returns: the pruned model and everything that happened.

    ``dense``/``final``: validation (accept split) and test statistics of the reference and the
    result; ``steps``: one entry per decision (validation and, with ``track_test``, test accuracy);
    ``seconds``: wall time of the run (summed over resumes).
    """

    model: nn.Module
    dense: dict
    final: dict
    steps: list[dict] = field(default_factory=list)
    removed_blocks: list[str] = field(default_factory=list)
    essential_blocks: list[str] = field(default_factory=list)
    stage_reasons: dict[str, str] = field(default_factory=dict)
    stop_reason: str = ""
    stages: tuple[int, ...] = (1, 2)
    seconds: float = 0.0
    config: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------- the method
def idap(model: nn.Module, data: DataSplits, config: IdapConfig | dict | None = None, *,
         checkpoint_dir: str | os.PathLike | None = None, reference: nn.Module | None = None,
         progress: bool | None = False, device: str | torch.device | None = None, **overrides) -> IdapResult:
    """Prune ``model`` with IDAP++ within a budget; the caller's model is never changed.

    Args:
        model: a trained model (built by :func:`flowprune.build_model` when ``checkpoint_dir`` is given).
        data: the data splits; recovery trains on ``train``, the budget is measured on ``val``
            (two halves, see :class:`IdapConfig` ``val_split``), ``test`` is only reported.
        config: an :class:`IdapConfig`, a dict of its fields, or None (defaults); ``overrides``
            (``max_drop=0.01, stages=(1,)``, ...) replace its fields.
        checkpoint_dir: write the model and the run state after every decision; resume from there.
        reference: the model the budget and the reductions are measured against (default: ``model``).
            Pass the dense model to continue pruning an already pruned ``model`` within the original budget.
        progress: a progress bar with the current MACs reduction and accuracies (None: when stderr is a terminal).
        device: where the work runs (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``; default: the model's).

    Returns:
        :class:`IdapResult`.

    Raises:
        FlowpruneError: an unknown or bad option, a validation split too small to measure the
            budget, stage 2 alone on a model with no removable block -- all before any work.
    """
    cfg = IdapConfig.resolve(config, overrides)
    budget = cfg.budget()
    if not isinstance(data, DataSplits):
        raise FlowpruneError("idap needs a DataSplits (train for recovery, val for the budget), e.g. load_dataset('mnist5k')")
    need = min_val_samples(budget) * (2 if cfg.val_split == "split" else 1)
    if len(data.val) < need:
        raise FlowpruneError(f"the validation split has {len(data.val)} samples; measuring the budget "
                             f"(max_drop={budget.max_drop}, val_split={cfg.val_split!r}) needs at least {need}. "
                             "Raise --val-fraction, loosen the budget or use val_split='shared'")
    shape = tuple(data.input_shape)
    base = getattr(model, "flowprune_base", None)
    if base is not None and tuple(base.get("input_shape", shape)) != shape:
        raise FlowpruneError(f"the model takes inputs {tuple(base['input_shape'])} but data {data.name!r} has {shape}")
    if checkpoint_dir is not None and base is None:
        raise FlowpruneError("checkpoint_dir needs a model built by flowprune.build_model (it has no flowprune_base)")
    if 1 in cfg.stages:
        from flowprune.scores import get_score

        get_score(cfg.score)  # unknown name -> error before work
    from flowprune.device import resolve_device

    dev = resolve_device(device, model)
    calib = data.calibration_batches(cfg.calib_batch_size, cfg.calib_batches, seed=cfg.seed, split="train")
    dense = copy.deepcopy(model).to(dev).eval()
    ref = dense if reference is None else copy.deepcopy(reference).to(dev).eval()
    no_blocks = None
    if 2 in cfg.stages and not find_removable_blocks(dense, calib[:1]):
        no_blocks = (f"skipped: the model ({type(model).__name__}) has no removable block (no residual block with an "
                     "identity shortcut, no transformer block, no shape-preserving layer)")
        if 1 not in cfg.stages:
            raise FlowpruneError(f"stage 2 asked for alone, but {no_blocks[9:]}; run stage 1 (stages=(1,), --stages 1)")
        log.warning("idap stage 2 %s; stage 1 runs alone", no_blocks)
    ctx = _Run.build(ref, data, calib, cfg, progress)
    return ctx.execute(dense, base, checkpoint_dir, no_blocks)


def _meters(ref: nn.Module, data: DataSplits, cfg: IdapConfig) -> tuple[BudgetMeter, BudgetMeter, BudgetMeter | None]:
    """(stop meter, accept meter, test meter or None) against ``ref``."""
    budget, shape = cfg.budget(), tuple(data.input_shape)
    if cfg.val_split == "split":
        stop_ds, accept_ds = split_validation(data.val, cfg.seed)
    else:
        stop_ds = accept_ds = data.val
    accept = BudgetMeter(ref, list(make_loader(accept_ds, 256)), budget, shape)
    stop = accept if stop_ds is accept_ds else BudgetMeter(ref, list(make_loader(stop_ds, 256)), budget, shape)
    test = None
    if cfg.track_test and len(data.test):
        test = BudgetMeter(ref, list(make_loader(data.test, 256)), budget, shape)
    return stop, accept, test


class _Bar:
    """A progress bar (tqdm, stderr) over the decisions, with the MACs reduction and accuracies; log lines always."""

    def __init__(self, show: bool | None):
        import sys

        self.bar = None
        if show is None:
            show = sys.stderr.isatty()
        if show:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(desc="idap", unit="decision", file=sys.stderr, dynamic_ncols=True)
            except ImportError:  # pragma: no cover
                self.bar = None

    def update(self, step: dict) -> None:
        acc, test = step.get("accuracy"), step.get("test_accuracy")
        label = f"stage {step['stage']} {'block ' + step['block'] if 'block' in step else 'step ' + str(step.get('step'))}"
        info = {"MACs": f"{step.get('macs_reduction', float('nan')):.2f}x",
                "val": "-" if acc is None else f"{100 * acc:.1f}%",
                "test": "-" if test is None else f"{100 * test:.1f}%",
                "ok": "yes" if step.get("accepted") else "no"}
        log.info("idap %s: %s", label, ", ".join(f"{k} {v}" for k, v in info.items()))
        if self.bar is not None:
            self.bar.set_description(f"idap {label}")
            self.bar.set_postfix(info, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class _Run:
    meter: BudgetMeter  # the accept split: every accept/reject decision
    stop_meter: BudgetMeter  # the stop split: recovery early stop and "needs recovery?"
    test_meter: BudgetMeter | None  # reported only
    data: DataSplits
    calib: list
    cfg: IdapConfig
    rec_cfg: TrainConfig
    bar: _Bar
    last_model: nn.Module | None = None
    _scores: tuple | None = None  # (model, units, scores) of the last scored model: reused by a retry
    _kept_test: tuple | None = None  # (model, test stats) of the model stage 2 keeps

    @classmethod
    def build(cls, ref: nn.Module, data: DataSplits, calib: list, cfg: IdapConfig, progress) -> _Run:
        stop, accept, test = _meters(ref, data, cfg)
        rec_cfg = TrainConfig(epochs=cfg.recover_epochs, lr=cfg.lr, optimizer="adamw", weight_decay=0.0,
                              batch_size=cfg.calib_batch_size, augment=False, schedule="constant", seed=cfg.seed)
        return cls(meter=accept, stop_meter=stop, test_meter=test, data=data, calib=calib, cfg=cfg,
                   rec_cfg=rec_cfg, bar=_Bar(progress))

    def test_stats(self, model: nn.Module) -> dict:
        if self.test_meter is None:
            return {}
        q = self.test_meter.quality(model)
        return {"test_accuracy": q["accuracy"], "test_drop": q["drop"]}

    def kept_test_stats(self, model: nn.Module) -> dict:
        """:meth:`test_stats` of the model a rejected stage-2 step keeps (its ``accuracy`` is that
        model's too), measured once per kept model."""
        if self._kept_test is None or self._kept_test[0] is not model:
            self._kept_test = (model, self.test_stats(model))
        return self._kept_test[1]

    # -- the run -------------------------------------------------------------------------------
    def execute(self, dense: nn.Module, base: dict | None, checkpoint_dir, no_blocks: str | None) -> IdapResult:
        from flowprune.runstate import RunState

        cfg, t0 = self.cfg, time.perf_counter()
        current = dense
        state = {"stage_pos": 0, "t": 0, "retry": 0, "steps": [], "removed": [], "essential": [], "ranking": None,
                 "tried": 0, "stage_reasons": {}, "stop_reason": "", "done": False, "final_done": False, "seconds": 0.0}
        rs = None if checkpoint_dir is None else RunState(checkpoint_dir, "idap", cfg.to_dict(), state_file=STATE_FILE)
        loaded = rs.load() if rs is not None else None
        if loaded is not None:
            state, current = loaded, rs.load_model()
            log.info("idap: resuming from %s (stage position %d, %d steps done)", rs.dir, state["stage_pos"],
                     len(state["steps"]))
        elif not self.meter.quality(current)["within"]:
            state.update(done=True, final_done=True, stop_reason="the input model already breaks the budget against the reference "
                                                "on the validation split; nothing was pruned")
        seconds0 = float(state.get("seconds", 0.0))

        def save() -> None:
            if rs is not None:
                state["seconds"] = seconds0 + time.perf_counter() - t0
                rs.save(state, self.last_model if self.last_model is not None else current)

        self.last_model = current
        try:
            current = self._stages(current, state, save, no_blocks)
        finally:
            self.bar.close()
        state["seconds"] = seconds0 + time.perf_counter() - t0
        return self._result(current, state, base)

    def _stages(self, current: nn.Module, state: dict, save, no_blocks: str | None) -> nn.Module:
        st = self.cfg.stages
        while not state["done"] and state["stage_pos"] < len(st):
            stage = st[state["stage_pos"]]
            if stage == 2 and no_blocks is not None:
                current, reason = current, no_blocks
            elif stage == 1:
                current, reason = self.stage1(current, state, save)
            else:
                current, reason = self.stage2(current, state, save)
            state["stage_reasons"][str(stage)] = reason
            state["stop_reason"] = reason
            if reason.startswith("target_"):
                state["done"] = True
            state["stage_pos"] += 1
            current = self.last_model
            save()
        if self.cfg.final_epochs > 0 and not state["final_done"]:
            current = self.final_finetune(current, state)
            state["final_done"] = True
            save()
        return current

    def _result(self, current: nn.Module, state: dict, base: dict | None) -> IdapResult:
        final = self.meter.measure(current)
        final.update(self.test_stats(current))
        m = self.meter
        dense = {"accuracy": m.ref_accuracy, "drop": 0.0, "output_error": 0.0, "macs": m.dense_macs,
                 "params": m.dense_params, "macs_reduction": 1.0, "params_reduction": 1.0,
                 "test_accuracy": None if self.test_meter is None else self.test_meter.ref_accuracy}
        final.setdefault("test_accuracy", None)
        stop = state["stop_reason"]
        if len(self.cfg.stages) > 1 and state["stage_reasons"]:
            stop = "; ".join(f"stage {k}: {v}" for k, v in state["stage_reasons"].items())
        if not any(s.get("accepted") and s.get("stage") in (1, 2) for s in state["steps"]):
            stop = f"no step met the budget; the returned model is the input model, unchanged ({stop})"
        current.flowprune_metadata = {"method": "idap", "stages": list(self.cfg.stages), "removed_blocks": state["removed"],
                                      "essential_blocks": state["essential"], "stop_reason": stop}
        if base is not None:
            current.flowprune_base = base
        return IdapResult(model=current, dense=dense, final=_public(final) | {"within": final["within"], "test_accuracy": final["test_accuracy"],
                                                               "test_drop": final.get("test_drop")},
                          steps=state["steps"], removed_blocks=list(state["removed"]),
                          essential_blocks=list(state["essential"]), stage_reasons=dict(state["stage_reasons"]),
                          stop_reason=stop, stages=self.cfg.stages, seconds=float(state["seconds"]),
                          config=self.cfg.to_dict())

    # -- recovery ------------------------------------------------------------------------------
    def recover(self, student: nn.Module, teacher: nn.Module, taps: list, *, epochs: int,
                batches: int | None, seed: int) -> dict:
        """CE + 0.5 L1 distillation, in place, stopped at the first epoch end within budget on the stop split.

        BatchNorm statistics are re-estimated on the calibration batches at every epoch end (and so
        at the end): after a few large steps on a freshly cut model the running averages lag far
        behind the weights (measured: 91% train-mode vs 10% eval-mode accuracy on a cut ResNet-20),
        and the budget check must see the model as it will be used. ``fit``'s own per-epoch
        accuracy is taken on one calibration batch only (the budget check replaces it).
        """
        distill = FeatureDistiller(teacher, student, taps)
        meter, calib = self.stop_meter, self.calib

        def on_epoch_end(_epoch: int, m: nn.Module, _history: dict) -> bool:
            reestimate_bn(m, calib)
            return bool(meter.quality(m)["within"])

        try:
            hist = fit(student, self.data, self.rec_cfg, epochs=epochs, seed=seed, extra_loss=distill,
                       on_epoch_end=on_epoch_end, max_batches_per_epoch=batches, val_data=calib[:1], progress=False)
        finally:
            distill.close()
        return {"epochs": len(hist["epochs"]), "stopped_early": hist["stopped_early"]}

    # -- stage 1 -------------------------------------------------------------------------------
    def scores(self, model: nn.Module) -> tuple[list, dict]:
        """Units and scores of ``model``; a retry after a rollback scores the same model: reuse them."""
        from flowprune.scores import get_score
        from flowprune.units import find_units

        if self._scores is not None and self._scores[0] is model:
            return self._scores[1], self._scores[2]
        units = find_units(model, self.calib[0][0][:1], kinds=self.cfg.kinds)
        scores = get_score(self.cfg.score)(model, units, self.calib) if units else {}
        self._scores = (model, units, scores)
        return units, scores

    def stage1_try(self, model: nn.Module, t: int, retry: int, frac: float):
        """One cut of ``frac`` + recovery; returns ``(candidate, history entry, stats)``, or a stop reason."""
        from flowprune.step import plan_and_cut

        cfg, example = self.cfg, self.calib[0][0][:1]
        units, scores = self.scores(model)
        if not units:
            return "no prunable unit left"
        # the one cut step (flowprune.step); no mean compensation: IDAP++ recovers by distillation
        step = plan_and_cut(model, units, scores, self.calib, example=example, compensate=False, ratio=frac,
                            budget="global", min_width=cfg.min_width, round_to=cfg.round_to,
                            normalize=cfg.normalize)
        cuts = {k: v for k, v in step.plan.items() if len(v) > 0}
        if not cuts:
            return ("nothing left to prune (every unit at min_width)" if retry == 0 else
                    f"budget violated at step {t}; retry {retry} (fraction {frac:.4f}) cuts nothing; "
                    "rolled back to the previous model")
        cand = step.model
        reestimate_bn(cand, self.calib)
        rec = {"epochs": 0}
        if not self.stop_meter.quality(cand)["within"]:  # early stop at epoch 0: no recovery needed
            rec = self.recover(cand, model, _unit_taps(units, cuts, cfg.num_taps), epochs=cfg.recover_epochs,
                               batches=cfg.recover_batches, seed=cfg.seed * 1000 + t + 100_000 * retry)
        stats = self.meter.measure(cand)
        step = {"stage": 1, "step": t, "retry": retry, "fraction": frac,
                "units_cut": int(sum(len(v) for v in cuts.values())), "recovery_epochs": rec["epochs"],
                **_public(stats), **self.test_stats(cand)}
        return cand, step, stats

    def stage1(self, model: nn.Module, state: dict, save) -> tuple[nn.Module, str]:
        cfg = self.cfg
        self.last_model = model
        reason = f"schedule finished ({cfg.steps} steps)"
        while state["t"] < cfg.steps:
            t, retry = state["t"], int(state.get("retry", 0))
            frac = min(schedule_fraction(t, cfg.p0, cfg.T, cfg.alpha), 0.9) * cfg.retry_factor ** retry
            tried = self.stage1_try(model, t, retry, frac)
            if isinstance(tried, str):
                reason = tried
                break
            cand, step, stats = tried
            step["accepted"] = bool(stats["within"])
            state["steps"].append(step)
            self.bar.update(step)
            if not stats["within"]:
                why = (f"{', '.join(stats['violations'])}: drop {100 * stats['drop']:.2f} pts "
                       f"(bound {100 * stats['drop_bound']:.2f}), output error {stats['output_error']:.4f}")
                if retry < cfg.max_retries:  # roll back (``model`` is untouched) and retry with a smaller cut
                    state["retry"] = retry + 1
                    log.info("idap stage 1: step %d (fraction %.4f) violated the budget (%s); rolled back, "
                             "retry %d", t, frac, why, retry + 1)
                    save()
                    continue
                state["t"], state["retry"] = t + 1, 0
                tries = f" after {retry} retr{'y' if retry == 1 else 'ies'}" if retry else ""
                reason = f"budget violated at step {t}{tries} ({why}); rolled back to the previous model"
                break
            state["t"], state["retry"] = t + 1, 0
            model = self.last_model = cand
            save()
            hit = self.meter.target_reached(stats)
            if hit:
                reason = hit
                break
        self.last_model = model
        return model, reason

    # -- stage 2 -------------------------------------------------------------------------------
    def stage2(self, model: nn.Module, state: dict, save) -> tuple[nn.Module, str]:
        self.last_model = model
        if state.get("ranking") is None:
            state["ranking"] = [b.to_dict() for b in rank_blocks(find_removable_blocks(model, self.calib))]
            state["tried"] = 0
        ranking = [RemovableBlock(name=d["name"], kind=d["kind"], cls=d["cls"], shape=tuple(d["shape"]),
                                  divergence=d["divergence"], input_nonnegative=d["input_nonnegative"],
                                  companions=tuple(d["companions"])) for d in state["ranking"]]
        if not ranking:
            return model, "no removable block left"
        current = self.meter.measure(model)
        hit = self.meter.target_reached(current)
        if hit:
            return model, hit
        reason = f"all {len(ranking)} removable blocks tried"
        while state["tried"] < len(ranking):
            i = state["tried"]
            model, current, accepted = self.stage2_try(model, current, ranking[i], i, state)
            state["tried"] = i + 1
            self.last_model = model
            save()
            hit = self.meter.target_reached(current) if accepted else None
            if hit:
                reason = hit
                break
        self.last_model = model
        return model, reason

    def stage2_try(self, model: nn.Module, current: dict, b: RemovableBlock, i: int, state: dict):
        """Remove block ``b`` (recover if the stop split says so); keep it only within budget on the accept split."""
        cfg = self.cfg
        cand = remove_block(model, b)
        reestimate_bn(cand, self.calib)
        recovered = 0
        if not self.stop_meter.quality(cand)["within"] and cfg.s2_batches != 0:
            rec = self.recover(cand, model, _container_taps(model, b), epochs=1, batches=cfg.s2_batches,
                               seed=cfg.seed * 1000 + 500 + i)
            recovered = rec["epochs"]
        stats = self.meter.quality(cand)
        step = {"stage": 2, "step": i, "block": b.name, "kind": b.kind, "divergence": b.divergence,
                "recovered": bool(recovered)}
        if stats["within"]:
            current = stats | _sizes(self.meter, cand)  # = self.meter.measure(cand), without a second pass
            self._kept_test = (cand, self.test_stats(cand))
            step.update(accepted=True, **_public(current), **self._kept_test[1])
            model = cand
            state["removed"].append(b.name)
        else:
            test = self.test_stats(cand)
            step.update({**_public(current), **self.kept_test_stats(model), "accepted": False,
                         "rejected_accuracy": stats["accuracy"],
                         "rejected_drop_bound": stats["drop_bound"], "rejected_output_error": stats["output_error"],
                         "violations": stats["violations"]},
                        **{"rejected_" + k: v for k, v in test.items()})
            state["essential"].append(b.name)
        state["steps"].append(step)
        self.bar.update(step)
        return model, current, bool(stats["within"])

    # -- final fine-tune -------------------------------------------------------------------------
    def final_finetune(self, model: nn.Module, state: dict) -> nn.Module:
        before = self.meter.quality(model)
        cand = copy.deepcopy(model)
        fit(cand, self.data, self.rec_cfg, epochs=self.cfg.final_epochs, seed=self.cfg.seed * 1000 + 999,
            schedule="cosine", max_batches_per_epoch=self.cfg.recover_batches, val_data=self.calib[:1], progress=False)
        reestimate_bn(cand, self.calib)
        after = self.meter.quality(cand)
        keep = after["within"] and after["accuracy"] >= before["accuracy"]
        state["steps"].append({"stage": "final", "accepted": keep, "accuracy_before": before["accuracy"],
                               "accuracy_after": after["accuracy"], **self.test_stats(cand)})
        self.last_model = cand if keep else model
        return self.last_model


def _sizes(meter: BudgetMeter, model: nn.Module) -> dict:
    macs, params = count_macs_params(model, meter.input_shape)
    return {"macs": macs, "params": params, "macs_reduction": meter.dense_macs / max(macs, 1),
            "params_reduction": meter.dense_params / max(params, 1)}


def _public(stats: dict) -> dict:
    keys = ("accuracy", "drop", "drop_bound", "output_error", "macs", "params", "macs_reduction", "params_reduction",
            "violations")
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
