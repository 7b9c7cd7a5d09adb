"""The pipelines that ship in pipelines/: each loads, and every flag it sets is one its tool accepts."""

from __future__ import annotations

import importlib

import pytest
import typer

from helpers import REPO
from smedjan.pipeline import load_pipeline
from smedjan_tools.cli import COMMANDS

SHIPPED = sorted((REPO / "pipelines").glob("*.toml"))


def test_the_four_pipelines_of_the_design_ship():
    assert {p.stem for p in SHIPPED} >= {"tiny", "small", "medium", "large"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_stage_command_parses(path, tmp_path):
    text = path.read_text()
    if "../shared/" in text and not (REPO.parent / "shared").is_dir():
        pytest.skip(f"{path.name} reads ../shared, which is absent beside {REPO}")
    pipe = load_pipeline(path, runs=tmp_path, base=REPO)
    assert [s.name for s in pipe.stages][:3] == ["tokenizer", "prepare", "train"]
    for stage in pipe.stages:
        for args in stage.command:
            tool, *rest = args
            cmd = typer.main.get_command(importlib.import_module(COMMANDS[tool][0]).app)
            try:
                cmd.make_context(tool, list(rest))  # parses and type-checks, runs nothing
            except Exception as e:  # typer vendors click: its UsageError is not click's
                msg = e.format_message() if hasattr(e, "format_message") else repr(e)
                pytest.fail(f"{path.name} [{stage.name}]: {msg}")


def test_the_tiny_pipeline_needs_only_what_ships(tmp_path):
    # The README's first command runs it on a fresh clone, where ../shared may be absent.
    assert "../shared" not in (REPO / "pipelines/tiny.toml").read_text()
    load_pipeline(REPO / "pipelines/tiny.toml", runs=tmp_path, base=REPO)
