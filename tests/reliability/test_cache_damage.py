"""A truncated cache shard is an error naming the file and the way out, not a bare pyarrow traceback; a
negative evaluation count is refused (issue 14)."""

from __future__ import annotations

import pytest
from test_cache_safety import fake_writer, write_shard

from sae_vision_ext.activations.cache import CachedActivations
from sae_vision_ext.cli import main as cli_main


def test_a_truncated_shard_names_the_file_and_the_way_out(tmp_path):
    writer = fake_writer(tmp_path / "cache")
    for index in writer.prepare():
        write_shard(writer, index)
    cache = writer.commit()
    shard = cache.path / cache.shards[1].filename
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"cache shard {shard} is damaged or missing .*--overwrite"):
        CachedActivations(cache.path)


def test_eval_refuses_a_negative_count(tmp_path, capsys):
    assert cli_main(["eval", str(tmp_path), "--n-eval-images", "-5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["sae-vision eval: error: --n-eval-images must be positive, got -5"]
