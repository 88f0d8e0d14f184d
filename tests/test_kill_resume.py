"""Kill tests: SIGKILL a long command after its first checkpoint, run it again, and get the same result.

Each test starts the command in a child process (``os.fork`` of the test process, so torch is
not imported again: a fresh interpreter costs ~6 s here; one test uses a real ``python -m
flowprune`` subprocess), waits until the command has written its N-th checkpoint file (the child
blocks right after that write, so the kill always lands between two checkpoints), SIGKILLs it,
then runs the same command again in-process. The rerun must say that it resumes, finish, and
leave the same results.json numbers and bit-identical weights as an uninterrupted run of the
same command in another directory. A third run must say the run is already finished, and the
same --out with other options must be refused.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
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


def _hook(marker: str, suffix: str, count: int, parent: str | None = None):
    """In the child: after the ``count``-th os.replace onto a file ending in ``suffix``, touch ``marker`` and wait."""
    real = os.replace
    seen = [0]

    def replace(src, dst):
        real(src, dst)
        d = Path(dst)
        if str(d).endswith(suffix) and (parent is None or d.parent.name == parent):
            seen[0] += 1
            if seen[0] == count:
                Path(marker).write_text("checkpoint written")
                time.sleep(600)

    os.replace = replace


def _run_and_kill(argv, tmp_path, suffix, count, parent=None, timeout=120.0):
    marker = tmp_path / "killed_here"
    pid = os.fork()
    if pid == 0:  # the child: run the command until the hook stops it
        code = 1
        try:
            torch.set_num_threads(1)
            _hook(str(marker), suffix, count, parent)
            code = main(argv)
        except BaseException:
            code = 1
        finally:
            os._exit(code if isinstance(code, int) else 1)
    t0 = time.time()
    try:
        while not marker.exists():
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


def _resume_and_compare(argv_fn, tmp_path, capsys, weights=(), kill=None):
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
    _resume_and_compare(argv, tmp_path, capsys, kill={"suffix": ".json", "count": 1, "parent": "runs"})


def test_kill_route_learned(models, tmp_path, capsys):
    def argv(out):
        return ["route", "--light", models["light"], "--heavy", models["lenet"], "--data", "digits",
                "--router", "learned", "--heavy-budget", "0.5", "--tolerance", "0.1", "--no-speed", "--no-sweep",
                "--no-diagnostic", "--out", str(out)]
    _resume_and_compare(argv, tmp_path, capsys, weights=("cascade/router.safetensors",),
                        kill={"suffix": "router.json", "count": 1})


def test_kill_prune_in_a_real_subprocess(models, tmp_path, capsys):
    """The same as test_kill_prune with a fresh interpreter (``python -m flowprune``-like), killed by SIGKILL."""
    out = tmp_path / "sub"
    argv = ["prune", "--checkpoint", models["lenet"], "--data", "digits", "--method", "l1", "--ratio", "0.5",
            "--steps", "2", "--finetune-epochs", "1", "--no-speed", "--threads", "1", "--no-report", "--out", str(out)]
    marker = tmp_path / "marker"
    code = textwrap.dedent(f"""
        import os, sys, time
        from pathlib import Path
        real = os.replace
        def replace(src, dst):
            real(src, dst)
            if str(dst).endswith("state.json"):
                Path({str(marker)!r}).write_text("x")
                time.sleep(600)
        os.replace = replace
        from flowprune.cli import main
        sys.exit(main({argv!r}))
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() - t0 < 180
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    steps_state = json.loads((out / "steps" / "state.json").read_text())
    assert steps_state["step"] == 1
    capsys.readouterr()
    assert main(argv) == 0
    assert "prune resumes after step 1 of 2" in capsys.readouterr().err
    assert json.loads((out / "steps" / "state.json").read_text())["step"] == 2
    io.load(out)
