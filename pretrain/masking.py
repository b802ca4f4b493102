"""Random patch masking of the spec (§1.5): a fixed share of each batch gets uniformly random masks.

Not DINOv2's block masking: a masked sample has exactly k = int(N * ratio) masked cells at uniformly
random positions. With a ratio range (lo, hi) the masked samples get stratified ratios (iBOT/DINOv2):
sample i draws its ratio uniformly from the i-th of n_masked equal slices of [lo, hi]. Which samples of
the batch are masked is random too (the original shuffled its mask list with Python's `random`).

Masks are drawn in the training process from a dedicated torch.Generator whose state goes into the
checkpoint, so a resumed run draws the same masks as an uninterrupted one.
"""
import torch

from common.errors import ConfigError


def validate_mask_config(mask_probability: float, mask_ratio) -> tuple[float, ...]:
    """Return the ratio as a tuple of one value or a (lo, hi) range; raise a clear error otherwise."""
    ratio = tuple(float(r) for r in (mask_ratio if isinstance(mask_ratio, (list, tuple)) else [mask_ratio]))
    if not 0.0 <= mask_probability <= 1.0:
        raise ConfigError(f"--mask-probability must be in [0, 1] (share of each batch that is masked), "
                         f"got {mask_probability}")
    if len(ratio) not in (1, 2):
        raise ConfigError(f"--mask-ratio takes one value or a range LO HI, got {len(ratio)} values {ratio}")
    if any(not 0.0 <= r <= 1.0 for r in ratio):
        raise ConfigError(f"--mask-ratio must lie in [0, 1] (share of patches masked), got {list(ratio)}")
    if len(ratio) == 2 and ratio[0] > ratio[1]:
        raise ConfigError(f"--mask-ratio range must be LO <= HI, got {list(ratio)}")
    return ratio


class MaskGenerator:
    """Draws (masks (B, N) bool, masked_rows (M,) long) for a batch; rows are the masked samples, sorted.

    Args:
        num_patches: N, the student's patch-grid size.
        mask_probability: share of the batch that is masked, n_masked = int(B * p).
        mask_ratio: one ratio, or (lo, hi) for stratified ratios.
        seed: seed of the private generator (use seed + rank so ranks differ).
    """

    def __init__(self, num_patches: int, mask_probability: float, mask_ratio, seed: int = 0):
        self.num_patches = num_patches
        self.mask_probability = mask_probability
        self.ratio = validate_mask_config(mask_probability, mask_ratio)
        self.generator = torch.Generator().manual_seed(seed)

    def _num_masked_tokens(self, n_masked: int) -> list[int]:
        N = self.num_patches
        if len(self.ratio) == 1:
            return [int(N * self.ratio[0])] * n_masked
        edges = torch.linspace(self.ratio[0], self.ratio[1], n_masked + 1, dtype=torch.float64)
        u = torch.rand(n_masked, generator=self.generator, dtype=torch.float64)
        return [int(N * (edges[i] + u[i] * (edges[i + 1] - edges[i]))) for i in range(n_masked)]

    def __call__(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        N = self.num_patches
        masks = torch.zeros(batch_size, N, dtype=torch.bool)  # (B, N)
        n_masked = int(batch_size * self.mask_probability)
        if n_masked == 0:
            return masks, torch.zeros(0, dtype=torch.long)
        # which samples are masked: the first n_masked of a random permutation; mask i goes to perm[i]
        perm = torch.randperm(batch_size, generator=self.generator)[:n_masked]
        for row, k in zip(perm.tolist(), self._num_masked_tokens(n_masked)):
            cells = torch.randperm(N, generator=self.generator)[:k]
            masks[row, cells] = True
        return masks, perm.sort().values

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
