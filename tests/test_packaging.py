"""One source of dependencies: pyproject.toml's extras cover what the test and benchmark suites import,
and requirements-dev.txt is generated from them (tools/requirements.py)."""

import ast
import glob
import importlib.metadata
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
requirements = pytest.importorskip("requirements", reason="tools/requirements.py needs tomllib or tomli")
sys.path.pop(0)

LOCAL = {"fastbert", "kernels", "conftest", "_util", "harness", "aot", "tests", "benchmarks", "tools"}


def _imported_modules(folder):
    """Top-level names of every module imported by folder/*.py (any depth in the file)."""
    names = set()
    for path in glob.glob(os.path.join(ROOT, folder, "*.py")):
        tree = ast.parse(open(path).read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    local = {os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(ROOT, folder, "*.py"))}
    return names - set(sys.stdlib_module_names) - LOCAL - local


def _dist_names(reqs):
    return {re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs}


@pytest.mark.parametrize("folder, extra", [("tests", "test"), ("benchmarks", "bench")])
def test_extras_cover_the_imports(folder, extra):
    project = requirements.load()["project"]
    allowed = _dist_names(project["dependencies"]) | _dist_names(requirements.extra(project, extra))
    dists = importlib.metadata.packages_distributions()
    missing = {}
    for module in sorted(_imported_modules(folder)):
        owners = {d.lower().replace("_", "-") for d in dists.get(module, [])}
        if owners and not owners & allowed:
            missing[module] = sorted(owners)
    assert not missing, f"{folder}/ imports modules that the [{extra}] extra does not provide: {missing}"


def test_requirements_dev_is_generated():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "requirements.py"), "--check"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dev_extra_contains_test_and_bench():
    project = requirements.load()["project"]
    dev = _dist_names(requirements.extra(project, "dev"))
    for name in ("test", "bench"):
        assert _dist_names(requirements.extra(project, name)) <= dev, name


def test_installed_copy_has_every_subpackage():
    """A non-editable install carries every package of the checkout's fastbert/ (and kernels/)."""
    import fastbert

    installed = os.path.dirname(os.path.abspath(fastbert.__file__))
    checkout = os.path.join(ROOT, "fastbert")
    if installed == checkout:
        pytest.skip("testing the checkout itself (editable install or source tree)")
    packages = [d for d in os.listdir(checkout) if os.path.exists(os.path.join(checkout, d, "__init__.py"))]
    missing = [d for d in packages + ["kernels"] if not os.path.isdir(os.path.join(installed, d))]
    assert not missing, f"the installed fastbert ({installed}) lacks {missing}"


def test_data_folders_are_declared_package_data(tmp_path):
    """setuptools copies every data file of fastbert/data and fastbert/data/world, with no "Package would
    be ignored" warning (build_py only: no compiler run, seconds)."""
    cmd = [sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "would be ignored" not in out.stdout + out.stderr
    for folder in ("data", os.path.join("data", "world")):
        src = os.path.join(ROOT, "fastbert", folder)
        files = sorted(f for f in os.listdir(src) if os.path.isfile(os.path.join(src, f)))
        assert files and all(os.path.isfile(tmp_path / "fastbert" / folder / f) for f in files), folder
