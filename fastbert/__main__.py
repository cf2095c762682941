"""python -m fastbert <command> [options]: the same as the `fastbert` command (see fastbert.cli)."""

import sys

from fastbert.cli import main

if __name__ == "__main__":
    sys.exit(main())
