"""`python train.py --stage STAGE ...`: the same as `minimind train`; what torchrun and deepspeed launch."""

import sys

if __name__ == "__main__":
    try:  # Ctrl-C in the first instants, before train_main can report it, ends quietly too
        from minimind.cli import train_main
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(train_main())
