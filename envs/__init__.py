"""Gymnasium environments: source games (registry) and the world-model env; strip.py makes
stills of a world's dream under scripted keys.

Importing ``envs`` is cheap: no torch and no game package (ale_py, vizdoom, minigrid) is imported
until a game is made. ``import envs`` also registers ``WorldModel-v0`` with Gymnasium.
"""

import gymnasium

# Guarded so that importing envs twice (or reloading it) does not re-register and fail/warn.
if "WorldModel-v0" not in gymnasium.registry:
    gymnasium.register(
        id="WorldModel-v0",
        entry_point="envs.world_model_env:WorldModelEnv",
        vector_entry_point="envs.world_model_env:WorldModelVectorEnv",
    )
