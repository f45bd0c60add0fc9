"""`python -m approvals` is the `approvals` command."""

from approvals.cli import main

if __name__ == "__main__":
    main()
