"""Block-scaled FP8 (e4m3): the one home of the format eep uses for expert weights and activations.

**Weights**, as DeepSeek-V3/R1 and the Qwen3 "-FP8" checkpoints store them (config.json
``quantization_config = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}``):
``weight`` float8_e4m3fn ``[..., out, in]`` and ``scale`` float32 ``[..., ceil(out/128), ceil(in/128)]``
(the checkpoint's ``weight_scale_inv``). The real weight is ``weight.float() * scale`` of its 128x128
block; a partial block at the edge has one scale like any other. ``Fp8Weight`` carries the two
tensors as one unit: a restore, a repair copy or a slot index moves both or neither.

**Activations**, as the FP8 dispatch sends them (DeepEP's low-latency format): per token and per
128 channels, ``scale = amax / 448`` (1 when the block is all zeros) and
``value = round_to_nearest_even(x / scale)`` saturated to e4m3, both divisions in float32 — the
arithmetic of ``eep/fused/csrc/dispatch.cuh`` (``eep_quantize``), which quantizes a whole row with
one scale: that per-row format is this one with ``block = hidden``. ``quantize_rows`` is the
reference of that arithmetic; the expert stages requantize the SwiGLU output with it before the
down projection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
BLOCK = 128  # scale granularity along a token row, and each side of a weight block


def num_blocks(n: int, block: int = BLOCK) -> int:
    """Scale entries covering ``n`` channels: ``ceil(n / block)``."""
    return -(-n // block)


def block_scale_shape(out_features: int, in_features: int, block: tuple[int, int] = (BLOCK, BLOCK)) -> tuple[int, int]:
    """Shape of a weight's block scales: ``[ceil(out / block_out), ceil(in / block_in)]``."""
    return num_blocks(out_features, block[0]), num_blocks(in_features, block[1])


