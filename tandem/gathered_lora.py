"""Gathered LoRA: every row of a batch applies its own adapter in one batched matmul per layer (Punica's BGMV idea,
in plain torch), instead of PEFT's mixed-batch forward, which loops over the adapters present in every LoRA layer.

For each LoRA linear layer the loaded adapters' matrices are stacked once, A as (slots, r, in) and B, already
scaled, as (slots, out, r), zero-padded to the largest rank; slot 0 is all zeros, for rows without an adapter. A
forward then runs the base with PEFT's adapters switched off, and a hook on each LoRA layer adds
`x @ A[slot]^T @ B[slot]^T` for all rows at once: two gathers and two `bmm`s per layer, whatever the number of
adapters. Plain LoRA on linear layers only; a model with other LoRA variants (DoRA, embeddings) keeps PEFT's path.
"""

from __future__ import annotations

from contextlib import contextmanager


class GatheredLoRA:
    """Stacks of a PEFT model's loaded adapters; `restack()` after every load or delete (under the lock that keeps
    forwards out), `rows(adapters)` around a forward whose batch rows use those adapters (None: the base)."""

    def __init__(self, model):
        self.model = model
        self.slots: dict[str, int] = {}
        self.layers: list = []
        self.restack()

    @staticmethod
    def supports(model) -> bool:
        from peft.tuners.lora import Linear as LoraLinear
        from peft.tuners.lora.layer import LoraLayer

        layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        return bool(layers) and all(isinstance(m, LoraLinear) and not m.lora_variant for m in layers)

    def restack(self) -> None:
        import torch
        from peft.tuners.lora.layer import LoraLayer

        names = list(self.model.peft_config)
        self.slots = {name: i + 1 for i, name in enumerate(names)}
        self.layers = []
        for module in self.model.modules():
            if not isinstance(module, LoraLayer):
                continue
            present = [n for n in names if n in module.lora_A]
            rank = max((module.lora_A[n].weight.shape[0] for n in present), default=0)
            weight = module.get_base_layer().weight
            out_features, in_features = module.out_features, module.in_features
            dtype = module.lora_A[present[0]].weight.dtype if present else torch.float32
            a = torch.zeros(len(names) + 1, rank, in_features, dtype=dtype, device=weight.device)
            b = torch.zeros(len(names) + 1, out_features, rank, dtype=dtype, device=weight.device)
            for n in present:
                r = module.lora_A[n].weight.shape[0]
                a[self.slots[n], :r] = module.lora_A[n].weight
                b[self.slots[n], :, :r] = module.lora_B[n].weight * module.scaling[n]
            self.layers.append((module, a, b))

    @contextmanager
    def rows(self, adapters: list[str | None]):
        import torch

        if not any(adapters):  # the base alone: nothing to add
            with self.model.disable_adapter():
                yield
            return
        device = self.layers[0][1].device
        slots = torch.tensor([self.slots[a] if a else 0 for a in adapters], device=device)
        hooks = [module.register_forward_hook(_adder(a[slots], b[slots].transpose(1, 2)))
                 for module, a, b in self.layers]
        try:
            with self.model.disable_adapter():
                yield
        finally:
            for hook in hooks:
                hook.remove()


def _adder(a, b_t):
    """A hook adding each row's LoRA update: a (rows, r, in), b_t (rows, r, out), both for this batch's rows."""
    import torch

    a_t = a.transpose(1, 2)

    def hook(module, inputs, output):
        x = inputs[0]
        return output + torch.bmm(torch.bmm(x.to(a_t.dtype), a_t), b_t).to(output.dtype)

    return hook
