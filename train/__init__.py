"""The staged training pipeline: one loop (`train/loop.py`), one objective per stage
(`train/objectives/`), hydra configs (`train/configs/`). Run `python -m train stage=<name> ...`."""


class UsageError(Exception):
    """Bad input from the person running training (a missing dataset, an unknown stage, a missing
    previous-stage export...). The message names the problem and the fix; the CLI prints it alone,
    without a traceback, and exits non-zero."""
