"""The CPU multimodal baseline's checkpoint folder follows the checkpoint it was made for (no servers)."""

from __future__ import annotations

import json

from benchmarks.vllm_cpu_shim import cpu_multimodal_checkpoint


def _checkpoint(path, marker: str):
    path.mkdir(parents=True)
    (path / "config.json").write_text(
        json.dumps({"vision_config": {"patch_size": 14, "image_size": 1540}, "marker": marker})
    )
    (path / "model.safetensors").write_text(marker)
    return path


def test_links_are_renewed_when_a_checkpoint_of_the_same_name_moves(tmp_path):
    first = _checkpoint(tmp_path / "a" / "demo", "first")
    model_dir, _ = cpu_multimodal_checkpoint(first, tmp_path / "work")
    assert (model_dir / "model.safetensors").read_text() == "first"

    second = _checkpoint(tmp_path / "b" / "demo", "second")
    for file in first.iterdir():
        file.unlink()
    first.rmdir()  # the earlier checkpoint is gone, as pytest's old temporary folders are
    model_dir, _ = cpu_multimodal_checkpoint(second, tmp_path / "work")
    assert (model_dir / "model.safetensors").read_text() == "second"
    assert json.loads((model_dir / "config.json").read_text())["marker"] == "second"
    assert (model_dir / "preprocessor_config.json").exists()
