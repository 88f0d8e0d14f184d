"""Mean compensation: a removed unit is replaced by its mean, folded into the next layer's bias.

Cutting channel c of a unit deletes the feature ``Y_c`` that its consumers read. Where a consumer
is followed by a BatchNorm, re-estimating BN statistics after the cut re-centres the consumer's
output, so the cut acts as *replacing ``Y_c`` by its mean* -- which is what the centred AGF score
(``agf`` with ``center=True``) measures. Where it is not (a classifier, an MLP's second linear, an
attention's output projection, a conv without BN), nothing re-centres it and the logits move by
``W[:, c] * E[Y_c]``. :func:`compensate_means` closes that gap without any training: before the
cut, each consumer that has a bias gets ``bias += sum_{c removed} W[:, c] * E[Y_c]`` (for a conv,
``W[:, c]`` summed over the kernel; exact away from zero-padded borders), with ``E[Y_c]`` the mean
of the consumer's input channel over the calibration batches and positions; the cut then removes
the columns. Consumers without a bias are left alone (adding a bias would change the architecture
the save/load recipe rebuilds); for those that feed a BatchNorm the compensation is not needed.
Grouped and depthwise consumers are skipped (their input channel removes their output with it).
This is a statistics-only step, like BatchNorm re-estimation: no gradient, no weight training.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from flowprune.scores.base import device_of, modules_of


def _compensable(mod: nn.Module) -> bool:
    if isinstance(mod, nn.Linear):
        return mod.bias is not None
    if isinstance(mod, nn.modules.conv._ConvNd):
        return mod.bias is not None and mod.groups == 1
    return False


@torch.no_grad()
def consumer_input_means(model: nn.Module, units: Sequence, batches) -> dict[str, torch.Tensor]:
    """Mean of every input channel (feature, for a linear) of the units' compensable consumers.

    One forward pass over ``batches`` in eval mode (the model's mode is restored); float64 on CPU.
    """
    mods = modules_of(model)
    names = {m.module_name for u in units for m in u.consumers if _compensable(mods.get(m.module_name))}
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []
    for n in names:
        def hook(mod, args, n=n):
            x = args[0].detach().double()
            if isinstance(mod, nn.modules.conv._ConvNd):
                flat = x.transpose(0, 1).reshape(x.shape[1], -1)
            else:
                flat = x.reshape(-1, x.shape[-1]).t()
            sums[n] = sums[n] + flat.sum(1) if n in sums else flat.sum(1)
            counts[n] = counts.get(n, 0) + flat.shape[1]
        handles.append(mods[n].register_forward_pre_hook(hook))
    was = model.training
    model.eval()
    dev = device_of(model)
    try:
        for x, _y in batches:
            model(x.to(dev))
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return {n: (sums[n] / max(counts[n], 1)).cpu() for n in sums}


@torch.no_grad()
def compensate_means(model: nn.Module, units: Sequence, cuts: Mapping[str, torch.Tensor | Sequence[int]],
                     means: Mapping[str, torch.Tensor]) -> list[str]:
    """IN PLACE on ``model`` (the model about to be cut): fold the mean of every channel that ``cuts``
    removes into its consumers' biases. Returns the names of the consumers that were compensated."""
    mods = modules_of(model)
    done = []
    for u in units:
        removed = cuts.get(u.name)
        if removed is None or len(removed) == 0:
            continue
        removed = torch.as_tensor(removed, dtype=torch.long)
        for m in u.consumers:
            mod = mods.get(m.module_name)
            if not _compensable(mod) or m.module_name not in means:
                continue
            gone = m.idxs[torch.isin(m.root_idxs, removed)]
            if gone.numel() == 0:
                continue
            w = mod.weight.detach().double()
            cols = w[:, gone]
            if cols.dim() > 2:
                cols = cols.flatten(2).sum(2)  # a conv: the kernel's weights all read the same mean
            delta = cols.cpu() @ means[m.module_name][gone]
            mod.bias.add_(delta.to(mod.bias.dtype).to(mod.bias.device))
            done.append(m.module_name)
    return sorted(set(done))
