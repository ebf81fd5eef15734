"""Controls that show whether the benchmark *could* detect a gain (positive) and does not
invent one (negative). Without them "no strategy beats random init" cannot be told apart
from "this benchmark is insensitive" (DESIGN.md, "Study power").

* Positive control (``positive_control``): the encoder of a *supervised* model trained on the
  same downstream task with the labels of the unlabelled pool (patients disjoint from the
  labelled cohort, test patients included). Supervised pretraining on a disjoint labelled set
  is a strong reference (SuPreM, Li et al. ICLR 2024), so a benchmark that cannot see it beat
  random init at the smallest label fraction cannot see a smaller SSL gain either.
* Negative control (``negative_control``): the positive control's weights shuffled within each
  tensor: every layer keeps its exact weight statistics (scale, mean, BatchNorm running stats),
  but no learned structure. A benchmark that finds a "gain" here rewards weight statistics, not
  features.

Both are listed apart from the strategies (``CONTROLS``) and never counted as "best".
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where used: the constants serve torch-free callers
    from torch import nn

POSITIVE, NEGATIVE = "positive_control", "negative_control"
CONTROLS = (POSITIVE, NEGATIVE)


def shuffle_within_layers(module: "nn.Module", seed: int) -> "nn.Module":
    """Permute the elements of every floating-point parameter and buffer of ``module`` in place.

    Same multiset of values per tensor (so the same mean, variance and norm per layer), in a
    seeded random order; integer buffers (BatchNorm's step counter) are left alone.
    """
    import torch

    g = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for _, t in sorted([*module.named_parameters(), *module.named_buffers()], key=lambda kv: kv[0]):
            if not t.is_floating_point() or t.numel() < 2:
                continue
            flat = t.detach().reshape(-1)                                     # (N,)
            perm = torch.randperm(flat.numel(), generator=g).to(flat.device)
            t.copy_(flat[perm].reshape(t.shape))
    return module


def write_negative_control(source: str | Path, out_path: str | Path, store_root: str | Path | None = None,
                           seed: int = 0) -> Path:
    """Load the encoder of checkpoint ``source``, shuffle it, save it as a ctssl checkpoint at ``out_path``."""
    from ctssl_core import checkpoint as ck

    encoder, cfg = ck.load_encoder(source, store_root)
    shuffle_within_layers(encoder, seed)
    config = {**(cfg or {}), "task": NEGATIVE, "kind": "control", "control_of": str(Path(source).name),
              "shuffle_seed": int(seed)}
    return ck.save_checkpoint(out_path, encoder, None, None, None, 0, None, config)
