"""The localhost API an Obsidian plugin drives (`vault-runner serve`).

app.py builds the ASGI app and serves it; routes.py holds the endpoints, schemas.py their
JSON shapes, codes.py the one table of error codes, security.py the checks every request
passes first, events.py the live event stream.
"""

__all__: list[str] = []
