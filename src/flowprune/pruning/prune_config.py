"""What :func:`flowprune.pruning.structural.prune` computes (:class:`PruneConfig`) and returns
(:class:`PruneResult`), and the defaults they carry; split from ``structural.py`` (the procedure)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from torch import nn

from flowprune.config import ProcedureConfig, ProcedureResult
from flowprune.errors import FlowpruneError, bad_choice, check_fraction, check_positive_int

# flowprune's default structural pruning, chosen by measurement (docs/results/study_structural.md):
# the ``agf`` score (centred, see flowprune.scores.agf), one global ranking of unit-normalised
# scores, and mean compensation of the removed channels before the cut.
DEFAULT_BUDGET = "global"
DEFAULT_NORMALIZE = "unit"
DEFAULT_COMPENSATE = True


@dataclass
class PruneConfig(ProcedureConfig):
    """Everything that decides what :func:`prune` computes (see :func:`prune` for each field)."""

    method: str = "agf"
    target_macs: float | str | None = None
    ratio: float | None = None
    steps: int | str = 1
    schedule: str = "geometric"
    budget: str | None = None
    calib_batches: int = 10
    calib_batch_size: int = 128
    finetune_epochs: int = 0
    final_finetune_epochs: int = 0
    finetune_config: object = None
    min_width: int = 1
    round_to: int = 1
    seed: int = 0
    score_options: dict | None = None
    normalize: str = DEFAULT_NORMALIZE
    reestimate_bn: bool = True
    measure: bool = True
    kinds: Sequence[str] = ("channel", "neuron", "head", "recurrent")
    compensate: bool = DEFAULT_COMPENSATE
    target_speedup: float | str | None = None
    batch_size: int = 1
    backend: str = "eager"
    # recovery (flowprune.recover): the recipe, its options, and a total epoch budget the steps share
    recovery: str | None = None
    recovery_options: dict | None = None
    recovery_epochs: int | None = None

    def validate(self) -> PruneConfig:
        """Check every field (raises FlowpruneError); parses ``target_macs`` and resolves ``steps``/``budget``."""
        from flowprune.plan import check_budget_args, parse_target
        from flowprune.schedules import SCHEDULES
        from flowprune.scores import get_score, list_scores

        if self.method not in list_scores():
            raise bad_choice("method", self.method, list_scores())
        get_score(self.method, **(self.score_options or {}))  # unknown or bad options: one clear error now
        given = [n for n in ("target_macs", "ratio", "target_speedup") if getattr(self, n) is not None]
        if not given:
            raise FlowpruneError("give target_macs (e.g. 4.0 or '4x'), target_speedup (e.g. 3.0 or '3x') or ratio "
                                 "(a fraction in [0, 1))")
        if len(given) > 1:
            raise FlowpruneError(f"give one of target_macs, target_speedup or ratio, not {' and '.join(given)}")
        if self.target_speedup is not None:
            from flowprune.latency import check_latency_args, parse_speedup

            self.target_speedup = parse_speedup(self.target_speedup)
            check_latency_args(self.batch_size, self.backend)
        if self.ratio is not None:
            self.ratio = check_fraction("ratio", self.ratio)
        if self.target_macs is not None:
            self.target_macs = parse_target(self.target_macs)
        self.budget = self.budget or DEFAULT_BUDGET
        if self.target_speedup is None:
            check_budget_args(self.ratio, None, self.target_macs, self.budget, self.min_width, self.round_to,
                              self.normalize)
        else:  # the latency planner's own knobs; widths round to the device's multiple (or round_to > 1)
            check_positive_int("min_width", self.min_width)
            check_positive_int("round_to", self.round_to)
        self.steps = resolve_steps(self.steps, self.target_macs or self.target_speedup)
        if self.schedule not in SCHEDULES:
            raise bad_choice("schedule", self.schedule, SCHEDULES)
        check_positive_int("calib_batches", self.calib_batches)
        check_positive_int("calib_batch_size", self.calib_batch_size)
        for nm in ("finetune_epochs", "final_finetune_epochs"):
            v = getattr(self, nm)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise FlowpruneError(f"{nm} must be an integer >= 0, got {v!r}")
        self._check_recovery()
        return self

    def _check_recovery(self) -> None:
        """Resolve the recovery recipe and the per-step epochs (FlowpruneError before any work)."""
        from flowprune.recover import DEFAULT_RECOVERY, make_recipe, split_epochs

        self.recovery = self.recovery or DEFAULT_RECOVERY
        self.recipe()
        if self.recovery_epochs is not None:
            if self.finetune_epochs or self.final_finetune_epochs:
                raise FlowpruneError("give either recovery_epochs (one budget the steps share) or "
                                     "finetune_epochs/final_finetune_epochs, not both")
            split_epochs(self.recovery_epochs, self.steps)
        make_recipe(self.recovery, self.recovery_options)

    def recipe(self):
        """The :class:`flowprune.recover.RecoveryRecipe`; plain fine-tuning keeps ``finetune_config``'s lr."""
        from flowprune.recover import make_recipe

        opts = dict(self.recovery_options or {})
        if self.recovery == "finetune" and self.finetune_config is not None:
            opts.setdefault("lr", self.finetune_config.lr)
        return make_recipe(self.recovery, opts)

    def step_epochs(self) -> list[int]:
        """Recovery epochs after each step: ``split_epochs(recovery_epochs, steps)``, or
        ``finetune_epochs`` after every step but the last and ``final_finetune_epochs`` after it."""
        from flowprune.recover import split_epochs

        if self.recovery_epochs is not None:
            return split_epochs(self.recovery_epochs, self.steps)
        return [self.finetune_epochs] * (self.steps - 1) + [self.final_finetune_epochs]

    def effective_finetune_config(self):
        """The fine-tuning recipe: ``finetune_config``, or SGD at lr 0.01 seeded by ``seed``."""
        from flowprune.train import TrainConfig

        return self.finetune_config or TrainConfig(lr=0.01, seed=self.seed)

    def record(self) -> dict:
        """The JSON record of this config (``PruneResult.config``; a resumed run must match it)."""
        ft = self.effective_finetune_config()
        return {"method": self.method, "target_macs": self.target_macs, "ratio": self.ratio, "steps": self.steps,
                "schedule": self.schedule, "budget": self.budget, "calib_batches": self.calib_batches,
                "calib_batch_size": self.calib_batch_size, "finetune_epochs": self.finetune_epochs,
                "final_finetune_epochs": self.final_finetune_epochs, "min_width": self.min_width,
                "round_to": self.round_to, "seed": self.seed, "normalize": self.normalize,
                "score_options": self.score_options or {}, "reestimate_bn": self.reestimate_bn,
                "compensate": self.compensate, "target_speedup": self.target_speedup,
                "batch_size": self.batch_size, "backend": self.backend, "recovery": self.recipe().to_dict(),
                "recovery_epochs": self.recovery_epochs,
                "finetune_config": asdict(ft) if hasattr(ft, "__dataclass_fields__") else None}


