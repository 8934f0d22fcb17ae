"""`python -m model.bench`: the command's short name; the tool is model.cli.bench (nothing imports this)."""
import sys

from model.cli.bench import main

if __name__ == "__main__":
    sys.exit(main())
