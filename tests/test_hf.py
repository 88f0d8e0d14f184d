"""Hugging Face transformers models in and out (issue 22): heads (whole key/value groups), MLP
neurons, forward + generate after the cut, save/load, parameter counts computed by hand."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import flowprune as fp
from flowprune.errors import FlowpruneError

T = pytest.importorskip("transformers")


def _llama():  # grouped-query attention: 4 query heads in 2 key/value groups of head_dim 8
    return T.LlamaForCausalLM(T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                            max_position_embeddings=64))


def _gpt2():
    return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32))


def _bert():
    return T.BertForSequenceClassification(T.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                        num_attention_heads=4, intermediate_size=48,
                                                        max_position_embeddings=32, num_labels=3))


def _vit():
    return T.ViTForImageClassification(T.ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
                                                   num_attention_heads=4, intermediate_size=48, num_labels=3))


# Parameters one layer loses when half its heads and half its MLP neurons go, by hand (hidden 32):
# llama: 1 of 2 kv groups = 2 query heads (16 q rows) + 8 k rows + 8 v rows, 16 o_proj columns, no
#        biases: (16 + 8 + 8) * 32 + 16 * 32 = 1536; 24 of 48 neurons: gate + up rows, down columns:
#        3 * 24 * 32 = 2304 -> 3840 per layer
# gpt2:  2 of 4 heads: c_attn 3 * 16 columns + biases: 3 * 16 * 33 = 1584, c_proj 16 rows * 32 = 512;
#        64 of 128 neurons: c_fc 64 * 33 = 2112, c_proj 64 * 32 = 2048 -> 6256 per layer
# bert/vit: 2 of 4 heads: q, k, v 16 rows + biases: 3 * 16 * 33 = 1584, output 16 * 32 = 512;
#        24 of 48 neurons: 24 * 33 + 24 * 32 = 1560 -> 3656 per layer
CASES = {
    "llama": (_llama, "tok", 2 * 3840),
    "gpt2": (_gpt2, "tok", 2 * 6256),
    "bert": (_bert, "cls", 2 * 3656),
    "vit": (_vit, "img", 2 * 3656),
}


def _inputs(kind: str, n: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if kind == "img":
        return torch.randn(n, 3, 16, 16, generator=g)
    return torch.randint(0, 64, (n, 10), generator=g)


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("family", sorted(CASES))
def test_half_cut_runs_round_trips_and_loses_the_hand_counted_parameters(family, tmp_path):
    torch.manual_seed(0)
    build, kind, lost = CASES[family]
    model = build().eval()
    x = _inputs(kind)
    units = fp.find_units(model, x)
    assert {u.kind for u in units} == {"head", "neuron"} and len(units) == 4 and not units.reasons
    cuts = {u.name: list(range(u.size // 2)) for u in units}
    cut = fp.apply_cuts(model, cuts, example_inputs=x)
    assert type(cut) is type(model)
    assert _params(model) - _params(cut) == lost
    with torch.no_grad():
        out = fp.hf.TensorIO(cut)(x)
    assert torch.isfinite(out).all()
    if kind == "tok":
        gen = cut.generate(x[:1], max_new_tokens=4, min_new_tokens=4, do_sample=False)
        assert gen.shape == (1, 14) and torch.equal(gen[:, :10], x[:1])
    fp.save(cut, tmp_path)
    assert {"config.json", "model.safetensors", "flowprune_hf.json"} <= {p.name for p in tmp_path.iterdir()}
    back = fp.load(tmp_path)
    assert type(back) is type(model) and _params(back) == _params(cut)
    with torch.no_grad():
        assert torch.equal(fp.hf.TensorIO(back)(x), out)
    assert back.flowprune_metadata["cuts"][-1] == {k: v for k, v in cuts.items()}


def test_gqa_unit_is_a_whole_key_value_group():
    model = _llama().eval()
    u = fp.find_units(model, _inputs("tok"))[0]
    assert (u.name, u.kind, u.size, u.head_dim) == ("model.layers.0.self_attn", "head", 2, 8)
    q = next(m for m in u.producers if m.module_name.endswith("q_proj"))
    k = next(m for m in u.producers if m.module_name.endswith("k_proj"))
    # query rows 0..15 (heads 0, 1) share key/value group 0, rows 16..31 group 1; key rows 0..7 are group 0
    assert q.root_idxs.tolist() == [0] * 16 + [1] * 16 and k.root_idxs.tolist() == [0] * 8 + [1] * 8
    cut = fp.apply_cuts(model, {u.name: [0]}, example_inputs=_inputs("tok"))
    attn = cut.model.layers[0].self_attn
    # group 1 kept: query heads 2, 3 and key/value head 1, exactly those rows
    assert torch.equal(attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight[16:])
    assert torch.equal(attn.k_proj.weight, model.model.layers[0].self_attn.k_proj.weight[8:])
    assert torch.equal(attn.o_proj.weight, model.model.layers[0].self_attn.o_proj.weight[:, 16:])
    assert attn.num_key_value_groups == 2  # query heads per group: unchanged, so repeat_kv still fits


def test_cutting_heads_whose_output_columns_are_zero_leaves_the_output_unchanged():
    torch.manual_seed(0)
    model = _gpt2().eval()
    with torch.no_grad():
        for blk in model.transformer.h:  # heads 1 and 3 contribute nothing through c_proj (rows of Conv1D)
            blk.attn.c_proj.weight[8:16] = 0
            blk.attn.c_proj.weight[24:32] = 0
    x = _inputs("tok")
    cut = fp.apply_cuts(model, {f"transformer.h.{i}.attn": [1, 3] for i in range(2)}, example_inputs=x)
    assert cut.transformer.h[0].attn.num_heads == 2 and cut.transformer.h[0].attn.split_size == 16
    with torch.no_grad():
        assert torch.allclose(cut(x).logits, model(x).logits, atol=1e-5)


def test_prune_takes_a_pretrained_model_as_is_and_returns_one():
    torch.manual_seed(0)
    model = _llama().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib = [(_inputs("tok", 4), torch.randint(0, 64, (4, 10))) for _ in range(2)]
    r = fp.prune(model, calib, ratio=0.5)
    assert isinstance(r.model, T.LlamaForCausalLM)
    assert set(r.widths) == {u.name for u in fp.find_units(model, calib[0][0])}
    assert r.params < 0.75 * r.dense_params and r.dense_params == _params(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the caller's model is intact
    assert r.model.generate(calib[0][0][:1], max_new_tokens=3, min_new_tokens=3, do_sample=False).shape == (1, 13)


def test_token_labels_score_every_token():
    from flowprune.scores.base import cross_entropy_sum

    logits = torch.zeros(2, 3, 5)
    logits[0, 0, 1] = 10.0
    y = torch.tensor([[1, 0, 0], [0, 0, 0]])
    # 5 tokens at uniform logits cost log 5 each; the confident correct one costs ~0
    want = 5 * torch.log(torch.tensor(5.0)) + torch.nn.functional.cross_entropy(logits[0, 0:1], y[0, 0:1])
    assert torch.allclose(cross_entropy_sum(logits, y), want)


def test_a_dense_save_loads_with_transformers_own_from_pretrained(tmp_path):
    model = _llama().eval()
    fp.save(model, tmp_path)
    x = _inputs("tok")
    again = T.LlamaForCausalLM.from_pretrained(str(tmp_path), local_files_only=True).eval()
    with torch.no_grad():
        assert torch.equal(again(x).logits, model(x).logits)


def test_unsupported_layout_is_named_and_left_intact():
    falcon = T.FalconForCausalLM(T.FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                num_attention_heads=4)).eval()
    x = _inputs("tok")
    units = fp.find_units(falcon, x)
    assert [u.kind for u in units] == ["neuron"]  # the MLP is cut; Falcon's fused multi-query qkv is not
    assert "FalconAttention" in units.reasons["transformer.h.0.self_attention"]
    cut = fp.apply_cuts(falcon, {units[0].name: list(range(64))}, example_inputs=x)
    assert cut.generate(x[:1], max_new_tokens=2, min_new_tokens=2, do_sample=False).shape == (1, 12)


def test_gpt_neox_per_head_fused_qkv_rows():
    neox = T.GPTNeoXForCausalLM(T.GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                num_attention_heads=4, intermediate_size=48,
                                                max_position_embeddings=32)).eval()
    x = _inputs("tok")
    cut = fp.apply_cuts(neox, {"gpt_neox.layers.0.attention": [0, 2]}, example_inputs=x)
    w0 = neox.gpt_neox.layers[0].attention.query_key_value.weight
    w1 = cut.gpt_neox.layers[0].attention.query_key_value.weight
    # rows are [q|k|v] per head of 8: heads 1 and 3 keep rows 24..47 and 72..95
    assert torch.equal(w1, torch.cat([w0[24:48], w0[72:96]]))
    assert cut.generate(x[:1], max_new_tokens=2, min_new_tokens=2, do_sample=False).shape == (1, 12)


def test_projections_that_are_not_whole_heads_are_one_clear_error():
    model = _llama()
    model.model.layers[1].self_attn.q_proj = nn.Linear(32, 20, bias=False)  # 20 is not 4 heads of 8
    with pytest.raises(FlowpruneError, match="model.layers.1.self_attn.*whole heads"):
        fp.find_units(model, _inputs("tok"))


def test_a_tampered_or_foreign_record_is_refused(tmp_path):
    model = _llama().eval()
    fp.save(model, tmp_path)
    rec_path = tmp_path / "flowprune_hf.json"
    rec = json.loads(rec_path.read_text())
    rec_path.write_text(json.dumps({**rec, "architecture": "os"}))
    with pytest.raises(FlowpruneError, match="not a PreTrainedModel class"):
        fp.load(tmp_path)
    rec_path.write_text(json.dumps({**rec, "widths": {"model.layers.0.self_attn": 5}}))
    with pytest.raises(FlowpruneError, match="more than the config's 2"):
        fp.load(tmp_path)
    rec_path.write_text(json.dumps(rec))
    (tmp_path / "config.json").write_text((tmp_path / "config.json").read_text().replace("64", "65", 1))
    with pytest.raises(FlowpruneError, match="changed after saving"):
        fp.load(tmp_path)
