"""python -m fastbert.bench report RUN.json [--out RESULTS.md] [--plots DIR] [--ours REGEX] [--no-plots]

Without --out the report is written beside RUN.json as RUN.md (plots RUN-throughput_vs_seq.png, ...).
"""

import argparse
import sys

from .report import OURS_PATTERN, write_report


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastbert.bench",
                                     description="fastbert benchmark tools")
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="pytest-benchmark JSON -> RESULTS.md tables and PNG plots")
    rep.add_argument("json", help="a JSON written by pytest benchmarks/ --benchmark-json RUN.json")
    rep.add_argument("--out", default=None,
                     help="Markdown file to write (default: beside the JSON, named after it: RUN.json -> "
                     "RUN.md, its plots RUN-*.png; the committed benchmarks/RESULTS.md only when named here)")
    rep.add_argument("--plots", default=None, help="folder for the PNG plots (default: the report's folder)")
    rep.add_argument("--ours", default=OURS_PATTERN,
                     help=f"regex on provider names that marks fastbert's rows (default: {OURS_PATTERN!r})")
    rep.add_argument("--no-plots", action="store_true", help="write the Markdown only")
    args = parser.parse_args(argv)
    try:
        out, plots, note = write_report(args.json, args.out, args.plots, args.ours,
                                        make_plots=not args.no_plots)
    except (OSError, ValueError) as exc:
        print(f"fastbert.bench report: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}" + "".join(f"\nwrote {p}" for p in plots) + (f"\n{note}" if note else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
