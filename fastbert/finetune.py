"""python -m fastbert.finetune [options]: the same as `fastbert finetune` (see fastbert.train.finetune)."""

import sys

from fastbert.train.finetune import main

if __name__ == "__main__":
    sys.exit(main())
