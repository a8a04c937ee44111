"""`python app.py`: the popo_lite web panel from a clone; the same as the installed `popo-panel` command.

The arguments and the launch live in popo_lite/panel/launch.py (`python app.py --help`).
"""

from __future__ import annotations

import sys

from popo_lite.panel.launch import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main(prog="python app.py"))
