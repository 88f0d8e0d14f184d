"""Side-by-side comparison of pruning criteria, flowprune's own and Torch-Pruning's, on equal work.

:func:`compare` starts every method from the SAME dense model, prunes it one-shot to the same
MACs reduction, and reports for every ``method x target`` the mean and standard deviation over
seeds of three accuracies (test split):

* ``acc_raw`` -- right after the cut (BatchNorm running statistics are stale: usually near chance);
* ``acc_bn``  -- after re-estimating BatchNorm statistics on the calibration batches, with no
  weight update (:func:`flowprune.train.reestimate_bn`): the fair one-shot comparison;
* ``acc_ft``  -- after the same fine-tune budget for every method (``finetune_epochs``, same
  learning rate, same batch order per seed),

plus the achieved MACs reduction, MACs, parameters, and measured latency (batch 1) and
throughput (batch 256) with the speed-up over the dense model measured in the same process.

Methods: every registered pruning procedure (:mod:`flowprune.procedures`), through one
interface (``get_procedure(name).cut(dense, target, ctx)``):

* one per flowprune score (``agf``, ``agf-paper``, ``taylor``, ``l1``, ``l2``, ``bn_scale``,
  ``wanda``, ``ria``, ``random``, ``divergence``, and any score registered later): scored on the
  calibration batches, planned to the MACs target, mean-compensated and cut by the one cut step
  (:func:`flowprune.step.plan_and_cut`);
* ``tp-*``: Torch-Pruning's own importances through Torch-Pruning's own pruner
  (:mod:`flowprune.procedures.torch_pruning`), the anchors flowprune must beat. Torch-Pruning
  has no MACs target: the pruning ratio is searched until the achieved reduction is within
  ``tol`` (3 %) of the target. In ``tp_mode="auto"`` (default) the uniform per-layer ratio is
  tried first (Torch-Pruning's default) and, when its reachable points jump over the target,
  global ranking; ``-uniform`` / ``-global`` names fix the mode. A target that cannot be reached
  within ``tol`` is reported at the nearest reachable point with ``within_tol = False``;
* any procedure registered with ``@register_procedure`` (docs/extend/procedure.md).

Also: the train-from-scratch baseline at the pruned architecture of ``scratch_from`` (default
``agf``): same widths, weights re-initialised, trained with the dense budget; and the Jaccard
overlap between the channel sets AGF and L1 choose to remove (and to keep), with the value two
independent random choices of the same per-unit sizes would give (chance).

"Exceeds one std": a difference between two means is marked when ``|delta|`` is larger than the
larger of the two standard deviations (a conservative reading; with one seed nothing is marked).

Every finished ``method x target x seed`` run is written to ``out_dir/runs/`` at once; calling
again with the same ``out_dir`` and configuration skips the finished runs (resume).
"""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from flowprune.config import ProcedureConfig, ProcedureResult, ReadsAsDict
from flowprune.data import DataSplits, make_loader
from flowprune.errors import FlowpruneError, bad_choice, check_positive_int
from flowprune.measure import accuracy, count_macs_params, speed_compare
from flowprune.plan import parse_target
from flowprune.procedures import CutContext, get_procedure, list_procedures
from flowprune.procedures.torch_pruning import (  # noqa: F401 -- public names kept where they were
    TP_METHODS,
    TP_MODE_METHODS,
    TP_MODES,
    accumulate_gradients,
    split_tp_method,
    tp_importance,
    tp_prune_to_target,
)
from flowprune.procedures.torch_pruning import classifier as _classifier
from flowprune.report import format_table, write_results
from flowprune.train import TrainConfig, fit, reestimate_bn

FLOWPRUNE_METHODS = ("agf", "taylor", "l1", "l2", "bn_scale", "wanda", "ria", "random")
DEFAULT_METHODS = ("agf", "l1", "taylor", "wanda", "random", "tp-magnitude", "tp-taylor")
STAGES = ("acc_raw", "acc_bn", "acc_ft")
# the configuration entries that change a finished run (a resumed comparison must agree on these)
RUN_KEYS = ("finetune_epochs", "finetune_lr", "finetune_batches", "calib_batches", "calib_batch_size",
            "plan_options", "score_options", "tp_mode", "tol", "round_to", "data", "model", "compensate",
            "recovery", "recovery_options")
# what a comparison written before a key existed ran with (its compare_config.json lacks the key)
RUN_KEY_DEFAULTS = {"recovery": "finetune", "recovery_options": {}}


# ----------------------------------------------------------------------------------------------
# arguments
# ----------------------------------------------------------------------------------------------

def available_methods() -> list[str]:
    """Every method name :func:`compare` accepts: every registered procedure (:mod:`flowprune.procedures`).

    That is one method per registered score, Torch-Pruning's ``tp-*`` methods, and every
    procedure registered with ``@register_procedure``.
    """
    return list_procedures()


