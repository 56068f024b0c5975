"""Agents trained only inside a world model, scored in the real game (the test DIAMOND uses).

``python -m agents train`` trains a PPO agent (stable-baselines3, the optional ``agents`` extra) on
the batched ``WorldModelVectorEnv``: every step of every world is imagined, rewards and episode
ends come from the world's reward heads. ``python -m agents score`` plays the agent, and a random
policy beside it, in the real game the world was made from. See ``python -m agents --help``.
"""
