"""``python -m deltalign``: the command line."""

import sys

from deltalign.pipeline.cli import main

sys.exit(main())
