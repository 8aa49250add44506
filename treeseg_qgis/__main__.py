"""`python -m treeseg_qgis`: the command line."""

import sys

from .cli import main

sys.exit(main())
