"""Kill tests: SIGKILL a long command after a checkpoint or in the middle of writing one, run it
again, and get the same result.

Each test starts the command in a child process (``os.fork`` of the test process, so torch is
not imported again: a fresh interpreter costs ~6 s here; one test uses a real ``python -m
flowprune`` subprocess), waits until the command has written its N-th checkpoint file (the child
blocks right after that write, or, for the ``during`` tests, after the temporary file is written
and before its rename), SIGKILLs it, then runs the same command again in-process. The rerun must
say that it resumes, finish, and leave the same results.json numbers (and run files) and
bit-identical weights as an uninterrupted run of the same command in another directory. A third run must say the run is already finished, and the
same --out with other options must be refused.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowprune import io
from flowprune.cli import main
from flowprune.models import build_model

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

VOLATILE = ("second", "time", "latency", "throughput", "speed", "started", "finished_at", "saved_cascade",
            "checkpoint", "ms_b", "per_s", "overhead")


def _clean(v):
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items() if not any(s in k for s in VOLATILE)}
    if isinstance(v, list):
        return [_clean(x) for x in v]
    return v


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill_models")
    torch.manual_seed(0)
    return {"lenet": str(io.save(build_model("lenet300", (1, 8, 8), 10, hidden=[64, 32]), root / "lenet")),
            "light": str(io.save(build_model("lenet300", (1, 8, 8), 10, hidden=[16]), root / "light")),
            "r20": str(io.save(build_model("resnet20", (1, 8, 8), 10), root / "r20"))}


def _hook(marker: str, suffix: str, count: int, parent: str | None = None, when: str = "after"):
    """In the child: at the ``count``-th os.replace onto a file ending in ``suffix``, write ``marker``
    and wait for the kill: ``after`` the rename (a checkpoint was just written) or ``during`` the
    write (the temporary file is complete, the rename has not happened). The marker holds the
    temporary file's path."""
    real = os.replace
    seen = [0]

    def replace(src, dst):
        d = Path(dst)
        hit = str(d).endswith(suffix) and (parent is None or d.parent.name == parent)
        if hit:
            seen[0] += 1
        if hit and seen[0] == count and when == "during":
            Path(marker).write_text(str(src))
            time.sleep(600)
        real(src, dst)
        if hit and seen[0] == count:
            Path(marker).write_text(str(src))
            time.sleep(600)

    os.replace = replace


def _run_and_kill(argv, tmp_path, suffix, count, parent=None, when="after", timeout=120.0):
    marker = tmp_path / "killed_here"
    pid = os.fork()
    if pid == 0:  # the child: run the command until the hook stops it
        code = 1
        try:
            torch.set_num_threads(1)
            _hook(str(marker), suffix, count, parent, when)
            code = main(argv)
        except BaseException:
            code = 1
        finally:
            os._exit(code if isinstance(code, int) else 1)
    t0 = time.time()
    try:
        while not (marker.exists() and marker.read_text()):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                pytest.fail(f"the command ended (status {status}) before writing checkpoint {count} ({suffix})")
            if time.time() - t0 > timeout:
                pytest.fail(f"no checkpoint {suffix} within {timeout} s")
            time.sleep(0.01)
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
    if when == "during":  # killed between the temporary write and the rename: the temporary file is left
        assert Path(marker.read_text()).exists(), marker.read_text()


def _same_json_files(a: Path, b: Path, pattern: str) -> None:
    """Every JSON file ``pattern`` under ``a`` is under ``b`` with the same (non-volatile) content."""
    fa, fb = sorted(p.relative_to(a) for p in a.glob(pattern)), sorted(p.relative_to(b) for p in b.glob(pattern))
    assert fa and fa == fb
    for f in fa:
        assert _clean(json.loads((a / f).read_text())) == _clean(json.loads((b / f).read_text())), f


