"""Captioned images for text-to-image fine-tuning: a folder of images and their prompts.

DreamBooth-style subject data is the common case: a folder of a few photos of one subject and an
instance prompt shared by all of them ("a photo of sks dog"). A prompts file gives each image its
own caption instead (the layout of Hugging Face ``imagefolder``: ``metadata.jsonl`` lines
``{"file_name": "x.png", "text": "..."}``, or a CSV with ``file_name`` and ``text`` columns); the
instance prompt, when also given, covers the images the file does not list.

Every image of the folder is used (no held-out split); the set is split among the clients like
any data set. ``labels`` are the prompt indices, so label-based partitions work on captions.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from fedrun.data.base import ImageLoader, list_image_files
from fedrun.errors import DataError


class CaptionedImages:
    """N images (float32 in [-1, 1], in memory) and the index of each one's prompt."""

    def __init__(self, images: torch.Tensor, prompt_ids: np.ndarray, prompts: List[str],
                 files: List[str]):
        self.images = images
        self.prompt_ids = np.asarray(prompt_ids, dtype=np.int64)
        self.prompts = prompts
        self.files = files
        self.labels = self.prompt_ids
        self.num_channels = images.shape[1]
        self.image_size = images.shape[-1]

    def __len__(self) -> int:
        return len(self.images)

    def get_batch(self, indices) -> torch.Tensor:
        return self.images[torch.as_tensor(np.asarray(indices, dtype=np.int64))]

    def describe(self) -> str:
        return (f"{len(self)} captioned images {self.num_channels}x{self.image_size}x{self.image_size}, "
                f"{len(self.prompts)} distinct prompt(s)")


def build_captioned_images(root: Optional[str], image_size: int, grayscale: bool, center_crop: bool,
                           instance_prompt: Optional[str], prompts_file: Optional[str]) -> CaptionedImages:
    """Read every image under ``root`` (recursively) and give each its prompt."""
    if not root:
        raise DataError("data.root (the folder of subject images) is required for finetune")
    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise DataError(f"data.root '{root}' is not a directory")
    rel_paths = list_image_files(folder)  # raises on an empty folder
    captions = read_prompts_file(prompts_file, folder) if prompts_file else {}
    texts = []
    for rel in rel_paths:
        text = captions.get(rel, captions.get(Path(rel).name, instance_prompt))
        if text is None:
            raise DataError(f"image '{folder / rel}' has no prompt: it is not listed in "
                            f"finetune.prompts_file and finetune.instance_prompt is not set")
        texts.append(text)
    prompts = sorted(set(texts))
    prompt_ids = np.array([prompts.index(t) for t in texts], dtype=np.int64)
    loader = ImageLoader(image_size, grayscale, center_crop)
    arrays = [loader(str(folder / rel)) for rel in rel_paths]
    images = torch.from_numpy(np.stack(arrays)).to(torch.float32).mul_(2.0 / 255.0).sub_(1.0)
    return CaptionedImages(images, prompt_ids, prompts, rel_paths)


def read_prompts_file(path: str, root: Path) -> Dict[str, str]:
    """{file name: prompt} from a ``metadata.jsonl`` or a CSV with file_name and text columns.

    A relative ``path`` is looked up in the working directory, then in ``root``."""
    file = Path(path).expanduser()
    if not file.is_file() and (root / file).is_file():
        file = root / file
    if not file.is_file():
        raise DataError(f"finetune.prompts_file '{path}' does not exist")
    rows = []
    if file.suffix == ".jsonl":
        for number, line in enumerate(file.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"finetune.prompts_file '{file}' line {number}: {exc}") from None
    else:
        with open(file, newline="") as handle:
            rows = list(csv.DictReader(handle))
    captions = {}
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict) or "file_name" not in row or "text" not in row:
            raise DataError(f"finetune.prompts_file '{file}' row {number}: needs 'file_name' and "
                            "'text' fields")
        captions[str(row["file_name"])] = str(row["text"])
    if not captions:
        raise DataError(f"finetune.prompts_file '{file}' lists no images")
    return captions
