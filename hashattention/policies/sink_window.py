"""StreamingLLM: attention sinks plus the most recent tokens, the same token count as the other policies."""
from __future__ import annotations

from .base import SelectionPolicy


class SinkWindowPolicy(SelectionPolicy):
    """No scores: the shared rule then gives the heavy budget to the most recent tokens, so this policy
    reads ``sink`` first tokens and ``window + heavy`` recent ones."""

    name = "sink_window"
