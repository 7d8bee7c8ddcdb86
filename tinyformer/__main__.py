"""`python -m tinyformer ...` (and `torchrun ... -m tinyformer train ...`) runs the command line."""
import sys

from tinyformer.cli import main

sys.exit(main())
