"""The whole flow on a GPU, with small budgets, timed next to the CPU.

    python -m benchmarks.gpu_check                      # cuda, then cpu; skips (exit 0) without CUDA
    python -m benchmarks.gpu_check --devices cuda       # GPU only
    python -m benchmarks.gpu_check --amp bf16           # mixed precision for training / fine-tuning
    python -m benchmarks.gpu_check --devices cpu        # the CPU leg alone (runs anywhere)

For each device: train ResNet-20 on mnist5k (``--epochs``), AGF-prune it to 2x fewer MACs with a
1-epoch recovery, route light/heavy (confidence, heavy budget 0.5, no sweep), IDAP++ stage 1
(2 steps, short recoveries), then train LeNet-300-100 and Hyperflows-prune it to 90% weight
sparsity (2 + 1 epochs). Every stage passes ``device=`` to the library; the table gives the
seconds per stage on each device, the ratio, the accuracies (sanity: the GPU must learn as well as
the CPU) and the dense/pruned latency at batch 1 and throughput at batch 256 on each device
(timings synchronise the device before reading the clock). Exit 1 if a stage fails, or if a
GPU accuracy is far (> 5 points) below the CPU's.
"""

from __future__ import annotations

import argparse
import sys
import time


def _stages(device: str, epochs: int, amp: str) -> dict:
    import torch

    import flowprune as fp
    from flowprune.measure import speed_compare
    from flowprune.pruning.hyperflows import hyperflows_prune
    from flowprune.pruning.idap import idap
    from flowprune.pruning.structural import prune
    from flowprune.route.api import route_experts

    data = fp.load_dataset("mnist5k", seed=0)
    test = fp.make_loader(data.test, 512)
    out: dict = {"seconds": {}, "accuracy": {}, "speed": {}}

    def timed(name, fn):
        from flowprune.device import synchronize

        t0 = time.perf_counter()
        res = fn()
        synchronize(device)
        out["seconds"][name] = time.perf_counter() - t0
        return res

    cfg = fp.TrainConfig(epochs=epochs, batch_size=128, seed=0)
    dense = timed("train resnet20", lambda: fp.train_model("resnet20", data, cfg, device=device, amp=amp,
                                                           measure_speed=False, progress=False))["model"]
    out["accuracy"]["dense"] = fp.accuracy(dense, test)
    pr = timed("prune agf 2x", lambda: prune(dense, data, "agf", target_macs=2.0, steps=1, final_finetune_epochs=1,
                                             device=device, amp=amp))
    out["accuracy"]["pruned"] = fp.accuracy(pr.model, test)
    rr = timed("route", lambda: route_experts(pr.model, dense, data, heavy_budget=0.5, sweep=False, diagnostic=False,
                                              measure=False, device=device))
    out["accuracy"]["routed"] = rr.results["accuracy"]
    ir = timed("idap stage 1", lambda: idap(dense, data, stages=(1,), max_steps=2, recover_epochs=1,
                                            recover_batches=10, device=device))
    out["accuracy"]["idap"] = fp.accuracy(ir.model, test)
    lenet = timed("train lenet300", lambda: fp.train_model("lenet300", data, fp.TrainConfig(epochs=epochs, seed=0),
                                                           device=device, measure_speed=False,
                                                           progress=False))["model"]
    hf = timed("hyperflows 90%", lambda: hyperflows_prune(lenet, data, target_sparsity=0.9, prune_epochs=2,
                                                          regrow_epochs=1, device=device, progress=False))
    out["accuracy"]["hyperflows"] = hf["accuracy"]
    # dense and pruned timed together (one interleaved harness call per batch size, device-synchronised)
    sp = speed_compare({"dense": dense.to(device), "pruned": pr.model.to(device)}, base="dense",
                       batch_sizes=(1, 256), rounds=7, min_round_s=0.05)
    for name in ("dense", "pruned"):
        out["speed"][name] = {"latency_ms_b1": 1e3 * sp["b1"]["seconds"][name],
                              "throughput_b256": sp["b256"]["per_second"][name]}
    out["speed"]["timing"] = sp
    out["device_name"] = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else device
    return out


