"""``cardseal.__all__`` is exactly the public API (after httpx's tests/test_exported_members.py)."""

from __future__ import annotations

import types

import cardseal


def test_every_name_in_all_exists() -> None:
    for name in cardseal.__all__:
        assert hasattr(cardseal, name), name
    assert len(cardseal.__all__) == len(set(cardseal.__all__))


def test_all_imports_are_exported() -> None:
    public = {
        name
        for name, value in vars(cardseal).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public | {"__version__"} == set(cardseal.__all__)


def test_exported_names_come_from_cardseal() -> None:
    for name in cardseal.__all__:
        if name == "__version__":
            continue
        assert getattr(cardseal, name).__module__.startswith("cardseal."), name


def test_version() -> None:
    from importlib.metadata import version

    assert cardseal.__version__ == version("cardseal")
