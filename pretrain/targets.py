"""Teacher targets for several teachers: one common token grid, and per-teacher feature normalisation.

Grid: every patch target is resampled onto the distillation grid (the ViT student's patch grid; for a
timm student, the first teacher's grid) with `models.timm_student.resample_grid`: bilinear on the token
grid, align_corners=False (cell centres), no antialiasing. So /14 and /16 teachers can be mixed; a
teacher already on the grid is passed through untouched (no arithmetic).

Normalisation, so that no teacher dominates the summed loss through the scale of its features: PHI-S
(Ranzinger et al., "PHI-S: Distribution Balancing for Label-Free Multi-Teacher Distillation", the method
RADIO publishes). With mean mu and covariance Sigma = U diag(lambda) U^T of a teacher's features,

    y = H U^T (x - mu) / phi,    phi^2 = mean(lambda),

where H is a normalised Hadamard matrix (H H^T = I). U^T decorrelates, H spreads the variance evenly so
every output dimension has variance exactly 1, and the map stays orthogonal up to the scalar 1/phi:
an MSE in y is the MSE in x divided by phi^2. Hadamard matrices are built for d = 2^k (Sylvester) and
d = 12 * 2^k (Paley's order-12 matrix, Kronecker), which covers 384, 768, 1024, 1536 and the test widths.
For any other width the documented fallback drops H (y = U^T (x - mu) / phi): the same isotropic scale,
the same MSE, only the per-dimension variances stay unequal.
The CLS token and the patch tokens of each teacher get their own statistics, estimated at the start
from a fixed number of training batches (the RNG streams are saved and restored around it, so the
training run itself is unchanged), all-reduced over ranks, stored in the checkpoint and restored on
resume (never re-estimated).
"""
import itertools
import logging
import math

import torch
import torch.nn as nn

from models.timm_student import resample_grid
from . import state as ckpt_state

log = logging.getLogger("pretrain")


# ---- Hadamard matrices ---------------------------------------------------------------------------------------
def _paley12() -> torch.Tensor:
    """Paley construction I for q = 11 (q = 3 mod 4): H = I + S, S = [[0, 1^T], [-1, Q]], Q the Jacobsthal matrix."""
    q = 11
    residues = {(i * i) % q for i in range(1, q)}
    chi = [0] + [1 if a in residues else -1 for a in range(1, q)]
    Q = torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)], dtype=torch.float64)
    S = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    S[0, 1:], S[1:, 0], S[1:, 1:] = 1.0, -1.0, Q
    return torch.eye(q + 1, dtype=torch.float64) + S


