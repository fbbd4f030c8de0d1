"""`vitlens explore`: a local, read-only web app over a result set (docs/explore.md)."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: "argparse._SubParsersAction") -> None:
    """Add `vitlens explore`."""
    parser = subparsers.add_parser(
        "explore",
        help="browse a result set interactively in the browser (local, read-only, token-protected)",
        description=(
            "Starts a local web app over RESULTS: an image browser (filter by class, correct / misclassified, "
            "shard; sort by the last block's identifiable tokens), an image view (a block slider and stream "
            "choice colouring every token by its score or top-1 class, its top-5 on hover, the random twin and "
            "a second variant beside it, the heads' and explain maps where those experiments ran) and "
            "identifiability curves. Prints the URL to open; it carries a random access token. Never writes "
            "into RESULTS. Stop it with Ctrl-C."
        ),
    )
    parser.add_argument("--results", required=True,
                        help="the results a job wrote: a folder or an object-store URL (s3://bucket/prefix)")
    parser.add_argument("--port", type=int, default=8765, help="port to listen on (default 8765; 0: any free port)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1, this machine only; 0.0.0.0 exposes it, "
                             "the token still required)")
    parser.set_defaults(func=_explore)


def _explore(args: argparse.Namespace) -> int:
    from vitlens.errors import UserError
    from vitlens.explore.data import ExploreData
    from vitlens.explore.server import Explorer

    data = ExploreData(args.results)
    app = Explorer(data)
    try:
        server = app.serve(args.host, args.port)
    except OSError as err:
        data.close()
        raise UserError(f"--port {args.port}: cannot listen on {args.host} ({err.strerror or err})") from None
    print(f"vitlens explore: {args.results}\n  open {app.url(server)}\n  (Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("vitlens explore: stopped", file=sys.stderr)
    finally:
        server.server_close()
        data.close()
    return 0
