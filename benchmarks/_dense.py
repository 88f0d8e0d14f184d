"""Dense models for the structural-pruning benchmarks, trained once per seed and cached.

``dense_model(key, seed)`` returns ``(model, data, info)``; the model is trained to convergence
(BENCHMARKING.md lesson 8) with the settings in :data:`DENSE` and cached under
``runs/bench/dense/<model>_<data>_e<epochs>_s<seed>`` (flowprune.io format), so every benchmark
starts every method from the same dense model. ``python -m benchmarks._dense resnet20 0 1 2``
trains (or loads) and prints the dense test accuracies.
"""

from __future__ import annotations

import sys
from pathlib import Path

# key: (zoo model, data set, epochs, lr)
DENSE = {
    "resnet20": ("resnet20", "mnist5k", 15, 0.05),
    "cnn1d": ("cnn1d", "mnist1d", 15, 0.05),
    "vgg8": ("vgg8", "mnist5k", 10, 0.05),
    "vit": ("vit", "mnist5k", 15, 1e-3),
    "lstm1d": ("lstm1d", "mnist1d", 40, 1e-2),
}
# optimiser settings other than plain SGD (transformers and recurrent nets train poorly with SGD at these budgets)
OPTIONS = {"vit": {"optimizer": "adamw", "weight_decay": 0.05},
           "lstm1d": {"optimizer": "adamw", "weight_decay": 0.01, "augment": False}}
ROOT = Path("runs/bench/dense")


def dense_model(key: str, seed: int, root: Path = ROOT):
    from flowprune.api import train_model
    from flowprune.data import load_dataset, make_loader
    from flowprune.io import load
    from flowprune.measure import accuracy
    from flowprune.train import TrainConfig

    name, data_name, epochs, lr = DENSE[key]
    data = load_dataset(data_name, seed=0)
    d = root / f"{name}_{data_name}_e{epochs}_s{seed}"
    if not (d / "model.json").exists():
        opt = OPTIONS.get(key, {})
        train_model(name, data, TrainConfig(epochs=epochs, lr=lr, seed=seed, **opt), out_dir=d,
                    measure_speed=False, progress=False)
    model = load(d).eval()
    acc = accuracy(model, make_loader(data.test, 512))
    return model, data, {"dense_acc": acc, "dense_epochs": epochs, "dense_lr": lr, "path": str(d)}


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    key, seeds = sys.argv[1], [int(s) for s in sys.argv[2:]] or [0]
    for s in seeds:
        _, _, info = dense_model(key, s)
        print(key, s, f"{100 * info['dense_acc']:.2f}", flush=True)