# ---- activations: per token, per block of channels ----
def quantize_rows(x: torch.Tensor, *, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., hidden]`` -> ``(values [..., hidden] e4m3, scales [..., ceil(hidden/block)] float32)``.

    ``block = hidden`` gives one scale per row (the decode buffer's format).
    """
    hidden = x.shape[-1]
    nb = num_blocks(hidden, block)
    xf = x.float()
    padded = torch.nn.functional.pad(xf, (0, nb * block - hidden)) if nb * block != hidden else xf
    blocks = padded.reshape(*x.shape[:-1], nb, block)
    amax = blocks.abs().amax(-1)
    scales = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    values = (blocks / scales.unsqueeze(-1)).reshape(*x.shape[:-1], nb * block)[..., :hidden]
    return values.to(FP8_DTYPE), scales


def dequantize_rows(values: torch.Tensor, scales: torch.Tensor, *, block: int = BLOCK) -> torch.Tensor:
    """Inverse of ``quantize_rows``: ``values [..., hidden] * scale of its block``, float32.

    ``scales`` is ``[..., ceil(hidden/block)]``, or ``[...]`` (one scale per row).
    """
    hidden = values.shape[-1]
    if scales.dim() == values.dim() - 1:
        return values.float() * scales.float().unsqueeze(-1)
    if scales.shape[-1] != num_blocks(hidden, block):
        raise ValueError(f"scales {list(scales.shape)} do not cover rows of {hidden} in blocks of {block}")
    per_channel = scales.float().repeat_interleave(block, dim=-1)[..., :hidden]
    return values.float() * per_channel


# ---- weights: 128x128 blocks ----
def dequantize_weight(weight: torch.Tensor, scale: torch.Tensor, *,
                      block: tuple[int, int] = (BLOCK, BLOCK)) -> torch.Tensor:
    """``weight [..., out, in]`` (any float dtype) times the scale of its block, in float32: exactly
    ``weight.float() * scale`` element by element."""
    out_features, in_features = weight.shape[-2:]
    if tuple(scale.shape[-2:]) != block_scale_shape(out_features, in_features, block):
        raise ValueError(f"weight {list(weight.shape)} and block scales {list(scale.shape)} do not tile in "
                         f"{block[0]}x{block[1]} blocks")
    block_out, block_in = block
    expanded = (scale.float().repeat_interleave(block_out, dim=-2)[..., :out_features, :]
                .repeat_interleave(block_in, dim=-1)[..., :in_features])
    return weight.float() * expanded


def quantize_weight(w: torch.Tensor, *, block: tuple[int, int] = (BLOCK, BLOCK)) -> Fp8Weight:
    """Blockwise e4m3 quantisation of ``w [..., out, in]``: per block ``scale = amax / 448`` (1 for an
    all-zero block), ``weight = round(w / scale)``. What a block-scaled checkpoint holds."""
    out_features, in_features = w.shape[-2:]
    rows, cols = block_scale_shape(out_features, in_features, block)
    wf = torch.nn.functional.pad(w.float(), (0, cols * block[1] - in_features, 0, rows * block[0] - out_features))
    tiles = wf.reshape(*w.shape[:-2], rows, block[0], cols, block[1])
    amax = tiles.abs().amax(dim=(-3, -1))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (tiles / scale[..., :, None, :, None]).reshape(*w.shape[:-2], rows * block[0], cols * block[1])
    return Fp8Weight(q[..., :out_features, :in_features].to(FP8_DTYPE).contiguous(), scale.contiguous())


@dataclass(frozen=True)
class Fp8Weight:
    """FP8 weights and their block scales, held, indexed and copied as one unit.

    weight: float8_e4m3fn ``[*lead, out, in]``; scale: float32 ``[*lead, ceil(out/128), ceil(in/128)]``.
    ``lead`` is empty for one projection, ``[num_experts]`` or ``[num_phys_slots]`` for a stack.
    Indexing (``w[expert]``, ``w[a:b]``) selects along the leading dimensions of both tensors and
    returns views, so ``stack[slot].copy_(src)`` writes the slot in place.
    """

    weight: torch.Tensor
    scale: torch.Tensor

    def __post_init__(self) -> None:
        if self.weight.dim() < 2 or self.weight.dim() != self.scale.dim() \
                or self.weight.shape[:-2] != self.scale.shape[:-2]:
            raise ValueError(f"Fp8Weight: weight {list(self.weight.shape)} and scale {list(self.scale.shape)} "
                             "must share their leading dimensions")

    @property
    def shape(self) -> torch.Size:
        """The weight's shape (what a plain tensor of the same weights would have)."""
        return self.weight.shape

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size() + self.scale.numel() * self.scale.element_size()

    def __getitem__(self, index) -> Fp8Weight:
        return Fp8Weight(self.weight[index], self.scale[index])

    def copy_(self, src: Fp8Weight, non_blocking: bool = False) -> Fp8Weight:
        if not isinstance(src, Fp8Weight):
            raise TypeError(f"an Fp8Weight copies from an Fp8Weight (weights and scales), got {type(src).__name__}")
        self.weight.copy_(src.weight, non_blocking=non_blocking)
        self.scale.copy_(src.scale, non_blocking=non_blocking)
        return self

    def fill_(self, value: float) -> Fp8Weight:
        """Fill both tensors (``float("nan")`` poisons: the dequantised weight is NaN either way)."""
        byte = torch.tensor([value]).to(self.weight.dtype).view(torch.uint8).item()
        self.weight.view(torch.uint8).fill_(byte)  # as bytes: not every device fills float8 tensors
        self.scale.fill_(value)
        return self

    def empty_like(self) -> Fp8Weight:
        return Fp8Weight(torch.empty_like(self.weight), torch.empty_like(self.scale))

    def to(self, device: torch.device | str) -> Fp8Weight:
        return Fp8Weight(self.weight.to(device), self.scale.to(device))

    def contiguous(self) -> Fp8Weight:
        return Fp8Weight(self.weight.contiguous(), self.scale.contiguous())

    def dequantize(self) -> torch.Tensor:
        """float32 weights, ``weight.float() * scale`` per block."""
        return dequantize_weight(self.weight, self.scale)


ExpertWeight = torch.Tensor | Fp8Weight  # one projection's weights as a slot or a tier holds them


def weight_nbytes(w: ExpertWeight) -> int:
    """Bytes of a plain weight tensor, or of an ``Fp8Weight``'s weights plus scales."""
    return w.nbytes if isinstance(w, Fp8Weight) else w.numel() * w.element_size()


def empty_like_weight(w: ExpertWeight) -> ExpertWeight:
    return w.empty_like() if isinstance(w, Fp8Weight) else torch.empty_like(w)


def as_float(w: ExpertWeight) -> torch.Tensor:
    """float32 weights: dequantised for an ``Fp8Weight``, upcast otherwise."""
    return w.dequantize() if isinstance(w, Fp8Weight) else w.float()


__all__ = ["BLOCK", "ExpertWeight", "FP8_DTYPE", "FP8_MAX", "Fp8Weight", "as_float", "block_scale_shape",
           "dequantize_rows", "dequantize_weight", "empty_like_weight", "num_blocks", "quantize_rows",
           "quantize_weight", "weight_nbytes"]
