"""`python train.py --method mae-ct ...` is `python -m vitfast.train ...` (see `python train.py --help`)."""
import sys

from vitfast.train import main

if __name__ == "__main__":
    sys.exit(main())
