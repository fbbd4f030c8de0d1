"""Coverage sweep: every timm ViT-family architecture through the lens's parity check.

Each model runs in its own subprocess (`python -m vitlens.models.coverage NAME
--headless-classes 1000`, one JSON row on stdout) with a timeout, so a model that hangs,
runs out of memory or crashes the interpreter costs only its own row. Writes one CSV row per
model and prints, per family, how many are parity-ok / refused (with a reason) / wrong /
crash / too large, then the refusal reasons with their counts.

    .venv/bin/python benchmarks/coverage_sweep.py --only deit_tiny        # a few models
    .venv/bin/python benchmarks/coverage_sweep.py --jobs 2 --out coverage.csv   # all (> 1 h on 2 cores)
    .venv/bin/python benchmarks/coverage_sweep.py --modules eva --out eva.csv    # one timm module
    .venv/bin/python benchmarks/coverage_sweep.py --summarise coverage.csv eva.csv  # counts of CSVs
    .venv/bin/python benchmarks/coverage_sweep.py --modules eva --out eva.csv --resume  # go on after a stop
    .venv/bin/python benchmarks/coverage_sweep.py --library open_clip --out open_clip.csv  # open_clip.list_models()
    .venv/bin/python benchmarks/coverage_sweep.py --library transformers --out hf.csv  # transformers classes

open_clip architectures are checked as `open_clip:ARCH@random` (a contrastive tower gets a
zero-shot class space from its own random text tower). transformers classes are checked from
their default configs (`benchmarks/hf_coverage_models.py` writes one config-only folder per
class, the `@random` twin is built from it), so neither needs a download.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from pathlib import Path

from vitlens.models.coverage import parse_count
from vitlens.models.coverage import (
    COVERED_MODULES,
    DEFAULT_MAX_PARAMS,
    HEADLESS_CLASSES,
    STATUSES,
    CoverageRow,
    timm_models,
)

COLUMNS = [f.name for f in fields(CoverageRow)] + ["seconds"]
#: the checks download nothing: random twins; a hub tokenizer is not fetched (the row says so)
OFFLINE_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def run_one(name: str, timeout: float, max_params: int, threads: int) -> tuple[CoverageRow, float]:
    """One model's row from its own subprocess (a timeout or a dead interpreter is a `crash`)."""
    command = [sys.executable, "-m", "vitlens.models.coverage", name, "--max-params", str(max_params),
               "--headless-classes", str(HEADLESS_CLASSES), "--threads", str(threads)]
    start = time.perf_counter()
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=OFFLINE_ENV)
    except subprocess.TimeoutExpired:
        return _crash(name, f"timed out after {timeout:g} s"), time.perf_counter() - start
    seconds = time.perf_counter() - start
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        tail = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
        return _crash(name, f"subprocess failed (exit {result.returncode}): {tail}"), seconds
    return CoverageRow.from_json(json.loads(lines[-1])), seconds


def _crash(name: str, reason: str) -> CoverageRow:
    from vitlens.models.coverage import timm_module_of

    module = name.split(":", 1)[0] if name.startswith(("open_clip:", "hf:")) else timm_module_of(name)
    return CoverageRow(name=name, timm_module=module, model_class="", family=module, params=None,
                       status="crash", reason=reason)


def reason_kind(row: dict[str, str]) -> str:
    """A reason with the model's own name taken out, for counting."""
    return row["reason"].replace(f"{row['name']}@random", "NAME").replace(row["name"], "NAME")


def print_counts(rows: list[dict[str, str]]) -> None:
    """Per family: how many models are in each status; then the reasons with their counts."""
    per_family: dict[str, Counter] = defaultdict(Counter)
    for row in rows:
        per_family[row["family"]][row["status"]] += 1
    width = max(len("FAMILY"), *(len(f) for f in per_family))
    print("\n" + "FAMILY".ljust(width) + "  " + "  ".join(s.upper().rjust(9) for s in STATUSES) + "  TOTAL")
    total: Counter = Counter()
    for family in sorted(per_family):
        counts = per_family[family]
        total.update(counts)
        print(family.ljust(width) + "  " + "  ".join(str(counts[s]).rjust(9) for s in STATUSES)
              + f"  {sum(counts.values()):5d}")
    print("all".ljust(width) + "  " + "  ".join(str(total[s]).rjust(9) for s in STATUSES) + f"  {len(rows):5d}")
    for status in ("refused", "wrong", "crash"):
        reasons = Counter(reason_kind(row) for row in rows if row["status"] == status)
        if reasons:
            print(f"\n{status} reasons:")
            for reason, count in reasons.most_common():
                print(f"  {count:4d}  {reason}")


