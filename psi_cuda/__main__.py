"""``python -m psi_cuda``: the command line, psi_cuda.apps.cli (also installed as ``psi-cuda``)."""
import sys

from .apps.cli import main

if __name__ == "__main__":
    sys.exit(main())
