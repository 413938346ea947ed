"""vLLM's own multimodal server for the baseline, on machines where it needs help to start.

On GPUs, vLLM serves the multimodal checkpoint as published. On this kind of
CPU machine its Mistral 3 path cannot start: it imports torchvision (there is
no CPU build for torch 2.13.0+cpu) and builds transformers' PixtralProcessor
from processor config files the demo checkpoint does not have. For the
benchmark baseline only, `site/sitecustomize.py` (put on the baseline
server's PYTHONPATH) stands in for the torchvision-based pieces, and the
checkpoint gets the two processor files. Nothing in ministral-serve uses this.
"""

from __future__ import annotations

import json
from pathlib import Path

SITE = Path(__file__).parent / "site"
# Pixtral's image normalisation, as mistral_common and transformers both use it.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def cpu_multimodal_checkpoint(checkpoint: Path, work_dir: Path) -> tuple[Path, Path]:
    """The model directory vLLM's server loads for images on CPU, and the PYTHONPATH entry it needs."""
    return _with_processor_files(checkpoint, work_dir / checkpoint.name), SITE


def _with_processor_files(source: Path, target: Path) -> Path:
    """`source` linked file by file into `target`, plus the processor files transformers reads."""
    source = source.resolve()
    target.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        link = target / file.name
        # A link left by an earlier run may point at another (or a deleted) checkpoint of the same name.
        if link.is_symlink() and link.readlink() != file:
            link.unlink()
        if not (link.exists() or link.is_symlink()):
            link.symlink_to(file)
    config = json.loads((source / "config.json").read_text())
    patch_size = config["vision_config"]["patch_size"]
    preprocessor = {
        "image_processor_type": "PixtralImageProcessor",
        "processor_class": "PixtralProcessor",
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "patch_size": {"height": patch_size, "width": patch_size},
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"longest_edge": config["vision_config"]["image_size"]},
    }
    processor = {
        "processor_class": "PixtralProcessor",
        "image_token": "[IMG]",
        "image_break_token": "[IMG_BREAK]",
        "image_end_token": "[IMG_END]",
        "patch_size": patch_size,
        "spatial_merge_size": config.get("spatial_merge_size", 2),
    }
    (target / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    (target / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    return target
