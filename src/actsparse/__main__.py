"""``python -m actsparse``: the CLI (what ``torchrun -m actsparse ...`` runs on each rank)."""
import sys

from actsparse.cli import main

if __name__ == "__main__":
    sys.exit(main())
