"""The public surface: every exported name resolves, internal modules are marked private, and no
function shadows the module it lives in."""

from __future__ import annotations

import importlib
import pkgutil
import types

import aliasscope as asc

PUBLIC_MODULES = {
    "capture", "captum", "cli", "comparison", "data", "decomposition", "diagnosis", "figures",
    "fixes", "generators", "kinds", "layout_rules", "layouts", "lie", "models", "results",
    "spectrum", "sweep", "transforms",
}  # fmt: skip


def test_every_exported_name_resolves():
    missing = [name for name in asc.__all__ if not hasattr(asc, name)]
    assert not missing


def test_modules_are_public_only_where_listed():
    found = {m.name for m in pkgutil.iter_modules(asc.__path__)}
    public = {name for name in found if not name.startswith("_")}
    # a new module is either public (add it here and to README's Layout) or _private
    assert public == PUBLIC_MODULES


def test_no_top_level_name_is_a_module_shadowed_by_a_function():
    for name in PUBLIC_MODULES:
        module = importlib.import_module(f"aliasscope.{name}")
        assert isinstance(module, types.ModuleType)
        assert not callable(getattr(module, name, None)), f"aliasscope.{name}.{name} shadows its module"


def test_decomposition_submodules_are_private():
    package = importlib.import_module("aliasscope.decomposition")
    names = [m.name for m in pkgutil.iter_modules(package.__path__)]
    assert names and all(n.startswith("_") for n in names)
