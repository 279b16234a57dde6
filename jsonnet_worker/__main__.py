"""``python -m jsonnet_worker``: the command line (``_cli``). Workers and fork servers are
started on ``_worker.bootstrap`` instead, which never loads this package's ``__init__``."""

from __future__ import annotations

import sys


def main() -> None:
    from ._cli.main import main as cli_main

    sys.exit(cli_main(sys.argv[1:]))


if __name__ == "__main__":
    main()