def parse_methods(methods: str | Sequence[str]) -> list[str]:
    """Method names from a list or a comma-separated string, checked against :func:`available_methods`."""
    items = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else [str(m).strip() for m in methods]
    items = [m for m in items if m]
    if not items:
        raise FlowpruneError("methods is empty; allowed: " + ", ".join(available_methods()))
    allowed = available_methods()
    for m in items:
        if m not in allowed:
            raise bad_choice("method", m, allowed)
    if len(set(items)) != len(items):
        raise FlowpruneError(f"methods lists a method twice: {items}")
    return items


def _seed_list(seeds: int | Sequence[int]) -> list[int]:
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        check_positive_int("seeds", seeds)
        return list(range(seeds))
    out = [int(s) for s in seeds]
    if not out:
        raise FlowpruneError("seeds must be a positive count or a non-empty list of seeds")
    return out


def flowprune_one_shot(model: nn.Module, method: str, target: float, *, input_shape: Sequence[int],
                       batches: Sequence[tuple[torch.Tensor, torch.Tensor]], seed: int = 0,
                       plan_options: dict | None = None, score_options: dict | None = None,
                       compensate: bool | None = None) -> tuple[nn.Module, dict, dict]:
    """Score, plan and cut a copy of ``model`` once to ``target`` x fewer MACs with a flowprune score.

    Kept for callers of the earlier API: it is the ``method`` procedure of
    :mod:`flowprune.procedures.scored`. Returns ``(pruned, cuts, info)``.
    """
    ctx = CutContext(input_shape=tuple(input_shape), batches=list(batches), seed=seed,
                     plan_options=dict(plan_options or {}), score_options=dict(score_options or {}),
                     compensate=compensate)
    out = get_procedure(method).cut(model, target, ctx)
    return out.model, out.cuts or {}, out.info


@dataclass
class CompareConfig(ProcedureConfig):
    """What :func:`compare` computes (see :func:`compare` for each field)."""

    methods: str | Sequence[str] = DEFAULT_METHODS
    targets: Sequence[float | str] = (2.0, 4.0, 8.0, 16.0)
    seeds: int | Sequence[int] = 3
    finetune_epochs: int = 1
    finetune_lr: float = 0.01
    finetune_batches: int | None = None
    calib_batches: int = 10
    calib_batch_size: int = 64
    dense_config: TrainConfig | None = None
    scratch_epochs: int | None = None
    scratch_from: str = "agf"
    scratch_targets: Sequence[float | str] | None = None
    scratch_seeds: int | None = None
    plan_options: dict | None = None
    score_options: dict | None = None
    tp_mode: str = "auto"
    tol: float = 0.03
    round_to: int | None = None
    measure_speed: bool = True
    speed_repeats: int = 5  # interleaved timing rounds (flowprune.timing) per batch size
    speed_batch: int = 256
    compensate: bool | None = None
    recovery: str = "finetune"
    recovery_options: dict | None = None

    def validate(self) -> CompareConfig:
        """Check every field; methods, targets and seeds become lists, the dense recipe a TrainConfig."""
        self.methods = parse_methods(self.methods)
        self.targets = [parse_target(t) for t in self.targets]
        if not self.targets:
            raise FlowpruneError("targets is empty; give at least one MACs reduction such as 4x")
        self.seeds = _seed_list(self.seeds)
        if isinstance(self.finetune_epochs, bool) or not isinstance(self.finetune_epochs, int) or self.finetune_epochs < 0:
            raise FlowpruneError(f"finetune_epochs must be an integer >= 0, got {self.finetune_epochs!r}")
        check_positive_int("calib_batches", self.calib_batches)
        check_positive_int("calib_batch_size", self.calib_batch_size)
        if self.finetune_batches is not None:
            check_positive_int("finetune_batches", self.finetune_batches)
        lr = self.finetune_lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
            raise FlowpruneError(f"finetune_lr must be a positive number, got {lr!r}")
        if self.tp_mode not in TP_MODES:
            raise bad_choice("tp_mode", self.tp_mode, TP_MODES)
        if not (0 < self.tol < 1):
            raise FlowpruneError(f"tol must lie in (0, 1), got {self.tol!r}")
        self.dense_config = (self.dense_config or TrainConfig()).validate()
        if self.scratch_epochs is None:
            self.scratch_epochs = self.dense_config.epochs
        if int(self.scratch_epochs) < 0:
            raise FlowpruneError(f"scratch_epochs must be >= 0, got {self.scratch_epochs!r}")
        self.scratch_epochs = int(self.scratch_epochs)
        self.scratch_targets = (list(self.targets) if self.scratch_targets is None
                                else [parse_target(t) for t in self.scratch_targets])
        if self.scratch_seeds is not None:
            check_positive_int("scratch_seeds", self.scratch_seeds)
        self._check_plan_options()
        self.recipe()
        return self

    def recipe(self):
        """The recovery recipe every method gets (:mod:`flowprune.recover`), at ``finetune_lr``."""
        from flowprune.recover import make_recipe

        return make_recipe(self.recovery, {"lr": self.finetune_lr, **(self.recovery_options or {})})

    def _check_plan_options(self) -> None:
        from flowprune.plan import BUDGETS, NORMALIZE

        po = self.plan_options or {}
        allowed = ("budget", "normalize", "min_width", "round_to")
        for k in po:
            if k not in allowed:
                raise bad_choice("plan option", k, allowed)
        if "budget" in po and po["budget"] not in BUDGETS:
            raise bad_choice("budget", po["budget"], BUDGETS)
        if "normalize" in po and po["normalize"] not in NORMALIZE:
            raise bad_choice("normalize", po["normalize"], NORMALIZE)
        for k in ("min_width", "round_to"):
            if k in po:
                check_positive_int(k, po[k])

    @property
    def do_scratch(self) -> bool:
        return self.scratch_epochs > 0 and self.scratch_from in self.methods and not self.scratch_from.startswith("tp-")

    def record(self, data: DataSplits, model_name: str | None) -> dict:
        """The JSON record written to ``compare_config.json`` and ``results["config"]``."""
        s_seeds = self.seeds if self.scratch_seeds is None else self.seeds[:self.scratch_seeds]
        return {"methods": self.methods, "targets": self.targets, "seeds": self.seeds,
                "finetune_epochs": self.finetune_epochs, "finetune_lr": self.finetune_lr,
                "finetune_batches": self.finetune_batches, "calib_batches": self.calib_batches,
                "calib_batch_size": self.calib_batch_size, "dense_config": asdict(self.dense_config),
                "scratch_epochs": self.scratch_epochs, "scratch_from": self.scratch_from if self.do_scratch else None,
                "scratch_targets": self.scratch_targets, "scratch_seeds": s_seeds,
                "plan_options": self.plan_options or {}, "score_options": self.score_options or {},
                "tp_mode": self.tp_mode, "tol": self.tol, "round_to": self.round_to, "data": data.name,
                "model": model_name, "compensate": self.compensate, "recovery": self.recovery,
                "recovery_options": self.recovery_options or {}, "torch_pruning_version": _tp_version()}


