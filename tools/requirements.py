"""Write requirements-dev.txt from pyproject.toml, the one list of dependencies.

    python tools/requirements.py           # rewrite requirements-dev.txt
    python tools/requirements.py --check   # exit 1 (and show the difference) when it is out of date

requirements-dev.txt is what scripts/env.sh installs before the editable build: the runtime
dependencies except torch (env.sh installs torch first, pinned to the CPU wheel on CPU machines) and
the [dev] extra (test + bench + tools), one line per distribution, with [tool.fastbert] dev-pins
applied. Users install the same set with `pip install ".[dev]"`.
"""

import argparse
import difflib
import os
import re
import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "requirements-dev.txt")
HEADER = ("# Generated from pyproject.toml by tools/requirements.py: do not edit, edit pyproject.toml.\n"
          "# The dependencies (torch aside: scripts/env.sh installs it first) and the [dev] extra.\n")


def _name(req: str) -> str:
    return re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0].lower().replace("_", "-")


PYPROJECT = os.path.join(ROOT, "pyproject.toml")


def load(path=PYPROJECT) -> dict:
    with open(path, "rb") as f:
        return tomllib.load(f)


def extra(project: dict, name: str, seen=None) -> list[str]:
    """Requirements of extra `name`, with self-references (fastbert[a,b]) expanded."""
    seen = set() if seen is None else seen
    if name in seen:
        return []
    seen.add(name)
    out = []
    for req in project["optional-dependencies"][name]:
        m = re.fullmatch(r"\s*" + re.escape(project["name"]) + r"\[([^\]]+)\]\s*", req)
        if m:
            for sub in m.group(1).split(","):
                out += extra(project, sub.strip(), seen)
        else:
            out.append(req)
    return out


def dev_requirements(config: dict) -> list[str]:
    project = config["project"]
    pins = config.get("tool", {}).get("fastbert", {}).get("dev-pins", {})
    reqs, names = [], set()
    for req in [*project["dependencies"], *extra(project, "dev")]:
        name = _name(req)
        if name == "torch" or name in names:
            continue
        names.add(name)
        reqs.append(f"{name}{pins[name]}" if name in pins else req)
    return reqs


def render(config: dict) -> str:
    return HEADER + "".join(f"{r}\n" for r in dev_requirements(config))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when requirements-dev.txt is stale")
    args = parser.parse_args(argv)
    text = render(load())
    current = open(OUT).read() if os.path.exists(OUT) else ""
    if args.check:
        if current != text:
            sys.stdout.writelines(difflib.unified_diff(current.splitlines(True), text.splitlines(True),
                                                       "requirements-dev.txt", "from pyproject.toml"))
            print("requirements-dev.txt is out of date: run python tools/requirements.py")
            return 1
        return 0
    with open(OUT, "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
