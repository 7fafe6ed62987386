"""Tiny twins shared by parallel workers (tasks/models.py build_tiny): a build that loses the race
to another process keeps the winner's twin in place, never deletes it from under its readers."""
from __future__ import annotations

import pytest

from tasks import models


def _builder_racing_another_process(target_name: str):
    """A twin builder during which another process finishes the same twin first."""
    def build(tmp):
        winner = tmp.parent / target_name
        winner.mkdir()
        (winner / "weights").write_text("the other process's twin")
        (tmp / "weights").write_text("this process's twin")
    return build


def test_a_build_that_loses_the_race_keeps_the_first_twin(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "_builder", lambda name: _builder_racing_another_process(name))
    got = models.build_tiny("aesthetics", tmp_path)
    assert got == tmp_path / "aesthetics"
    assert (got / "weights").read_text() == "the other process's twin"
    assert [p.name for p in tmp_path.iterdir()] == ["aesthetics"]   # no temporary left behind


def test_force_replaces_the_twin_and_a_present_twin_is_not_rebuilt(tmp_path, monkeypatch):
    built = []

    def builder(name):
        def build(tmp):
            built.append(name)
            (tmp / "weights").write_text(f"build {len(built)}")
        return build

    monkeypatch.setattr(models, "_builder", builder)
    first = models.build_tiny("whisper", tmp_path)
    assert models.build_tiny("whisper", tmp_path) == first and built == ["whisper"]
    models.build_tiny("whisper", tmp_path, force=True)
    assert (first / "weights").read_text() == "build 2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["whisper"]


def test_a_failed_build_leaves_nothing(tmp_path, monkeypatch):
    def builder(name):
        def build(tmp):
            (tmp / "half").write_text("x")
            raise RuntimeError("builder crashed")
        return build

    monkeypatch.setattr(models, "_builder", builder)
    with pytest.raises(RuntimeError, match="builder crashed"):
        models.build_tiny("mt5", tmp_path)
    assert list(tmp_path.iterdir()) == []