@dataclass
class CompareResult(ProcedureResult, ReadsAsDict):
    """What :func:`compare` returns; also readable as a dict (``res["summary"]``) as before."""

    config: dict
    dense: dict
    runs: list[dict]
    summary: list[dict]
    jaccard: list[dict]
    scratch: list[dict]
    scratch_runs: list[dict]
    table: str
    torch_threads: int = field(default_factory=torch.get_num_threads)
    model: None = None

    def __getitem__(self, key: str):
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def keys(self) -> list[str]:
        return [k for k in self.__dataclass_fields__ if k != "model"]


# ----------------------------------------------------------------------------------------------
# overlap, re-initialisation, statistics
# ----------------------------------------------------------------------------------------------

def jaccard_overlap(cuts_a: dict[str, Sequence[int]], cuts_b: dict[str, Sequence[int]],
                    sizes: dict[str, int]) -> dict[str, float]:
    """Jaccard index of two channel selections over all units, for removed and for kept channels.

    A selection is the set of ``(unit, index)`` pairs. ``sizes`` gives every unit's width (the
    kept set is the complement of the removed one). ``chance_*`` is the expected index for two
    independent uniform random selections of the same per-unit sizes (the ratio of expected
    intersection to expected union).
    """
    out: dict[str, float] = {}
    for kind in ("removed", "kept"):
        inter = union = chance_i = total_a = total_b = 0.0
        for name, n in sizes.items():
            a = set(int(i) for i in cuts_a.get(name, ()))
            b = set(int(i) for i in cuts_b.get(name, ()))
            if kind == "kept":
                a, b = set(range(n)) - a, set(range(n)) - b
            inter += len(a & b)
            union += len(a | b)
            total_a += len(a)
            total_b += len(b)
            chance_i += len(a) * len(b) / n if n else 0.0
        out[kind] = inter / union if union else float("nan")
        den = total_a + total_b - chance_i
        out[f"chance_{kind}"] = chance_i / den if den else float("nan")
    return out


