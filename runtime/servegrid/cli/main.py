"""The ``servegrid`` command."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from servegrid.sdk.errors import UserError

app = typer.Typer(
    help="servegrid: serve LLM graphs on one machine or a cluster of GPU nodes.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}


def _split_target(target: str | None, extra: list[str]) -> tuple[str | None, list[str]]:
    """Click may hand an override (``--Svc.key=v``) to the positional; give it back."""
    if target is not None and target.startswith("--"):
        return None, [target, *extra]
    return target, extra


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


@app.command(context_settings=EXTRA)
def serve(
    ctx: typer.Context,
    target: Annotated[
        str | None,
        typer.Argument(help="Entry service, module:Class (default: the config's graph:)"),
    ] = None,
    config_file: Annotated[
        Path | None, typer.Option("-f", "--config-file", help="Graph config (YAML)")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the merged config; start nothing")
    ] = False,
    service_name: Annotated[
        str | None,
        typer.Option(
            "--service-name", help="Start only this service (its depends are not started)"
        ),
    ] = None,
    working_dir: Annotated[
        Path | None, typer.Option("--working-dir", help="Directory to import the graph from")
    ] = None,
    namespace: Annotated[
        str | None,
        typer.Option(
            "--namespace",
            help="Run the graph in this namespace (graphs naming the same one share workers; "
            "default: a namespace of its own)",
        ),
    ] = None,
) -> None:
    """Start every service of a graph (override settings with --Service.key=value)."""
    from servegrid.cli.loader import load_graph
    from servegrid.cli.serve import print_dry_run, run_serve

    workdir = (working_dir or Path.cwd()).resolve()
    try:
        target, extra = _split_target(target, list(ctx.args))
        names = [n for n in service_name.split(",") if n] if service_name else None
        loaded = load_graph(target, config_file, extra, workdir, names)
        if dry_run:
            print_dry_run(loaded)
            return
        run_serve(loaded, names, workdir, namespace)
    except UserError as exc:
        _fail(str(exc))


@app.command(context_settings=EXTRA)
def graph(
    ctx: typer.Context,
    target: Annotated[str | None, typer.Argument(help="Entry service, module:Class")] = None,
    config_file: Annotated[Path | None, typer.Option("-f", "--config-file")] = None,
    working_dir: Annotated[Path | None, typer.Option("--working-dir")] = None,
) -> None:
    """Show the resolved graph: services, edges, workers, resources."""
    from servegrid.cli.graph_cmd import print_graph
    from servegrid.cli.loader import load_graph

    target, extra = _split_target(target, list(ctx.args))
    try:
        print_graph(load_graph(target, config_file, extra, (working_dir or Path.cwd()).resolve()))
    except UserError as exc:
        _fail(str(exc))


model_app = typer.Typer(help="Make and inspect local model directories.", no_args_is_help=True)
app.add_typer(model_app, name="model")

from servegrid.cli.secret_cmd import secret_app  # noqa: E402

app.add_typer(secret_app, name="secret")


@model_app.command("init")
def model_init(
    directory: Annotated[Path, typer.Argument(help="Where to write the model")],
    vocab_size: Annotated[int, typer.Option("--vocab-size")] = 2048,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing model")] = False,
) -> None:
    """Write the tiny offline chat model (tokenizer, chat template, config) to DIRECTORY."""
    from servegrid.llm.model_init import init_model

    try:
        path = init_model(directory, vocab_size=vocab_size, force=force)
    except (FileExistsError, ValueError, OSError) as exc:
        _fail(str(exc))
    typer.echo(f"model written to {path}")


def _register_optional_commands() -> None:
    try:
        from servegrid.cli.status import status
    except ImportError:
        return
    app.command("status", help="List what is registered in discovery.")(status)


_register_optional_commands()


def main() -> None:  # pragma: no cover
    sys.exit(app())
