"""Tiny real MoE checkpoints written by ``transformers`` itself, shared by the test_weights_* files.

Not a test module of its own (it holds no tests); the other files import its builders.
"""

from __future__ import annotations

import os

import torch

HIDDEN, INTER, NUM_EXPERTS, TOP_K = 64, 32, 8, 2
_COMMON = dict(vocab_size=96, hidden_size=HIDDEN, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=64, tie_word_embeddings=False)


def make_model(arch: str, seed: int = 0, *, hidden: int = HIDDEN, inter: int = INTER):
    """A randomly initialised tiny model of ``arch`` (mixtral, qwen3_moe, qwen2_moe, deepseek_v3, llama)."""
    import transformers as tf

    torch.manual_seed(seed)
    common = {**_COMMON, "hidden_size": hidden}
    if arch == "mixtral":
        cfg = tf.MixtralConfig(intermediate_size=inter, num_local_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K,
                               num_hidden_layers=2, **common)
        model = tf.MixtralForCausalLM(cfg)
    elif arch == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(moe_intermediate_size=inter, intermediate_size=96, num_experts=NUM_EXPERTS,
                                num_experts_per_tok=TOP_K, norm_topk_prob=True, head_dim=16, num_hidden_layers=2,
                                **common)
        model = tf.Qwen3MoeForCausalLM(cfg)
    elif arch == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(moe_intermediate_size=inter, intermediate_size=96, shared_expert_intermediate_size=48,
                                num_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K, num_hidden_layers=2, **common)
        model = tf.Qwen2MoeForCausalLM(cfg)
    elif arch == "deepseek_v3":
        cfg = tf.DeepseekV3Config(moe_intermediate_size=inter, intermediate_size=96, n_routed_experts=NUM_EXPERTS,
                                  n_shared_experts=1, num_experts_per_tok=TOP_K, n_group=2, topk_group=1,
                                  first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
                                  qk_nope_head_dim=8, v_head_dim=16, num_hidden_layers=3, **common)
        model = tf.DeepseekV3ForCausalLM(cfg)
    elif arch == "llama":
        cfg = tf.LlamaConfig(intermediate_size=96, num_hidden_layers=2, **common)
        model = tf.LlamaForCausalLM(cfg)
    else:
        raise ValueError(arch)
    model.eval()
    if arch == "deepseek_v3":  # the correction bias is a zero buffer at init: make routing depend on it
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate") and hasattr(layer.mlp.gate, "e_score_correction_bias"):
                layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(NUM_EXPERTS) * 0.1)
    return model


FP8_LAYOUTS = ("hub", "transformers", "transformers_fused")


def save_fp8(model, path: str, layout: str) -> str:
    """A block-scaled FP8 checkpoint of ``model`` (weights quantised 128x128 by ``eep.fp8.quantize_weight``).

    ``hub``: ``save_pretrained`` of the model, then every routed expert weight rewritten as F8_E4M3
    with its ``...weight_scale_inv`` beside it and ``quantization_config`` added: the layout of the
    DeepSeek-V3 and Qwen3 "-FP8" files. ``transformers`` / ``transformers_fused``: the model's
    linears and experts swapped for transformers' own ``FP8Linear`` / ``FP8Experts`` (which hold
    ``gate_up_proj`` + ``gate_up_proj_scale_inv``), filled with the quantised weights and written by
    ``save_pretrained`` (per-expert weights with stacked scales) or ``save_pretrained(save_original_format=False)``
    (fused ``[E, ...]`` tensors).
    """
    import json

    import transformers as tf
    from safetensors.torch import load_file, save_file
    from transformers.integrations.finegrained_fp8 import replace_with_fp8_linear

    from eep.fp8 import quantize_weight

    qconfig = tf.FineGrainedFP8Config(weight_block_size=[128, 128])
    if layout == "hub":
        save(model, path)
        file = os.path.join(path, "model.safetensors")
        tensors = load_file(file)
        for key in [k for k in tensors if ".experts." in k and ".shared_experts." not in k]:
            q = quantize_weight(tensors[key])
            tensors[key] = q.weight
            tensors[key + "_scale_inv"] = q.scale
        save_file(tensors, file, metadata={"format": "pt"})
        config = json.load(open(os.path.join(path, "config.json")))
        config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": [128, 128]}
        json.dump(config, open(os.path.join(path, "config.json"), "w"))
        return path
    source = model.state_dict()
    fp8_model = type(model)(model.config)
    replace_with_fp8_linear(fp8_model, quantization_config=qconfig)
    fp8_model.to_empty(device="cpu")
    params = dict(fp8_model.named_parameters())
    with torch.no_grad():
        for name, param in params.items():
            if name.endswith("_scale_inv"):
                continue
            if param.dtype == torch.float8_e4m3fn:
                q = quantize_weight(source[name])
                param.copy_(q.weight)
                scale_name = name[:-len("weight")] + "weight_scale_inv" if name.endswith(".weight") else name + "_scale_inv"
                params[scale_name].copy_(q.scale)
            else:
                param.copy_(source[name])
        for name, buf in fp8_model.named_buffers():
            if name in source:
                buf.copy_(source[name])
    fp8_model.config.quantization_config = qconfig
    os.makedirs(path, exist_ok=True)
    fp8_model.save_pretrained(path, **({"save_original_format": False} if layout == "transformers_fused" else {}))
    return path


def save(model, path: str, **kwargs) -> str:
    """``save_pretrained`` with the progress bars of transformers kept off stderr noise."""
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, **kwargs)
    return path


def moe_layers(model) -> list[int]:
    return [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]


def routed_tokens(model, num_tokens: int, gen: torch.Generator):
    """For each MoE layer: ``(layer, block, x [num_tokens, hidden], topk_weights, topk_ids)`` with the
    model's own router (``block.gate``) deciding where fresh random tokens go."""
    for layer in moe_layers(model):
        block = model.model.layers[layer].mlp
        x = torch.randn(num_tokens, model.config.hidden_size, generator=gen)
        with torch.no_grad():
            _, topk_weights, topk_ids = block.gate(x)
        yield layer, block, x, topk_weights, topk_ids


def model_expert(model, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(w_gate [I, H], w_up [I, H], w_down [H, I])`` straight from the model's parameters.

    transformers >= 5 keeps ``experts.gate_up_proj [E, 2I, H]`` (gate first, ``chunk(2, -1)`` in the
    forward) and ``experts.down_proj [E, H, I]`` in memory.
    """
    experts = model.model.layers[layer].mlp.experts
    gate_up = experts.gate_up_proj[expert]
    inter = gate_up.shape[0] // 2
    return gate_up[:inter].detach(), gate_up[inter:].detach(), experts.down_proj[expert].detach()
