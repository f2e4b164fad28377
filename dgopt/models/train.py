"""Moved to :mod:`dgopt.training`. ``python -m dgopt.models.train build|list ...`` still runs ``dgopt models
build|list ...``, because scripts and the shipped models' cards (``dgopt_build.json`` "command") name it."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from ..cli import main as dgopt_main

    return dgopt_main(["models", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
