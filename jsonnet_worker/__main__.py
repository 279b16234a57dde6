"""``python -m jsonnet_worker``: the CLI, and the hidden worker mode the pool re-executes."""

from __future__ import annotations

import sys


def main() -> None:
    argv = sys.argv[1:]
    if argv[:1] == ["_worker"]:  # hidden: the mode the pool re-executes this interpreter in
        from ._worker import run

        run()
    from ._cli import main as cli_main

    sys.exit(cli_main(argv))


if __name__ == "__main__":
    main()
