"""What every `dmf` command shares at the user boundary: how an error is shown and the exit status.

Library code raises; only the CLI layer calls `fail()`. Torch-free (rich and typer only), so the
runtime-only install can use it.
"""

from __future__ import annotations

from typing import Iterable, NoReturn

import typer

EXIT_USAGE = 2  # bad input, bad options or a refused artifact: the user can fix it


def console(stderr: bool = True):
    """A rich console that never highlights or wraps (messages quote paths and values verbatim)."""
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def fail(error: BaseException | str, details: Iterable[str] = ()) -> NoReturn:
    """Print `details` (one per line, e.g. every bad row), then one red `error: ...` line on stderr,
    and exit with status 2. The message is collapsed to one line and escaped: messages quote paths
    and backend errors with [brackets] that rich would otherwise read as markup."""
    from rich.markup import escape

    message = " ".join(str(error).split()) or type(error).__name__
    con = console()
    for line in details:
        con.print(escape(line))
    con.print(f"[bold red]error:[/bold red] {escape(message)}")
    raise typer.Exit(EXIT_USAGE)
