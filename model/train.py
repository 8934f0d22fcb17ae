"""`python -m model.train`: the command's short name; the tool is model.cli.train (nothing imports this)."""
import sys

from model.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
