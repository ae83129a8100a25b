"""Exponential moving average of the trainable parameters, averaged by torch's EMA function (torch.optim.swa_utils).

Only the trainable tensors are shadowed (in float32), so a LoRA run keeps an EMA of its adapters, not of the UNet.
"""

import torch
from torch.optim.swa_utils import get_ema_multi_avg_fn


class EMA:
    """Shadow copies e of the parameters p, updated e <- d e + (1 - d) p by get_ema_multi_avg_fn(d)."""

    def __init__(self, params: dict[str, torch.Tensor], decay: float):
        self.decay = decay
        self.shadow = {k: p.detach().float().clone() for k, p in params.items()}
        self._average = get_ema_multi_avg_fn(decay)

    @torch.no_grad()
    def update(self, params: dict[str, torch.Tensor]) -> None:
        """One averaging step towards the current parameters."""
        self._average(list(self.shadow.values()), [params[k].detach().float() for k in self.shadow], None)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        if state["shadow"].keys() != self.shadow.keys():
            raise ValueError("the checkpoint's EMA holds other parameters than this model")
        self.shadow = {k: v.clone() for k, v in state["shadow"].items()}
