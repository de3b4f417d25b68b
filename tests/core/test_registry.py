"""The one registry behind methods, nets and backends: lazy discovery, extra modules from the
environment, checks where a thing is added, and errors that name what exists."""

import sys

import pytest

from core.registry import Registry


def test_discovers_a_package_and_names_what_exists(tmp_path, monkeypatch):
    package = tmp_path / "labthings"
    package.mkdir()
    (package / "__init__.py").write_text("from core.registry import Registry\nTHINGS = Registry('thing', package='labthings', skip={'base'})\n")
    (package / "base.py").write_text("raise RuntimeError('base is not imported')\n")
    (package / "alpha.py").write_text("from labthings import THINGS\n@THINGS.register('alpha')\nclass Alpha: pass\n")
    (tmp_path / "extra_thing.py").write_text("from labthings import THINGS\nTHINGS.register('beta')(object)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("EXTRA_THINGS", "extra_thing")
    import labthings

    labthings.THINGS.env = "EXTRA_THINGS"
    assert labthings.THINGS.names() == ["alpha", "beta"]  # a file is all it takes; the environment adds more
    with pytest.raises(KeyError, match=r"unknown thing 'alpah' \(known: alpha, beta\); did you mean 'alpha'\?"):
        labthings.THINGS.get("alpah")
    for name in ("labthings", "labthings.alpha", "extra_thing"):
        sys.modules.pop(name, None)


def test_refuses_a_second_thing_of_a_name_and_runs_the_check():
    seen = []
    things = Registry("thing", check=lambda name, obj: seen.append(name))
    things.register("a")(int)
    with pytest.raises(ValueError, match="registered twice"):
        things.register("a")(float)
    assert seen == ["a", "a"] and things.get("a") is int


def test_a_module_that_fails_to_import_fails_again_at_the_next_lookup(monkeypatch):
    things = Registry("thing", modules=["no_such_module_here"], error=LookupError)
    for _ in range(2):
        with pytest.raises(ModuleNotFoundError):
            things.names()
