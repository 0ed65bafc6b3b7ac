"""`runner <command> ...` and `python -m runner <command> ...`: one command with subcommands."""
import sys

from runner.cli import dispatch


def main() -> int:
    return dispatch()


if __name__ == "__main__":
    sys.exit(main())
