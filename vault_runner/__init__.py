"""vault_runner: run the python blocks of Obsidian notes in a Jupyter kernel, outputs back in the note."""

__version__ = "0.1.0"
