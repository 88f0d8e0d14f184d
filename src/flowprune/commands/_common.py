"""Arguments and steps that several CLI commands share.

Every long command follows one pattern (see docs/robustness.md)::

    def add_arguments(p):
        setup_parser(p)                 # one-line argparse errors, --threads range, --overwrite
        ...
    def run(args):
        ... validate every value (the library's own checks), load models and data ...
        run = open_run(args, inputs=[...])   # the first write to OUT: the run-state file
        if run.finished:
            return 0                    # same options, already done: nothing to do
        ... work (checkpoints in OUT; a rerun resumes) ...
        run.finish()

``open_run`` records the command and its options in ``OUT/flowprune_run.json``. The same
``--out`` with other options is refused (the error names the options that differ), the same
options resume an interrupted run or say the run is finished, and ``--overwrite`` starts fresh.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

from flowprune.data import ON_BAD_IMAGE, DataSplits, available_datasets, load_dataset
from flowprune.errors import FlowpruneError, check_positive_int
from flowprune.threads import MAX_THREADS  # noqa: F401 -- re-exported
from flowprune.train import TrainConfig

RUN_STATE_FILE = "flowprune_run.json"
# argparse entries that do not change what a run computes
NOT_OPTIONS = frozenset({"_run", "debug", "threads", "overwrite", "no_resume", "command", "no_report", "device",
                         "no_speed", "speed_batch", "speed_backend", "speed_rounds"})
# what flowprune commands write into OUT (removed by --overwrite when OUT was not created by the run)
KNOWN_OUTPUTS = ("results.json", "model.json", "model.safetensors", "model.safetensors.prev", "model.json.tmp",
                 "model.safetensors.tmp", "checkpoint.pt", "checkpoint.pt.tmp", "hyperflows.pt", "hyperflows.pt.tmp",
                 "steps", "checkpoint", "model", "runs", "compare.md", "compare_config.json", "cascade",
                 "pareto.png", "sparse", "dense", "report.html", RUN_STATE_FILE)


# ------------------------------------------------------------------------------ parser set-up


def _one_line_error(parser: argparse.ArgumentParser):
    def error(message: str):
        print(f"flowprune: error: {message} (see `{parser.prog} --help`)", file=sys.stderr)
        sys.exit(2)
    return error


def check_threads(value: object) -> int:
    """``--threads``: an integer in [1, MAX_THREADS] (CLI-only option, validated here)."""
    from flowprune.threads import check_threads as check

    return check(value)


def _threads_type(text: str) -> int:
    try:
        return check_threads(text)
    except FlowpruneError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def setup_parser(p: argparse.ArgumentParser, *, overwrite: bool = True) -> None:
    """Shared set-up of a command's parser: argparse errors as one line (exit 2), the ``--threads``
    range checked while parsing (before torch sees it), and ``--overwrite``."""
    p.error = _one_line_error(p)  # type: ignore[method-assign]
    for action in p._actions:
        if action.dest == "threads":
            action.type = _threads_type
    if overwrite:
        p.add_argument("--overwrite", action="store_true",
                       help="start fresh in --out even if it holds a run (with other options, or finished)")


def add_runtime_arguments(p: argparse.ArgumentParser) -> None:
    """``--device`` and ``--amp``, on every command (the CLI's common parent parser).

    Both are checked before any work (:func:`flowprune.device.resolve_device`,
    :func:`flowprune.device.check_amp`); the command then runs inside
    :func:`flowprune.device.use`, so every library call it makes uses them. ``--device`` does not
    change what a run computes (a run started on the CPU may be resumed on a GPU); ``--amp`` does.
    """
    p.add_argument("--device", default=None, metavar="DEVICE",
                   help="where to run: auto (default: CUDA when available, else CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--amp", default=None, metavar="MODE",
                   help="mixed precision of training and fine-tuning: none (default), bf16 (CUDA or CPU) or "
                        "fp16 (CUDA, with loss scaling)")


def add_data_arguments(p: argparse.ArgumentParser, default: str = "mnist5k") -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default=default,
                   help=f"data set: {', '.join(available_datasets())} (default {default})")
    g.add_argument("--seed", type=int, default=0, help="seed for the split, the init and the batch order")
    g.add_argument("--val-fraction", type=float, default=0.1, help="share of every class held out for validation")
    g.add_argument("--test-fraction", type=float, default=0.2, help="share of every class held out for test")
    g.add_argument("--data-root", default=None, help="where tv:NAME data sets live; for fashion, the directory of its IDX files "
                        "(default /usr/share/datasets/fashion-mnist, Debian's dataset-fashion-mnist)")
    g.add_argument("--on-bad-image", default="skip", choices=ON_BAD_IMAGE,
                   help="imagefolder: skip unreadable images with a warning (default) or stop with an error")


def add_train_arguments(p: argparse.ArgumentParser, *, epochs: int = 15, lr: float = 0.05) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=epochs)
    g.add_argument("--lr", type=float, default=lr)
    g.add_argument("--optimizer", default="sgd", help="sgd or adamw")
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--label-smoothing", type=float, default=0.0)
    g.add_argument("--no-augment", action="store_true", help="turn off random translation of training inputs")


def train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(epochs=args.epochs, lr=args.lr, optimizer=args.optimizer, weight_decay=args.weight_decay,
                       batch_size=args.batch_size, label_smoothing=args.label_smoothing,
                       augment=not args.no_augment, seed=args.seed).validate()


def load_data(args: argparse.Namespace) -> DataSplits:
    return load_dataset(args.data, seed=args.seed, val_fraction=args.val_fraction,
                        test_fraction=args.test_fraction, root=args.data_root,
                        on_bad_image=getattr(args, "on_bad_image", "skip"))


# ------------------------------------------------------------------------------ values


def check_int(name: str, value: object, low: int, high: int | None = None, *, allow_none: bool = False) -> int | None:
    """An integer option in [low, high] (high None: no upper bound), else a FlowpruneError naming it."""
    if value is None and allow_none:
        return None
    rng = f"[{low}, {high}]" if high is not None else f">= {low}"
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        raise FlowpruneError(f"{name} must be an integer {'in ' if high is not None else ''}{rng}, got {value!r}")
    return value


def check_float(name: str, value: object, low: float, high: float = math.inf, *, low_open: bool = False,
                high_open: bool = False, allow_none: bool = False) -> float | None:
    """A finite number option in the interval, else a FlowpruneError naming it (NaN and inf refused)."""
    if value is None and allow_none:
        return None
    lb, rb = "(" if low_open else "[", ")" if high_open else "]"
    rng = f"{lb}{low:g}, {high:g}{rb}" if math.isfinite(high) else f"{lb}{low:g}, inf)"
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise FlowpruneError(f"{name} must be a finite number in {rng}, got {value!r}") from None
    ok = math.isfinite(v) and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        raise FlowpruneError(f"{name} must be a finite number in {rng}, got {value!r}")
    return v


def check_out_path(out: str) -> Path:
    """Check ``--out`` without creating anything: it must be a directory path that can be created."""
    if not isinstance(out, str) or not out.strip():
        raise FlowpruneError(f"--out must be a directory path, got {out!r}")
    if "\x00" in out:
        raise FlowpruneError(f"--out {out!r} holds a NUL character; pick a directory path")
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise FlowpruneError(f"--out {out!r} exists and is not a directory; pick a directory path")
    parent = p
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise FlowpruneError(f"--out {out!r} cannot be created: {str(parent)!r} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise FlowpruneError(f"--out {out!r} cannot be written: no write permission in {str(parent)!r}")
    return p


def check_out_dir(out: str) -> Path:
    """Check ``--out`` and create it (commands that do not use :func:`open_run`)."""
    p = check_out_path(out)
    p.mkdir(parents=True, exist_ok=True)
    return p


# ------------------------------------------------------------------------------ the run state


def _flag(key: str) -> str:
    return key if key == "action" else "--" + key.replace("_", "-")


def run_options(args: argparse.Namespace) -> dict:
    """The options that decide what a run computes (JSON-safe), from the parsed arguments."""
    opts = {}
    for k, v in sorted(vars(args).items()):
        if k in NOT_OPTIONS or k.startswith("_") or k == "out":
            continue
        if k == "amp" and v in (None, "none"):  # the default: runs recorded before --amp existed still match
            continue
        opts[k] = v if isinstance(v, (str, int, float, bool, type(None))) else str(v)
    return json.loads(json.dumps(opts))


class RunState:
    """The record of one command's run in ``OUT/flowprune_run.json`` (see :func:`open_run`)."""

    def __init__(self, out: Path, state: dict, *, finished: bool, resumed: bool):
        self.out, self.state, self.finished, self.resumed = out, state, finished, resumed

    def _write(self) -> None:
        tmp = self.out / (RUN_STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(self.state, indent=1))
        os.replace(tmp, self.out / RUN_STATE_FILE)

    def __enter__(self) -> RunState:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        # a validation error the library raised before doing any work: leave OUT as it was
        if exc_type is not None and issubclass(exc_type, FlowpruneError) and self.state.get("starts") == 1:
            self._undo_if_empty()
        return False

    def _undo_if_empty(self) -> None:
        files = [f for f in self.out.rglob("*") if not f.is_dir()]
        if any(f.name != RUN_STATE_FILE or f.parent != self.out for f in files):
            return
        (self.out / RUN_STATE_FILE).unlink(missing_ok=True)
        for d in sorted((f for f in self.out.rglob("*") if f.is_dir()), key=lambda f: -len(f.parts)):
            d.rmdir()
        if self.state.get("created_out"):
            self.out.rmdir()

    def finish(self) -> None:
        """Mark the run finished (call after results.json and the model are written)."""
        self.state["status"] = "finished"
        self.state["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._write()
        self.finished = True


def read_run_state(out: str | os.PathLike) -> dict | None:
    f = Path(out) / RUN_STATE_FILE
    if not f.exists():
        return None
    try:
        state = json.loads(f.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        raise FlowpruneError(f"{f} is corrupt; pass --overwrite to start fresh in {str(Path(out))!r}") from None
    if not isinstance(state, dict) or not isinstance(state.get("options"), dict):
        raise FlowpruneError(f"{f} is not a flowprune run state; pass --overwrite to start fresh")
    return state


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:  # pragma: no cover
        return False


def open_run(args: argparse.Namespace, *, inputs: tuple[tuple[str, str | None], ...] = (),
             command: str | None = None) -> RunState:
    """Start (or resume) the run of ``args.command`` in ``args.out``: the first write to OUT.

    Call it after every value has been validated and the inputs have been loaded, so bad input
    leaves nothing in OUT. ``inputs`` are ``(option, path)`` pairs that OUT must not be (or hold).

    * OUT new or without a run-state file: the run starts (OUT holding a ``results.json`` of an
      unknown earlier run is refused unless ``--overwrite``).
    * Same command and options: an unfinished run resumes (``resumed``; the command's
      checkpoints in OUT are picked up), a finished one is reported and ``finished`` is True.
    * Other command or options: FlowpruneError naming the options that differ and ``--overwrite``.
    * ``--overwrite``: earlier outputs in OUT are removed and the run starts fresh.
    """
    command = command or getattr(args, "command", None) or "run"
    out = check_out_path(args.out)
    for opt, path in inputs:
        if path is None or not out.exists() or not Path(path).exists():
            continue
        ip = Path(path)
        if _same_dir(out, ip if ip.is_dir() else ip.parent):
            raise FlowpruneError(f"--out {args.out!r} is the {opt} directory; writing there would replace the "
                                 f"input model: pick another --out")
    opts = run_options(args)
    overwrite = bool(getattr(args, "overwrite", False))
    existed = out.exists() and any(out.iterdir())
    state = read_run_state(out) if out.exists() and not overwrite else None
    if overwrite and out.exists():
        _clear(out)
        existed = any(out.iterdir())
    resumed = finished = False
    if state is not None:
        if state.get("command") != command:
            raise FlowpruneError(f"--out {args.out!r} holds a `flowprune {state.get('command')}` run; pick another "
                                 f"--out for `flowprune {command}`, or pass --overwrite to replace it")
        old = state["options"]
        diff = sorted(k for k in set(old) | set(opts) if old.get(k, "<unset>") != opts.get(k, "<unset>"))
        if diff:
            parts = ", ".join(f"{_flag(k)} {old.get(k, '<unset>')!r} -> {opts.get(k, '<unset>')!r}" for k in diff[:6])
            raise FlowpruneError(f"--out {args.out!r} holds a {state.get('status', 'earlier')} run with other options "
                                 f"({parts}); pass --overwrite to start fresh, or pick another --out")
        if state.get("status") == "finished":
            finished = True
            print(f"flowprune: {args.out} already holds this finished run (same options; results.json); "
                  "nothing to do. Pass --overwrite to run it again.")
        else:
            state["starts"] = int(state.get("starts", 1)) + 1
            if getattr(args, "no_resume", False):
                print(f"flowprune: --no-resume: starting the run in {args.out} over", file=sys.stderr)
            else:
                resumed = True
                print(f"flowprune: resuming the interrupted run in {args.out} (start {state['starts']}; "
                      "finished checkpoints are kept)", file=sys.stderr)
    else:
        if out.exists() and (out / "results.json").exists():
            raise FlowpruneError(f"--out {args.out!r} holds results.json of an earlier run with unknown options; "
                                 "pass --overwrite to replace it, or pick another --out")
        state = {"format": "flowprune-run", "command": command, "options": opts, "status": "running", "starts": 1,
                 "created_out": not existed,
                 "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out.mkdir(parents=True, exist_ok=True)
    run = RunState(out, state, finished=finished, resumed=resumed)
    if not finished:
        run._write()
    return run


def _clear(out: Path) -> None:
    """Remove an earlier run's outputs from OUT (everything if the run created OUT)."""
    try:
        prev = read_run_state(out)
    except FlowpruneError:
        prev = None
    if prev is not None and prev.get("created_out"):
        for child in out.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        return
    for name in KNOWN_OUTPUTS:
        f = out / name
        if f.is_dir() and not f.is_symlink():
            shutil.rmtree(f)
        elif f.exists() or f.is_symlink():
            f.unlink()
    for f in out.glob("gamma_*"):
        if f.is_dir():
            shutil.rmtree(f)


# ------------------------------------------------------------------------------ models


def load_model_arg(path: str, what: str = "--checkpoint"):
    """Load a saved model given on the command line, with an error that names the option."""
    from flowprune.io import load

    if not isinstance(path, str) or not path:
        raise FlowpruneError(f"{what} must be a directory written by `flowprune train --out DIR`, got {path!r}")
    if not Path(path).exists():
        raise FlowpruneError(f"{what} {path!r} does not exist; pass a directory written by `flowprune train --out DIR`")
    try:
        model = load(path)
    except FlowpruneError as e:
        raise FlowpruneError(f"{what} {path!r}: {e}") from None
    from flowprune.device import current

    dev = current()  # the command's --device
    return model.to(dev) if dev is not None else model


def check_data_fits_model(model, data: DataSplits, what: str = "model") -> None:
    base = getattr(model, "flowprune_base", {}) or {}
    shape = tuple(base.get("input_shape", ()))
    if shape and tuple(shape) != tuple(data.input_shape):
        raise FlowpruneError(f"{what} takes inputs of shape {shape} but data set {data.name!r} has {data.input_shape}; "
                             "use the data set the model was trained on")
    nc = base.get("num_classes")
    if nc is not None and nc < data.num_classes:
        raise FlowpruneError(f"{what} has {nc} classes but data set {data.name!r} has {data.num_classes} labels")


def add_checkpoint_arguments(p: argparse.ArgumentParser) -> None:
    """The shared model input of a command: ``--checkpoint DIR`` and an optional ``--model`` name check."""
    p.add_argument("--checkpoint", required=True,
                   help="directory written by `flowprune train --out DIR` (or another flowprune command)")
    p.add_argument("--model", default=None, help="zoo name, checked against the checkpoint (optional)")


def check_model_name(args: argparse.Namespace, model, what: str = "the checkpoint's model") -> None:
    """``--model`` (when given) must name the architecture the checkpoint holds."""
    name = (getattr(model, "flowprune_base", None) or {}).get("name")
    if getattr(args, "model", None) is not None and args.model != name:
        raise FlowpruneError(f"--model {args.model!r} does not match {what} {name!r}")


def load_checkpoint_and_data(args: argparse.Namespace):
    """The shared first step of a command: load the model (``--checkpoint``), check ``--model``,
    load the data and check that it fits the model. Returns ``(model, data)``."""
    model = load_model_arg(args.checkpoint)
    check_model_name(args, model)
    data = load_data(args)
    check_data_fits_model(model, data, "the checkpoint's model")
    return model, data


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0


def positive(name: str, value: int) -> int:
    return check_positive_int(name, value)