def reinitialise(model: nn.Module, seed: int = 0) -> nn.Module:
    """A copy of ``model`` with the same architecture and freshly initialised weights.

    Every module's own ``reset_parameters`` is used (PyTorch's default initialisation, BN
    statistics reset); parameters owned by modules without one (ViT ``pos_embed``/``cls_token``)
    are drawn from N(0, 0.02^2), timm's choice.
    """
    new = copy.deepcopy(model)
    torch.manual_seed(seed)
    for m in new.modules():
        if hasattr(m, "reset_parameters") and callable(m.reset_parameters):
            m.reset_parameters()
        elif m._parameters:
            for p in m._parameters.values():
                if p is not None:
                    with torch.no_grad():
                        p.normal_(0.0, 0.02)
    return new


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (0 for one value); ``(None, None)`` for no values."""
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def exceeds_one_std(mean_a: float, std_a: float, mean_b: float, std_b: float) -> bool:
    """Whether ``|mean_a - mean_b|`` is larger than the larger of the two standard deviations (> 0)."""
    s = max(std_a or 0.0, std_b or 0.0)
    return s > 0 and abs(mean_a - mean_b) > s


# ----------------------------------------------------------------------------------------------
# the comparison
# ----------------------------------------------------------------------------------------------

def _speed(models: dict, input_shape, rounds: int, batch: int) -> dict:
    """Interleaved timing (flowprune.timing) of ``models`` at batch 1 and ``batch``, vs ``dense``."""
    return speed_compare(models, input_shape, base="dense", batch_sizes=(1, batch), rounds=rounds)


def _run_key(method: str, target: float, seed: int) -> str:
    return f"{method}_{target:g}x_s{seed}"


def compare(dense_model: nn.Module | Sequence[nn.Module], data: DataSplits,
            config: CompareConfig | dict | str | Sequence[str] | None = None, *legacy,
            out_dir: str | os.PathLike | None = None, resume: bool = True, progress: bool | None = None,
            device: str | torch.device | None = None, **overrides) -> CompareResult:
    """Compare pruning methods from one dense model on equal work; returns (and writes) the results.

    Called like every procedure: ``compare(dense, data, config=None, **overrides)`` with a
    :class:`CompareConfig` (or a dict of its fields) and/or its fields as keywords. For the earlier
    call form a string or list of method names in the config position is ``methods``, and up to
    two more positional arguments are ``targets`` and ``seeds``.

    Config fields:
        methods: names or a comma-separated string (see :func:`available_methods`: every registered
            procedure, :mod:`flowprune.procedures`).
        targets: MACs reduction factors (``4``, ``"4x"``).
        seeds: a count (seeds 0..n-1) or a list. A seed picks the calibration batches, the
            random selections and the fine-tune batch order; every method sees the same ones.
        finetune_epochs: epochs of fine-tuning after the cut, the same for every method (0: none).
        finetune_lr: its initial learning rate (SGD, cosine, weight decay 5e-4, augmentation).
        recovery: the recovery recipe every method gets (:mod:`flowprune.recover`): ``finetune``
            (plain fine-tuning, the default here so every method gets the same plain recovery) or
            ``kd`` (distillation from the dense model, warm-up + cosine); ``recovery_options`` its
            options. Runs record ``val_ft`` (validation accuracy after recovery, which picks the
            best ``tp-*`` reference after recovery) and ``teacher_forwards``.
        finetune_batches: optional cap on steps per fine-tune epoch (short recoveries).
        calib_batches, calib_batch_size: T calibration batches from ``train`` (scores, Taylor
            gradients and BatchNorm re-estimation).
        dense_config: the dense model's training recipe, reused for the train-from-scratch
            baseline (default ``TrainConfig()``); ``scratch_epochs`` overrides its epochs, 0 skips.
        scratch_from: the method whose pruned architecture is trained from scratch.
        scratch_targets, scratch_seeds: restrict the (costly) scratch baseline (default: all
            targets, all seeds).
        plan_options: extra keywords for ``plan_cuts`` (``budget``, ``normalize``, ``min_width``,
            ``round_to``); flowprune methods default to ``flowprune.prune``'s plan (global, unit).
        compensate: mean compensation before the cut for flowprune methods (default: on, as in
            ``flowprune.prune``; :mod:`flowprune.compensate`).
        score_options: ``{method: {option: value}}`` for ``get_score``.
        tp_mode, tol, round_to: Torch-Pruning search (see :func:`tp_prune_to_target`).
        measure_speed: latency at batch 1 and throughput at ``speed_batch``, for the first seed
            of every method x target, with the dense model re-measured next to it (speed-up).

    Run options:
        dense_model: the trained dense model every method starts from (never changed), or one
            dense model per seed (a list as long as ``seeds``: seed i prunes dense model i, so the
            spread over seeds covers dense training as well as calibration, the fair protocol).
        data: the data set (calibration and fine-tuning on ``train``; accuracy on ``test``).
        out_dir: writes ``results.json``, ``compare.md`` and one JSON per finished run (resume).
        device: where every run happens (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``; default: the
            dense model's device); the dense models are copied there.

    Returns:
        a :class:`CompareResult`: ``config``, ``dense``, ``runs``, ``summary``, ``jaccard``,
        ``scratch``, ``table`` (the Markdown table that was written), readable as a dict.
    """
    if isinstance(config, str) or (isinstance(config, Sequence) and not isinstance(config, dict)):
        overrides = {"methods": config, **overrides}
        config = None
    if len(legacy) > 2:
        raise FlowpruneError("compare takes at most two positional arguments after methods (targets, seeds)")
    overrides.update(dict(zip(("targets", "seeds"), legacy)))
    cfg = CompareConfig.resolve(config, overrides)
    run = _CompareRun(dense_model, data, cfg, device=device, out_dir=out_dir, resume=resume)
    runs = run.run_all(progress)
    return run.finish(runs)


def _dense_list(dense_model, n_seeds: int) -> list[nn.Module]:
    if isinstance(dense_model, nn.Module):
        return [dense_model] * n_seeds
    if isinstance(dense_model, Sequence) and all(isinstance(m, nn.Module) for m in dense_model):
        if len(dense_model) != n_seeds:
            raise FlowpruneError(f"dense_model is a list of {len(dense_model)} models but there are "
                                 f"{n_seeds} seeds; give one dense model per seed (or a single model)")
        return list(dense_model)
    raise FlowpruneError(f"dense_model must be a torch nn.Module or a list of them, got {type(dense_model).__name__}")


def _check_fits(model: nn.Module, data) -> tuple[int, ...]:
    """The model's input shape, checked against ``data``'s (and its head against the classes)."""
    if not isinstance(data, DataSplits):
        raise FlowpruneError(f"data must be a DataSplits from flowprune.load_dataset, got {type(data).__name__}")
    base = getattr(model, "flowprune_base", None) or {}
    input_shape = tuple(base.get("input_shape", data.input_shape))
    if input_shape != tuple(data.input_shape):
        raise FlowpruneError(f"the model takes inputs of shape {input_shape} but data set {data.name!r} "
                             f"has {tuple(data.input_shape)}")
    fc = _classifier(model)
    if fc is not None and fc.out_features < data.num_classes:
        raise FlowpruneError(f"the model's head has {fc.out_features} outputs but data set {data.name!r} has "
                             f"{data.num_classes} classes; labels would not fit")
    return input_shape


class _CompareRun:
    """One comparison: the dense models on the device, the output folder and the shared contexts."""

    def __init__(self, dense_model, data: DataSplits, cfg: CompareConfig, *, device, out_dir, resume: bool):
        from flowprune.device import resolve_device

        self.cfg, self.data, self.resume = cfg, data, resume
        dense_models = _dense_list(dense_model, len(cfg.seeds))
        self.input_shape = _check_fits(dense_models[0], data)
        base = getattr(dense_models[0], "flowprune_base", None) or {}
        self.record = cfg.record(data, base.get("name"))
        dev = resolve_device(device, dense_models[0])
        self.denses = [copy.deepcopy(m).to(dev).eval() for m in dense_models]
        self._check_targets()
        self.run_dir = self._open_out_dir(out_dir)
        self.test = make_loader(data.test, 512)
        self.dense_info = self._dense_info(dense_models)
        self.tp_cache: dict = {}
        self.archs: dict[tuple[int, float], nn.Module] = {}

    def _check_targets(self) -> None:
        """Reachability of every target, before any work: every unit at its minimum width."""
        from flowprune.plan import MacsModel, check_reachable
        from flowprune.units import find_units

        dense, po = self.denses[0], self.cfg.plan_options or {}
        example = torch.randn(1, *self.input_shape, device=next(dense.parameters()).device)
        units = find_units(copy.deepcopy(dense), example)
        self.sizes = {u.name: int(u.size) for u in units}
        check_reachable(MacsModel(dense, units, example), units, max(self.cfg.targets), po.get("min_width", 1),
                        po.get("round_to", 1), what="target")

    def _open_out_dir(self, out_dir) -> Path | None:
        if out_dir is None:
            self.out = None
            return None
        self.out = out = Path(out_dir)
        if out.exists() and not out.is_dir():
            raise FlowpruneError(f"out_dir {str(out)!r} exists and is not a directory")
        run_dir = out / "runs"
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg_path = out / "compare_config.json"
        if cfg_path.exists() and self.resume:
            old = json.loads(cfg_path.read_text())
            now = json.loads(json.dumps(self.record))
            # only what changes a finished run matters; methods, targets, seeds and scratch may grow
            if any(old.get(k, RUN_KEY_DEFAULTS.get(k)) != now.get(k) for k in RUN_KEYS):
                raise FlowpruneError(f"{out} holds runs of another comparison config; use a fresh out dir or resume=False")
        cfg_path.write_text(json.dumps(self.record, indent=1))
        return run_dir

    def _dense_info(self, dense_models: list[nn.Module]) -> dict:
        cfg, dense = self.cfg, self.denses[0]
        self.dense_macs, dense_params = count_macs_params(dense, self.input_shape)
        accs = [accuracy(m, self.test) for m in self.denses]
        info = {"accuracy": statistics.mean(accs), "macs": self.dense_macs, "params": dense_params,
                "accuracy_per_seed": accs, "per_seed_dense": len(dense_models) > 1 and
                any(m is not dense_models[0] for m in dense_models)}
        if len(accs) > 1:
            info["accuracy_std"] = statistics.stdev(accs)
        if cfg.measure_speed:
            sp = _speed({"dense": dense}, self.input_shape, cfg.speed_repeats, cfg.speed_batch)
            info.update({"latency_ms_b1": 1e3 * sp["b1"]["seconds"]["dense"],
                         f"throughput_b{cfg.speed_batch}": sp[f"b{cfg.speed_batch}"]["per_second"]["dense"],
                         "speed_backend": f"{sp['backend']} on {sp['device']}"})
        return info

    def context(self, seed: int, calib) -> CutContext:
        cfg = self.cfg
        return CutContext(input_shape=self.input_shape, batches=calib, seed=seed, tol=cfg.tol,
                          plan_options=dict(cfg.plan_options or {}), score_options=dict(cfg.score_options or {}),
                          compensate=cfg.compensate, round_to=cfg.round_to, tp_mode=cfg.tp_mode, cache=self.tp_cache)

    def run_all(self, progress) -> list[dict]:
        cfg = self.cfg
        bar = _bar(len(cfg.seeds) * len(cfg.targets) * len(cfg.methods), progress)
        runs: list[dict] = []
        for si, seed in enumerate(cfg.seeds):
            calib = self.data.calibration_batches(cfg.calib_batch_size, cfg.calib_batches, seed=seed, split="train")
            for target in cfg.targets:
                for method in cfg.methods:
                    path = self.run_dir / f"{_run_key(method, target, seed)}.json" if self.run_dir else None
                    if path is not None and self.resume and path.exists():
                        runs.append(json.loads(path.read_text()))
                    else:
                        runs.append(self.run_one(si, seed, target, method, calib))
                        if path is not None:
                            write_results(path, runs[-1])
                    bar.update(1)
        bar.close()
        return runs

    def run_one(self, si: int, seed: int, target: float, method: str, calib) -> dict:
        """One method x target x seed: cut, measure, re-estimate BN, fine-tune, time."""
        cfg, dense, t0 = self.cfg, self.denses[si], time.perf_counter()
        out = get_procedure(method).cut(dense, target, self.context(seed, calib))
        pruned = out.model
        prune_s = time.perf_counter() - t0
        macs, params = count_macs_params(pruned, self.input_shape)
        rec = {"method": method, "target": target, "seed": seed, "macs": macs, "params": params,
               "achieved": self.dense_macs / max(macs, 1), "prune_seconds": prune_s, **out.info}
        rec["within_tol"] = abs(rec["achieved"] / target - 1) <= cfg.tol
        rec["acc_raw"] = accuracy(pruned, self.test)
        reestimate_bn(pruned, calib)
        rec["acc_bn"] = accuracy(pruned, self.test)
        if cfg.do_scratch and method == cfg.scratch_from:
            self.archs[(seed, target)] = copy.deepcopy(pruned)
        rec["acc_ft"] = None
        if cfg.finetune_epochs > 0:
            from flowprune.recover import recover

            t1 = time.perf_counter()
            ft = TrainConfig(epochs=cfg.finetune_epochs, lr=cfg.finetune_lr, batch_size=cfg.dense_config.batch_size,
                             weight_decay=cfg.dense_config.weight_decay, optimizer="sgd",
                             augment=cfg.dense_config.augment, seed=seed)
            rr = recover(pruned, self.data, cfg.finetune_epochs, cfg.recipe(), teacher=dense, seed=seed,
                         train_config=ft, progress=False, max_batches_per_epoch=cfg.finetune_batches)
            rec["acc_ft"] = accuracy(pruned, self.test)
            if len(self.data.val):
                rec["val_ft"] = accuracy(pruned, make_loader(self.data.val, 512))
            rec["teacher_forwards"] = rr["teacher_forwards"]
            rec["finetune_seconds"] = time.perf_counter() - t1
        if cfg.measure_speed and si == 0:
            rec.update(_speed_vs_dense(pruned, dense, self.input_shape, cfg.speed_repeats, cfg.speed_batch))
        if out.cuts is not None and method in ("agf", "l1"):
            rec["cuts"] = out.cuts
        rec["seconds"] = time.perf_counter() - t0
        return rec

    def jaccard(self, runs: list[dict]) -> list[dict]:
        """Jaccard overlap of the channel sets AGF and L1 remove, per target."""
        cfg, rows = self.cfg, []
        if not ("agf" in cfg.methods and "l1" in cfg.methods and self.sizes):
            return rows
        by = {(r["method"], r["target"], r["seed"]): r for r in runs}
        for target in cfg.targets:
            vals = [jaccard_overlap(by[("agf", target, s)]["cuts"], by[("l1", target, s)]["cuts"], self.sizes)
                    for s in cfg.seeds
                    if "cuts" in by.get(("agf", target, s), {}) and "cuts" in by.get(("l1", target, s), {})]
            if not vals:
                continue
            row = {"target": target}
            for k in ("removed", "kept", "chance_removed", "chance_kept"):
                row[k], row[k + "_std"] = mean_std([v[k] for v in vals])
            rows.append(row)
        return rows

    def scratch(self) -> list[dict]:
        """Train from scratch at the pruned architecture of ``scratch_from``."""
        cfg, rows = self.cfg, []
        if not cfg.do_scratch:
            return rows
        for seed in self.record["scratch_seeds"]:
            for target in cfg.scratch_targets:
                path = self.run_dir / f"scratch_{cfg.scratch_from}_{target:g}x_s{seed}.json" if self.run_dir else None
                if path is not None and self.resume and path.exists():
                    rows.append(json.loads(path.read_text()))
                    continue
                rows.append(self._scratch_one(seed, target))
                if path is not None:
                    write_results(path, rows[-1])
        return rows

    def _scratch_one(self, seed: int, target: float) -> dict:
        cfg = self.cfg
        arch = self.archs.get((seed, target))
        if arch is None:  # resumed run: rebuild the architecture (deterministic for a seed)
            calib = self.data.calibration_batches(cfg.calib_batch_size, cfg.calib_batches, seed=seed, split="train")
            dense = self.denses[cfg.seeds.index(seed)]
            arch = get_procedure(cfg.scratch_from).cut(dense, target, self.context(seed, calib)).model
        net = reinitialise(arch, seed)
        t0 = time.perf_counter()
        fit(net, self.data, TrainConfig(**{**asdict(cfg.dense_config), "epochs": cfg.scratch_epochs, "seed": seed}),
            progress=False)
        return {"arch_from": cfg.scratch_from, "target": target, "seed": seed, "epochs": cfg.scratch_epochs,
                "acc": accuracy(net, self.test), "seconds": time.perf_counter() - t0}

    def finish(self, runs: list[dict]) -> CompareResult:
        cfg = self.cfg
        jac_rows = self.jaccard(runs)
        scratch_rows = self.scratch()
        summary = summarise(runs, cfg.methods, cfg.targets, cfg.speed_batch)
        scratch_summary = []
        for target in cfg.scratch_targets if cfg.do_scratch else []:
            m, s = mean_std([r["acc"] for r in scratch_rows if r["target"] == target])
            scratch_summary.append({"target": target, "arch_from": cfg.scratch_from, "acc": m, "acc_std": s,
                                    "n": sum(r["target"] == target for r in scratch_rows),
                                    "epochs": cfg.scratch_epochs})
        table = render_markdown(self.record, self.dense_info, summary, jac_rows, scratch_summary, cfg.speed_batch)
        result = CompareResult(config=self.record, dense=self.dense_info, runs=runs, summary=summary,
                               jaccard=jac_rows, scratch=scratch_summary, scratch_runs=scratch_rows, table=table)
        if self.out is not None:
            write_results(self.out / "results.json", {k: result[k] for k in result.keys()})
            (self.out / "compare.md").write_text(table + "\n")
        return result


def _speed_vs_dense(pruned: nn.Module, dense: nn.Module, input_shape, rounds: int, batch: int) -> dict:
    """The pruned model's speed and its speed-ups over the dense one, timed together (interleaved);
    a refused (implausible) speed-up is None, with the reason under ``speed.refused``."""
    sp = _speed({"dense": dense, "pruned": pruned}, input_shape, rounds, batch)
    b1, bt = sp["b1"], sp[f"b{batch}"]
    return {"latency_ms_b1": 1e3 * b1["seconds"]["pruned"], f"throughput_b{batch}": bt["per_second"]["pruned"],
            "speedup_latency_b1": b1["speedup"]["pruned"], f"speedup_throughput_b{batch}": bt["speedup"]["pruned"],
            "speed": sp}


def _tp_version() -> str:
    try:
        from importlib.metadata import version

        return version("torch-pruning")
    except Exception:  # noqa: BLE001
        return "unknown"


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(total: int, progress: bool | None):
    import sys

    show = sys.stderr.isatty() if progress is None else progress
    if not show:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="compare", file=sys.stderr)


def summarise(runs: Sequence[dict], methods: Sequence[str], targets: Sequence[float], speed_batch: int = 256) -> list[dict]:
    """One row per ``method x target``: mean/std over seeds of every stage, and deltas to the reference.

    The reference at each target and stage is the best ``tp-*`` method by mean (when any ran),
    otherwise the first method listed; after recovery (``acc_ft``) "best" is judged on the
    validation split (``val_ft``) where the runs have it, never on test. ``d_<stage>`` is ``mean - reference mean`` and
    ``d_<stage>_gt_std`` whether it exceeds one std (:func:`exceeds_one_std`).
    """
    rows = []
    for target in targets:
        group = []
        for method in methods:
            rs = [r for r in runs if r["method"] == method and r["target"] == target]
            if not rs:
                continue
            row: dict = {"method": method, "target": target, "n": len(rs)}
            for k in (*STAGES, "val_ft", "achieved", "macs", "params", "prune_seconds"):
                row[k], row[k + "_std"] = mean_std([r.get(k) for r in rs])
            row["within_tol"] = all(r.get("within_tol", True) for r in rs)
            modes = sorted({r["mode"] for r in rs if "mode" in r})
            if modes:
                row["tp_mode"] = "/".join(modes)
            first = min(rs, key=lambda r: r["seed"])
            for k in ("latency_ms_b1", f"throughput_b{speed_batch}", "speedup_latency_b1",
                      f"speedup_throughput_b{speed_batch}"):
                if k in first:
                    row[k] = first[k]
            group.append(row)
        tp_rows = [r for r in group if r["method"].startswith("tp-")]
        for stage in STAGES:
            cands = [r for r in (tp_rows or group[:1]) if r[stage] is not None]
            if not cands:
                continue
            by_val = stage == "acc_ft" and all(r.get("val_ft") is not None for r in cands)
            ref = max(cands, key=lambda r: r["val_ft" if by_val else stage])
            for r in group:
                if r[stage] is None:
                    continue
                r[f"ref_{stage}"] = ref["method"]
                r[f"d_{stage}"] = r[stage] - ref[stage]
                r[f"d_{stage}_gt_std"] = exceeds_one_std(r[stage], r[stage + "_std"], ref[stage], ref[stage + "_std"])
        rows.extend(group)
    return rows


def _pm(m: float | None, s: float | None, scale: float = 100.0, digits: int = 1) -> str:
    if m is None:
        return "-"
    return f"{scale * m:.{digits}f} ± {scale * (s or 0.0):.{digits}f}"


def _delta(r: dict, stage: str) -> str:
    d = r.get(f"d_{stage}")
    if d is None:
        return "-"
    if r["method"] == r.get(f"ref_{stage}"):
        return "ref"
    return f"{100 * d:+.1f}{'*' if r.get(f'd_{stage}_gt_std') else ''}"


def _x(v: float | None) -> str:
    return "refused" if v is None else f"{v:.2f}x"


def render_markdown(config: dict, dense: dict, summary: Sequence[dict], jaccard: Sequence[dict],
                    scratch: Sequence[dict], speed_batch: int = 256) -> str:
    """The comparison as Markdown: the main table, then Jaccard overlaps and the scratch baseline."""
    n_seeds = len(config["seeds"])
    has_tp = any(m.startswith("tp-") for m in config["methods"])
    ref_name = "best tp-*" if has_tp else config["methods"][0]
    acc_std = f" ± {100 * dense['accuracy_std']:.1f}" if dense.get("accuracy_std") is not None else ""
    per_seed = " (one dense model per seed)" if dense.get("per_seed_dense") else ""
    lines = [f"Dense {config.get('model')} on {config['data']}{per_seed}: test accuracy "
             f"{100 * dense['accuracy']:.1f}{acc_std} %, "
             f"{dense['macs'] / 1e6:.2f} M MACs, {dense['params'] / 1e3:.1f} K params"
             + (f", latency b1 {dense['latency_ms_b1']:.2f} ms, throughput b{speed_batch} "
                f"{dense[f'throughput_b{speed_batch}']:.0f}/s" if "latency_ms_b1" in dense else "") + ".",
             f"Accuracy % as mean ± std over {n_seeds} seed(s); one-shot cut; BN = after BatchNorm re-estimation on "
             f"{config['calib_batches']} x {config['calib_batch_size']} calibration samples (no weight update); "
             f"FT = after {config['finetune_epochs']} fine-tune epoch(s) at lr {config['finetune_lr']}. "
             f"Δ = difference to {ref_name} at that target (points); * = exceeds one std (the larger of the two).",
             ""]
    rows = []
    for r in summary:
        row = {"method": r["method"], "target": f"{r['target']:g}x",
               "achieved": f"{r['achieved']:.2f}x" + ("" if r["within_tol"] else " (!)"),
               "MACs": int(r["macs"]), "params": int(r["params"]),
               "raw %": _pm(r["acc_raw"], r["acc_raw_std"]), "BN %": _pm(r["acc_bn"], r["acc_bn_std"]),
               "Δ BN": _delta(r, "acc_bn"), "FT %": _pm(r["acc_ft"], r["acc_ft_std"]), "Δ FT": _delta(r, "acc_ft")}
        if "latency_ms_b1" in r:
            row["lat b1 ms"] = f"{r['latency_ms_b1']:.2f} ({_x(r['speedup_latency_b1'])})"
            row[f"thr b{speed_batch}/s"] = (f"{r[f'throughput_b{speed_batch}']:.0f} "
                                            f"({_x(r[f'speedup_throughput_b{speed_batch}'])})")
        rows.append(row)
    lines.append(format_table(rows))
    lines.append("")
    lines.append("(!) = the achieved reduction is more than "
                 f"{100 * config['tol']:.0f} % off the target (nearest reachable point). Speed: first seed's model; "
                 "in brackets the speed-up over the dense model, timed interleaved with it in one harness call "
                 f"({dense.get('speed_backend', 'eager')}; medians of rounds; 'refused' = faster than the MACs cut "
                 "allows beyond the noise, see results.json).")
    if jaccard:
        lines += ["", "Jaccard overlap of the channel sets AGF and L1 choose (mean ± std over seeds; chance = two "
                  "independent random selections of the same per-unit sizes):", ""]
        lines.append(format_table([{"target": f"{j['target']:g}x", "removed": _pm(j["removed"], j["removed_std"], 1, 3),
                                    "chance (removed)": f"{j['chance_removed']:.3f}",
                                    "kept": _pm(j["kept"], j["kept_std"], 1, 3),
                                    "chance (kept)": f"{j['chance_kept']:.3f}"} for j in jaccard]))
    if scratch:
        lines += ["", f"Train from scratch at the {scratch[0]['arch_from']}-pruned architecture "
                  f"(weights re-initialised, {scratch[0]['epochs']} epochs, the dense budget):", ""]
        lines.append(format_table([{"target": f"{s['target']:g}x", "scratch %": _pm(s["acc"], s["acc_std"]),
                                    "seeds": s["n"]} for s in scratch]))
    return "\n".join(lines)