def markdown(payload: dict) -> str:
    """The tables of one run (stage seconds per device, accuracies, speed), from its JSON payload."""
    devs, results = payload["devices"], payload["results"]
    names = list(next(iter(results.values()))["seconds"])
    lines = [f"# gpu_check: the whole flow per device ({', '.join(results[d]['device_name'] for d in devs)})", "",
             f"Command: `{payload['command']}` (torch {payload['torch']}, amp {payload['amp']}, "
             f"{payload['epochs']} dense epochs)", "", *([payload["note"], ""] if payload.get("note") else [])]
    head = "| stage | " + " | ".join(f"{d} s" for d in devs) + (" | ratio |" if len(devs) == 2 else " |")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for n in names:
        cells = [results[d]["seconds"][n] for d in devs]
        ratio = f" {cells[1] / max(cells[0], 1e-9):.2f}x |" if len(devs) == 2 else ""
        lines.append(f"| {n} | " + " | ".join(f"{c:.1f}" for c in cells) + " |" + ratio)
    lines += ["", "| accuracy % | " + " | ".join(devs) + " |", "|---|" + "---|" * len(devs)]
    for k in results[devs[0]]["accuracy"]:
        lines.append(f"| {k} | " + " | ".join(f"{100 * results[d]['accuracy'][k]:.2f}" for d in devs) + " |")
    lines += ["", "| speed | " + " | ".join(devs) + " |", "|---|" + "---|" * len(devs)]
    for m in ("dense", "pruned"):
        lines.append(f"| {m} latency b1 ms | "
                     + " | ".join(f"{results[d]['speed'][m]['latency_ms_b1']:.2f}" for d in devs) + " |")
        lines.append(f"| {m} throughput b256 /s | "
                     + " | ".join(f"{results[d]['speed'][m]['throughput_b256']:.0f}" for d in devs) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", default="cuda,cpu", help="comma-separated, run in this order (default cuda,cpu)")
    p.add_argument("--epochs", type=int, default=3, help="training epochs of the dense models (default 3)")
    p.add_argument("--amp", default="none", help="none, bf16 or fp16 (fp16 on CUDA only)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="write PREFIX.json and PREFIX.md (the tables, from the JSON)")
    args = p.parse_args(argv)
    import torch

    from flowprune.device import check_amp, resolve_device
    from flowprune.errors import FlowpruneError

    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    if any(d.startswith("cuda") for d in devices) and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible to PyTorch; skipped (run with --devices cpu for the CPU leg)")
        return 0
    try:
        devs = [str(resolve_device(d)) for d in devices]
        for d in devs:
            check_amp(args.amp if d.startswith("cuda") else ("none" if args.amp == "fp16" else args.amp), d)
    except FlowpruneError as e:
        print(f"gpu_check: error: {e}", file=sys.stderr)
        return 2
    results = {}
    for d in devs:
        amp = args.amp if d.startswith("cuda") or args.amp != "fp16" else "none"
        print(f"gpu_check: running the flow on {d} (amp {amp}) ...", flush=True)
        t0 = time.perf_counter()
        results[d] = _stages(d, args.epochs, amp)
        print(f"gpu_check: {d} done in {time.perf_counter() - t0:.1f} s ({results[d]['device_name']})", flush=True)
    payload = {"command": "python -m benchmarks.gpu_check " + " ".join(argv if argv is not None else sys.argv[1:]),
               "devices": devs, "torch": torch.__version__, "amp": args.amp, "epochs": args.epochs,
               "results": results}
    text = markdown(payload)
    print("\n" + text)
    if args.out:
        from pathlib import Path

        from flowprune.report import write_results

        write_results(Path(args.out + ".json"), payload)
        Path(args.out + ".md").write_text(text)
    bad = []
    if len(devs) == 2:
        for k, v in results[devs[0]]["accuracy"].items():
            if v < results[devs[1]]["accuracy"][k] - 0.05:
                bad.append(f"{k}: {100 * v:.1f}% on {devs[0]} vs {100 * results[devs[1]]['accuracy'][k]:.1f}% on "
                           f"{devs[1]}")
    if bad:
        print("gpu_check: accuracy far below the other device: " + "; ".join(bad), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
