"""Run transformers' own model tests stock and with every model patched, and compare test by test.

    python tools/hf_conformance.py [--suite ../shared/transformers-tests] [--families bert roberta]
                                   [--work /tmp/fastbert-conformance] [-- extra pytest args]

The suite is copied to --work (its tests import transformers from src/, linked to the installed
package there), each family's tests/models/<family>/test_modeling_<family>.py runs twice (stock, then
with tools/hf_conformance_plugin.py), and the script prints, per family, the counts of each run and
every test whose outcome differs. Exit status 1 when a test that passes stock fails patched, 2 when
a run reports no test at all (the suite could not be collected: a missing test dependency, a wrong path).
"""

import argparse
import os
import re
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def outcomes(report):
    """{test id: PASSED|FAILED|ERROR|SKIPPED} from pytest's -rA short summary."""
    found = {}
    for line in report.splitlines():
        m = re.match(r"^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (\S+)", line)
        if m:
            found[m.group(2)] = m.group(1)
    return found


def run(work, family, stock, extra):
    path = [HERE, ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(path))
    if stock:
        env["FASTBERT_CONFORMANCE_STOCK"] = "1"
    cmd = [sys.executable, "-m", "pytest", f"tests/models/{family}/test_modeling_{family}.py", "-q", "-rA",
           "-p", "no:cacheprovider", "-p", "hf_conformance_plugin", *extra]
    done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    tail = [line for line in done.stdout.splitlines() if re.search(r"\d+ (passed|failed)", line)]
    return outcomes(done.stdout), (tail[-1] if tail else done.stdout[-500:])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", default=os.path.join(ROOT, "..", "shared", "transformers-tests"))
    parser.add_argument("--families", nargs="+", default=["bert", "roberta"])
    parser.add_argument("--work", default="/tmp/fastbert-conformance")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    import transformers

    if not os.path.isdir(args.work):
        shutil.copytree(args.suite, args.work)
    os.makedirs(os.path.join(args.work, "src"), exist_ok=True)
    link = os.path.join(args.work, "src", "transformers")
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(os.path.dirname(transformers.__file__), link)
    lost, empty = 0, []
    for family in args.families:
        stock, stock_tail = run(args.work, family, True, extra)
        patched, patched_tail = run(args.work, family, False, extra)
        print(f"== {family} (transformers {transformers.__version__})\n  stock:   {stock_tail}\n"
              f"  patched: {patched_tail}")
        for test in sorted(set(stock) | set(patched)):
            a, b = stock.get(test, "-"), patched.get(test, "-")
            if a != b:
                print(f"  {a:>7} -> {b:<7} {test}")
                lost += a == "PASSED" and b in ("FAILED", "ERROR")
        # a collection error reports the file, not a test: count only test ids
        runs = (("stock", stock), ("patched", patched))
        empty += [f"{family} ({name})" for name, got in runs if not any("::" in t for t in got)]
    if empty:
        print(f"no test outcome reported for {', '.join(empty)}: nothing was compared", file=sys.stderr)
        return 2
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
