"""The package as a user installs it: its documented names, its help, its type hints."""

from __future__ import annotations

import pydoc
from importlib import resources

import registry


def test_help_lists_every_public_class() -> None:
    text = pydoc.plain(pydoc.render_doc(registry))
    classes = [name for name in registry.__all__ if isinstance(getattr(registry, name), type)]
    assert len(classes) > 30
    section = text[text.index("CLASSES"):]
    missing = [name for name in classes
               if f"class {getattr(registry, name).__name__}" not in section]
    assert missing == []


def test_every_name_in_all_is_importable_and_nothing_private_is_exported() -> None:
    assert all(hasattr(registry, name) for name in registry.__all__)
    assert not [name for name in registry.__all__ if name.startswith("_")]


def test_the_packages_carry_py_typed_so_a_users_mypy_sees_their_hints() -> None:
    for package in ("registry", "harness"):
        assert resources.files(package).joinpath("py.typed").is_file()
