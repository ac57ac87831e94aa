"""Issue 27.5 and 27.3: the build config gives setuptools nothing to warn about, and the declared transformers
versions hold the installed one."""
import re
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_pyproject_builds_without_warnings(monkeypatch):
    pytest.importorskip("setuptools")
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution
    proj = _pyproject()["project"]
    assert proj["license"] == "Apache-2.0"  # an SPDX expression, not the deprecated table
    for f in proj.get("license-files", []):
        assert (ROOT / f).is_file(), f
    monkeypatch.chdir(ROOT)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), ROOT / "pyproject.toml")
    assert not [str(w.message) for w in caught if "setuptools" in w.category.__module__
                or "Deprecat" in w.category.__name__], [str(w.message)[:200] for w in caught]
    assert dist.metadata.license_expression == "Apache-2.0"


def test_transformers_bounds_hold_the_installed_version():
    import transformers
    from packaging.requirements import Requirement
    reqs = [Requirement(r) for r in _pyproject()["project"]["dependencies"]]
    tf = next(r for r in reqs if r.name == "transformers")
    assert tf.specifier.contains(transformers.__version__), (str(tf.specifier), transformers.__version__)
    assert any(s.operator == "<" for s in tf.specifier), "an upper bound: the next major is untested"
    # the README says which versions were tested; the lower bound is the oldest of them
    readme = (ROOT / "README.md").read_text()
    low = next(s.version for s in tf.specifier if s.operator == ">=")
    assert re.search(rf"transformers {re.escape(low)}\b", readme), f"README does not name transformers {low}"
