"""The tiny decode model served by the runtime, defined once for the engine and the test oracle.

Shape ``tiny`` from DESIGN.md: hidden 64, moe intermediate 32, 16 experts, top-4, 2 MoE layers,
plus a small vocabulary. One decode step maps each request's last token to its next token:

    h = embed[token]                                       # [num_tokens, hidden]
    for layer in range(num_layers):
        x = rms_norm(h)
        topk_weights, topk_ids = select_experts(x @ router[layer].T, top_k)
        h = h + moe(layer, x, topk_weights, topk_ids)      # the only part that crosses ranks
    next_token = argmax(rms_norm(h) @ lm_head.T)

``moe`` is ``eep.mlp.dense_moe`` in the oracle and dispatch/expert/combine over the
transport in the engine; everything else is ``decode_step`` here, shared by both. There is no
attention, so the next token depends only on the last one: a request can be re-run from its
prompt on any rank and yields the same tokens, which is how a dead rank's requests are re-queued.

Weights are generated from a seed (``generate_weights``). A rank restores experts from
``rank_tiers``: ``eep.repair.ExpertSource`` tiers (a ``TensorTier`` over the generated copy, or
weights_tools' host and disk tiers over ``eep-shards prepare`` output), through the one repair executor.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from eep.fp8 import BLOCK as FP8_BLOCK
from eep.fp8 import Fp8Weight, quantize_weight
from eep.mlp import dense_moe
from eep.repair.tiers import ExpertSource, TensorTier
from eep.routing import select_experts

MoEFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TinyConfig:
    hidden: int = 64
    intermediate: int = 32
    num_experts: int = 16
    top_k: int = 4
    num_layers: int = 2
    vocab_size: int = 128  # small: the oracle tabulates all next tokens at once
    seed: int = 0


@dataclass
class TinyWeights:
    """Shapes: embed, lm_head ``[vocab_size, hidden]``; router ``[num_layers, num_experts, hidden]``;
    w_gate, w_up ``[num_layers, num_experts, intermediate, hidden]``; w_down ``[num_layers,
    num_experts, hidden, intermediate]``. float32."""

    config: TinyConfig
    embed: torch.Tensor
    router: torch.Tensor
    w_gate: torch.Tensor
    w_up: torch.Tensor
    w_down: torch.Tensor
    lm_head: torch.Tensor


def generate_weights(config: TinyConfig, *, shard_dir: str | None = None) -> TinyWeights:
    """Deterministic weights for ``config`` (the same on every rank and in the oracle).

    Experts are random, or with ``shard_dir`` read from shards made by ``eep-shards prepare`` (MoE
    layer ``l`` of the model is the ``l``-th MoE layer of the checkpoint); embeddings, routers and
    the lm head are always random from the seed.

    Every rank runs the same arithmetic in a different batch composition, so results may differ in
    the last float32 bit. A top-k or argmax that is a near tie could then flip; the seed is
    advanced until the routing and the argmax of every vocabulary entry are decided by a margin
    far above float32 noise, so token-exact comparison with the oracle is well defined.
    """
    experts = None if shard_dir is None else _shard_experts(config, shard_dir)
    for attempt in range(64):
        weights = _random_weights(config, config.seed * 1000 + attempt)
        if experts is not None:
            weights.w_gate, weights.w_up, weights.w_down = experts
        if _min_margin(weights) > 1e-4:
            return weights
    raise RuntimeError(f"no tie-free weights found for {config}")


def _shard_experts(config: TinyConfig, shard_dir: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from weights_tools import ExpertStore, load_layer_experts  # lazily: the generated path needs no shards

    store = ExpertStore(shard_dir)
    if store.is_fp8:
        store.close()
        raise ValueError(f"shards in {shard_dir} hold block-scaled FP8 experts; the shm engine serves float32 "
                         "experts (FP8 ones run on GpuEngine: engine cpu_elastic or gloo on a CPU)")
    got = (len(store.moe_layers), store.num_experts, store.expert_shapes()[0])
    want = (config.num_layers, config.num_experts, (config.intermediate, config.hidden))
    store.close()
    if got != want:
        raise ValueError(f"shards in {shard_dir} hold (moe layers, experts, [intermediate, hidden]) {got}; "
                         f"the model config needs {want}")
    layers = [load_layer_experts(shard_dir, layer) for layer in store.moe_layers]
    return tuple(torch.stack([layer[i] for layer in layers]).float() for i in range(3))


def _random_weights(config: TinyConfig, seed: int) -> TinyWeights:
    gen = torch.Generator().manual_seed(seed)
    c = config
    h, i, e, n = c.hidden, c.intermediate, c.num_experts, c.num_layers
    return TinyWeights(
        config=c,
        embed=torch.randn(c.vocab_size, h, generator=gen),
        router=torch.randn(n, e, h, generator=gen) / h ** 0.5 * 2.0,
        w_gate=torch.randn(n, e, i, h, generator=gen) / h ** 0.5,
        w_up=torch.randn(n, e, i, h, generator=gen) / h ** 0.5,
        w_down=torch.randn(n, e, h, i, generator=gen) / i ** 0.5,
        lm_head=torch.randn(c.vocab_size, h, generator=gen) / h ** 0.5 * 4.0)


def rms_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def decode_step(weights: TinyWeights, tokens: torch.Tensor, moe: MoEFn) -> torch.Tensor:
    """``tokens [num_tokens]`` int64 -> next tokens ``[num_tokens]`` int64 (module docstring)."""
    h = weights.embed[tokens]  # [num_tokens, hidden]
    for layer in range(weights.config.num_layers):
        x = rms_norm(h)
        topk_weights, topk_ids = select_experts(x @ weights.router[layer].T, weights.config.top_k)
        h = h + moe(layer, x, topk_weights, topk_ids)
    return (rms_norm(h) @ weights.lm_head.T).argmax(-1)


def dense_moe_fn(weights: TinyWeights) -> MoEFn:
    """The oracle's MoE: ``eep.mlp.dense_moe`` over all experts of the layer."""
    def moe(layer: int, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        return dense_moe(x, weights.w_gate[layer], weights.w_up[layer], weights.w_down[layer],
                         topk_ids=topk_ids, topk_weights=topk_weights)
    return moe


def next_token_table(weights: TinyWeights) -> list[int]:
    """The reference next token of every vocabulary entry (the oracle, tabulated)."""
    tokens = torch.arange(weights.config.vocab_size)
    return decode_step(weights, tokens, dense_moe_fn(weights)).tolist()


def reference_generate(weights: TinyWeights, prompt_token: int, num_new_tokens: int, *,
                       table: list[int] | None = None) -> list[int]:
    """The tokens the single-process reference generates for one request."""
    table = next_token_table(weights) if table is None else table
    out, token = [], prompt_token
    for _ in range(num_new_tokens):
        token = table[token]
        out.append(token)
    return out


def make_request(config: TinyConfig, request_id: int, *, max_new_tokens: int = 12) -> tuple[int, int]:
    """Request ``request_id``'s ``(prompt_token, num_new_tokens)``, a pure function of the seed."""
    gen = torch.Generator().manual_seed(config.seed * 1_000_003 + request_id)
    prompt = int(torch.randint(config.vocab_size, (1,), generator=gen))
    num_new = int(torch.randint(max(1, max_new_tokens // 3), max_new_tokens + 1, (1,), generator=gen))
    return prompt, num_new


def rank_tiers(weights: TinyWeights, shard_dir: str | None = None) -> list[ExpertSource]:
    """The tiers a rank restores experts from, fastest first, in the model's layer numbering: a
    ``TensorTier`` named "host" over the generated weights, or weights_tools' ``HostTier`` and
    ``DiskTier`` over the shards in ``shard_dir`` (which must hold the same experts as ``weights``)."""
    if shard_dir is None:
        layers = range(weights.config.num_layers)
        return [TensorTier({layer: (weights.w_gate[layer], weights.w_up[layer], weights.w_down[layer])
                            for layer in layers})]
    from weights_tools import DiskTier, HostTier  # lazily: the generated path needs no shards
    from weights_tools.manifest import Manifest

    manifest = Manifest.load(shard_dir)
    return [ModelLayerTier(HostTier(shard_dir, manifest=manifest), manifest.moe_layers),
            ModelLayerTier(DiskTier(shard_dir, manifest=manifest), manifest.moe_layers)]


def shards_are_fp8(shard_dir: str | None) -> bool:
    """Whether ``eep-shards prepare`` output holds block-scaled FP8 experts (its manifest says; no shards:
    the generated float32 experts)."""
    if shard_dir is None:
        return False
    from weights_tools.manifest import Manifest  # lazily: the generated path needs no shards

    return Manifest.load(shard_dir).is_fp8


class ModelLayerTier:
    """An ``ExpertSource`` in the model's layer numbering over one in the checkpoint's: model layer
    ``l`` is the checkpoint's ``layer_ids[l]`` (its ``l``-th MoE layer). Plans name layers as the
    model does; shards as the checkpoint does."""

    def __init__(self, tier: ExpertSource, layer_ids: list[int]):
        self.tier, self.layer_ids, self.name = tier, list(layer_ids), tier.name

    def has_expert(self, layer: int, expert: int) -> bool:
        return 0 <= layer < len(self.layer_ids) and self.tier.has_expert(self.layer_ids[layer], expert)

    def copy_expert_into(self, layer: int, expert: int, w_gate_dst, w_up_dst, w_down_dst, *, stream=None) -> int:
        return self.tier.copy_expert_into(self.layer_ids[layer], expert, w_gate_dst, w_up_dst, w_down_dst,
                                          stream=stream)

    def close(self) -> None:
        close = getattr(self.tier, "close", None)
        if close is not None:
            close()


def _min_margin(weights: TinyWeights) -> float:
    """Smallest gap, over every vocabulary entry, between the k-th and (k+1)-th router logit of
    each layer and between the top two lm-head logits (what must not flip)."""
    c = weights.config
    h = weights.embed
    margins = []
    for layer in range(c.num_layers):
        x = rms_norm(h)
        probs = torch.softmax(x @ weights.router[layer].T, -1)
        top = probs.topk(c.top_k + 1, -1).values
        margins.append((top[:, c.top_k - 1] - top[:, c.top_k]).min())
        tw, ti = select_experts(x @ weights.router[layer].T, c.top_k)
        h = h + dense_moe(x, weights.w_gate[layer], weights.w_up[layer], weights.w_down[layer],
                          topk_ids=ti, topk_weights=tw)
    logits = (rms_norm(h) @ weights.lm_head.T).topk(2, -1).values
    margins.append((logits[:, 0] - logits[:, 1]).min())
    return float(min(margins))


# ---- the bench model: the same decode model at a real MoE shape, served by the GPU engine ----
# (non-expert weights from a seed, bench_weights; experts from eep-shards output of a checkpoint such
# as write_random_checkpoint writes: the failure benchmark and `eep demo --gpu` serve it)

QWEN3_30B_A3B = TinyConfig(hidden=2048, intermediate=768, num_experts=128, top_k=8, num_layers=48, vocab_size=1024)
QWEN3_ATTN_WIDTH = 4096 + 512 + 512 + 4096  # q, k, v, o projection columns at hidden 2048


@dataclass
class BenchWeights:
    """Non-expert weights (float32, CPU): embed, lm_head ``[vocab, hidden]``; router ``[layers, experts,
    hidden]``. (The attention stand-in's weights are drawn on the device by ``GpuEngine``: they never
    change a token, so the oracle does not need them.)"""

    embed: torch.Tensor
    router: torch.Tensor
    lm_head: torch.Tensor


def bench_weights(config: TinyConfig) -> BenchWeights:
    """The seeded non-expert weights; identical on every rank and in the oracle."""
    gen = torch.Generator().manual_seed(config.seed * 7919 + 1)
    h, n, e, v = config.hidden, config.num_layers, config.num_experts, config.vocab_size
    return BenchWeights(embed=torch.randn(v, h, generator=gen),
                        router=torch.randn(n, e, h, generator=gen) / h ** 0.5 * 2.0,
                        lm_head=torch.randn(v, h, generator=gen) / h ** 0.5 * 4.0)


def write_random_checkpoint(root: str, model: TinyConfig, *, seed: int = 0, device: str = "cpu",
                            workers: int = 4, fp8: bool = False) -> int:
    """A Qwen3-MoE-format checkpoint of random bf16 experts, one file per layer; returns bytes written.

    Random values are drawn on ``device`` (a GPU draws 58 GB in seconds) from a generator seeded
    per layer, and ``workers`` layers are written at a time (one at a time, 38 GB took 41 s), so host
    memory holds a few layers at most.

    ``fp8``: the same random experts quantised blockwise (``eep.fp8.quantize_weight``: e4m3 weights,
    ``weight_scale_inv`` float32 per 128x128 block) with the ``quantization_config`` the Qwen3 "-FP8"
    and DeepSeek-V3 releases carry; hidden and intermediate sizes must be multiples of 128.
    """
    from concurrent.futures import ThreadPoolExecutor

    from safetensors.torch import save_file  # lazily: serving never writes a checkpoint

    os.makedirs(root, exist_ok=True)
    h, i, e, n = model.hidden, model.intermediate, model.num_experts, model.num_layers
    if fp8 and (h % FP8_BLOCK or i % FP8_BLOCK):
        raise ValueError(f"FP8 experts need hidden ({h}) and intermediate ({i}) sizes that are multiples of "
                         f"{FP8_BLOCK}: the expert slots keep gate and up scale blocks apart")

    def stored(w: torch.Tensor) -> Fp8Weight | torch.Tensor:  # a whole layer's stack at once, on the device
        return quantize_weight(w).to("cpu") if fp8 else w.to(torch.bfloat16).cpu()

    def expert_tensors(pre: str, name: str, w: Fp8Weight | torch.Tensor) -> dict[str, torch.Tensor]:
        if not fp8:
            return {pre + name: w.contiguous()}
        return {pre + name: w.weight.contiguous(), pre + name + "_scale_inv": w.scale.contiguous()}

    def write_layer(layer: int) -> tuple[str, list[str], int]:
        gen = torch.Generator(device=device).manual_seed(seed * 100003 + layer)
        name = f"model-{layer + 1:05d}-of-{n:05d}.safetensors"
        gate_up = stored(torch.randn(e, 2, i, h, generator=gen, device=device) / h ** 0.5)
        down = stored(torch.randn(e, h, i, generator=gen, device=device) / i ** 0.5)
        tensors = {f"model.layers.{layer}.mlp.gate.weight": torch.zeros(e, h, dtype=torch.bfloat16)}
        for x in range(e):
            pre = f"model.layers.{layer}.mlp.experts.{x}."
            tensors.update(expert_tensors(pre, "gate_proj.weight", gate_up[x, 0]))
            tensors.update(expert_tensors(pre, "up_proj.weight", gate_up[x, 1]))
            tensors.update(expert_tensors(pre, "down_proj.weight", down[x]))
        save_file(tensors, os.path.join(root, name))
        return name, list(tensors), os.path.getsize(os.path.join(root, name))

    weight_map, total = {}, 0
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for name, keys, size in pool.map(write_layer, range(n)):
            weight_map.update({k: name for k in keys})
            total += size
    json.dump({"weight_map": weight_map}, open(os.path.join(root, "model.safetensors.index.json"), "w"))
    config = {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": h,
              "moe_intermediate_size": i, "num_experts": e, "num_experts_per_tok": model.top_k,
              "num_hidden_layers": n, "norm_topk_prob": True}
    if fp8:
        config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
    json.dump(config, open(os.path.join(root, "config.json"), "w"))
    return total
