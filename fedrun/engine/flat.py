"""The federated vector: a module's trainable parameters as ONE contiguous fp32 vector.

This is what a client sends, what the round buffer sums, what the server steps and what a
checkpoint stores: the whole U-Net in pre-training, only the LoRA matrices in fine-tuning.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch


class FlatParameters:
    """The trainable parameters of a module, re-seated as views of ONE contiguous fp32 vector.

    Reading the local model (``flat``) and resetting it to the global weights (``load_``) are then
    single memory copies, and the vector is exactly what the all-reduce buffer carries.
    """

    def __init__(self, module: torch.nn.Module):
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters")
        self.names: List[str] = [n for n, _ in named]
        self.shapes: List[torch.Size] = [p.shape for _, p in named]
        self.params: List[torch.nn.Parameter] = [p for _, p in named]
        numel = sum(p.numel() for p in self.params)
        self.flat = torch.empty(numel, dtype=torch.float32, device=self.params[0].device)
        offset = 0
        for param in self.params:
            n = param.numel()
            self.flat[offset: offset + n].copy_(param.data.reshape(-1))
            param.data = self.flat[offset: offset + n].view_as(param)
            offset += n

    @property
    def numel(self) -> int:
        return self.flat.numel()

    def load_(self, vector: torch.Tensor) -> None:
        """Copy ``vector`` into the parameters (a copy: the caller's vector is never aliased)."""
        self.flat.copy_(vector)

    def state_dict(self, vector: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Name -> tensor for ``vector`` (default: the current parameters); fresh, unshared storage."""
        vector = self.flat if vector is None else vector
        out, offset = {}, 0
        for name, shape in zip(self.names, self.shapes):
            n = shape.numel()
            out[name] = vector[offset: offset + n].detach().reshape(shape).clone().cpu()
            offset += n
        return out

    def vector_from(self, state: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The flat vector for a name -> tensor mapping (checks names and shapes)."""
        missing = [n for n in self.names if n not in state]
        if missing:
            raise KeyError(f"{len(missing)} parameters missing, e.g. '{missing[0]}'")
        parts = []
        for name, shape in zip(self.names, self.shapes):
            if state[name].shape != shape:
                raise ValueError(f"parameter '{name}' has shape {tuple(state[name].shape)}, "
                                 f"expected {tuple(shape)}")
            parts.append(state[name].reshape(-1).float())
        return torch.cat(parts).to(self.flat.device)
