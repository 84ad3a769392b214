"""Where a C++ kernel is built and when it is reused (`serving/kernels/build.py`): one build
per machine, CPU, torch and source text, shared by every venv and checkout of the same
torch, instead of one per torch install path and checkout."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from torch.utils import cpp_extension

from serving.kernels import build, greedy


def test_directory_follows_the_source_text_not_its_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    here = build.build_directory("greedy")
    copy = tmp_path / "csrc"
    shutil.copytree(build.CSRC, copy)
    monkeypatch.setattr(build, "CSRC", copy)  # another checkout, same text
    assert build.build_directory("greedy") == here
    (copy / "greedy.cpp").write_text((copy / "greedy.cpp").read_text() + "\n// changed\n")
    assert build.build_directory("greedy") != here


@pytest.mark.skipif(not greedy.kernel_available(), reason="the greedy kernel does not build here")
def test_a_built_library_is_loaded_without_the_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    """What another venv's process does with the library this one built: load it, even
    where ninja would see a different command (other include paths) and rebuild."""
    assert build.library_path("greedy").exists()

    def no_compiler(*args: object, **kwargs: object) -> None:
        raise AssertionError("rebuilt a library that was there")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    build._build("greedy")  # would raise if it went to cpp_extension.load
