"""``python -m jsonnet_worker``: the command line (``_cli``), as the console script runs it
(``eval``'s worker started first). Workers and fork servers are started on
``_worker.bootstrap`` instead, which never loads this package's ``__init__``."""

from __future__ import annotations


def main() -> None:
    from ._cli.main import main_entry

    main_entry()


if __name__ == "__main__":
    main()