def library_models(library: str, modules: tuple[str, ...], folder: Path) -> list[str]:
    """The variant names a sweep checks: timm names of `modules`, every open_clip architecture,
    or one `hf:FOLDER` per transformers class (config-only folders written under `folder`)."""
    if library == "timm":
        return timm_models(modules)
    if library == "open_clip":
        from vitlens.models.open_clip_models import open_clip_architectures

        return [f"open_clip:{arch}" for arch in open_clip_architectures()]
    from hf_coverage_models import write_config_folders

    return [f"hf:{path}" for path in write_config_folders(folder)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=None, metavar="SUBSTRING", help="only models whose name contains it")
    parser.add_argument("--jobs", type=int, default=1, help="parallel subprocesses (default 1)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per model (default 300)")
    parser.add_argument("--max-params", type=parse_count, default=DEFAULT_MAX_PARAMS,
                        help="too large above this many parameters (default 700M)")
    parser.add_argument("--out", default="coverage.csv", help="CSV file (default coverage.csv)")
    parser.add_argument("--library", choices=("timm", "open_clip", "transformers"), default="timm",
                        help="whose architectures to sweep (default timm)")
    parser.add_argument("--modules", nargs="+", default=list(COVERED_MODULES), choices=COVERED_MODULES,
                        metavar="MODULE", help=f"timm modules to sweep (default all: {' '.join(COVERED_MODULES)})")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows already in --out and sweep only the models it lacks")
    parser.add_argument("--summarise", nargs="+", type=Path, metavar="CSV",
                        help="print the counts of earlier sweeps' CSV files (one row per model) and stop")
    args = parser.parse_args()
    if args.summarise:
        rows_by_name: dict[str, dict[str, str]] = {}
        for path in args.summarise:
            with path.open(newline="") as handle:
                rows_by_name.update({row["name"]: row for row in csv.DictReader(handle)})
        print_counts(list(rows_by_name.values()))
        return 0
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    names = [n for n in library_models(args.library, tuple(args.modules), Path(args.out).with_suffix(".models"))
             if args.only is None or args.only in n]
    out = Path(args.out)
    kept: list[dict[str, str]] = []
    if args.resume and out.is_file():
        with out.open(newline="") as handle:
            kept = list(csv.DictReader(handle))
        done_names = {row["name"] for row in kept}
        names = [n for n in names if n not in done_names]
    if not names and kept:
        print(f"every model is already in {out}")
        print_counts(kept)
        return 0
    if not names:
        print(f"no timm model of {', '.join(COVERED_MODULES)} contains {args.only!r}", file=sys.stderr)
        return 2
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    print(f"{len(names)} models, {args.jobs} at a time, {threads} torch thread(s) each, "
          f"timeout {args.timeout:g} s -> {args.out}", flush=True)
    rows: list[tuple[CoverageRow, float]] = []
    with out.open("w", newline="") as handle, ThreadPoolExecutor(args.jobs) as pool:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(kept)
        futures = [pool.submit(run_one, name, args.timeout, args.max_params, threads) for name in names]
        for done, future in enumerate(futures, start=1):
            row, seconds = future.result()
            rows.append((row, seconds))
            record = row.to_json()
            record["grid"] = "x".join(map(str, row.grid)) if row.grid else ""
            record["cell"] = "x".join(map(str, row.cell)) if row.cell else ""
            record["skipped"] = "; ".join(f"{e}: {r}" for e, r in row.skipped)
            writer.writerow({**record, "seconds": f"{seconds:.1f}"})
            handle.flush()
            print(f"[{done}/{len(names)}] {row.name}: {row.status}"
                  + (f" ({row.reason})" if row.reason else "") + f" {seconds:.0f} s", flush=True)

    print_counts(kept + [{**row.to_json(), "reason": row.reason} for row, _ in rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())
