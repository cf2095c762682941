"""Which fastbert pytest tests: loaded first for tests/ and benchmarks/ alike (repository-root conftest).

`python -m pytest` puts the current directory first on sys.path, so from the repository root the
checkout's fastbert/ would shadow an installed fastbert; and the checkout has neither the compiled
extension (`pip install .` builds fastbert/_C into site-packages) nor fastbert.kernels (kernels/ is
installed as that subpackage, setup.py's package_dir). So, before any test module imports fastbert:

* fastbert installed without -e (site-packages holds its own fastbert/): the repository root leaves
  sys.path and the installed package is tested, with its _C and its kernels; PYTHONSAFEPATH=1 is
  exported so that the tests' child processes (`python -m fastbert.info`, `python -c`, torchrun
  workers, started from the root) do not put the checkout first either (Python >= 3.11);
* an editable install (`pip install --no-build-isolation -e .`): the checkout is the installed package;
  nothing changes;
* nothing installed: the checkout is tested as a source tree. fastbert.kernels resolves to kernels/ as
  setup.py maps it, and without a built _C the C++ ops run their reference (tests of _C skip; set
  FASTBERT_REQUIRE_EXTENSION=1 to make that a failure).

The report header names the fastbert under test and which of the three it is.
"""

import importlib.machinery
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
_MODE = "source tree"


def _is_root(entry: str) -> bool:
    return os.path.abspath(entry or os.curdir) == ROOT


def _installed_elsewhere():
    """Directory of a fastbert package found on sys.path outside this checkout, or None."""
    spec = importlib.machinery.PathFinder.find_spec("fastbert", [p for p in sys.path if not _is_root(p)])
    if spec is None or not spec.submodule_search_locations:
        return None
    location = os.path.abspath(next(iter(spec.submodule_search_locations)))
    return None if location == os.path.join(ROOT, "fastbert") else location


class _SourceKernels:
    """fastbert.kernels -> kernels/ for a checkout that is not installed (setup.py's package_dir)."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name != "fastbert.kernels":
            return None
        folder = os.path.join(ROOT, "kernels")
        return importlib.util.spec_from_file_location(name, os.path.join(folder, "__init__.py"),
                                                      submodule_search_locations=[folder])


def _choose():
    global _MODE
    installed = _installed_elsewhere()
    if installed is not None:
        sys.path[:] = [p for p in sys.path if not _is_root(p)]
        os.environ["PYTHONSAFEPATH"] = "1"
        for name in [m for m in sys.modules if m == "fastbert" or m.startswith("fastbert.")]:
            del sys.modules[name]  # imported from the checkout before this ran (a plugin): forget it
        _MODE = "installed"
        return
    spec = importlib.util.find_spec("fastbert")
    if spec is not None and spec.origin and os.path.dirname(spec.origin) == os.path.join(ROOT, "fastbert"):
        # editable installs keep a finder that maps fastbert.kernels; a bare checkout needs ours
        # (appended: any installed finder still answers first)
        _MODE = "editable" if _editable_finder() else "source tree"
        if _MODE == "source tree":
            sys.meta_path.append(_SourceKernels)


def _editable_finder() -> bool:
    return any("editable" in type(f).__name__.lower() or "editable" in getattr(f, "__name__", "").lower()
               or "editable" in getattr(f, "__module__", "").lower() for f in sys.meta_path)


_choose()


def pytest_report_header(config):
    spec = importlib.util.find_spec("fastbert")
    where = os.path.dirname(spec.origin) if spec and spec.origin else "not importable"
    return f"fastbert under test: {where} ({_MODE})"
