"""commands: one module per CLI command; each only parses, calls the library and prints.

Owns the Typer command functions that :mod:`binarize_cli.cli` registers and their option
tables; rendering of library results lives in :mod:`binarize_cli.render`.

May import: any room of the package (this is the top floor).
"""
