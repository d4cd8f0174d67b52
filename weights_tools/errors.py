"""Errors raised by weights_tools. Every message names the file and, where there is one, the tensor."""

from __future__ import annotations

from eep.errors import EEPError


class ShardError(EEPError):
    """Base class for every problem with a checkpoint, an expert shard or a restore tier.

    ``path`` is the file at fault (``None`` when no single file is), ``tensor`` the key inside it.
    """

    def __init__(self, message: str, *, path: str | None = None, tensor: str | None = None):
        self.path = path
        self.tensor = tensor
        super().__init__(message)


class ManifestError(ShardError):
    """``manifest.json`` is missing, unparsable, of another format version, or names a path outside OUT_DIR."""


class MissingShardError(ShardError):
    """A file the manifest lists is absent, or a tensor is absent from its file."""


class CorruptShardError(ShardError):
    """A file that exists but is damaged: truncated, bad header, sha256 mismatch, or shape/dtype unlike the manifest."""


class CheckpointError(ShardError):
    """The source Hugging Face checkpoint cannot be converted: not MoE, unknown layout, config/weights mismatch."""


class HostTierError(ShardError):
    """The shared host-memory copy is absent, stale (another manifest), truncated, or fails its checksum."""


class ExpertUnavailableError(ShardError):
    """No tier could serve an expert; ``failures`` lists ``(tier name, reason)`` for each tier tried."""

    def __init__(self, layer: int, expert: int, failures: list[tuple[str, str]]):
        self.layer = layer
        self.expert = expert
        self.failures = failures
        tried = "; ".join(f"{tier}: {reason}" for tier, reason in failures) or "no tier holds it"
        super().__init__(f"no tier could restore layer {layer} expert {expert} ({tried})")
