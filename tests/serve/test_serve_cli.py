"""The serving commands' help: what each does, its inputs and outputs, in ``--help``."""

from __future__ import annotations

import pytest

from fearec_dist.cli import build_parser, main


@pytest.mark.parametrize(
    ("command", "phrases"),
    [
        ("export", ["--run DIR|URI", "items.parquet", "encoder.pt2", "manifest.json", "hnsw"]),
        ("recommend", ["--history", "--input URI", "--fallback", "--strict", "Ray Data"]),
    ],
)
def test_serve_commands_explain_themselves(command, phrases, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for phrase in phrases:
        assert phrase in text, phrase
    assert command in build_parser().format_help()
