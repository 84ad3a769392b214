"""The config example in the README is a valid config (unknown keys are refused)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from serving.config import InferosConfig

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_yaml_example_validates() -> None:
    blocks = re.findall(r"```yaml\n(.*?)```", README.read_text(), re.S)
    assert blocks, "the README lost its config example"
    for block in blocks:
        InferosConfig.model_validate(yaml.safe_load(block))


def test_cli_flags_override_config(tmp_path: Path) -> None:
    from serving.cli import build_config, make_parser

    path = tmp_path / "c.yaml"
    path.write_text("scheduling: {pd_mode: colocated}\nserver: {port: 9001}\n")
    args = make_parser().parse_args(
        ["serve", "--config", str(path), "--port", "9002", "--stream-interval", "4"]
    )
    cfg = build_config(args)
    assert cfg.scheduling.pd_mode == "colocated"
    assert cfg.server.port == 9002
    assert cfg.scheduling.stream_interval == 4
    assert cfg.kv_cache.enable_prefix_caching  # the default, where no flag says otherwise


def test_prefix_caching_flag_as_vllms() -> None:
    from serving.cli import build_config, make_parser

    off = build_config(make_parser().parse_args(["serve", "--no-enable-prefix-caching"]))
    assert not off.kv_cache.enable_prefix_caching and not off.engine_config().prefix_caching
    on = build_config(make_parser().parse_args(["serve", "--enable-prefix-caching"]))
    assert on.engine_config().prefix_caching
    no_reuse = build_config(make_parser().parse_args(["serve", "--no-prefix-reuse"]))
    assert not no_reuse.engine_config().prefix_caching  # no reuse of either kind
