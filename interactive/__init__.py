"""What a person sees and touches in a real-time loop: the window, the held keys and the keymaps
that turn them into action ids, the heads-up display, and video capture.

These parts know no game and no model (frames are uint8 arrays, actions are ids), so play.py, the
recorder's human sessions and the world-model env's ``render_mode="human"`` share one window and
one keyboard path, and this package imports nothing else of the project.
"""

import os

# Before pygame is first imported (by any module here): no pygame banner on our CLIs' output, and
# Ctrl-C reaches Python's handler (which closes episodes cleanly) instead of becoming an SDL event.
os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
os.environ.setdefault("SDL_NO_SIGNAL_HANDLERS", "1")
