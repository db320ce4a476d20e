"""`python -m tokenpool ...` is the `tokenpool` command."""

from tokenpool.entrypoints.cli import main

if __name__ == "__main__":
    main()
