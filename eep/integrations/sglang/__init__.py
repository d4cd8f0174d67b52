"""eep as SGLang's MoE all-to-all: a plugin for SGLang 0.5.x's ``sglang.srt.plugins`` entry points.

SGLang loads ``register`` in every process (main, scheduler, workers) when eep is installed and the
``SGLANG_PLUGINS`` allow-list names ``eep`` (or is unset). Nothing here imports SGLang until
``register`` runs, and ``import eep`` never imports this package. Launch line and limits:
docs/integrations.md.

Modules: ``dispatcher`` (``EepDispatcher``, a ``BaseDispatcher``), ``ep_buffer`` (the process-wide
``eep.Buffer`` and the backend seam), ``placement`` (SGLang expert-location maps <-> ``ExpertPlacement``,
in-place writes), ``hooks`` (what ``register`` installs in SGLang's ``HookRegistry``).
"""

from __future__ import annotations


def register() -> None:
    """The entry point: register eep's hooks with SGLang's ``HookRegistry`` (applied by SGLang)."""
    from eep.integrations.sglang.hooks import register_hooks

    register_hooks()
