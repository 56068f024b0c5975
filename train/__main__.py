"""`python -m train ...`: see train/app.py."""

import sys

from train.app import main

sys.exit(main())
