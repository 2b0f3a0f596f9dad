"""`python -m trafficvlm ...` — the same CLI; `torchrun -m trafficvlm train ...` uses this entry."""
import sys

from trafficvlm.cli import main

sys.exit(main())