def _resume_and_compare(argv_fn, tmp_path, capsys, weights=(), kill=None, json_files=()):
    killed, ref = tmp_path / "killed", tmp_path / "ref"
    # the killed child runs 1 torch thread; the resume and the reference run here must too, or the weights
    # differ in the last bits under a 2-thread suite (tests/conftest.py restores the count afterwards)
    torch.set_num_threads(1)
    inner = argv_fn

    def argv_fn(out):  # the HTML report (matplotlib) is not what these tests are about
        return inner(out) + ["--no-report"]
    _run_and_kill(argv_fn(killed), tmp_path, **kill)
    state = json.loads((killed / "flowprune_run.json").read_text())
    assert state["status"] == "running" and state["starts"] == 1
    capsys.readouterr()
    assert main(argv_fn(killed)) == 0
    err = capsys.readouterr().err
    assert "resum" in err, err
    state = json.loads((killed / "flowprune_run.json").read_text())
    assert state["status"] == "finished" and state["starts"] == 2
    assert main(argv_fn(ref)) == 0
    res_k = json.loads((killed / "results.json").read_text())
    res_r = json.loads((ref / "results.json").read_text())
    assert _clean(res_k) == _clean(res_r)
    for pattern in json_files:
        _same_json_files(killed, ref, pattern)
    for w in weights:
        a, b = load_file(str(killed / w)), load_file(str(ref / w))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (w, k)
    # a third run: already finished; other options: refused, naming them
    capsys.readouterr()
    assert main(argv_fn(killed)) == 0
    assert "already holds this finished run" in capsys.readouterr().out
    return killed, res_k


def test_kill_train(tmp_path, capsys):
    def argv(out):
        return ["train", "--model", "lenet300", "--data", "digits", "--epochs", "3", "--lr", "0.1", "--no-speed",
                "--out", str(out)]
    out, res = _resume_and_compare(argv, tmp_path, capsys, weights=("model.safetensors",),
                                   kill={"suffix": "checkpoint.pt", "count": 1})
    assert [e["epoch"] for e in res["history"]] == [1, 2, 3]
    capsys.readouterr()
    assert main(argv(out)[:-2] + ["--lr", "0.2", "--out", str(out), "--no-report"]) == 2
    err = capsys.readouterr().err
    assert "--lr 0.1 -> 0.2" in err and "--overwrite" in err


def test_kill_prune(models, tmp_path, capsys):
    def argv(out):
        return ["prune", "--checkpoint", models["lenet"], "--data", "digits", "--method", "l1", "--ratio", "0.5",
                "--steps", "3", "--finetune-epochs", "1", "--no-speed", "--out", str(out)]
    out, res = _resume_and_compare(argv, tmp_path, capsys, weights=("model.safetensors",),
                                   kill={"suffix": "state.json", "count": 1})
    assert len(res["history"]) == 3
    # --overwrite starts fresh and ends with the same model
    capsys.readouterr()
    assert main(argv(out) + ["--overwrite", "--no-report"]) == 0
    assert "resum" not in capsys.readouterr().err
    a, b = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "ref" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_kill_idap(models, tmp_path, capsys):
    def argv(out):
        return ["idap", "--checkpoint", models["lenet"], "--data", "digits", "--stages", "1", "--T", "3",
                "--max-steps", "3", "--recover-epochs", "1", "--max-drop", "0.9", "--out", str(out)]
    _resume_and_compare(argv, tmp_path, capsys, weights=("model/model.safetensors",),
                        kill={"suffix": "idap_state.json", "count": 1})


def test_kill_hyperflows(models, tmp_path, capsys):
    def argv(out):
        return ["hyperflows", "--checkpoint", models["lenet"], "--data", "digits", "--target-sparsity", "0.7",
                "--epochs", "4", "--regrow-epochs", "1", "--no-speed", "--out", str(out)]
    _resume_and_compare(argv, tmp_path, capsys, weights=("model.safetensors",),
                        kill={"suffix": "hyperflows.pt", "count": 2})


def test_kill_compare(models, tmp_path, capsys):
    def argv(out):
        return ["compare", "--checkpoint", models["lenet"], "--data", "digits", "--methods", "l1,random",
                "--targets", "2x", "--seeds", "1", "--finetune-epochs", "1", "--calib-batches", "2",
                "--scratch-epochs", "0", "--no-speed", "--out", str(out)]
    _resume_and_compare(argv, tmp_path, capsys, kill={"suffix": ".json", "count": 1, "parent": "runs"},
                        json_files=("runs/*.json",))


