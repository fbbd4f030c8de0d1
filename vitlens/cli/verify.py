"""`vitlens verify RESULTS`: check every committed file of a result set against its done-marker."""

from __future__ import annotations

import argparse
import sys
import uuid

from tqdm import tqdm

from vitlens.errors import UserError
from vitlens.store.committed import committed_files, damaged_shards, verify
from vitlens.store.layout import clean_temporaries
from vitlens.store.lock import OutputLock
from vitlens.store.storage import Storage, open_storage

#: Exit code when some committed file is damaged (a partial result).
EXIT_DAMAGED = 3


def register(subparsers: "argparse._SubParsersAction") -> None:
    """Add `vitlens verify`."""
    parser = subparsers.add_parser(
        "verify",
        help="check a result set's files against the sizes and sha256 its done-markers recorded",
        description=(
            "Reads every file the result set's done-markers commit and compares its size and sha256 with "
            "what was recorded when it was written. Prints one line per damaged file (missing, cut, or "
            "changed) and exits 3 when there is any, else 0; writes nothing unless --clean. `vitlens run` on "
            "the same job redoes the shards whose files are damaged."
        ),
        epilog="examples:\n  vitlens verify demo-out/results\n  vitlens verify s3://bucket/results --sizes-only\n"
               "  vitlens verify s3://bucket/results --clean",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("results", help="the results a job wrote: a folder or an object-store URL")
    parser.add_argument("--sizes-only", action="store_true", help="compare sizes only (no file is read)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--clean", action="store_true",
                        help="also delete what no done-marker names (objects of interrupted or retried writes, "
                             "temporaries), holding the output's lock: refused while a run writes there")
    parser.set_defaults(func=_verify)


def _verify(args: argparse.Namespace) -> int:
    storage = open_storage(args.results)
    try:
        found = committed_files(storage)
    except OSError as err:
        raise UserError(f"{storage.root}: cannot list it ({err})") from None
    if not found.markers and not found.files:
        raise UserError(f"{storage.root}: no result set there (no done-marker and no table=... file)")
    recorded = [r for r in found.files.values() if r is not None]
    total = sum(r.size for r in recorded)
    with tqdm(total=0 if args.sizes_only else total, unit="B", unit_scale=True, desc="verify",
              disable=args.no_progress or args.sizes_only, file=sys.stderr) as bar:
        damage = verify(found, checksums=not args.sizes_only, progress=bar.update)
    for item in damage:
        print(item.line(storage))
    unchecked = len(found.files) - len(recorded)
    what = "sizes" if args.sizes_only else "sizes and sha256"
    print(f"{storage.root}: {len(recorded)} committed files ({total / 1e6:.1f} MB) checked ({what}), "
          f"{len(damage)} damaged"
          + (f" in {len(damaged_shards(damage, found))} shard(s): `vitlens run` on the job redoes them" if damage else "")
          + (f"; {unchecked} file(s) without a recorded checksum (per-run tables, or written before "
             "markers recorded them)" if unchecked else "")
          + (f"; {len(found.unreferenced)} object(s) named by no marker (interrupted writes; never read)"
             if found.unreferenced else ""))
    if args.clean:
        _clean(storage)
    return EXIT_DAMAGED if damage else 0


def _clean(storage: Storage) -> None:
    """Delete the objects no marker names and local temporaries, under the output's lock (so
    no run is between its data objects and its marker); listed again once the lock is held."""
    with OutputLock(storage, f"verify-clean-{uuid.uuid4().hex[:8]}"):
        found = committed_files(storage)
        size = sum(found.listing[key] for key in found.unreferenced)
        storage.delete_many(found.unreferenced)
        temporaries = clean_temporaries(storage)
    print(f"{storage.root}: deleted {len(found.unreferenced)} object(s) named by no marker ({size / 1e6:.1f} MB)"
          + (f" and {temporaries} temporary file(s)" if temporaries else ""))
