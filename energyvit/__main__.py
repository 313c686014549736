"""`python -m energyvit ...`, which is also how torchrun starts it: `torchrun ... -m energyvit pretrain`."""
import sys

from energyvit.cli import main

sys.exit(main())
