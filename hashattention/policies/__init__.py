"""Selection policies, one per file, all behind :class:`SelectionPolicy`."""
from __future__ import annotations

from ..core.budget import Budget
from .base import SelectionPolicy
from .bucket import BUCKET_POLICIES, BucketPolicy
from .dense import DensePolicy
from .h2o import H2OPolicy
from .hash import HashAttentionPolicy
from .oracle import OracleTopKPolicy
from .quest import QuestPolicy
from .random import RandomPolicy
from .sink_window import SinkWindowPolicy

#: name -> (class, needs maps)
POLICIES = {
    "dense": DensePolicy,
    "oracle": OracleTopKPolicy,
    "hash": HashAttentionPolicy,
    # the library's hash policy with a named group selection (HashAttentionPolicy.SELECTIONS)
    **{f"hash-{sel}": HashAttentionPolicy for sel in HashAttentionPolicy.SELECTIONS},
    "simhash": HashAttentionPolicy,
    "sink_window": SinkWindowPolicy,
    "random": RandomPolicy,
    "quest": QuestPolicy,  # policies/quest.py (page min/max bounds)
    "h2o": H2OPolicy,  # policies/h2o.py (accumulated attention)
    **BUCKET_POLICIES,  # bucket hash attention (the seed article's reading), policies/bucket.py
}


def make_policy(name: str, budget: Budget | None = None, maps=None, model_config=None,
                per_group: bool = True, **kwargs) -> SelectionPolicy:
    """Build a policy by name. "hash" needs ``maps``; "simhash" builds untrained 32-bit SimHash maps for
    ``model_config``."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; available: {', '.join(POLICIES)}")
    selection = kwargs.pop("selection", None)  # hash and simhash: how a KV group's heads share a selection
    if name == "dense":
        return DensePolicy()
    if name == "hash" or name.startswith("hash-"):
        if maps is None:
            raise ValueError(f"policy {name!r} needs trained maps (hashattention.load_maps / load_default_maps)")
        selection = name[5:] if name.startswith("hash-") else selection
        return HashAttentionPolicy(maps, budget, per_group, selection=selection)
    if name == "simhash":
        if model_config is None:
            raise ValueError("policy 'simhash' needs the model config to size its projections")
        from ..core.maps import HashMaps
        from ..weights import maps_config_for
        maps = HashMaps.simhash(maps_config_for(model_config), seed=kwargs.get("seed", 0))
        return HashAttentionPolicy(maps, budget, per_group, selection=selection)
    return POLICIES[name](budget, per_group, **kwargs)
