"""``python -m ssm.bench``: the same as the ``ssm-bench`` console script."""
import sys

from .cli import main

sys.exit(main())
