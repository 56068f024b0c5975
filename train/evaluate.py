"""The old spelling of `python -m train.eval` (train/eval/run.py): still runs it, and says so."""

import sys

from train.eval.run import main

if __name__ == "__main__":
    print("note: `python -m train.evaluate` is now `python -m train.eval`", file=sys.stderr)
    sys.exit(main())
