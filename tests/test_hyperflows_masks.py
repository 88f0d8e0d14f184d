"""The fused straight-through mask: gradients, buffer reuse, two forwards before one backward."""

import torch
from torch import nn

from flowprune.pruning.masks import install_masks, mask_logits, masked_modules, set_pressure


def _reference(w, m, g, scale, pressure):
    keep = (m >= 0).to(w.dtype)
    return w * keep, g * keep, scale * w * g + pressure


def test_fused_mask_matches_reference_gradients():
    torch.manual_seed(0)
    net = install_masks(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)), init=(-0.3, 0.3))
    set_pressure(net, 0.01)
    x = torch.randn(4, 6)
    out = net(x)
    g_out = torch.randn_like(out)
    out.backward(g_out)
    lin = net[0]
    w = lin.parametrizations["weight"].original.detach()
    m = lin.parametrizations["weight"][0].logits.detach()
    # recompute dL/dw_eff for the first layer with a plain model using the masked weights
    ref = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    with torch.no_grad():
        ref[0].weight.copy_(w * (m >= 0))
        ref[0].bias.copy_(lin.bias)
        ref[2].weight.copy_(net[2].weight)
        ref[2].bias.copy_(net[2].bias)
    ref(x).backward(g_out)
    g = ref[0].weight.grad
    w_eff, gw, gm = _reference(w, m, g, 0.25, 0.01)
    assert torch.allclose(lin.weight, w_eff)
    assert torch.allclose(lin.parametrizations["weight"].original.grad, gw, atol=1e-6)
    assert torch.allclose(lin.parametrizations["weight"][0].logits.grad, gm, atol=1e-6)


def test_keep_buffer_reused_across_steps_and_not_while_a_graph_lives():
    torch.manual_seed(0)
    net = install_masks(nn.Sequential(nn.Linear(8, 4)))
    mask = masked_modules(net)["0"]
    opt = torch.optim.Adam(mask_logits(net), lr=1.0)
    x = torch.randn(3, 8)
    net(x).sum().backward()
    first = mask._keep.data_ptr()
    opt.step()
    opt.zero_grad(set_to_none=True)
    net(x).sum().backward()
    assert mask._keep.data_ptr() == first  # the previous graph is gone: the buffer is reused
    # two forwards before one backward, logits changed in between: each graph keeps its own keep
    with torch.no_grad():
        mask.logits.copy_(torch.where(torch.arange(32).reshape(4, 8) % 2 == 0, 1.0, -1.0))
    net.zero_grad(set_to_none=True)
    y1 = net(x).sum()
    keep1 = (mask.logits.detach() >= 0).float()
    with torch.no_grad():
        mask.logits.neg_()
    y2 = net(x).sum()
    (y1 + y2).backward()
    w = net[0].parametrizations["weight"].original
    gx = x.sum(0).expand(4, 8)
    expected = gx * keep1 + gx * (1 - keep1)  # each graph used the keep of its own forward
    assert torch.allclose(w.grad, expected, atol=1e-6)


def test_adam_step_matches_torch_adam():
    from flowprune.pruning.hyperflows import _fused_kw, adam_step

    torch.manual_seed(0)
    a = [nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(7))]
    b = [nn.Parameter(p.detach().clone()) for p in a]
    oa = torch.optim.Adam(a, lr=0.01, **_fused_kw())
    ob = torch.optim.Adam(b, lr=0.01, **_fused_kw())
    for i in range(4):
        grads = [torch.randn_like(p) for p in a]
        for p, q, gr in zip(a, b, grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        if i == 2:
            for grp in (oa.param_groups[0], ob.param_groups[0]):
                grp["lr"] = 0.003  # a schedule changes lr between steps
        oa.step()
        adam_step(ob)
    for p, q in zip(a, b):
        assert torch.allclose(p, q, atol=1e-7)
    sa, sb = oa.state_dict(), ob.state_dict()
    for k in sa["state"]:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.allclose(sa["state"][k][name], sb["state"][k][name])