def hadamard(d: int) -> torch.Tensor | None:
    """A d x d matrix of +-1 with H H^T = d I for d = 2^k or 12 * 2^k, else None."""
    base, k = (1, d) if d & (d - 1) == 0 else (12, d // 12)
    if d < 1 or (base == 12 and (d % 12 or k & (k - 1))):
        return None
    h = torch.ones(1, 1, dtype=torch.float64) if base == 1 else _paley12()
    sylvester = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.kron(h, sylvester)
    return h


# ---- PHI-S -------------------------------------------------------------------------------------------------
class PhiS(nn.Module):
    """y = R (x - mean) with R = H U^T / phi (see the module docstring). Buffers go into the checkpoint."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("rotation", torch.eye(dim))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def fit(self, count: float, total: torch.Tensor, outer: torch.Tensor) -> None:
        """From float64 sums over `count` samples: sum x (D,) and sum x x^T (D, D)."""
        mean = total / count
        cov = outer / count - torch.outer(mean, mean)
        eigvals, eigvecs = torch.linalg.eigh((cov + cov.T) / 2)
        phi = math.sqrt(max(float(eigvals.clamp_min(0).mean()), 1e-12))
        h = hadamard(mean.numel())
        rotation = eigvecs.T if h is None else (h / math.sqrt(h.shape[0])) @ eigvecs.T
        self.mean.copy_(mean.float())
        self.rotation.copy_((rotation / phi).float())
        self.fitted.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., D), fp32
        return (x.float() - self.mean) @ self.rotation.T


class TargetNormaliser(nn.Module):
    """PHI-S for the CLS and the patch tokens of every teacher (`norms["<teacher>/cls"]`, ".../patch").

    `dims`: teacher key -> {"cls": summary width, "patch": patch width}, or one int for both parts."""

    def __init__(self, dims: dict[str, int | dict]):
        super().__init__()
        widths = {key: d if isinstance(d, dict) else {"cls": d, "patch": d} for key, d in dims.items()}
        self.norms = nn.ModuleDict({f"{key}/{part}".replace(".", "_"): PhiS(w[part])
                                    for key, w in widths.items() for part in ("cls", "patch")})

    def __call__(self, key: str, part: str, x: torch.Tensor) -> torch.Tensor:
        return self.norms[f"{key}/{part}".replace(".", "_")](x)

    @property
    def fitted(self) -> bool:
        return all(bool(n.fitted) for n in self.norms.values())


class MomentSums:
    """float64 sums of x and x x^T per (teacher, part), for PhiS.fit; all-reduced over ranks."""

    def __init__(self):
        self.sums: dict[str, list] = {}

    def add(self, name: str, x: torch.Tensor) -> None:  # x (n, D)
        x = x.detach().double().cpu()
        entry = self.sums.setdefault(name, [0.0, torch.zeros(x.shape[1], dtype=torch.float64),
                                            torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)])
        entry[0] += x.shape[0]
        entry[1] += x.sum(0)
        entry[2] += x.T @ x

    def all_reduce(self) -> None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        for entry in self.sums.values():
            for i, v in enumerate((torch.tensor(entry[0], dtype=torch.float64), entry[1], entry[2])):
                t = v.to(device)
                dist.all_reduce(t)
                entry[i] = float(t) if i == 0 else t.cpu()


def fit_normaliser(normaliser: TargetNormaliser, batches, teacher_outputs) -> int:
    """Estimate every PhiS from `batches` (iterable of image tensors); `teacher_outputs(images)` -> raw targets
    {key: dict(cls (B, D), patch (B, N, D))}. Returns the number of images used (summed over ranks)."""
    sums = MomentSums()
    for images in batches:
        for key, out in teacher_outputs(images).items():
            sums.add(f"{key}/cls", out["cls"].float())
            sums.add(f"{key}/patch", out["patch"].float().flatten(0, 1))
    sums.all_reduce()
    for name, (count, total, outer) in sums.sums.items():
        normaliser.norms[name.replace(".", "_")].fit(count, total, outer)
    first = next(iter(sums.sums.values()))
    return int(first[0])


def prepare_targets(raw: dict, grids: dict, grid: tuple[int, int], normaliser: TargetNormaliser | None) -> dict:
    """raw teacher outputs -> targets on the common grid, normalised if a normaliser is given."""
    out = {}
    for key, t in raw.items():
        cls, patch = t["cls"], resample_grid(t["patch"], grids[key], grid)
        if normaliser is not None:
            cls, patch = normaliser(key, "cls", cls), normaliser(key, "patch", patch)
        out[key] = {"cls": cls, "patch": patch}
    return out


def fit_teacher_norm(trainer, n_batches: int) -> None:
    """Estimate PHI-S from the first --teacher-norm-batches batches, leaving every RNG stream as it was."""
    norm = trainer.normaliser
    if norm is None or norm.fitted:
        return
    rng = ckpt_state.capture_rng()
    batches = (micro for b, _ in itertools.islice(
        (x for x in trainer.batches() if x[0] is not None), n_batches)
        for micro in trainer.to_device(b[0])[0].split(trainer.cfg["batch_size"]))  # the teacher sees micro-batches
    n = fit_normaliser(norm, batches, lambda x: prepare_targets(trainer.raw_teacher_outputs(x), trainer.grids,
                                                                trainer.distiller.grid, None))
    ckpt_state.restore_rng(rng)
    norm.to(trainer.dist_info.device)
    log.info("PHI-S teacher normalisation estimated on %d images (%d batches per rank)", n, n_batches)
