"""AdamW whose chosen parameter groups are updated a slice at a time (`moments: fp32` or
`moments: bf16` in the group), keeping their moments in fp32 or in bfloat16: at 10^6 categories
the [C, 768] category table's two fp32 Adam moments are 6.1 GB, in bfloat16 3.1 GB, and torch's
AdamW makes a full-size temporary (its `denom`, 3.1 GB more) where the slices make 16 MB ones.
An fp32 group's update is torch's own, operation for operation (`tests/test_optim.py` checks
it bit for bit against torch's AdamW).

bfloat16 keeps fp32's exponent but 8 bits of mantissa, so a moment stored to nearest would lose
the small updates an exponential average makes (adding 0.1% of g^2 to v with beta2 = 0.999 is
below half a bfloat16 step): the moments are updated in fp32 a slice at a time and stored with
stochastic rounding, which is unbiased (the stored value's expectation is the fp32 one). Not
exact: the difference from fp32 moments is measured in `tests/test_optim.py` and
`benchmarks/bench_table_step.py`. Every other group is torch's AdamW, unchanged.
"""

from __future__ import annotations

import torch

SLICE = 1 << 22  # elements updated in fp32 at a time (16 MB of each moment)


def round_to_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 -> bfloat16 with stochastic rounding: a value between two bfloat16 neighbours goes
    to the upper one with probability equal to its distance from the lower (random low 16 bits
    added to the fp32 bit pattern, then truncated)."""
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(
        0, 1 << 16, bits.shape, dtype=torch.int32, device=x.device, generator=generator
    )
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


SLICED = ("fp32", "bf16")


class AdamW(torch.optim.AdamW):
    """torch's AdamW (decoupled weight decay); groups with `moments: "fp32"` are updated a
    slice at a time, groups with `moments: "bf16"` too, keeping bfloat16 moments with stochastic
    rounding (no amsgrad, no maximize: what training uses)."""

    def __init__(self, params, *args, seed: int = 0, **kwargs):
        super().__init__(params, *args, **kwargs)
        self._generator = torch.Generator().manual_seed(seed)

    def state_dict(self) -> dict:
        # the rounding's random state too, so a resumed run rounds as an uninterrupted one
        return {**super().state_dict(), "rounding_rng": self._generator.get_state()}

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        rng = state_dict.pop("rounding_rng", None)
        super().load_state_dict(state_dict)
        if rng is not None:
            self._generator.set_state(rng)

    @torch.no_grad()
    def step(self, closure=None):
        groups = self.param_groups
        sliced = [g for g in groups if g.get("moments") in SLICED]
        self.param_groups = [g for g in groups if g.get("moments") not in SLICED]
        try:
            loss = super().step(closure)
        finally:
            self.param_groups = groups
        for group in sliced:
            self._sliced_step(group)
        return loss

    def _sliced_step(self, group: dict) -> None:
        """torch's single-tensor AdamW update, SLICE elements at a time; bf16 moments are
        updated in fp32 and stored with stochastic rounding."""
        beta1, beta2 = group["betas"]
        lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
        low = group["moments"] == "bf16"
        for param in group["params"]:
            if param.grad is None:
                continue
            state = self.state[param]
            if not state:
                state["step"] = torch.tensor(0.0)
                dtype = torch.bfloat16 if low else param.dtype
                state["exp_avg"] = torch.zeros_like(param, dtype=dtype)
                state["exp_avg_sq"] = torch.zeros_like(param, dtype=dtype)
            state["step"] += 1
            step = state["step"].item()
            step_size = lr / (1 - beta1**step)
            correction2_sqrt = (1 - beta2**step) ** 0.5
            p, g = param.view(-1), param.grad.view(-1)
            m_all, v_all = state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1)
            p.mul_(1 - lr * decay)
            for i in range(0, p.numel(), SLICE):
                grad = g[i : i + SLICE]
                m, v = m_all[i : i + SLICE], v_all[i : i + SLICE]
                if low:
                    grad, m, v = grad.float(), m.float(), v.float()
                m.lerp_(grad, 1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (v.sqrt() / correction2_sqrt).add_(eps)
                p[i : i + SLICE].addcdiv_(m, denom, value=-step_size)
                if low:
                    m_all[i : i + SLICE] = round_to_bf16(m, self._generator)
                    v_all[i : i + SLICE] = round_to_bf16(v, self._generator)
