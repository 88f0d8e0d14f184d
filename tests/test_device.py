"""``--device`` / ``device=`` and ``--amp`` / ``amp=``: validated before any work; bf16 runs on the CPU."""

from __future__ import annotations

import pytest
import torch

from flowprune import device as fdev
from flowprune.cli import main
from flowprune.errors import FlowpruneError
from flowprune.models import build_model
from flowprune.train import TrainConfig, fit

HAS_CUDA = torch.cuda.is_available()


def _mlp(data):
    torch.manual_seed(0)
    return build_model("lenet300", data.input_shape, 10, hidden=[16, 8])


@pytest.mark.skipif(HAS_CUDA, reason="checks the machine without a GPU")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "CUDA:1"])
def test_cuda_without_gpu_is_one_clear_error(spec):
    with pytest.raises(FlowpruneError, match=r"no CUDA GPU is visible.*allowed here: auto, cpu"):
        fdev.resolve_device(spec)


@pytest.mark.parametrize("spec", ["tpu", "cuda:x", "cpu:1", "auto:0", "", 3])
def test_unknown_device_names_are_refused(spec):
    with pytest.raises(FlowpruneError, match="device"):
        fdev.resolve_device(spec)


def test_cuda_index_past_the_last_gpu():
    if not HAS_CUDA:
        pytest.skip("needs a GPU")
    n = torch.cuda.device_count()
    with pytest.raises(FlowpruneError, match="past the last GPU"):
        fdev.resolve_device(f"cuda:{n}")


def test_defaults_follow_the_model_then_the_machine(digits_data):
    m = _mlp(digits_data)
    assert fdev.resolve_device(None, m) == torch.device("cpu")  # a CPU model stays on the CPU
    assert fdev.resolve_device("cpu") == torch.device("cpu")
    auto = fdev.resolve_device("auto")
    assert auto.type == ("cuda" if HAS_CUDA else "cpu")
    with fdev.use("cpu", "bf16") as d:
        assert d == torch.device("cpu") and fdev.current() == d and fdev.default_amp() == "bf16"
        assert fdev.resolve_device(None, m) == d
    assert fdev.current() is None and fdev.default_amp() == "none"
    fdev.synchronize("cpu")  # no-op, no error
    fdev.synchronize(None)


@pytest.mark.parametrize("amp, device, needle", [
    ("fp8", "cpu", "amp must be one of none, bf16, fp16"),
    ("fp16", "cpu", "'fp16' needs a CUDA device"),
])
def test_bad_amp_is_refused(amp, device, needle):
    with pytest.raises(FlowpruneError, match=needle):
        fdev.check_amp(amp, device)


def test_bf16_autocast_trains_on_cpu(digits_data):
    cfg = TrainConfig(epochs=1, lr=0.1, batch_size=64, augment=False)
    a, b = _mlp(digits_data), _mlp(digits_data)
    ha = fit(a, digits_data, cfg, progress=False, amp="bf16", max_batches_per_epoch=5)
    hb = fit(b, digits_data, cfg, progress=False, max_batches_per_epoch=5)
    assert all(p.dtype == torch.float32 for p in a.parameters())  # weights stay float32
    la, lb = ha["epochs"][0]["loss"], hb["epochs"][0]["loss"]
    assert la == pytest.approx(lb, rel=0.05) and la != lb  # bf16 forward: close, not identical


def test_library_functions_validate_device_before_work(digits_data):
    from flowprune.pruning.structural import prune

    m = _mlp(digits_data)
    with pytest.raises(FlowpruneError, match="device 'gpu7' is not a device name"):
        prune(m, digits_data, "l1", ratio=0.5, device="gpu7")
    with pytest.raises(FlowpruneError, match="device 'tpu'"):
        fit(m, digits_data, TrainConfig(epochs=1), device="tpu", progress=False)
    if not HAS_CUDA:
        with pytest.raises(FlowpruneError, match="no CUDA GPU"):
            prune(m, digits_data, "l1", ratio=0.5, device="cuda")


@pytest.mark.parametrize("extra, needle", [
    (["--device", "tpu"], "device 'tpu' is not a device name"),
    (["--amp", "fp8"], "amp must be one of none, bf16, fp16"),
    (["--amp", "fp16", "--device", "cpu"], "'fp16' needs a CUDA device"),
] + ([] if HAS_CUDA else [(["--device", "cuda"], "no CUDA GPU is visible")]))
def test_cli_device_errors_are_one_line_and_write_nothing(tmp_path, capsys, extra, needle):
    out = tmp_path / "run"
    rc = main(["train", "--model", "lenet300", "--data", "digits", "--epochs", "1", "--out", str(out)] + extra)
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_device_cpu_and_bf16_run_and_device_is_not_a_run_option(tmp_path, capsys):
    import json

    out = tmp_path / "run"
    argv = ["train", "--model", "lenet300", "--data", "digits", "--epochs", "1", "--out", str(out), "--no-speed",
            "--no-report"]
    assert main(argv + ["--device", "cpu", "--amp", "bf16"]) == 0
    state = json.loads((out / "flowprune_run.json").read_text())
    assert "device" not in state["options"] and state["options"]["amp"] == "bf16"
    # the same run with another --device is the same run (finished: nothing to do)
    assert main(argv + ["--device", "auto", "--amp", "bf16"]) == 0
    assert "already holds this finished run" in capsys.readouterr().out


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_cuda_training_with_amp_and_prune_on_the_gpu(digits_data, tmp_path, amp):
    from flowprune.measure import accuracy, latency
    from flowprune.pruning.structural import prune

    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("GPU without bfloat16")
    m = _mlp(digits_data)
    hist = fit(m, digits_data, TrainConfig(epochs=3, lr=0.1, batch_size=64, augment=False), progress=False,
               device="cuda", amp=amp, checkpoint_dir=tmp_path)
    assert next(m.parameters()).device.type == "cuda" and next(m.parameters()).dtype == torch.float32
    assert hist["epochs"][-1]["val_accuracy"] > 0.25  # learns (chance: 0.1)
    state = torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ("scaler" in state) == (amp == "fp16")
    cpu_model = _mlp(digits_data)
    res = prune(cpu_model, digits_data, "agf", ratio=0.5, device="cuda", final_finetune_epochs=1, amp=amp)
    assert next(res.model.parameters()).device.type == "cuda"
    assert next(cpu_model.parameters()).device.type == "cpu"  # the caller's model is not moved
    assert 0.0 <= accuracy(res.model, [(digits_data.test.tensors[0], digits_data.test.tensors[1])]) <= 1.0
    assert latency(res.model, batch_size=4, repeats=3) > 0
