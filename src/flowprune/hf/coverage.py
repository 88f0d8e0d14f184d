"""The transformers coverage sweep: one tiny config per architecture family, built offline.

For every family in :data:`FAMILIES` that the installed ``transformers`` can build:
find the units (:mod:`flowprune.hf.units`), cut half of every unit (heads: whole key/value
groups; MLP neurons), run the cut model (and ``generate()`` for decoders), save and load it
(:mod:`flowprune.hf.io`) and compare the outputs. Beside it, Torch-Pruning's ``BasePruner`` on
the same model with its documented transformers options (``num_heads`` of every q/k/v
projection, ``prune_num_heads=True``, ``prune_head_dims=False``, ``head_pruning_ratio=0.5``,
``pruning_ratio=0.5``, the output layer ignored, then the head-count attributes set from
``pruner.num_heads`` as its Hugging Face examples do), judged by the same forward/generate.

:func:`run_transformers_sweep` returns one dict per family (``status``: ``pass`` -- every
attention and MLP cut, runs, round-trips; ``partial`` -- the same, with some attention left
intact for a named reason; ``fail`` -- with the error; ``skip`` -- the family does not build
in this transformers). ``benchmarks/bench_transformers.py`` writes docs/results/transformers.*.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from flowprune.errors import FlowpruneError, bad_choice

_V = 96  # vocabulary of every text family
_TXT = dict(vocab_size=_V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64)
_DEC = dict(_TXT, num_key_value_heads=2, head_dim=8)
_IMG = dict(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64)
_SEQ2SEQ = dict(vocab_size=_V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)

# family -> (model class, config class, config kwargs, input kind); kinds: cls (token classifier),
# lm (causal decoder), seq2seq (encoder-decoder), img, audio, enc (token encoder, no head)
FAMILIES: dict[str, tuple[str, str, dict, str]] = {
    "bert": ("BertForSequenceClassification", "BertConfig", dict(_TXT, num_labels=3), "cls"),
    "roberta": ("RobertaForSequenceClassification", "RobertaConfig", dict(_TXT, num_labels=3), "cls"),
    "distilbert": ("DistilBertForSequenceClassification", "DistilBertConfig",
                   dict(vocab_size=_V, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64,
                        num_labels=3), "cls"),
    "electra": ("ElectraForSequenceClassification", "ElectraConfig", dict(_TXT, embedding_size=32, num_labels=3),
                "cls"),
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", dict(vocab_size=_V, n_embd=32, n_layer=2, n_head=4, n_positions=64),
             "lm"),
    "gpt_neox": ("GPTNeoXForCausalLM", "GPTNeoXConfig", dict(_TXT), "lm"),
    "gptj": ("GPTJForCausalLM", "GPTJConfig", dict(vocab_size=_V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                   rotary_dim=4), "lm"),
    "opt": ("OPTForCausalLM", "OPTConfig", dict(vocab_size=_V, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=4, ffn_dim=64, max_position_embeddings=64,
                                                word_embed_proj_dim=32), "lm"),
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(_DEC), "lm"),
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(_DEC), "lm"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(_DEC), "lm"),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(_DEC), "lm"),
    "gemma": ("GemmaForCausalLM", "GemmaConfig", dict(_DEC), "lm"),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", dict(_DEC), "lm"),
    "phi": ("PhiForCausalLM", "PhiConfig", dict(_TXT), "lm"),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", dict(_DEC, pad_token_id=0, bos_token_id=1, eos_token_id=2), "lm"),
    "falcon": ("FalconForCausalLM", "FalconConfig", dict(vocab_size=_V, hidden_size=32, num_hidden_layers=2,
                                                         num_attention_heads=4), "lm"),
    "t5": ("T5ForConditionalGeneration", "T5Config", dict(vocab_size=_V, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                          num_heads=4, decoder_start_token_id=0), "seq2seq"),
    "bart": ("BartForConditionalGeneration", "BartConfig", dict(_SEQ2SEQ), "seq2seq"),
    "whisper_encoder": ("WhisperForAudioClassification", "WhisperConfig",
                        dict(_SEQ2SEQ, num_mel_bins=16, max_source_positions=16, num_labels=3), "audio"),
    "vit": ("ViTForImageClassification", "ViTConfig", dict(_IMG, num_labels=3), "img"),
    "deit": ("DeiTForImageClassification", "DeiTConfig", dict(_IMG, num_labels=3), "img"),
    "swin": ("SwinForImageClassification", "SwinConfig", dict(image_size=16, patch_size=4, embed_dim=16,
                                                              depths=[1, 1], num_heads=[2, 4], window_size=2,
                                                              num_labels=3), "img"),
    "clip_text": ("CLIPTextModel", "CLIPTextConfig", dict(_TXT), "enc"),
    "clip_vision": ("CLIPVisionModel", "CLIPVisionConfig", dict(_IMG), "img"),
    "siglip_vision": ("SiglipVisionModel", "SiglipVisionConfig", dict(_IMG), "img"),
    "dinov2": ("Dinov2Model", "Dinov2Config", dict(_IMG), "img"),
}
DECODERS = ("lm", "seq2seq")


def build_family(name: str) -> tuple[nn.Module, torch.Tensor, str]:
    """``(model, input batch, kind)`` of family ``name``, built from its tiny config (seeded, eval mode)."""
    import transformers

    if name not in FAMILIES:
        raise bad_choice("transformers family", name, sorted(FAMILIES))
    cls_name, cfg_name, kw, kind = FAMILIES[name]
    cls, cfg_cls = getattr(transformers, cls_name, None), getattr(transformers, cfg_name, None)
    if cls is None or cfg_cls is None:
        raise FlowpruneError(f"family {name!r}: {cls_name} is not in transformers {transformers.__version__}")
    torch.manual_seed(0)
    model = cls(cfg_cls(**kw)).eval()
    g = torch.Generator().manual_seed(0)
    if kind == "img":
        x = torch.randn(2, 3, kw["image_size"], kw["image_size"], generator=g)
    elif kind == "audio":
        x = torch.randn(2, kw["num_mel_bins"], 2 * kw["max_source_positions"], generator=g)
    else:
        x = torch.randint(3, _V, (2, 12), generator=g)
    return model, x, kind


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _runs(model: nn.Module, x: torch.Tensor, kind: str) -> tuple[torch.Tensor, int | None]:
    """The model's output on ``x`` (finite, else an error) and the generated length for decoders."""
    from flowprune.hf.adapter import TensorIO

    with torch.no_grad():
        out = TensorIO(model)(x)
    if not torch.isfinite(out).all():
        raise FlowpruneError("the cut model gives non-finite outputs")
    gen = None
    if kind in DECODERS:
        gen = int(model.generate(x[:1], max_new_tokens=3, min_new_tokens=3, do_sample=False).shape[1])
    return out, gen


