"""Layout of the theory and Monte Carlo packages: one public face per package, unambiguous module names."""

import pkgutil
from pathlib import Path

import pytest

import mobalab
import mobalab.simulate
import mobalab.snr

SRC = Path(mobalab.__file__).resolve().parent
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
