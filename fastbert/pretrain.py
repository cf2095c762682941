"""python -m fastbert.pretrain [options]: the same as `fastbert pretrain` (see fastbert.train.pretrain)."""

import sys

from fastbert.train.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
