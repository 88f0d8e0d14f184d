"""Do two versions of flowprune compute the same thing? (issue 14: a refactor must not change results.)

Runs a fixed, seeded workload -- a short ResNet-20 training on the digits, a comparison of six
methods (flowprune scores and Torch-Pruning's) at 2x and 4x over two seeds with one short
fine-tune, an iterative AGF prune with fine-tuning between steps, a per-layer L1 prune -- and
prints every accuracy, MACs count and width as JSON. Run it on both versions and compare:

    git worktree add /tmp/flowprune-old <REF>
    PYTHONPATH=/tmp/flowprune-old/src python -m benchmarks.check_equivalence > old.json
    python -m benchmarks.check_equivalence > new.json
    python -m benchmarks.check_equivalence --diff old.json new.json

One torch thread, so the numbers are bit-for-bit reproducible on one machine.
"""

from __future__ import annotations

import argparse
import json
import sys


def workload() -> dict:
    import torch

    torch.set_num_threads(1)
    import flowprune as fp
    from flowprune.compare import compare

    data = fp.load_dataset("digits", seed=0)
    torch.manual_seed(0)
    m = fp.build_model("resnet20", data.input_shape, data.num_classes)
    fp.fit(m, data, fp.TrainConfig(epochs=2, lr=0.05, seed=0), progress=False)
    res = compare(m, data, methods="agf,l1,taylor,random,tp-magnitude,tp-taylor-global", targets=[2, 4],
                  seeds=[0, 1], finetune_epochs=1, finetune_batches=5, measure_speed=False, scratch_epochs=0,
                  calib_batches=2)
    out = {"flowprune": fp.__file__,
           "compare": [(r["method"], r["target"], r["seed"], r["macs"], round(r["acc_raw"], 6),
                        round(r["acc_bn"], 6), round(r["acc_ft"], 6)) for r in res["runs"]]}
    pr = fp.prune(m, data, "agf", target_macs=3.0, steps=2, calib_batches=2, finetune_epochs=1,
                  final_finetune_epochs=0)
    out["prune"] = [pr.macs, pr.widths, [(h.get("acc_cut"), h.get("acc_bn"), h.get("acc_ft")) for h in pr.history]]
    pr2 = fp.prune(m, data, "l1", ratio=0.4, budget="layer")
    out["prune_ratio"] = [pr2.macs, pr2.widths]
    return out


def diff(a_path: str, b_path: str) -> int:
    a, b = json.load(open(a_path)), json.load(open(b_path))
    keys = [k for k in a if k != "flowprune"]
    bad = [k for k in keys if a.get(k) != b.get(k)]
    print("| part | same |\n|---|---|\n" + "\n".join(f"| {k} | {'yes' if k not in bad else 'NO'} |" for k in keys))
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--diff", nargs=2, metavar=("OLD", "NEW"), help="compare two outputs instead of running")
    args = ap.parse_args(argv)
    if args.diff:
        return diff(*args.diff)
    print(json.dumps(workload()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