@dataclass
class PruneResult(ProcedureResult):
    """The pruned model and how it got there.

    ``history``: one dict per step: step, target (reduction or ratio of that step), macs,
    params, reduction (vs the dense model), widths, plan_note, acc_cut (right after the cut),
    acc_bn (after BatchNorm re-estimation), acc_ft (after fine-tune), seconds_* timings.
    ``warnings``: every warning of the run in full (:mod:`flowprune.notices`), each once.
    """

    model: nn.Module
    history: list[dict] = field(default_factory=list)
    widths: dict[str, int] = field(default_factory=dict)
    macs: int = 0
    params: int = 0
    dense_macs: int = 0
    dense_params: int = 0
    method: str = "agf"
    config: dict = field(default_factory=dict)
    unsupported: list[str] = field(default_factory=list)
    warnings: list[dict] = field(default_factory=list)
    latency: dict = field(default_factory=dict)  # with target_speedup: flowprune.plan_latency.speed_check

    @property
    def reduction(self) -> float:
        return self.dense_macs / max(self.macs, 1)

    def to_dict(self) -> dict:
        return {"method": self.method, "macs": self.macs, "params": self.params, "dense_macs": self.dense_macs,
                "dense_params": self.dense_params, "reduction": self.reduction, "widths": dict(self.widths),
                "history": self.history, "config": self.config, "unsupported_layers": list(self.unsupported),
                "warnings": [dict(w) for w in self.warnings], "latency": dict(self.latency)}


def resolve_steps(steps: int | str, target: float | None) -> int:
    """``steps`` as a count: an int >= 1, or ``"auto"`` = ceil(log2(target)) (1 without a MACs target)."""
    import math

    if steps == "auto":
        return max(1, math.ceil(math.log2(target) - 1e-9)) if target is not None else 1
    if isinstance(steps, str):
        raise FlowpruneError(f"steps must be a positive integer or 'auto', got {steps!r}")
    return check_positive_int("steps", steps)
