"""A sweep of bad command lines: every one exits with 2, prints one line naming the value, and writes nothing.

The CLI runs in-process (``flowprune.cli.main``) for speed. Each case lists the argv (with
``{placeholders}`` for the model directories built once below) and a piece of text the one
error line must contain.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from flowprune import io
from flowprune.cli import main
from flowprune.models import build_model


def _snapshot(path):
    if not os.path.exists(path):
        return None
    if os.path.isfile(path):
        return ("file", os.path.getsize(path), os.path.getmtime(path))
    out = {}
    for root, _dirs, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, path)] = (os.path.getsize(p), os.path.getmtime(p))
    return out


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input")
    torch.manual_seed(0)
    good = io.save(build_model("lenet300", (1, 8, 8), 10, hidden=[8]), root / "good")
    wide = io.save(build_model("lenet300", (1, 28, 28), 10, hidden=[8]), root / "wide")

    def variant(name, edit_recipe=None, edit_weights=None, drop_integrity=True):
        d = root / name
        shutil.copytree(good, d)
        if edit_recipe is not None:
            r = json.loads((d / "model.json").read_text())
            if drop_integrity:
                r.pop("integrity", None)
            edit_recipe(r)
            (d / "model.json").write_text(json.dumps(r))
        if edit_weights is not None:
            b = bytearray((d / "model.safetensors").read_bytes())
            (d / "model.safetensors").write_bytes(bytes(edit_weights(b)))
        return d

    def set_kw(**kw):
        return lambda r: r["base"]["kwargs"].update(kw)

    def flip(b):
        b[-5] ^= 0xFF
        return b

    def attr(name, value):
        return lambda r: r["modules"]["body.0"]["attrs"].__setitem__(name, value)

    v = {
        "good": good, "wide": wide,
        "trunc": variant("trunc", edit_weights=lambda b: b[: len(b) // 2]),
        "trunc_header": variant("trunc_header", edit_weights=lambda b: b[:20]),
        "flipped": variant("flipped", edit_weights=flip),
        "badjson": variant("badjson"),
        "pretrained": variant("pretrained", set_kw(pretrained=True)),
        "overlay": variant("overlay", lambda r: r["base"].update(
            name="timm:resnet18", kwargs={"pretrained_cfg_overlay": {"file": "/etc/passwd"}})),
        "tv_weights": variant("tv_weights", lambda r: r["base"].update(name="tv:resnet18",
                                                                       kwargs={"weights": "IMAGENET1K_V1"})),
        "multi": variant("multi", set_kw(num_classes=5)),
        "hidden_str": variant("hidden_str", set_kw(hidden="abc")),
        "huge": variant("huge", set_kw(hidden=[100000, 100000, 100000])),
        "forward_attr": variant("forward_attr", attr("forward", "x")),
        "str_attr": variant("str_attr", attr("out_features", "eight")),
        "version": variant("version", lambda r: r.__setitem__("format_version", 99)),
        "unknown_model": variant("unknown_model", lambda r: r["base"].update(name="resnet21")),
        "edited": variant("edited", lambda r: r["modules"]["body.0"]["attrs"].__setitem__("out_features", 9),
                          drop_integrity=False),
        "empty": root / "empty",
        "file": root / "afile.txt",
        "law_bad": root / "law.json",
    }
    (v["badjson"] / "model.json").write_text('{"format": "flowprune-model", "base": ')
    v["empty"].mkdir()
    v["file"].write_text("not a directory")
    v["law_bad"].write_text("{not json")
    return v


T = ["train", "--model", "lenet300", "--data", "digits", "--epochs", "1"]
P = ["prune", "--checkpoint", "{good}", "--data", "digits", "--ratio", "0.5"]
PM = ["prune", "--data", "digits", "--ratio", "0.5", "--checkpoint"]
ID = ["idap", "--checkpoint", "{good}", "--data", "digits", "--stages", "1"]
H = ["hyperflows", "--checkpoint", "{good}", "--data", "digits"]
C = ["compare", "--checkpoint", "{good}", "--data", "digits", "--methods", "l1", "--targets", "2x"]
R = ["route", "--light", "{good}", "--heavy", "{good}", "--data", "digits"]

CASES = [
    # train: numbers
    ("epochs0", T[:-1] + ["0"], "epochs must be a positive integer, got 0"),
    ("epochs-neg", T[:-1] + ["-3"], "-3"),
    ("epochs-text", T[:-1] + ["abc"], "'abc'"),
    ("epochs-float", T[:-1] + ["1.5"], "'1.5'"),
    ("lr-nan", T + ["--lr", "nan"], "lr must be a positive number, got nan"),
    ("lr-inf", T + ["--lr", "inf"], "got inf"),
    ("lr-neg", T + ["--lr", "-0.1"], "got -0.1"),
    ("lr-zero", T + ["--lr", "0"], "got 0.0"),
    ("batch0", T + ["--batch-size", "0"], "batch_size must be a positive integer, got 0"),
    ("wd-nan", T + ["--weight-decay", "nan"], "weight_decay must be a finite number >= 0, got nan"),
    ("wd-neg", T + ["--weight-decay", "-1"], "weight_decay"),
    ("ls-big", T + ["--label-smoothing", "1.5"], "label_smoothing must lie in [0.0, 1.0), got 1.5"),
    ("ls-nan", T + ["--label-smoothing", "nan"], "label_smoothing"),
    ("valfrac-nan", T + ["--val-fraction", "nan"], "val_fraction"),
    ("valfrac-neg", T + ["--val-fraction", "-0.1"], "val_fraction"),
    ("testfrac-inf", T + ["--test-fraction", "inf"], "test_fraction"),
    ("fractions-sum", T + ["--val-fraction", "0.5", "--test-fraction", "0.5"], "below 1"),
    ("seed-neg", T + ["--seed", "-1"], "seed must be an integer in [0, 2147483647], got -1"),
    ("seed-huge", T + ["--seed", "99999999999"], "99999999999"),
    ("optimizer", T + ["--optimizer", "lion"], "unknown optimizer 'lion'"),
    ("threads0", ["--threads", "0"] + T, "--threads must be an integer in [1, 1024], got '0'"),
    ("threads0-sub", T + ["--threads", "0"], "--threads must be an integer in [1, 1024], got '0'"),
    ("threads-neg", T + ["--threads", "-2"], "'-2'"),
    ("threads-huge", T + ["--threads", "100000"], "'100000'"),
    ("threads-text", T + ["--threads", "many"], "'many'"),
    # train: names, data and --out
    ("model-unknown", ["train", "--model", "resnet21", "--data", "digits"], "unknown model 'resnet21'"),
    ("model-tv-unknown", ["train", "--model", "tv:resnet999", "--data", "digits"], "tv:resnet999"),
    ("model-timm-unknown", ["train", "--model", "timm:no_such_net", "--data", "digits"], "timm:no_such_net"),
    ("model-shape", ["train", "--model", "cnn1d", "--data", "digits"], "cnn1d"),
    ("data-unknown", ["train", "--model", "lenet300", "--data", "cifar9"], "unknown data set 'cifar9'"),
    ("data-imagefolder-missing", T[:3] + ["--data", "imagefolder:/does/not/exist"], "/does/not/exist"),
    ("data-fashion-missing", T[:3] + ["--data", "fashion", "--data-root", "/does/not/exist"],
     "apt-get install -y dataset-fashion-mnist"),
    ("on-bad-image", T + ["--on-bad-image", "maybe"], "'maybe'"),
    ("out-is-file", T + ["--out", "{file}"], "is not a directory"),
    ("out-under-file", T + ["--out", "{file}/sub"], "is a file"),
    ("unknown-option-sub", T + ["--bogus"], "--bogus"),
    # prune
    ("ratio-nan", P[:-1] + ["nan"], "ratio must lie in [0.0, 1.0), got nan"),
    ("ratio-one", P[:-1] + ["1.0"], "ratio must lie in [0.0, 1.0), got 1.0"),
    ("ratio-neg", P[:-1] + ["-0.5"], "got -0.5"),
    ("target-nan", P[:-2] + ["--target-macs", "nanx"], "nanx"),
    ("target-inf", P[:-2] + ["--target-macs", "infx"], "infx"),
    ("target-below-1", P[:-2] + ["--target-macs", "0.5x"], "0.5"),
    ("target-unreachable", P[:-2] + ["--target-macs", "1000x"], "cannot be reached"),
    ("steps0", P + ["--steps", "0"], "steps must be a positive integer or 'auto', got '0'"),
    ("calib0", P + ["--calib-batches", "0"], "calib_batches must be a positive integer, got 0"),
    ("calib-bs-neg", P + ["--calib-batch-size", "-1"], "calib_batch_size"),
    ("ft-neg", P + ["--finetune-epochs", "-1"], "finetune_epochs must be an integer >= 0, got -1"),
    ("prune-lr-nan", P + ["--lr", "nan"], "lr must be a positive number, got nan"),
    ("round-to0", P + ["--round-to", "0"], "round_to"),
    ("min-width0", P + ["--min-width", "0"], "min_width"),
    ("method", ["prune", "--checkpoint", "{good}", "--data", "digits", "--method", "nope", "--ratio", "0.5"],
     "unknown method 'nope'"),
    ("schedule", P + ["--schedule", "zigzag"], "zigzag"),
    ("budget", P + ["--budget", "sideways"], "sideways"),
    ("prune-seed-neg", P + ["--seed", "-5"], "got -5"),
    # prune: missing, corrupt and hostile model directories
    ("ckpt-missing", PM + ["{good}_nowhere"], "does not exist"),
    ("ckpt-empty", PM + ["{empty}"], "has no model.json"),
    ("ckpt-file", PM + ["{file}"], "is not a saved flowprune model"),
    ("ckpt-truncated", PM + ["{trunc}"], "model.safetensors"),
    ("ckpt-truncated-header", PM + ["{trunc_header}"], "model.safetensors"),
    ("ckpt-flipped-bytes", PM + ["{flipped}"], "SHA-256"),
    ("ckpt-corrupt-json", PM + ["{badjson}"], "corrupt or truncated JSON"),
    ("ckpt-pretrained", PM + ["{pretrained}"], "base.kwargs['pretrained'] is not an allowed option"),
    ("ckpt-overlay-path", PM + ["{overlay}"], "pretrained_cfg_overlay"),
    ("ckpt-tv-weights", PM + ["{tv_weights}"], "base.kwargs['weights']"),
    ("ckpt-multiple-values", PM + ["{multi}"], "base.kwargs['num_classes']"),
    ("ckpt-kwarg-type", PM + ["{hidden_str}"], "base.kwargs['hidden']"),
    ("ckpt-huge", PM + ["{huge}"], "hidden"),
    ("ckpt-forward-attr", PM + ["{forward_attr}"], "attrs['forward'] is not a registered shape attribute"),
    ("ckpt-attr-type", PM + ["{str_attr}"], "attrs['out_features']"),
    ("ckpt-version", PM + ["{version}"], "unknown format_version 99"),
    ("ckpt-model-name", PM + ["{unknown_model}"], "resnet21"),
    ("ckpt-edited", PM + ["{edited}"], "architecture_sha256"),
    ("ckpt-wrong-data", PM + ["{wide}"], "(1, 28, 28)"),
    ("out-is-checkpoint", P + ["--out", "{good}"], "is the --checkpoint directory"),
    # idap
    ("maxdrop-nan", ID + ["--max-drop", "nan"], "max_drop must be a finite number >= 0, got nan"),
    ("maxdrop-neg", ID + ["--max-drop", "-0.1"], "-0.1"),
    ("p0-big", ID + ["--p0", "2"], "p0 must lie in (0, 1), got 2.0"),
    ("p0-nan", ID + ["--p0", "nan"], "p0"),
    ("T0", ID + ["--T", "0"], "T must be a positive integer, got 0"),
    ("alpha-inf", ID + ["--alpha", "inf"], "alpha must be a finite number, got inf"),
    ("retry-factor", ID + ["--retry-factor", "1.5"], "retry_factor must lie in (0, 1)"),
    ("stages", ID[:-1] + ["3"], "--stages '3'"),
    ("idap-lr-inf", ID + ["--lr", "inf"], "lr must be a positive number, got inf"),
    ("recover0", ID + ["--recover-epochs", "0"], "recover_epochs must be a positive integer, got 0"),
    ("idap-ckpt-corrupt", ["idap", "--data", "digits", "--checkpoint", "{trunc}"], "model.safetensors"),
    # hyperflows
    ("sparsity-big", H + ["--target-sparsity", "1.2"], "1.2"),
    ("sparsity-nan", H + ["--target-sparsity", "nan"], "target_sparsity"),
    ("hf-epochs0", H + ["--epochs", "0"], "got 0"),
    ("mask-lr-nan", H + ["--mask-lr", "nan"], "mask_lr"),
    ("gamma0-neg", H + ["--gamma0", "-1"], "gamma0"),
    ("gammas-neg", ["hyperflows", "sweep", "--checkpoint", "{good}", "--data", "digits", "--gammas", "1,-1"],
     "--gammas needs at least two positive finite pressures, got '1,-1'"),
    ("gammas-nan", ["hyperflows", "sweep", "--checkpoint", "{good}", "--data", "digits", "--gammas", "1,nan"],
     "'1,nan'"),
    ("law-missing", H + ["--law", "{empty}/none.json"], "--law"),
    ("law-corrupt", H + ["--law", "{law_bad}"], "law.json"),
    ("hf-batch0", H + ["--batch-size", "0"], "batch_size"),
    ("hf-updates0", H + ["--updates-per-epoch", "0"], "updates_per_epoch"),
    ("hf-dense-epochs", ["hyperflows", "--model", "lenet300", "--data", "digits", "--dense-epochs", "0"],
     "--dense-epochs"),
    # compare
    ("seeds0", C + ["--seeds", "0"], "--seeds must be an integer in [1, 1000], got 0"),
    ("seeds-nan", C + ["--seeds", "nan"], "'nan'"),
    ("targets-nan", C[:-1] + ["2x,nanx"], "nanx"),
    ("methods", C[:-3] + ["agf,nope", "--targets", "2x"], "unknown method 'nope'"),
    ("ft-lr-nan", C + ["--finetune-lr", "nan"], "lr must be a positive number, got nan"),
    ("tp-mode", C + ["--tp-mode", "sideways"], "sideways"),
    ("ft-batches0", C + ["--finetune-batches", "0"], "--finetune-batches must be an integer >= 1, got 0"),
    ("compare-no-model", ["compare", "--data", "digits"], "give --checkpoint DIR"),
    ("compare-targets-inf", C[:-1] + ["infx"], "infx"),
    ("compare-calib-bs0", C + ["--calib-batch-size", "0"], "--calib-batch-size must be an integer >= 1, got 0"),
    ("compare-scratch-neg", C + ["--scratch-epochs", "-1"], "--scratch-epochs must be an integer >= 0, got -1"),
    ("compare-epochs0", C + ["--epochs", "0"], "--epochs must be an integer >= 1, got 0"),
    ("compare-lr-inf", C + ["--lr", "inf"], "lr must be a positive number, got inf"),
    ("compare-seed-neg", C + ["--seed", "-1"], "got -1"),
    # more idap and hyperflows numbers
    ("idap-output-error-nan", ID + ["--max-output-error", "nan"], "max_output_error"),
    ("idap-target-macs-nan", ID + ["--target-macs", "nan"], "target_macs"),
    ("idap-target-params-inf", ID + ["--target-params", "inf"], "target_params"),
    ("idap-retry-nan", ID + ["--retry-factor", "nan"], "retry_factor"),
    ("idap-retries-neg", ID + ["--max-retries", "-1"], "max_retries must be an integer >= 0, got -1"),
    ("idap-recover-batches0", ID + ["--recover-batches", "0"], "recover_batches must be a positive integer, got 0"),
    ("idap-s2-batches-neg", ID + ["--stage2-recover-batches", "-1"], "stage2_recover_batches"),
    ("idap-final-neg", ID + ["--final-epochs", "-1"], "final_epochs must be an integer >= 0, got -1"),
    ("idap-max-steps0", ID + ["--max-steps", "0"], "max_steps must be a positive integer, got 0"),
    ("prune-final-ft-neg", P + ["--final-finetune-epochs", "-2"], "final_finetune_epochs"),
    ("hf-lr-nan", H + ["--lr", "nan"], "lr"),
    ("hf-regrow-neg", H + ["--regrow-epochs", "-1"], "regrow_epochs"),
    ("hf-gammas-inf", ["hyperflows", "sweep", "--checkpoint", "{good}", "--data", "digits", "--gammas", "1,inf"],
     "'1,inf'"),
    ("hf-seed-neg", H + ["--seed", "-3"], "-3"),
    # route
    ("learned-hidden0", R + ["--router", "learned", "--learned-hidden", "0"], "learned_hidden must be a positive integer"),
    ("route-seed-neg", R + ["--seed", "-1"], "got -1"),
    ("budget-big", R + ["--heavy-budget", "1.5"], "heavy_budget must lie in [0.0, 1.0], got 1.5"),
    ("budget-nan", R + ["--heavy-budget", "nan"], "heavy_budget"),
    ("route-maxdrop-inf", R + ["--max-drop", "inf"], "max_drop"),
    ("tolerance0", R + ["--tolerance", "0"], "tolerance must lie in (0.0, 1.0], got 0.0"),
    ("tolerance-nan", R + ["--tolerance", "nan"], "tolerance"),
    ("router-choice", R + ["--router", "agf"], "'agf'"),
    ("learned-fraction", R + ["--router", "learned", "--learned-fraction", "1.0"], "learned_fraction"),
    ("light-missing", ["route", "--light", "{good}_x", "--heavy", "{good}", "--data", "digits"], "--light"),
    ("heavy-corrupt", ["route", "--light", "{good}", "--heavy", "{trunc}", "--data", "digits"], "--heavy"),
    ("out-is-light", R + ["--out", "{good}"], "is the --light directory"),
]


# argparse errors of the top-level parser (options before the command, unknown options) print a usage
# line too until cli.py's build_parser calls ``setup_parser(parser, overwrite=False)`` on it.
TOP_LEVEL = {"threads0", "unknown-option-sub"}


def _top_level_one_line() -> bool:
    from flowprune.cli import build_parser

    return build_parser().error.__name__ == "error" and not hasattr(build_parser().error, "__self__")


def _fill(argv, dirs):
    return [a.format(**{k: str(v) for k, v in dirs.items()}) for a in argv]


@pytest.mark.parametrize("name, argv, needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input(name, argv, needle, dirs, tmp_path, capsys):
    if name in TOP_LEVEL and not _top_level_one_line():
        pytest.xfail("cli.py's top-level parser still prints a usage line")
    argv = _fill(argv, dirs)
    if "--out" not in argv:
        argv = argv + ["--out", str(tmp_path / "out")]
    out = argv[argv.index("--out") + 1]
    before = _snapshot(out)
    inputs = {k: _snapshot(str(v)) for k, v in dirs.items()}
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse errors
        rc = e.code
    cap = capsys.readouterr()
    lines = [ln for ln in cap.err.splitlines() if ln.strip()]
    assert rc == 2, (rc, cap.err)
    assert "Traceback" not in cap.err
    assert len(lines) == 1, cap.err
    assert needle in lines[0], lines[0]
    assert _snapshot(out) == before, "something was written to --out"
    assert {k: _snapshot(str(v)) for k, v in dirs.items()} == inputs, "an input was changed"


def test_case_count():
    assert len(CASES) >= 40


# ------------------------------------------------------------------------------ unreadable images


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(0)
    for c in ("cat", "dog"):
        (root / c).mkdir()
        for i in range(6):
            arr = (torch.rand(10, 10, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(root / c / f"{i}.png")
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (root / "cat" / "truncated.jpg").write_bytes((root / "cat" / "0.png").read_bytes()[:40])
    return root


def test_unreadable_images_are_skipped_with_a_count(image_dir):
    from flowprune.data import load_dataset

    with pytest.warns(UserWarning, match="skipped 2 unreadable image"):
        d = load_dataset(f"imagefolder:{image_dir}", image_size=8, val_fraction=0.2, test_fraction=0.2)
    assert d.info["skipped_images"] == 2 and sum(d.sizes().values()) == 12


def test_unreadable_image_error_names_the_file(image_dir):
    from flowprune.data import load_dataset
    from flowprune.errors import FlowpruneError

    with pytest.raises(FlowpruneError, match=r"(broken\.png|truncated\.jpg)"):
        load_dataset(f"imagefolder:{image_dir}", image_size=8, on_bad_image="error")
    with pytest.raises(FlowpruneError, match="on_bad_image"):
        load_dataset(f"imagefolder:{image_dir}", on_bad_image="ignore")


def test_cli_on_bad_image_error_is_one_line(image_dir, tmp_path, capsys):
    rc = main(["train", "--model", "lenet300", "--data", f"imagefolder:{image_dir}", "--on-bad-image", "error",
               "--epochs", "1", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "cannot be read" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------ --out with an earlier run


def test_out_with_other_options_is_refused_and_overwrite_starts_fresh(dirs, tmp_path, capsys):
    out = tmp_path / "o"
    base = ["train", "--model", "lenet300", "--data", "digits", "--epochs", "1", "--no-speed", "--no-report",
            "--out", str(out)]
    assert main(base) == 0
    before = _snapshot(str(out))
    capsys.readouterr()
    assert main(base + ["--batch-size", "64", "--seed", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--batch-size 128 -> 64" in err and "--seed 0 -> 3" in err
    assert "--overwrite" in err and _snapshot(str(out)) == before
    assert main(["prune", "--checkpoint", str(dirs["good"]), "--data", "digits", "--ratio", "0.5",
                 "--out", str(out)]) == 2
    assert "holds a `flowprune train` run" in capsys.readouterr().err
    assert main(base) == 0 and "already holds this finished run" in capsys.readouterr().out
    assert _snapshot(str(out)) == before
    assert main(base + ["--batch-size", "64", "--overwrite"]) == 0
    state = json.loads((out / "flowprune_run.json").read_text())
    assert state["options"]["batch_size"] == 64 and state["status"] == "finished" and state["starts"] == 1


def test_out_with_results_of_an_unknown_run_is_refused(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "results.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    argv = ["train", "--model", "lenet300", "--data", "digits", "--epochs", "1", "--no-speed", "--no-report",
            "--out", str(out)]
    assert main(argv) == 2
    assert "results.json of an earlier run" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite removes only flowprune's outputs
