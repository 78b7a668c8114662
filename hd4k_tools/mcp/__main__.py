"""``python -m hd4k_tools.mcp``: the same server as ``hd4k mcp``."""

import sys

from hd4k_tools.mcp.cli import main

sys.exit(main())
