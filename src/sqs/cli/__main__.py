"""`python -m sqs.cli ...` (also under `torchrun -m sqs.cli ...`)."""

import sys

from sqs.cli import main

sys.exit(main())
