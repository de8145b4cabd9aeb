"""``servegrid secret init PATH``: write a new cluster secret to a file only its owner can read."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from servegrid.distributed import env

secret_app = typer.Typer(
    help="Make the cluster secret that authenticates the request plane and NATS.",
    no_args_is_help=True,
)


@secret_app.command("init")
def init(
    path: Annotated[Path, typer.Argument(help="File to write (mode 0600)")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file")] = False,
) -> None:
    """Write a new random cluster secret to PATH, readable by you only."""
    from servegrid.distributed.errors import SetupError
    from servegrid.distributed.secret import write_secret_file

    try:
        written = write_secret_file(path, force=force)
    except (SetupError, OSError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    typer.echo(
        f"cluster secret written to {written} (mode 0600). Copy it to every node, owned by the "
        f"user that runs servegrid, and set {env.SERVEGRID_CLUSTER_SECRET_FILE}={written.resolve()}"
    )
