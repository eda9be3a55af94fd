"""`franca audit PATH` and its output."""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="any artifact (checkpoint, table, eval JSON, shard) or a provenance.json")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from franca.audit import audit

    report = audit(args.path)
    if args.json:
        print(
            json.dumps(
                {
                    "problems": report.problems,
                    "files_verified": report.files_verified,
                    "records": sorted(report.records),
                    "sources": report.sources,
                },
                indent=1,
            )
        )
    else:
        print("\n".join(report.lines))
        print(
            f"\n{len(report.records)} provenance records, {report.files_verified} file hashes verified, "
            f"{len(report.sources)} sources"
        )
    for problem in report.problems:
        print(f"AUDIT FAILED: {problem}", file=sys.stderr)
    return 1 if report.problems else 0
