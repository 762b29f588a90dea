"""`python train.py --stage STAGE ...`: the same as `minimind train`; what torchrun and deepspeed launch."""

import sys

from minimind.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
