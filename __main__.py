"""`python -m backdrop` is the `backdrop` command."""
from backdrop.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
