"""Read a Hugging Face MoE checkpoint directory and work out where every routed expert lives.

Layouts are detected from the keys present, never from the model name:

* **per-expert** (what ``transformers`` ``save_pretrained`` writes by default, and the Hub files):
  ``...layers.{l}.block_sparse_moe.experts.{e}.w1|w3|w2.weight`` (Mixtral: gate|up|down) or
  ``...layers.{l}.mlp.experts.{e}.gate_proj|up_proj|down_proj.weight`` (Qwen2/3-MoE, DeepSeek-V2/V3),
  each ``[I, H]`` / ``[H, I]`` like ``nn.Linear.weight``.
* **stacked** ``...experts.gate_proj|up_proj|down_proj`` ``[E, I, H]`` / ``[E, H, I]``, and **fused**
  ``...experts.gate_up_proj`` ``[E, 2I, H]`` with gate in the first half (``transformers`` >= 5 in
  memory, ``save_pretrained(save_original_format=False)``), plus the transposed variants
  ``[E, H, 2I]`` / ``[E, I, H]`` (Llama-4 style, ``x @ W``). Orientation is decided from the
  config's hidden and intermediate sizes; when one tensor is square-ambiguous, the other decides.

Block-scaled FP8 experts (DeepSeek-V3/R1, Qwen3 "-FP8"; ``quantization_config.quant_method == "fp8"``,
e4m3, ``weight_block_size [128, 128]``): each weight above is ``F8_E4M3`` and has float32 block scales,
per expert ``...experts.{e}.{proj}.weight_scale_inv [ceil(out/128), ceil(in/128)]`` or stacked
``...experts.{proj}_scale_inv [E, ...]`` (what ``transformers`` writes for its in-memory
``FP8Experts``, also beside per-expert weights). A scale is located like its weight, as a byte range
of the source, so an expert's shard holds its FP8 weights and their scales. Any other
quantisation method, format or block size is refused naming it.

Shared experts (``shared_expert``/``shared_experts``), routers and dense layers are non-expert
tensors (FP8 ones are copied as they are, scales included). Anything else under ``.experts.``
(biases, activation scales, interleaved gate/up) is refused with a list of the keys, rather than
silently dropped. Only ``.safetensors`` weights are read: a ``pytorch_model.bin`` would need
unpickling, which this tool never does.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

from eep.fp8 import BLOCK, block_scale_shape
from weights_tools.errors import CheckpointError, ShardError
from weights_tools.manifest import FP8_QUANTIZATION, ROLES
from weights_tools.safetensors_io import DTYPE_SIZE, HeaderEntry, read_header

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

_PER_EXPERT = re.compile(r"^(?P<prefix>(?:.*\.)?layers\.)(?P<layer>\d+)\.(?P<block>(?:[A-Za-z_]\w*\.)*?)"
                         r"experts\.(?P<expert>\d+)\.(?P<proj>w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_STACKED = re.compile(r"^(?P<prefix>(?:.*\.)?layers\.)(?P<layer>\d+)\.(?P<block>(?:[A-Za-z_]\w*\.)*?)"
                      r"experts\.(?P<proj>gate_up_proj|gate_proj|up_proj|down_proj)(?:\.weight)?$")
_PER_EXPERT_SCALE = re.compile(r"^(?P<prefix>(?:.*\.)?layers\.)(?P<layer>\d+)\.(?P<block>(?:[A-Za-z_]\w*\.)*?)"
                               r"experts\.(?P<expert>\d+)\.(?P<proj>w1|w2|w3|gate_proj|up_proj|down_proj)"
                               r"\.weight_scale_inv$")
_STACKED_SCALE = re.compile(r"^(?P<prefix>(?:.*\.)?layers\.)(?P<layer>\d+)\.(?P<block>(?:[A-Za-z_]\w*\.)*?)"
                            r"experts\.(?P<proj>gate_up_proj|gate_proj|up_proj|down_proj)_scale_inv$")
_ANY_EXPERT = re.compile(r"(?:^|\.)experts\.")  # ".shared_experts." does not match: no dot before "experts"
_PROJ_ROLE = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}


@dataclass(frozen=True)
class ExpertSource:
    """Where one canonical expert tensor comes from.

    ``begin``/``nbytes`` are the absolute byte range in ``file`` when the canonical tensor is a
    contiguous slice of the source (per-expert, stacked, fused ``[E, 2I, H]``); for the transposed
    layouts ``transpose`` is set and ``index``/``half`` say which expert and which half to cut.
    """

    file: str
    key: str
    layer: int
    expert: int
    role: str
    shape: tuple[int, ...]  # canonical: gate/up [I, H], down [H, I]
    dtype: str
    begin: int
    nbytes: int
    transpose: bool = False
    index: int | None = None
    half: int | None = None  # 0 = gate, 1 = up, for a fused gate_up tensor


@dataclass
class CheckpointLayout:
    """Everything ``prepare`` needs to know about a source checkpoint."""

    checkpoint_dir: str
    config: dict[str, Any]
    config_sha256: str
    fingerprint: str  # changes when the config, index or any source header/size changes
    layout: str  # "per_expert" | "stacked" | "fused_gate_up" (+ "_transposed")
    hidden_size: int
    intermediate_size: int
    num_experts: int
    moe_layers: list[int]
    dtype: str
    experts: dict[tuple[int, int, str], ExpertSource]  # (layer, expert, role) -> source
    non_expert: list[tuple[str, HeaderEntry]]  # (file, header entry), everything else
    source_files: list[str] = field(default_factory=list)
    router_keys: dict[int, str] = field(default_factory=dict)  # MoE layer -> its router's weight key
    quantization: dict[str, Any] | None = None  # FP8_QUANTIZATION when the experts are block-scaled FP8
    scales: dict[tuple[int, int, str], ExpertSource] = field(default_factory=dict)  # like experts, FP8 only

    def architecture(self) -> dict[str, Any]:
        cfg = self.config
        return {"model_type": cfg.get("model_type"), "architectures": cfg.get("architectures"),
                "layout": self.layout, "hidden_size": self.hidden_size,
                "moe_intermediate_size": self.intermediate_size, "num_experts": self.num_experts,
                "moe_layers": self.moe_layers, "num_hidden_layers": _cfg(cfg, "num_hidden_layers", default=None),
                "top_k": _cfg(cfg, "num_experts_per_tok", default=None),
                "norm_topk_prob": _cfg(cfg, "norm_topk_prob", default=cfg.get("model_type") == "mixtral"),
                "hidden_act": _cfg(cfg, "hidden_act", default="silu"), "dtype": self.dtype,
                "quantization": self.quantization,
                "router_keys": {str(layer): key for layer, key in sorted(self.router_keys.items())}}


def inspect_checkpoint(checkpoint_dir: str) -> CheckpointLayout:
    """Parse ``config.json`` and the safetensors headers of a checkpoint; locate every routed expert.

    Raises ``CheckpointError`` (naming the file and tensor) for a non-MoE checkpoint, an unknown
    expert layout, a missing shard, or weights that disagree with the config.
    """
    config_path = os.path.join(checkpoint_dir, "config.json")
    try:
        with open(config_path, "rb") as f:
            config_raw = f.read()
        config = json.loads(config_raw)
    except FileNotFoundError:
        raise CheckpointError(f"{config_path}: missing; a Hugging Face checkpoint directory needs config.json",
                              path=config_path) from None
    except ValueError as exc:
        raise CheckpointError(f"{config_path}: not valid JSON ({exc})", path=config_path) from None

    weight_map, index_raw = _weight_map(checkpoint_dir)
    headers: dict[str, dict[str, HeaderEntry]] = {}
    fingerprint = hashlib.sha256(config_raw + index_raw)
    for name in sorted(set(weight_map.values())):
        path = os.path.join(checkpoint_dir, name)
        try:
            headers[name], _ = read_header(path)
        except ShardError as exc:
            raise CheckpointError(f"checkpoint shard {exc}", path=path) from None
        fingerprint.update(f"{name}:{os.path.getsize(path)}:".encode())
        fingerprint.update(json.dumps({k: [e.dtype, e.shape, e.begin] for k, e in headers[name].items()},
                                      sort_keys=True).encode())
    for key, name in weight_map.items():
        if key not in headers[name]:
            raise CheckpointError(f"{os.path.join(checkpoint_dir, name)}: tensor {key!r} listed in {INDEX_NAME} "
                                  "is absent from the file", path=os.path.join(checkpoint_dir, name), tensor=key)

    num_experts = _cfg(config, "num_local_experts", "num_experts", "n_routed_experts", default=None)
    if num_experts is None:
        if not any(_PER_EXPERT.match(k) or _STACKED.match(k) for k in weight_map):
            raise CheckpointError(f"{checkpoint_dir}: not a Mixture-of-Experts checkpoint: config.json "
                                  f"(model_type={config.get('model_type')!r}) has no expert count and the weights "
                                  f"no routed expert tensors; keys look like {sorted(weight_map)[:6]}",
                                  path=checkpoint_dir)
        raise CheckpointError(f"{config_path}: the weights hold expert tensors but config.json has none of "
                              "num_local_experts / num_experts / n_routed_experts", path=config_path)
    hidden = _cfg(config, "hidden_size", path=config_path)
    inter = _cfg(config, "moe_intermediate_size", "intermediate_size", path=config_path)
    experts, non_expert, layout, blocks, scale_keys = _locate_experts(checkpoint_dir, weight_map, headers,
                                                                      config_path, hidden, inter, num_experts)
    layers = sorted({layer for layer, _, _ in experts})
    num_layers = _cfg(config, "num_hidden_layers", default=None)
    extra_layers = _cfg(config, "num_nextn_predict_layers", default=0) or 0  # DeepSeek-V3 MTP layer(s)
    dtypes = {src.dtype for src in experts.values()}
    if len(dtypes) != 1:
        raise CheckpointError(f"{checkpoint_dir}: routed experts mix dtypes {sorted(dtypes)}", path=checkpoint_dir)
    quantization = _expert_quantization(config, config_path, next(iter(dtypes)), experts, scale_keys, layout)
    scales = _locate_scales(checkpoint_dir, scale_keys, experts, num_experts) if quantization else {}
    for layer in layers:
        if isinstance(num_layers, int) and layer >= num_layers + extra_layers:
            raise CheckpointError(f"{config_path}: num_hidden_layers={num_layers} but the weights have expert "
                                  f"tensors for layer {layer}", path=config_path)
        found = sorted({e for (l, e, _) in experts if l == layer})
        if found != list(range(num_experts)):
            missing = sorted(set(range(num_experts)) - set(found))
            extra = sorted(set(found) - set(range(num_experts)))
            raise CheckpointError(f"{config_path}: config says {num_experts} experts, layer {layer} of the weights "
                                  f"has {len(found)} (missing {missing[:8]}, beyond range {extra[:8]})",
                                  path=config_path)
        for expert in found:
            for role in ROLES:
                if (layer, expert, role) not in experts:
                    raise CheckpointError(f"{checkpoint_dir}: layer {layer} expert {expert} has no {role} "
                                          "projection", path=checkpoint_dir)
    return CheckpointLayout(checkpoint_dir=checkpoint_dir, config=config,
                            config_sha256=hashlib.sha256(config_raw).hexdigest(), fingerprint=fingerprint.hexdigest(),
                            layout=layout, hidden_size=hidden, intermediate_size=inter, num_experts=num_experts,
                            moe_layers=layers, dtype=dtypes.pop(), experts=experts, non_expert=non_expert,
                            source_files=sorted(headers), router_keys=_router_keys(blocks, non_expert),
                            quantization=quantization, scales=scales)


def _cfg(config: dict[str, Any], *names: str, default: Any = ..., path: str = "config.json") -> Any:
    """First of ``names`` in the config or its ``text_config`` (multimodal wrappers nest it)."""
    for scope in (config, config.get("text_config") or {}):
        for name in names:
            if scope.get(name) is not None:
                return scope[name]
    if default is not ...:
        return default
    raise CheckpointError(f"{path}: has none of {list(names)}", path=path)


def _weight_map(checkpoint_dir: str) -> tuple[dict[str, str], bytes]:
    """``{tensor key: file name}`` from the index, or from the single ``model.safetensors``."""
    index_path = os.path.join(checkpoint_dir, INDEX_NAME)
    if os.path.exists(index_path):
        with open(index_path, "rb") as f:
            raw = f.read()
        try:
            weight_map = json.loads(raw)["weight_map"]
            weight_map = {str(k): str(v) for k, v in weight_map.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{index_path}: malformed index ({exc})", path=index_path) from None
        for name in set(weight_map.values()):
            if os.path.basename(name) != name or name in ("", ".", ".."):
                raise CheckpointError(f"{index_path}: shard name {name!r} points outside the checkpoint directory",
                                      path=index_path)
            if not os.path.exists(os.path.join(checkpoint_dir, name)):
                raise CheckpointError(f"{os.path.join(checkpoint_dir, name)}: shard listed in {INDEX_NAME} is "
                                      "missing", path=os.path.join(checkpoint_dir, name))
        return weight_map, raw
    single = os.path.join(checkpoint_dir, SINGLE_NAME)
    if os.path.exists(single):
        entries, _ = _header_or_checkpoint_error(single)
        return {k: SINGLE_NAME for k in entries}, b""
    found = sorted(os.listdir(checkpoint_dir)) if os.path.isdir(checkpoint_dir) else []
    pickles = [n for n in found if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    hint = (f"; {pickles} need unpickling, which eep never does: convert them to safetensors first"
            if pickles else "")
    raise CheckpointError(f"{checkpoint_dir}: no {SINGLE_NAME} or {INDEX_NAME} (found {found[:10]}){hint}",
                          path=checkpoint_dir)


def _header_or_checkpoint_error(path: str) -> tuple[dict[str, HeaderEntry], dict[str, str]]:
    try:
        return read_header(path)
    except ShardError as exc:
        raise CheckpointError(f"checkpoint shard {exc}", path=path) from None


def _locate_experts(checkpoint_dir: str, weight_map: dict[str, str], headers: dict[str, dict[str, HeaderEntry]],
                    config_path: str, hidden: int, inter: int, num_experts: int
                    ) -> tuple[dict[tuple[int, int, str], ExpertSource], list[tuple[str, HeaderEntry]], str,
                               dict[int, str], dict[tuple, tuple[str, HeaderEntry]]]:
    """Weights of every routed expert, the non-expert tensors, the layout, each MoE block's key
    prefix, and the raw block-scale tensors: ``(layer, expert, role)`` (per expert) or
    ``(layer, proj)`` (stacked) -> ``(file, header entry)``, matched later by ``_locate_scales``."""
    scale_keys: dict[tuple, tuple[str, HeaderEntry]] = {}
    blocks: dict[int, str] = {}  # MoE layer -> "model.layers.3.mlp." (the MoE block's key prefix)
    experts: dict[tuple[int, int, str], ExpertSource] = {}
    non_expert: list[tuple[str, HeaderEntry]] = []
    unknown: list[str] = []
    kinds: set[str] = set()
    prefixes: set[str] = set()
    stacked: dict[int, dict[str, tuple[str, HeaderEntry]]] = {}
    for key in sorted(weight_map):
        name = weight_map[key]
        entry = headers[name][key]
        path = os.path.join(checkpoint_dir, name)
        if m := _PER_EXPERT.match(key):
            kinds.add("per_expert")
            prefixes.add(m["prefix"] + "*." + m["block"])
            layer, expert, role = int(m["layer"]), int(m["expert"]), _PROJ_ROLE[m["proj"]]
            blocks[layer] = f"{m['prefix']}{layer}.{m['block']}"
            want = (hidden, inter) if role == "down" else (inter, hidden)
            if entry.shape != want:
                raise CheckpointError(f"{path}: tensor {key!r} has shape {list(entry.shape)}, but config.json "
                                      f"(hidden_size={hidden}, intermediate={inter}) implies {list(want)}",
                                      path=path, tensor=key)
            experts[(layer, expert, role)] = ExpertSource(name, key, layer, expert, role, want, entry.dtype,
                                                          entry.begin, entry.nbytes)
        elif m := _STACKED.match(key):
            kinds.add("stacked")
            prefixes.add(m["prefix"] + "*." + m["block"])
            stacked.setdefault(int(m["layer"]), {})[m["proj"]] = (name, entry)
            blocks[int(m["layer"])] = f"{m['prefix']}{m['layer']}.{m['block']}"
        elif m := _PER_EXPERT_SCALE.match(key):
            prefixes.add(m["prefix"] + "*." + m["block"])
            scale_keys[(int(m["layer"]), int(m["expert"]), _PROJ_ROLE[m["proj"]])] = (name, entry)
        elif m := _STACKED_SCALE.match(key):
            prefixes.add(m["prefix"] + "*." + m["block"])
            scale_keys[(int(m["layer"]), m["proj"])] = (name, entry)
        elif _ANY_EXPERT.search(key):
            unknown.append(f"{key} in {name}")
        else:
            non_expert.append((name, entry))
    if unknown:
        raise CheckpointError(f"{checkpoint_dir}: unsupported expert tensors (biases, activation scales or an "
                              f"unknown naming): {unknown[:6]}{' ...' if len(unknown) > 6 else ''}",
                              path=checkpoint_dir, tensor=unknown[0].split(" in ")[0])
    if not kinds:
        sample = sorted(weight_map)[:6]
        raise CheckpointError(f"{checkpoint_dir}: not a Mixture-of-Experts checkpoint: no routed expert tensors "
                              f"(looked for '...layers.N.*.experts.E.(w1|w2|w3|gate_proj|up_proj|down_proj).weight' "
                              f"and stacked '...experts.(gate_up_proj|gate_proj|up_proj|down_proj)'); keys look like "
                              f"{sample}", path=checkpoint_dir)
    if len(kinds) > 1 or len(prefixes) > 1:
        raise CheckpointError(f"{checkpoint_dir}: expert tensors follow several layouts or prefixes "
                              f"({sorted(kinds)}, {sorted(prefixes)}); expected one", path=checkpoint_dir)
    if "per_expert" in kinds:
        return experts, non_expert, "per_expert", blocks, scale_keys
    layout = ""
    for layer, projs in sorted(stacked.items()):
        layout = _stacked_layer(checkpoint_dir, layer, projs, hidden, inter, num_experts, experts)
    return experts, non_expert, layout, blocks, scale_keys


def _expert_quantization(config: dict[str, Any], config_path: str, dtype: str,
                         experts: dict[tuple[int, int, str], ExpertSource],
                         scale_keys: dict[tuple, tuple[str, HeaderEntry]], layout: str) -> dict[str, Any] | None:
    """``FP8_QUANTIZATION`` for block-scaled FP8 experts, ``None`` for unquantised ones; refuses every
    other case naming the tensor and the setting (method, format, block size, scale format)."""
    first = experts[min(experts)]
    qc = _cfg(config, "quantization_config", default=None)
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if qc is not None and method != "fp8":
        raise CheckpointError(f"{config_path}: quantization_config.quant_method={method!r} is not supported "
                              f"(expert tensor {first.key!r}): eep reads unquantised experts and block-scaled FP8 "
                              "('fp8', e4m3, 128x128 blocks)", path=config_path, tensor=first.key)
    if not dtype.startswith("F8"):
        if scale_keys:
            name, entry = scale_keys[min(scale_keys, key=str)]
            raise CheckpointError(f"{name}: tensor {entry.key!r} is a block scale, but the routed experts are "
                                  f"{dtype}, not FP8", path=name, tensor=entry.key)
        return None
    if qc is None:
        raise CheckpointError(f"{config_path}: expert tensor {first.key!r} is {dtype} but config.json has no "
                              "quantization_config (expected quant_method 'fp8' with weight_block_size [128, 128])",
                              path=config_path, tensor=first.key)
    wanted = {"fmt": ("e4m3", None), "weight_block_size": ([BLOCK, BLOCK],), "scale_fmt": ("float", None),
              "activation_scheme": ("dynamic", None)}
    for name, allowed in wanted.items():
        value = qc.get(name)
        if (list(value) if isinstance(value, (list, tuple)) else value) not in allowed:
            raise CheckpointError(f"{config_path}: quantization_config.{name}={value!r} is not supported (expert "
                                  f"tensor {first.key!r}); eep reads quant_method 'fp8' with {name} "
                                  f"{' or '.join(repr(a) for a in allowed if a is not None)}",
                                  path=config_path, tensor=first.key)
    if dtype != "F8_E4M3":
        raise CheckpointError(f"{config_path}: expert tensor {first.key!r} is {dtype}; FP8 experts must be F8_E4M3",
                              path=config_path, tensor=first.key)
    if layout.endswith("_transposed"):
        raise CheckpointError(f"{config_path}: FP8 experts in the transposed {layout} layout are not supported "
                              f"(tensor {first.key!r}): their 128x128 scale blocks would be transposed too",
                              path=config_path, tensor=first.key)
    return dict(FP8_QUANTIZATION)


def _locate_scales(checkpoint_dir: str, scale_keys: dict[tuple, tuple[str, HeaderEntry]],
                   experts: dict[tuple[int, int, str], ExpertSource], num_experts: int
                   ) -> dict[tuple[int, int, str], ExpertSource]:
    """The block scales of every FP8 expert weight, each as a contiguous byte range of its source."""
    stacked_roles = {"gate_up_proj": ("gate", "up"), "gate_proj": ("gate",), "up_proj": ("up",),
                     "down_proj": ("down",)}
    scales: dict[tuple[int, int, str], ExpertSource] = {}
    for key, (name, entry) in scale_keys.items():
        path = os.path.join(checkpoint_dir, name)
        if entry.dtype != "F32":
            raise CheckpointError(f"{path}: block scale {entry.key!r} is {entry.dtype}, expected F32",
                                  path=path, tensor=entry.key)
        if len(key) == 3:  # per expert: one [ceil(out/128), ceil(in/128)] tensor
            weight = experts.get(key)
            want = block_scale_shape(*weight.shape) if weight is not None else None
            if weight is None or entry.shape != want:
                raise CheckpointError(f"{path}: block scale {entry.key!r} has shape {list(entry.shape)}, but its "
                                      f"weight is {list(weight.shape) if weight else 'absent'} (expects "
                                      f"{list(want) if want else '?'} for 128x128 blocks)", path=path, tensor=entry.key)
            scales[key] = ExpertSource(name, entry.key, key[0], key[1], key[2], want, "F32", entry.begin, entry.nbytes)
            continue
        layer, proj = key
        roles = stacked_roles[proj]
        sample = experts.get((layer, 0, roles[0]))
        if sample is None:
            raise CheckpointError(f"{path}: block scale {entry.key!r} of layer {layer} has no {proj} weights",
                                  path=path, tensor=entry.key)
        rows, cols = block_scale_shape(*sample.shape)
        if len(roles) == 2 and sample.shape[0] % BLOCK:
            raise CheckpointError(f"{path}: block scale {entry.key!r}: intermediate size {sample.shape[0]} is not a "
                                  f"multiple of {BLOCK}, so gate and up rows share scale blocks and cannot be "
                                  "split per projection", path=path, tensor=entry.key)
        want = (num_experts, rows * len(roles), cols)
        if entry.shape != want:
            raise CheckpointError(f"{path}: block scale {entry.key!r} has shape {list(entry.shape)}, but its weights "
                                  f"imply {list(want)} for 128x128 blocks", path=path, tensor=entry.key)
        part_nbytes = rows * cols * 4
        for expert in range(num_experts):
            for half, role in enumerate(roles):
                begin = entry.begin + (expert * len(roles) + half) * part_nbytes
                scales[(layer, expert, role)] = ExpertSource(name, entry.key, layer, expert, role, (rows, cols), "F32",
                                                             begin, part_nbytes, index=expert,
                                                             half=half if len(roles) == 2 else None)
    for (layer, expert, role), weight in experts.items():
        if (layer, expert, role) not in scales:
            raise CheckpointError(f"{checkpoint_dir}: FP8 expert tensor {weight.key!r} has no block scale "
                                  f"('{weight.key}_scale_inv' or '...weight_scale_inv')", path=checkpoint_dir,
                                  tensor=weight.key)
    return scales


def _router_keys(blocks: dict[int, str], non_expert: list[tuple[str, HeaderEntry]]) -> dict[int, str]:
    keys = {e.key for _, e in non_expert}
    return {layer: block + "gate.weight" for layer, block in blocks.items() if block + "gate.weight" in keys}


def _stacked_layer(checkpoint_dir: str, layer: int, projs: dict[str, tuple[str, HeaderEntry]], hidden: int,
                   inter: int, num_experts: int, experts: dict[tuple[int, int, str], ExpertSource]) -> str:
    """Add one layer's stacked/fused expert tensors to ``experts``; return the layout name."""
    fused = "gate_up_proj" in projs
    need = {"gate_up_proj", "down_proj"} if fused else {"gate_proj", "up_proj", "down_proj"}
    if set(projs) != need:
        raise CheckpointError(f"{checkpoint_dir}: layer {layer} has stacked expert tensors {sorted(projs)}, "
                              f"expected exactly {sorted(need)}", path=checkpoint_dir)
    in_proj_rows = 2 * inter if fused else inter
    # Orientation: "out x in" per expert (nn.Linear, transformers' own) or "in x out" (x @ W, Llama-4).
    votes = set()
    for proj, (name, entry) in projs.items():
        rows, cols = (hidden, inter) if proj == "down_proj" else (in_proj_rows, hidden)
        path = os.path.join(checkpoint_dir, name)
        if len(entry.shape) != 3 or entry.shape[0] != num_experts or \
                sorted(entry.shape[1:]) != sorted((rows, cols)):
            raise CheckpointError(f"{path}: tensor {entry.key!r} has shape {list(entry.shape)}, but config.json "
                                  f"(num_experts={num_experts}, hidden_size={hidden}, intermediate={inter}) implies "
                                  f"{[num_experts, rows, cols]} or its transpose", path=path, tensor=entry.key)
        if rows != cols:
            votes.add(entry.shape[1:] == (cols, rows))
    if len(votes) > 1:
        raise CheckpointError(f"{checkpoint_dir}: layer {layer} stacked experts have inconsistent orientations "
                              f"{ {p: list(e.shape) for p, (_, e) in projs.items()} }", path=checkpoint_dir)
    # Every tensor square (split stacked with H == I): assume transformers' own "out x in".
    transpose = votes.pop() if votes else False
    for proj, (name, entry) in projs.items():
        size = DTYPE_SIZE[entry.dtype]
        per_expert = entry.nbytes // num_experts
        for expert in range(num_experts):
            start = entry.begin + expert * per_expert
            roles = (("gate", 0), ("up", 1)) if proj == "gate_up_proj" else ((_PROJ_ROLE[proj], None),)
            for role, half in roles:
                shape = (hidden, inter) if role == "down" else (inter, hidden)
                nbytes = shape[0] * shape[1] * size
                begin = start + (half or 0) * nbytes if not transpose else start
                experts[(layer, expert, role)] = ExpertSource(name, entry.key, layer, expert, role, shape, entry.dtype,
                                                              begin, nbytes, transpose=transpose, index=expert,
                                                              half=half)
    kind = "fused_gate_up" if fused else "stacked"
    return kind + ("_transposed" if transpose else "")
