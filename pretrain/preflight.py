"""Models checked by one forward pass before any data or weights load (issue #22).

A timm model can pass every flag check and still fail at step 1: `features_only=True` (a list of maps, no
pooled feature), `in_chans=1` (the data is RGB), an input size that leaves no token grid, feature maps in
channels-last order, a CNN as a teacher. Each model named by --student / --teacher is therefore built on
the meta device (no memory, no weights, no initialisation) and run once on a (1, 3, S, S) input at the
configured --input-size; what comes out must have the shapes the distiller uses. A failure is a ValueError
naming the model, the size and what went wrong (the CLI boundary prints it as one message, exit 2). An op
without a meta kernel (NotImplementedError) falls back to the same check on a randomly initialised CPU copy.
"""
import torch

import models


def check_timm_student(name: str, kwargs: dict, input_size: int, grid: tuple[int, int] | None = None) -> None:
    """`--student timm:<name>` with its kwargs runs at `input_size` and gives cls (1, D) and patch tokens on a
    non-empty grid (resampled onto `grid`, the distillation grid, when given)."""
    def forward(device):
        with torch.device(device):
            try:
                student = models.build_student(name, img_size=input_size, **kwargs).eval()  # eval: BN, one sample
            except (TypeError, ValueError) as e:  # an unknown keyword, or a value timm's constructor refuses
                raise ValueError(f"--student-kwargs {kwargs} do not fit {name}: {e} (a timm student takes "
                                 f"timm.create_model's own arguments; with several students give one ';' entry "
                                 f"each)") from None
            x = torch.zeros(1, 3, input_size, input_size)
            feats, patch, hw = student.feature_map(x)
            if min(hw) < 1:
                raise ValueError(f"its feature map at {input_size} px is {hw[0]}x{hw[1]}: raise --input-size")
            out = student.forward_features(x, grid=grid)
        want = {"cls": (1, student.embed_dim), "patch": (1, grid[0] * grid[1] if grid else patch.shape[1],
                                                          student.patch_dim)}
        got = {k: tuple(out[k].shape) for k in want}
        if got != want:
            raise ValueError(f"its features have shapes {got}, expected {want} (cls: the pooled feature; patch: "
                             f"the final feature map as (batch, tokens, channels); a model whose maps are "
                             f"channels-last or that returns several maps cannot be distilled as it is)")

    _run_checked(forward, f"--student {name}" + (f" with --student-kwargs {kwargs}" if kwargs else ""), input_size)


def check_timm_teacher(name: str, input_size: int) -> int:
    """`--teacher timm:<name>` is a ViT (teachers give patch tokens) that runs at `input_size`: returns its patch
    size. Built without weights: none is read or downloaded here."""
    import timm

    model_name = name[len("timm:"):]
    patch = {}

    def forward(device):
        with torch.device(device):
            try:
                model = timm.create_model(model_name, pretrained=False, num_classes=0, img_size=input_size,
                                          dynamic_img_size=True).eval()
            except TypeError as e:
                raise ValueError(f"it is not a ViT ({e}): a teacher must give patch tokens; use a timm ViT, or "
                                 f"distil a CNN as a --student") from None
            ps = getattr(getattr(model, "patch_embed", None), "patch_size", None)
            if ps is None:
                raise ValueError("it has no patch embedding: a teacher must be a ViT that gives patch tokens")
            p = ps if isinstance(ps, int) else ps[0]
            if input_size % p:
                raise ValueError(f"--input-size {input_size} is not a multiple of its patch size {p}")
            tokens = model.forward_features(torch.zeros(1, 3, input_size, input_size))
        n = (input_size // p) ** 2
        prefix = int(getattr(model, "num_prefix_tokens", 1) or 0)
        if tokens.ndim != 3 or tokens.shape[1] != prefix + n:
            raise ValueError(f"its features have shape {tuple(tokens.shape)}, expected (1, {prefix} + {n} tokens, "
                             f"dim)")
        patch["size"] = p

    _run_checked(forward, f"--teacher {name}", input_size)
    return patch["size"]


def _run_checked(forward, what: str, input_size: int) -> None:
    try:
        try:
            forward("meta")
        except NotImplementedError:  # an op without a meta kernel: the same check on a real (random) CPU copy
            forward("cpu")
    except ValueError as e:
        if str(e).startswith("--student-kwargs"):
            raise
        raise ValueError(f"{what} cannot be distilled at --input-size {input_size}: {e}") from None
    except Exception as e:  # noqa: BLE001 - whatever the model raises on this input is the model/size mismatch
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"{what} fails at --input-size {input_size} (one forward of a (1, 3, {input_size}, "
                         f"{input_size}) input, before training): {type(e).__name__}: {first}") from None