# ---------------------------------------------------------------- killed during a checkpoint write
# Each long command, SIGKILLed between the temporary write of a checkpoint and its rename (the
# hook holds os.replace), resumes from the checkpoint before it and ends with the weights and
# results of an uninterrupted run.
def _argv_train(models, out):
    return ["train", "--model", "lenet300", "--data", "digits", "--epochs", "3", "--lr", "0.1", "--no-speed",
            "--out", str(out)]


def _argv_prune(models, out):
    return ["prune", "--checkpoint", models["lenet"], "--data", "digits", "--method", "l1", "--ratio", "0.5",
            "--steps", "3", "--finetune-epochs", "1", "--no-speed", "--out", str(out)]


def _argv_idap(models, out):
    return ["idap", "--checkpoint", models["lenet"], "--data", "digits", "--stages", "1", "--T", "3",
            "--max-steps", "3", "--recover-epochs", "1", "--max-drop", "0.9", "--out", str(out)]


def _argv_hyperflows(models, out):
    return ["hyperflows", "--checkpoint", models["lenet"], "--data", "digits", "--target-sparsity", "0.7",
            "--epochs", "4", "--regrow-epochs", "1", "--no-speed", "--out", str(out)]


def _argv_compare(models, out):  # trains its dense model (OUT/dense: weights to compare) and prunes it
    return ["compare", "--model", "lenet300", "--epochs", "2", "--data", "digits", "--methods", "l1,random",
            "--targets", "2x", "--seeds", "1", "--finetune-epochs", "1", "--calib-batches", "2",
            "--scratch-epochs", "0", "--no-speed", "--out", str(out)]


def _argv_route(models, out):
    return ["route", "--light", models["light"], "--heavy", models["lenet"], "--data", "digits",
            "--router", "learned", "--heavy-budget", "0.5", "--tolerance", "0.1", "--no-speed", "--no-sweep",
            "--no-diagnostic", "--out", str(out)]


DURING = {  # command: (argv, the write to interrupt, weights compared, JSON files compared)
    "train": (_argv_train, {"suffix": "checkpoint.pt", "count": 2}, ("model.safetensors",), ()),
    # io.save of step 2: the new weights are in place, the new recipe (the commit point) is not
    "prune": (_argv_prune, {"suffix": "model.json", "count": 1, "parent": "step_2"}, ("model.safetensors",),
              ("steps/state.json",)),
    "idap": (_argv_idap, {"suffix": "idap_state.json", "count": 2}, ("model/model.safetensors",), ()),
    "hyperflows": (_argv_hyperflows, {"suffix": "hyperflows.pt", "count": 2}, ("model.safetensors",), ()),
    "compare-dense": (_argv_compare, {"suffix": "checkpoint.pt", "count": 2, "parent": "dense"},
                      ("dense/model.safetensors",), ("runs/*.json",)),
    "compare-runs": (_argv_compare, {"suffix": ".json", "count": 2, "parent": "runs"},
                     ("dense/model.safetensors",), ("runs/*.json",)),
    "route": (_argv_route, {"suffix": "router.json", "count": 1}, ("cascade/router.safetensors",), ()),
}


@pytest.mark.parametrize("command", list(DURING))
def test_kill_during_a_checkpoint_write(command, models, tmp_path, capsys):
    argv, kill, weights, json_files = DURING[command]
    _resume_and_compare(lambda out: argv(models, out), tmp_path, capsys, weights=weights,
                        kill={**kill, "when": "during"}, json_files=json_files)


