"""The workloads: what requests each benchmark sends, as arguments of vLLM's load generator.

Every workload is a chat-completions workload driven by `vllm bench serve`
(`vllm.benchmarks.serve`), identical for both stacks: same prompts, same
images, same output lengths (EOS ignored), greedy sampling.
"""

from __future__ import annotations

import base64
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from PIL import Image

WorkloadName = Literal["text", "image-repeat", "image-unique", "image-long"]
WORKLOADS: tuple[WorkloadName, ...] = ("text", "image-repeat", "image-unique", "image-long")

# A few hundred words to draw prompt text from: prompts differ per request,
# so only what a workload means to share (an image) is shared.
_WORDS = [
    "picture",
    "photo",
    "colour",
    "light",
    "shadow",
    "left",
    "right",
    "top",
    "bottom",
    "corner",
    "centre",
    "object",
    "person",
    "tree",
    "house",
    "street",
    "sky",
    "water",
    "road",
    "car",
    "window",
    "door",
    "table",
    "chair",
    "cup",
    "book",
    "dog",
    "cat",
    "bird",
    "flower",
    "mountain",
    "river",
    "cloud",
    "sun",
    "moon",
    "building",
    "sign",
    "text",
    "number",
    "red",
    "green",
    "blue",
    "yellow",
    "black",
    "white",
    "small",
    "large",
    "near",
    "far",
    "bright",
    "dark",
    "old",
    "new",
    "open",
    "closed",
    "round",
    "square",
    "tall",
    "short",
    "wide",
    "narrow",
]


@dataclass(frozen=True)
class WorkloadShape:
    """Sizes of a workload; the CPU demo uses small ones, a GPU run the defaults of `gpu_shapes`."""

    text_input_tokens: int
    output_tokens: int
    image_width: int
    image_height: int
    long_prompt_words: int


CPU_DEMO_SHAPE = WorkloadShape(
    text_input_tokens=256, output_tokens=64, image_width=448, image_height=336, long_prompt_words=2500
)
GPU_SHAPE = WorkloadShape(
    text_input_tokens=1024, output_tokens=256, image_width=1024, image_height=768, long_prompt_words=6000
)


@dataclass(frozen=True)
class Workload:
    name: WorkloadName
    uses_images: bool
    description: str
    # Arguments of `vllm bench serve` naming the dataset.
    dataset_args: tuple[str, ...]


def build_workload(name: WorkloadName, shape: WorkloadShape, data_dir: Path, num_prompts: int) -> Workload:
    """The workload `name`, with its dataset file (if any) written under `data_dir`."""
    if name == "text":
        return Workload(
            name,
            uses_images=False,
            description=f"random text, {shape.text_input_tokens} tokens in, {shape.output_tokens} out",
            dataset_args=(
                "--dataset-name=random",
                f"--random-input-len={shape.text_input_tokens}",
                f"--random-output-len={shape.output_tokens}",
            ),
        )
    rng = random.Random(f"{name}-{num_prompts}")
    size = (shape.image_width, shape.image_height)
    if name == "image-repeat":
        description = f"one {size[0]}x{size[1]} image in every request, a different question each time"
        picture = _image_url(size, seed=0)
        rows = [_chat_row(picture, _sentence(rng, 12)) for _ in range(num_prompts)]
    elif name == "image-unique":
        description = f"a different {size[0]}x{size[1]} image in every request"
        rows = [_chat_row(_image_url(size, seed=i + 1), _sentence(rng, 12)) for i in range(num_prompts)]
    else:
        words = shape.long_prompt_words
        description = f"about {words} words of text and one {size[0]}x{size[1]} image, different per request"
        rows = [
            _chat_row(_image_url(size, seed=10_000 + i), _sentence(rng, words)) for i in range(num_prompts)
        ]
    path = data_dir / f"{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return Workload(
        name,
        uses_images=True,
        description=description,
        dataset_args=(
            "--dataset-name=custom_image",
            f"--dataset-path={path}",
            f"--custom-output-len={shape.output_tokens}",
            "--disable-shuffle",
        ),
    )


def _chat_row(image_url: str, question: str) -> dict:
    # The image first, as in a chat about a picture: the part requests share comes first.
    return {
        "content": [
            {"type": "image_url", "image_url": {"url": image_url}},
            {"type": "text", "text": question},
        ]
    }


def _sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words)) + "?"


def _image_url(size: tuple[int, int], seed: int) -> str:
    """A PNG data URL of a smooth random picture (gradients and blocks compress like a photo would not)."""
    rng = random.Random(seed)
    image = Image.radial_gradient("L").resize(size).convert("RGB")
    for _ in range(12):
        left, top = rng.randrange(size[0]), rng.randrange(size[1])
        box = (
            left,
            top,
            min(size[0], left + rng.randrange(16, 160)),
            min(size[1], top + rng.randrange(16, 160)),
        )
        image.paste(tuple(rng.randrange(256) for _ in range(3)), box)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
