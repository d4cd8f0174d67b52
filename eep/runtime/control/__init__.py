"""The control plane: launcher, coordinator, rank loop, authentication, decision rules, timeline.

It decides membership and drives the engines (``eep.runtime.engines``) through their seam; it never
moves tensor data itself. docs/runtime.md.
"""
