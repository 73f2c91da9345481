"""`python -m fearec_dist ...` is the same CLI as `fearec-dist ...`."""

import sys

from fearec_dist.cli import main

sys.exit(main())
