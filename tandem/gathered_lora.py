"""Gathered LoRA: every row of a batch applies its own adapter in one batched matmul per layer (Punica's BGMV idea,
in plain torch), instead of PEFT's mixed-batch forward, which loops over the adapters present in every LoRA layer.

For each LoRA linear layer the loaded adapters' matrices are stacked once, transposed for `bmm`: A as
(slots, in, r) and B, already scaled, as (slots, r, out), zero-padded to the largest rank; slot 0 is all zeros,
for rows without an adapter. A forward then runs the base with PEFT's adapters switched off, and a hook on each
LoRA layer adds `x @ A[slot]^T @ B[slot]^T` for all rows at once: two gathers and two `bmm`s per layer, whatever
the number of adapters. Plain LoRA on linear layers only; a model with other LoRA variants (DoRA, embeddings)
keeps PEFT's path.
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
            a = torch.zeros(len(names) + 1, in_features, rank, dtype=dtype, device=weight.device)
            b = torch.zeros(len(names) + 1, rank, out_features, dtype=dtype, device=weight.device)
            for n in present:
                r = module.lora_A[n].weight.shape[0]
                a[self.slots[n], :, :r] = module.lora_A[n].weight.T
                b[self.slots[n], :r] = (module.lora_B[n].weight * module.scaling[n]).T
            self.layers.append((module, a, b))

    @contextmanager
    def rows(self, adapters: list[str | None]):
        """Each row's adapter added by the hooks, PEFT's own switched off."""
        import torch

        hooks = []
        if any(adapters):  # the base alone needs nothing added
            slots = torch.tensor([self.slots[a] if a else 0 for a in adapters], device=self.layers[0][1].device)
            hooks = [module.register_forward_hook(_adder(a[slots], b[slots])) for module, a, b in self.layers]
        try:
            with adapters_off([module for module, _, _ in self.layers]):
                yield
        finally:
            for hook in hooks:
                hook.remove()


def lora_layers(model) -> list:
    from peft.tuners.lora.layer import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


@contextmanager
def adapters_off(layers: list):
    """PEFT's LoRA layers switched off through the flag their forward reads: PEFT's `disable_adapter()` walks the
    whole model for a status report first (about 120 ms a call here, more than a decode step) and resets the
    adapters' requires_grad on the way back."""
    for module in layers:
        module._disable_adapters = True
    try:
        yield
    finally:
        for module in layers:
            module._disable_adapters = False


def _adder(a, b):
    """A hook adding each row's LoRA update: a (rows, in, r) and b (rows, r, out), gathered for this batch's rows."""
    import torch

    def hook(module, inputs, output):
        return output + torch.bmm(torch.bmm(inputs[0].to(a.dtype), a), b).to(output.dtype)

    return hook
