"""How far summation order alone can move a bias after a few AdamW steps: the numbers behind the
weight tolerances of the equivalence tests (tests/helpers/equivalence.py, assert_same's floor).

  python tests/parallel/reorder_estimate.py --section.field=value ...   # one process, the run's overrides

Trains the run on one process and records, per step and per bias element, its gradient g (a sum
over the step's n tokens of the layer output's gradient) and S, the sum of the terms' magnitudes.
Another layout sums the same terms in another order, which moves g by about sqrt(n) u S (u = 2^-24,
fp32's unit roundoff; n u S at worst). Each element's AdamW trajectory (the run's betas, eps, lr
schedule) is then replayed with every step's g moved by +-sqrt(n) u S, the signs that move the
final weight most: the largest move per tensor is the estimate. It is largest where g nearly
cancels (|g| / S ~ 1e-5): the same absolute noise is then a large part of g, and AdamW, which
normalizes steps to ~lr, passes it on. Prints one line per tensor, the largest first.
"""

import itertools
import math
import sys

import torch

from gptoss_titan.config import parse_args
from gptoss_titan.model.moe import GroupedExperts
from gptoss_titan.runtime.distributed import apply_process_settings
from gptoss_titan.train import Trainer
from gptoss_titan.train.optim import lr_factor

U = 2.0**-24


def main() -> None:
    cfg = parse_args(sys.argv[1:])
    apply_process_settings(cfg)
    tr = Trainer(cfg)
    terms: dict[str, list] = {}  # bias name -> per backward: (g [P], S [P], number of terms)

    def record(name: str, split=None):
        def hook(module, inputs, out):
            def on_grad(grad):
                rows = grad.reshape(-1, grad.shape[-1]).double()
                if split is None:
                    terms.setdefault(name, []).append((rows.sum(0), rows.abs().sum(0), rows.shape[0]))
                else:  # expert biases: each expert sums its own rows ([E, H])
                    parts = rows.split(split(inputs).tolist())
                    g = torch.stack([p.sum(0) for p in parts]).flatten()
                    s = torch.stack([p.abs().sum(0) for p in parts]).flatten()
                    terms.setdefault(name, []).append((g, s, max(len(p) for p in parts)))

            if out.requires_grad:
                out.register_hook(on_grad)

        return hook

    for name, m in tr.model.named_modules():
        if isinstance(m, torch.nn.Linear) and m.bias is not None:
            m.register_forward_hook(record(f"{name}.bias"))
        if isinstance(m, GroupedExperts):
            m.register_forward_hook(record(f"{name}.b_down", split=lambda inputs: inputs[1]))
    tr.train()

    o, steps = cfg.optimizer, cfg.training.steps
    lrs = [o.lr * lr_factor(k, steps, cfg.lr_scheduler) for k in range(1, steps + 1)]

    def adamw(g: torch.Tensor) -> torch.Tensor:  # [steps, P] gradients -> [P] final weights from 0
        m = v = w = torch.zeros_like(g[0])
        for k in range(steps):
            m = o.beta1 * m + (1 - o.beta1) * g[k]
            v = o.beta2 * v + (1 - o.beta2) * g[k] ** 2
            mh, vh = m / (1 - o.beta1 ** (k + 1)), v / (1 - o.beta2 ** (k + 1))
            w = w - lrs[k] * mh / (vh.sqrt() + o.eps)
        return w

    params = dict(tr.model.named_parameters())
    rows = []
    for name, per_backward in terms.items():
        micro = len(per_backward) // steps  # backward passes per step (gradient accumulation)
        g = torch.stack([sum(t[0] for t in per_backward[k * micro : (k + 1) * micro]) for k in range(steps)])
        s = torch.stack([sum(t[1] for t in per_backward[k * micro : (k + 1) * micro]) for k in range(steps)])
        n = sum(t[2] for t in per_backward[:micro])
        base = adamw(g)
        moved = {}
        for label, c in (("estimate", math.sqrt(n) * U), ("worst", n * U)):
            dw = torch.zeros_like(base)
            for signs in itertools.product((-1.0, 1.0), repeat=steps):
                dw = torch.maximum(dw, (adamw(g + torch.tensor(signs)[:, None] * c * s) - base).abs())
            moved[label] = dw
        i = int(moved["estimate"].argmax())
        rows.append(
            (
                moved["estimate"].norm().item(),
                f"{name}: norm {params[name].norm():.2e}, n {n}, S max {s.max():.2e}; element {i}: "
                f"min |g|/S {(g[:, i].abs() / s[:, i]).min():.1e}; estimate {moved['estimate'].norm():.2e} "
                f"(relative to the norm {moved['estimate'].norm() / params[name].norm():.1e}), "
                f"worst case {moved['worst'].norm():.2e}",
            )
        )
    for _, line in sorted(rows, reverse=True):
        print(line)


if __name__ == "__main__":
    main()
