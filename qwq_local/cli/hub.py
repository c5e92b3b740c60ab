"""Commands for the model cache: `pull` and `list`."""

from typing import Optional

import typer

from .. import constants
from . import format as cli_format
from .app import command
from .options import progress_bar


@command("pull")
def hub_pull(
    quant: str = typer.Option(constants.DEFAULT_QUANT, "--quant", "-q", help="llama.cpp type of the GGUF to fetch."),
    repo: str = typer.Option(constants.QWQ_GGUF_REPO_ID, "--repo", help="Hub repository holding the GGUFs."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch, tag or commit (default: main)."),
) -> None:
    """Download a GGUF into the Hugging Face cache (resumable) and verify its sha256.
    Works offline for models already cached."""
    from ..hub.download import pull, recorded_sha256, split_parts

    with progress_bar(f"pull {quant}") as progress:
        path = pull(quant=quant, repo_id=repo, revision=revision, progress=progress)
    for part in split_parts(path):
        typer.echo(f"verified sha256 {recorded_sha256(part)}  {part.name}")
    typer.echo(str(path))


@command("list")
def hub_list(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """Show the GGUF models in the local Hugging Face cache."""
    import json

    from ..hub.download import list_models
    from ..hub.cache import hub_cache_dir

    models = list_models()
    if as_json:
        typer.echo(json.dumps([m.to_dict() for m in models], indent=2))
        return
    if not models:
        typer.echo(f"no GGUF models in {hub_cache_dir()}; fetch one with `qwq-local pull --quant {constants.DEFAULT_QUANT}`")
        return
    typer.echo(cli_format.model_table(models))