def test_kill_during_the_first_state_write_starts_fresh(models, tmp_path, capsys):
    """Killed while writing OUT/flowprune_run.json itself: nothing was done, the rerun starts and finishes."""
    killed, ref = tmp_path / "killed", tmp_path / "ref"
    _run_and_kill(_argv_train(models, killed) + ["--no-report"], tmp_path, suffix="flowprune_run.json", count=1,
                  when="during")
    assert not (killed / "flowprune_run.json").exists()
    assert main(_argv_train(models, killed) + ["--no-report"]) == 0
    assert main(_argv_train(models, ref) + ["--no-report"]) == 0
    a, b = load_file(str(killed / "model.safetensors")), load_file(str(ref / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _clean(json.loads((killed / "results.json").read_text())) == \
        _clean(json.loads((ref / "results.json").read_text()))


def test_kill_route_learned(models, tmp_path, capsys):
    def argv(out):
        return ["route", "--light", models["light"], "--heavy", models["lenet"], "--data", "digits",
                "--router", "learned", "--heavy-budget", "0.5", "--tolerance", "0.1", "--no-speed", "--no-sweep",
                "--no-diagnostic", "--out", str(out)]
    _resume_and_compare(argv, tmp_path, capsys, weights=("cascade/router.safetensors",),
                        kill={"suffix": "router.json", "count": 1})


SITECUSTOMIZE = """
import os, time
from pathlib import Path
_suffix, _count, _marker = os.environ["FP_KILL_SUFFIX"], int(os.environ["FP_KILL_COUNT"]), os.environ["FP_KILL_MARKER"]
_real, _seen = os.replace, [0]
def _replace(src, dst):
    if str(dst).endswith(_suffix):
        _seen[0] += 1
        if _seen[0] == _count:  # the temporary file is written, the rename is not done: wait for the kill
            Path(_marker).write_text(str(src))
            time.sleep(600)
    _real(src, dst)
os.replace = _replace
"""


def test_kill_prune_in_a_real_subprocess(models, tmp_path, capsys):
    """A real ``python -m flowprune prune`` child, SIGKILLed while it writes its second checkpoint
    (between the temporary file and the rename; the fault hook comes in through a sitecustomize
    module on PYTHONPATH, the command itself is unchanged), resumed, and compared with an
    uninterrupted run: the same weights, bit for bit, and the same results."""
    import flowprune

    out, ref = tmp_path / "sub", tmp_path / "ref"

    def argv(o):
        return ["prune", "--checkpoint", models["lenet"], "--data", "digits", "--method", "l1", "--ratio", "0.5",
                "--steps", "2", "--finetune-epochs", "1", "--no-speed", "--threads", "1", "--no-report",
                "--out", str(o)]
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    marker = tmp_path / "marker"
    src = str(Path(flowprune.__file__).resolve().parents[1])
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", FP_KILL_SUFFIX="state.json", FP_KILL_COUNT="2",
               FP_KILL_MARKER=str(marker),
               PYTHONPATH=os.pathsep.join([str(hook), src, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "flowprune", *argv(out)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not (marker.exists() and marker.read_text()):
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() - t0 < 180
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert Path(marker.read_text()).exists()  # killed mid-write: the temporary file is there
    assert json.loads((out / "steps" / "state.json").read_text())["step"] == 1  # the last complete state
    capsys.readouterr()
    assert main(argv(out)) == 0
    assert "prune resumes after step 1 of 2" in capsys.readouterr().err
    assert main(argv(ref)) == 0
    a, b = load_file(str(out / "model.safetensors")), load_file(str(ref / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _clean(json.loads((out / "results.json").read_text())) == \
        _clean(json.loads((ref / "results.json").read_text()))


def test_runstate_keeps_the_state_with_its_own_model(tmp_path, monkeypatch):
    """A fault between a model's write and its state's write (the rename of state.json raises)
    leaves the previous state AND the previous model: the pair a resume needs."""
    from flowprune.runstate import RunState

    rs = RunState(tmp_path, "demo", {"x": 1})
    torch.manual_seed(0)
    m1, m2 = build_model("lenet300", (1, 8, 8), 10, hidden=[8]), build_model("lenet300", (1, 8, 8), 10, hidden=[8])
    rs.save({"step": 1}, m1)
    real = os.replace

    def failing(src, dst):
        if str(dst).endswith("state.json"):
            raise OSError("disk full")
        real(src, dst)
    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError):
        rs.save({"step": 2}, m2)
    monkeypatch.setattr(os, "replace", real)
    again = RunState(tmp_path, "demo", {"x": 1})
    assert again.load() == {"step": 1, "config": {"x": 1}}
    back = again.load_model()
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), m1.state_dict().values()))
    again.save({"step": 2}, m2)  # the next save goes to the directory the state does not name
    assert again.load() == {"step": 2, "config": {"x": 1}}
    assert all(torch.equal(a, b) for a, b in zip(again.load_model().state_dict().values(), m2.state_dict().values()))
    # the state names model.alt now; the stale copy (model, the state's before) is gone
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["model.alt"]
