"""``python -m hd4k_tools.cli`` runs ``hd4k``."""

import sys

from hd4k_tools.cli.main import main

sys.exit(main())
