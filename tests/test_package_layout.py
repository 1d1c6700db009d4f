"""Layout of the theory and Monte Carlo packages: one public face per package, unambiguous module names."""

import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import mobalab
import mobalab.simulate
import mobalab.snr
import mobalab.stats

# the checkout, not the installed package (CI installs mobalab into a fresh environment)
ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "mobalab"
OWN = {"snr": mobalab.snr, "simulate": mobalab.simulate}


def _module_names(package_dir: Path) -> set[str]:
    return {m.name for m in pkgutil.iter_modules([str(package_dir)])}


@pytest.mark.parametrize("name", sorted(OWN))
def test_public_names_are_not_shadowed_by_submodules(name):
    # `mobalab.simulate.key_conv` must mean one thing: the function, not also a module of that name.
    package = OWN[name]
    clash = sorted(set(package.__all__) & _module_names(SRC / name))
    assert clash == [], f"mobalab.{name} exports names that are also its submodules: {clash}"


def test_private_module_names_say_what_they_hold():
    """An implementation module of snr / simulate shares its name with no other module of mobalab."""
    others: dict[str, list[str]] = {}
    for path in SRC.rglob("*.py"):
        if path.name != "__init__.py":
            rel = path.relative_to(SRC).with_suffix("")
            others.setdefault(path.stem.lstrip("_"), []).append(".".join(rel.parts))
    clashes = {
        stem: places
        for stem, places in others.items()
        if len(places) > 1 and any(p.split(".")[0] in OWN and p.split(".")[-1].startswith("_") for p in places)
    }
    assert clashes == {}, f"module names used twice: {clashes}"


DESIGN = ROOT / "docs" / "design.md"
# The sections of docs/design.md that code may point at (docs/design.md, then the quoted section): its headings.
DESIGN_SECTIONS = {line.lstrip("#").strip() for line in DESIGN.read_text().splitlines() if line.startswith("#")}
THEORY_FILES = sorted(
    [*(SRC / "snr").glob("*.py"), *(SRC / "simulate").glob("*.py"), SRC / "stats.py", SRC / "_validate.py"]
    + [*(ROOT / "tests" / "snr").glob("*.py"), *(ROOT / "tests" / "simulate").glob("*.py")]
    + [ROOT / "tests" / "test_stats.py", ROOT / "tests" / "test_validate.py"]
)
TEXT_SUFFIXES = {".py", ".md", ".sh", ".cu", ".cuh", ".toml", ".ipynb", ".cfg", ".txt"}
REPO_FILES = sorted(
    p
    for top in ("src", "tests", "scripts", "notebooks", "docs", ".ci")
    for p in (ROOT / top).rglob("*")
    if p.is_file() and (p.suffix in TEXT_SUFFIXES or p.parent.name == ".ci") and "__pycache__" not in p.parts
) + [ROOT / "README.md", ROOT / "RESULTS.md", ROOT / "pyproject.toml"]
POINTER = re.compile(r'docs/design\.md,\s+"([^"]+)"')
# Spelled in pieces so that this file does not match itself.
OUTSIDE = ("DESIGN" + ".md", "shared" + "/reference", "../" + "shared", "/" + "work/", "." + "notes/")


@pytest.mark.parametrize("path", REPO_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_repository_stands_on_its_own(path):
    """No file names a path outside the repository or a document it does not contain."""
    text = path.read_text(encoding="utf-8", errors="replace")
    for outside in OUTSIDE:
        assert outside not in text, f"{path.name} points outside the repository: {outside!r}"
    sections = {" ".join(s.split()) for s in POINTER.findall(text)}
    assert sections <= DESIGN_SECTIONS, f"{path.name} points at sections {sections - DESIGN_SECTIONS} " \
        "that are not headings of docs/design.md"


@pytest.mark.parametrize("path", THEORY_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_theory_files_name_no_outside_documents(path):
    text = path.read_text(encoding="utf-8")
    assert not re.search(r"\bissues?\b|#\d{2,}", text, re.IGNORECASE), f"{path.name} names an issue"
    for name in re.findall(r"[\w.-]+\.md\b", text):
        assert name in ("design.md", "README.md", "RESULTS.md"), f"{path.name} names {name}"


# mobalab's API as docs/design.md quotes it: `mobalab.snr.snr`, or `snr.snr` (mobalab understood)
API_NAME = re.compile(r"`(?:mobalab\.)?((?:snr|simulate|stats|kernels|training|bench|distributed|integrations)"
                      r"(?:\.\w+)+)")


def _resolves(dotted: str) -> bool:
    """Whether ``mobalab.<dotted>`` is a module or an attribute of one."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module("mobalab." + ".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_design_names_only_api_that_exists():
    names = set(API_NAME.findall(DESIGN.read_text(encoding="utf-8")))
    assert "snr.hit_probability" in names  # the pattern finds the names the document quotes
    assert sorted(n for n in names if not _resolves(n)) == []


PUBLIC = [(pkg, name) for pkg in (mobalab.snr, mobalab.simulate, mobalab.stats) for name in pkg.__all__]


@pytest.mark.parametrize("package, name", PUBLIC, ids=[f"{p.__name__}.{n}" for p, n in PUBLIC])
def test_public_docstrings_state_their_equation_and_an_example(package, name):
    doc = getattr(package, name).__doc__ or ""
    assert ":math:" in doc or ".. math::" in doc, f"{package.__name__}.{name}: no equation in the docstring"
    assert "Examples\n    --------\n" in doc and "    >>> " in doc, f"{package.__name__}.{name}: no Examples section"
