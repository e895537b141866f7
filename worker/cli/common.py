"""What the command modules share: declaring a command, and refusing a database whose schema is behind."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from worker.settings import Settings

if TYPE_CHECKING:
    from worker.ledger.db import Ledger

Command = Callable[[Settings, argparse.Namespace], None]


def command(sub: argparse._SubParsersAction, name: str, text: str,
            func: Command | None = None) -> argparse.ArgumentParser:
    """Subcommand ``name`` running ``func``, described by ``text`` in ``pleura --help`` and its own --help."""
    p = sub.add_parser(name, help=text, description=text)
    if func is not None:
        p.set_defaults(func=func)
    return p


def require_schema(ledger: Ledger) -> None:
    """Exit with what to do when the database schema is not the current one."""
    from worker.ledger.db import schema_is_current

    if not schema_is_current(ledger.engine):
        sys.exit("error: the database schema is not current; run `pleura db upgrade` first")
