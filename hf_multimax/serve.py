"""`hf-multimax-serve`: transformers' OpenAI-compatible server (`transformers serve`) in a process that
has the plugin registered, so checkpoints saved with a plugin attention load and run as trained.

The server builds models by name from their `config.json`, which carries `"attn_implementation":
"multimax"` (or `"sparsemix"`) for a plugin checkpoint; without `import hf_multimax` first, transformers
refuses that name. This entry point imports the plugin, then hands every argument to transformers'
own `serve` command unchanged (`hf-multimax-serve --help` lists them), with or without
`--continuous-batching`:

    hf-multimax-serve ./my-multimax-model --host 127.0.0.1 --port 8000
    hf-multimax-serve ./my-multimax-model --continuous-batching

It needs transformers' serving dependencies: `pip install "hf-multimax[serve]"`. With
`--api-server-count` above 1, the extra API processes only tokenize and decode; the model runs in this
process, with the plugin.
"""

from __future__ import annotations

import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    import hf_multimax  # noqa: F401  (registers the plugin's attention implementations)
    import typer
    from transformers.cli.serve import Serve

    app = typer.Typer(add_completion=False)
    app.command()(Serve)  # the only command: its options are the program's
    app(args=sys.argv[1:] if argv is None else argv, prog_name="hf-multimax-serve")


if __name__ == "__main__":
    main()
