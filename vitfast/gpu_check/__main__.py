"""python -m vitfast.gpu_check (see vitfast/gpu_check/__init__.py)."""
import sys

from . import main

sys.exit(main())
