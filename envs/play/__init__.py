"""Pieces of the interactive loop that play.py assembles: window, HUD, controllers, video, recording.

Nothing here knows about the model: frames are uint8 arrays and actions are ids.
"""
