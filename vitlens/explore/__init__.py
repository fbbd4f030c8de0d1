"""`vitlens explore`: a local, read-only web app over a result set (docs/explore.md).

`data.py` answers the views' questions with parameterised DuckDB queries (no HTTP);
`server.py` serves them and the static page (`static/`: plain HTML, CSS and JavaScript, no
build step, no CDN) from the standard library's threading HTTP server, behind a random token.
"""
