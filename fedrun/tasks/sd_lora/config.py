"""The Stable Diffusion LoRA task's config section: ``finetune``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from fedrun.errors import ConfigError


#: finetune.lora_aggregation's values; those that take client ranks
LORA_AGGREGATIONS = ("fedavg", "ffa", "fedsa", "hetlora", "flexlora", "flora")
HETEROGENEOUS = ("hetlora", "flexlora", "flora")


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config key '{key}': {message}")


@dataclass
class FinetuneConfig:
    """``fedrun finetune``: a Stable Diffusion-style pipeline folder or hub id, LoRA on its U-Net.

    The images are ``data.root`` (``data.name: image_folder``, every image used); their prompts are
    ``instance_prompt`` and/or ``prompts_file``. The noise schedule is the pipeline's own
    ``scheduler/`` (the ``diffusion`` section is not used).
    """

    pretrained: Optional[str] = None
    """Hub id (e.g. runwayml/stable-diffusion-v1-5) or local folder with unet/, vae/,
    text_encoder/, tokenizer/, scheduler/."""
    mode: str = "lora"
    """'lora' (frozen base, train LoRA on the U-Net) or 'full' (train the whole U-Net,
    text-conditioned: the pre-training of the CPU demo); final/ is then a whole pipeline."""
    lora_rank: int = 8
    lora_alpha: Optional[float] = None
    """LoRA scale is alpha / rank; null = rank (scale 1)."""
    lora_target_modules: List[str] = field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    lora_aggregation: str = "fedavg"
    """'fedavg' (average A and B separately), 'ffa' (A frozen at its shared random init, only
    B trained and averaged: exact, half the bytes), 'fedsa' (FedSA-LoRA: A averaged, each
    client's B stays with it), 'hetlora' (client ranks; zero-padded averaging), 'flexlora'
    (client ranks; the server redistributes sum p_k B_k A_k by truncated SVD) or 'flora'
    (client ranks; fresh modules each round, stacked: sum p_k B_k A_k merged into the base).
    docs/fine-tuning.md compares them."""
    client_ranks: List[int] = field(default_factory=list)
    """hetlora / flexlora / flora: the LoRA rank of each client (num_clients entries); the
    global LoRA has rank max(client_ranks), which lora_rank must equal. Empty = every client
    has lora_rank (or draws from client_rank_choices)."""
    client_rank_choices: List[int] = field(default_factory=list)
    """hetlora / flexlora / flora: ranks each client draws one of, uniformly and
    deterministically from (seed, client); lora_rank must equal the largest. Exclusive with
    client_ranks."""
    aggregation_error_every: int = 1
    """Log ||mean(B A) - mean(B) mean(A)|| / ||mean(B A)|| every this many rounds (0 = never).
    It needs the clients' products B_c A_c: an extra, explicit all-reduce of U-Net-sized
    matrices on those rounds only (a diagnostic of the simulator, not part of the protocol)."""
    instance_prompt: Optional[str] = None
    """Prompt of every image (DreamBooth: 'a photo of sks dog')."""
    prompts_file: Optional[str] = None
    """metadata.jsonl ({"file_name", "text"} per line) or CSV (file_name,text): one prompt per
    image; relative paths are tried in the working directory, then in data.root."""
    class_prompt: Optional[str] = None
    """DreamBooth prior preservation: the prompt of the class images ('a photo of a dog')."""
    class_data_dir: Optional[str] = None
    """Folder of class images (e.g. sampled from the base model for class_prompt); every client
    draws as many of them per step as it has subject images in its batch."""
    class_prompts_file: Optional[str] = None
    """Per-image prompts of the class images (metadata.jsonl or CSV, like prompts_file): prior
    preservation over several prompts; class_prompt then covers the images it does not list."""
    prior_loss_weight: float = 1.0
    """Weight of the class images' loss (DreamBooth's prior-preservation loss)."""
    prompt_dropout: float = 0.0
    """Probability of training on the empty prompt instead (for classifier-free guidance)."""
    validation_prompts: List[str] = field(default_factory=list)
    """Prompts of the sample grids (base model and during/after training); empty = the
    instance prompt."""
    guidance_scale: float = 7.5
    """Classifier-free guidance of the sample grids."""
    base_dtype: str = "float32"
    """dtype of the frozen base (unet, vae, text encoder): 'float32', 'float16', 'bfloat16'.
    Trainable parameters are always float32."""

    def __post_init__(self) -> None:
        _require(self.mode in ("lora", "full"), "finetune.mode",
                 f"must be 'lora' or 'full', got '{self.mode}'")
        _require(self.lora_rank >= 1, "finetune.lora_rank", f"must be >= 1, got {self.lora_rank}")
        _require(self.lora_alpha is None or self.lora_alpha > 0, "finetune.lora_alpha",
                 f"must be > 0 or null, got {self.lora_alpha}")
        _require(bool(self.lora_target_modules), "finetune.lora_target_modules", "must not be empty")
        _require(self.lora_aggregation in LORA_AGGREGATIONS, "finetune.lora_aggregation",
                 f"must be one of {', '.join(LORA_AGGREGATIONS)}, got '{self.lora_aggregation}'")
        for key in ("client_ranks", "client_rank_choices"):
            ranks = getattr(self, key)
            _require(all(isinstance(r, int) and r >= 1 for r in ranks), f"finetune.{key}",
                     f"must be integers >= 1, got {ranks}")
            _require(not ranks or self.lora_aggregation in HETEROGENEOUS, f"finetune.{key}",
                     f"client ranks need finetune.lora_aggregation in {', '.join(HETEROGENEOUS)}, "
                     f"got '{self.lora_aggregation}'")
            _require(not ranks or max(ranks) == self.lora_rank, "finetune.lora_rank",
                     f"the global LoRA has rank max(finetune.{key}) = {max(ranks, default=0)}; "
                     f"set finetune.lora_rank={max(ranks, default=0)} (got {self.lora_rank})")
        _require(not (self.client_ranks and self.client_rank_choices), "finetune.client_ranks",
                 "set finetune.client_ranks or finetune.client_rank_choices, not both")
        _require(self.aggregation_error_every >= 0, "finetune.aggregation_error_every",
                 f"must be >= 0, got {self.aggregation_error_every}")
        _require(bool(self.class_prompt or self.class_prompts_file) == bool(self.class_data_dir),
                 "finetune.class_data_dir", "goes with finetune.class_prompt or "
                 "finetune.class_prompts_file (both or neither)")
        _require(self.prior_loss_weight >= 0, "finetune.prior_loss_weight",
                 f"must be >= 0, got {self.prior_loss_weight}")
        _require(0.0 <= self.prompt_dropout < 1.0, "finetune.prompt_dropout",
                 f"must be in [0, 1), got {self.prompt_dropout}")
        _require(self.guidance_scale >= 0, "finetune.guidance_scale",
                 f"must be >= 0, got {self.guidance_scale}")
        _require(self.base_dtype in ("float32", "float16", "bfloat16"), "finetune.base_dtype",
                 f"must be 'float32', 'float16' or 'bfloat16', got '{self.base_dtype}'")
