"""Tiny real MoE checkpoints written by ``transformers`` itself, shared by the test_weights_* files.

Not a test module of its own (it holds no tests); the other files import its builders.
"""

from __future__ import annotations

import os

import torch

HIDDEN, INTER, NUM_EXPERTS, TOP_K = 64, 32, 8, 2
_COMMON = dict(vocab_size=96, hidden_size=HIDDEN, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=64, tie_word_embeddings=False)


def make_model(arch: str, seed: int = 0):
    """A randomly initialised tiny model of ``arch`` (mixtral, qwen3_moe, qwen2_moe, deepseek_v3, llama)."""
    import transformers as tf

    torch.manual_seed(seed)
    if arch == "mixtral":
        cfg = tf.MixtralConfig(intermediate_size=INTER, num_local_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K,
                               num_hidden_layers=2, **_COMMON)
        model = tf.MixtralForCausalLM(cfg)
    elif arch == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(moe_intermediate_size=INTER, intermediate_size=96, num_experts=NUM_EXPERTS,
                                num_experts_per_tok=TOP_K, norm_topk_prob=True, head_dim=16, num_hidden_layers=2,
                                **_COMMON)
        model = tf.Qwen3MoeForCausalLM(cfg)
    elif arch == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(moe_intermediate_size=INTER, intermediate_size=96, shared_expert_intermediate_size=48,
                                num_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K, num_hidden_layers=2, **_COMMON)
        model = tf.Qwen2MoeForCausalLM(cfg)
    elif arch == "deepseek_v3":
        cfg = tf.DeepseekV3Config(moe_intermediate_size=INTER, intermediate_size=96, n_routed_experts=NUM_EXPERTS,
                                  n_shared_experts=1, num_experts_per_tok=TOP_K, n_group=2, topk_group=1,
                                  first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
                                  qk_nope_head_dim=8, v_head_dim=16, num_hidden_layers=3, **_COMMON)
        model = tf.DeepseekV3ForCausalLM(cfg)
    elif arch == "llama":
        cfg = tf.LlamaConfig(intermediate_size=96, num_hidden_layers=2, **_COMMON)
        model = tf.LlamaForCausalLM(cfg)
    else:
        raise ValueError(arch)
    model.eval()
    if arch == "deepseek_v3":  # the correction bias is a zero buffer at init: make routing depend on it
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate") and hasattr(layer.mlp.gate, "e_score_correction_bias"):
                layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(NUM_EXPERTS) * 0.1)
    return model


def save(model, path: str, **kwargs) -> str:
    """``save_pretrained`` with the progress bars of transformers kept off stderr noise."""
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, **kwargs)
    return path


def moe_layers(model) -> list[int]:
    return [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]


def model_expert(model, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(w_gate [I, H], w_up [I, H], w_down [H, I])`` straight from the model's parameters.

    transformers >= 5 keeps ``experts.gate_up_proj [E, 2I, H]`` (gate first, ``chunk(2, -1)`` in the
    forward) and ``experts.down_proj [E, H, I]`` in memory.
    """
    experts = model.model.layers[layer].mlp.experts
    gate_up = experts.gate_up_proj[expert]
    inter = gate_up.shape[0] // 2
    return gate_up[:inter].detach(), gate_up[inter:].detach(), experts.down_proj[expert].detach()
