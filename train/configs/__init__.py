"""Hydra configs of `python -m train` (a package so the Compose API finds them when installed).

One source of truth per value: a stage's config dataclass (``train/objectives/<stage>.py``) is its
schema and holds every default; ``stage/<stage>.yaml`` lists only what the dataclass cannot know
(interpolations such as ``clip_len: ${data.clip_len}``, the stage's loop and data settings). The
dataclass defaults reach hydra as the config node ``schema/<stage>``, which each stage yaml puts
first in its defaults list, so ``stage.<key>=<value>`` works for every field and a misspelt key
is still refused at composition.
"""

from __future__ import annotations

from dataclasses import asdict


def register_stage_schemas() -> None:
    """Store every registered stage's dataclass defaults as the hydra node ``schema/<stage>``."""
    from hydra.core.config_store import ConfigStore

    from train.objectives import available_stages, get_objective

    store = ConfigStore.instance()
    for name in available_stages():
        defaults = asdict(get_objective(name).Config())
        node = {"name": name, **{k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()}}
        store.store(group="schema", name=name, node=node)
