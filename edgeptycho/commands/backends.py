"""`edgeptycho backends`: every HAL backend with its availability here, precisions, and why not / how to fix."""

from __future__ import annotations

import argparse
import json
import textwrap


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")


def run(args: argparse.Namespace) -> int:
    from ..hw.registry import list_backends

    rows = list_backends()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["name"]) for r in rows)
    print(f"{'backend':<{width}}  available  {'precisions':<15} details")
    for r in rows:
        detail = r["summary"] if r["available"] else f"{r['reason']}\nfix: {r['fix']}" if r["fix"] else r["reason"]
        lines = [w for line in detail.splitlines() for w in textwrap.wrap(line, 90) or [""]]
        print(f"{r['name']:<{width}}  {'yes' if r['available'] else 'no':<9}  {','.join(r['precisions']):<15} "
              f"{lines[0] if lines else ''}")
        for line in lines[1:]:
            print(f"{'':<{width + 28}} {line}")
    return 0
