"""`python -m train.eval ...`: see train/eval/run.py."""

import sys

from train.eval.run import main

sys.exit(main())
