"""The backbone flags of every frozen-feature evaluation (linear_eval, fine_grained): one definition.

    add_backbone_args(parser)            # --pretrained --student --arch --patch-size --model-kwargs --ema
                                         # --image-size --precision
    run = resolve_backbone(args, task)   # after parsing: fills what the run says, checks the flags against it

`--pretrained` takes a pretraining run dir, its `checkpoint.pth` (any step), an exported
`student_backbone[_ema].pth`, any other accepted checkpoint file, or `none` (random init). From a run
(models.run.resolve_run) the architecture, size overrides (`--student-kwargs`), patch size and image size
are read from its config.json; explicit flags win, but a flag that contradicts the run (another
architecture, patch size or size override) is a ConfigError naming both values. The image size is the
run's training crop unless --image-size gives another (evaluating at another resolution is allowed).
`--student KEY` picks one student of a several-student run (finished, or from a mid-run checkpoint.pth);
without a run it is the old alias of --arch. The output dir defaults to RUN/eval/[<key>/][step<N>/]<task>.
"""
import os

import models
from common.errors import ConfigError, MissingFileError
from common.precision import CHOICES as PRECISIONS
from models.run import RunBackbone, resolve_run

DEFAULT_ARCH, DEFAULT_PATCH, DEFAULT_IMAGE_SIZE = "vit_small", 14, 224


def add_backbone_args(parser, title: str = "backbone"):
    """The shared flags, in their own argument group; returns the group (tasks may add their own to it)."""
    from common.config import size_kwargs  # one size-override syntax

    g = parser.add_argument_group(title)
    g.add_argument("--pretrained", default="none",
                   help="pretraining run dir (its config.json gives arch, sizes, patch and image size), its "
                        "checkpoint.pth, an exported student_backbone[_ema].pth, another checkpoint file, or "
                        "'none' (random init)")
    g.add_argument("--student", default=None, metavar="KEY",
                   help="several-student run: the student to evaluate (its folder name, e.g. vit_tiny); "
                        "without a run: the architecture (old alias of --arch)")
    g.add_argument("--arch", default=None,
                   help=f"vit_tiny | vit_small | vit_base | vit_large | vit_giant2, or timm:<name> (default: the "
                        f"run's student, else {DEFAULT_ARCH})")
    g.add_argument("--patch-size", type=int, default=None,
                   help=f"ViT patch size (default: the run's, else {DEFAULT_PATCH}; not used by timm archs)")
    g.add_argument("--model-kwargs", "--student-kwargs", dest="model_kwargs", type=size_kwargs, default=None,
                   help="size overrides, e.g. depth=2,embed_dim=64 or JSON (default: the run's --student-kwargs)")
    g.add_argument("--ema", action="store_true", help="evaluate the EMA student of the run / checkpoint")
    g.add_argument("--image-size", "--input-size", dest="image_size", type=int, default=None,
                   help=f"input crop size (default: the run's --input-size, else {DEFAULT_IMAGE_SIZE})")
    g.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="backbone precision (auto: bf16 on GPUs and CPUs with native bf16, fp16 on older GPUs, "
                        "else fp32)")
    return g


def resolve_backbone(args, task: str, subdir: str | None = None) -> RunBackbone | None:
    """Fill args.arch / patch_size / model_kwargs / image_size / pretrained / student / output_dir from the run
    `--pretrained` names (flags win; contradictions are ConfigErrors). Returns the run, or None (random init)."""
    run = None
    source = args.pretrained
    if source not in (None, "", "none"):
        if not os.path.exists(source):
            raise MissingFileError(f"--pretrained {source}: no such file or directory; pass a pretraining run dir, "
                                   f"a checkpoint written by pretrain.main (checkpoint.pth / student_backbone.pth), "
                                   f"an official DINOv2 file, or 'none' for the random-init baseline")
        run = resolve_run(source, student=args.student, ema=args.ema)
    if run is not None and run.arch is not None:
        check_against_run(run, args.arch, args.patch_size, args.model_kwargs)
        args.arch = args.arch or run.arch
        args.patch_size = _first(args.patch_size, run.patch_size)
        args.model_kwargs = args.model_kwargs if args.model_kwargs is not None else (run.kwargs or None)
        args.image_size = _first(args.image_size, run.img_size)
        args.student = run.student  # the key inside a several-student checkpoint (None otherwise)
    else:
        if args.student and args.arch is None:  # no run: --student is the architecture (old alias)
            args.arch = args.student
        # a file of no run may still be a several-student checkpoint: --student then selects in it (a file
        # holding one student ignores it)
        args.student = args.student if run is not None else None
    args.arch = args.arch or DEFAULT_ARCH
    args.patch_size = _first(args.patch_size, DEFAULT_PATCH)
    args.image_size = _first(args.image_size, DEFAULT_IMAGE_SIZE)
    args.pretrained_source = source
    args.pretrained = run.weights if run is not None else source
    args.run_dir = run.run_dir if run is not None else None
    args.student_key = run.key if run is not None else None
    if getattr(args, "output_dir", None) is None:
        args.output_dir = run.eval_dir(task, args.ema) if run is not None else None
        if args.output_dir is not None and subdir:
            args.output_dir = os.path.join(args.output_dir, subdir)
        if args.output_dir is None:
            raise ConfigError("--output-dir is needed when --pretrained is not a pretraining run (a run dir, or a "
                              "file inside one): results go to RUN/eval/<task> only when there is a run")
    return run


def _first(flag, fallback):
    """The flag's value when given (0 included: the range checks then name it), else the fallback."""
    return flag if flag is not None else fallback


def check_against_run(run: RunBackbone, arch, patch_size, kwargs) -> None:
    """An explicit flag (None: not given) that says something else than the run is an error naming both values.
    The evaluations and tools.export call it."""
    where = run.describe()
    if arch is not None and arch != run.arch:
        raise ConfigError(f"--arch {arch} contradicts {where}, which trained {run.arch}; drop --arch (the "
                          f"run's is used) or pass another run")
    if patch_size is not None and patch_size != run.patch_size and not models.is_timm_name(run.arch):
        raise ConfigError(f"--patch-size {patch_size} contradicts {where}, which trained patch {run.patch_size}; "
                          f"drop --patch-size")
    # img_size is the build size (as --image-size), not a size override: evaluating at another size is allowed
    sizes = {k: v for k, v in (kwargs or {}).items() if k != "img_size"}
    if kwargs is not None and sizes != {k: v for k, v in (run.kwargs or {}).items() if k != "img_size"}:
        raise ConfigError(f"--model-kwargs {kwargs} contradicts {where}, which trained "
                          f"{run.kwargs or 'no size overrides'}; drop --model-kwargs")