def check_family(name: str) -> dict:
    """flowprune on family ``name``: half of every unit cut, run, generate, save/load (see the module doc)."""
    import flowprune as fp
    from flowprune.hf import io as hf_io
    from flowprune.hf.adapter import TensorIO

    t0 = time.perf_counter()
    try:
        model, x, kind = build_family(name)
    except Exception as e:  # noqa: BLE001 -- a family this transformers cannot build is skipped
        return {"family": name, "status": "skip", "error": f"{type(e).__name__}: {str(e)[:200]}"}
    rec = {"family": name, "class": type(model).__name__, "kind": kind, "params": _params(model)}
    try:
        units = fp.find_units(model, x)
        rec["heads"] = sum(u.kind == "head" for u in units)
        rec["mlps"] = sum(u.kind == "neuron" for u in units)
        rec["left_intact"] = dict(units.reasons)
        cut = fp.apply_cuts(model, {u.name: list(range(u.size // 2)) for u in units}, example_inputs=x)
        rec["params_cut"] = _params(cut)
        out, rec["generated"] = _runs(cut, x, kind)
        with tempfile.TemporaryDirectory() as d:
            hf_io.save(cut, d)
            with torch.no_grad():
                back = TensorIO(hf_io.load(d))(x)
        rec["round_trip_max_diff"] = float((back - out).abs().max())
        if rec["round_trip_max_diff"] > 1e-6:
            raise FlowpruneError(f"save/load changed the outputs by {rec['round_trip_max_diff']:.3g}")
        if not (rec["heads"] or rec["left_intact"]) or not rec["mlps"]:
            raise FlowpruneError("no attention or no MLP found")
        rec["status"] = "partial" if rec["left_intact"] else "pass"
    except Exception as e:  # noqa: BLE001 -- recorded, the sweep goes on
        rec.update(status="fail", error=f"{type(e).__name__}: {str(e)[:300]}")
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    return rec


def _output_layers(model: nn.Module) -> list[nn.Module]:
    """The layers whose outputs are the model's (kept whole by Torch-Pruning's recipe)."""
    out = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and
           n.rpartition(".")[2] in ("lm_head", "classifier", "score", "proj_out", "out_proj") and
           ("." not in n or n.startswith(("classifier", "score")))]
    emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return out + ([emb] if isinstance(emb, nn.Linear) and emb not in out else [])


def check_family_torch_pruning(name: str) -> dict:
    """Torch-Pruning's BasePruner with its documented transformers options on family ``name``."""
    import torch_pruning as tp

    from flowprune.hf.adapter import TensorIO
    from flowprune.hf.units import HFUnit, _set_head_attrs, find_hf_units

    try:
        model, x, kind = build_family(name)
    except Exception as e:  # noqa: BLE001
        return {"status": "skip", "error": f"{type(e).__name__}: {str(e)[:200]}"}
    dense = _params(model)
    try:
        heads = [u for u in find_hf_units(model, ("head",), set(), config=model.config) if isinstance(u, HFUnit)]
        num_heads = {}
        for u in heads:
            for mem in u.producers:
                per = u.group_size if mem is u.producers[0] and len(u.producers) > 1 else 1
                num_heads[u.mods[mem.module_name]] = u.size * per
        pruner = tp.pruner.BasePruner(TensorIO(model), x, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                      pruning_ratio=0.5, num_heads=num_heads, prune_num_heads=True,
                                      prune_head_dims=False, head_pruning_ratio=0.5,
                                      ignored_layers=_output_layers(model))
        pruner.step()
        for u in heads:  # the attribute fix its Hugging Face examples apply by hand
            q = u.mods[u.producers[0].module_name]
            n_q = pruner.num_heads.get(q, u.size * u.group_size)
            _set_head_attrs(u.attrs, n_q, max(1, n_q // max(1, u.group_size)), u.head_dim)
        _out, gen = _runs(model, x, kind)
        if _params(model) >= dense:
            raise FlowpruneError("nothing was pruned")
        return {"status": "pass", "params_cut": _params(model), "generated": gen}
    except Exception as e:  # noqa: BLE001 -- recorded
        return {"status": "fail", "error": f"{type(e).__name__}: {str(e)[:300]}"}


def run_transformers_sweep(families: Sequence[str] | None = None, *, torch_pruning: bool = True,
                           on_family: Callable[[dict], None] | None = None) -> list[dict]:
    """Run :func:`check_family` (and Torch-Pruning's, as ``rec["torch_pruning"]``) over ``families``
    (default: every family of :data:`FAMILIES`); one dict per family, in order."""
    names = list(FAMILIES) if families is None else list(families)
    for n in names:
        if n not in FAMILIES:
            raise bad_choice("transformers family", n, sorted(FAMILIES))
    out = []
    for n in names:
        rec = check_family(n)
        if torch_pruning and rec["status"] != "skip":
            rec["torch_pruning"] = check_family_torch_pruning(n)
        out.append(rec)
        if on_family is not None:
            on_family(rec)
    return out
