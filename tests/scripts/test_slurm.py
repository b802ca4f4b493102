"""Issue #19 item 4: the SLURM launchers read nodes / GPUs / CPUs from SLURM's environment (with overrides) and
pass the run dir through to the eval scripts; every script uses the repo's .venv when present.

srun, scontrol and torchrun are replaced by stubs that print their arguments (no cluster needed).
"""
import os
import shutil
import stat
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def stub_repo(tmp_path):
    """A copy of scripts/ without .venv, and a bin/ of stubs first on PATH."""
    repo = tmp_path / "repo"
    shutil.copytree(os.path.join(REPO, "scripts"), repo / "scripts")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", 'echo "srun $*"; shift; "$@"'), ("scontrol", 'echo node001'),
                       ("torchrun", 'echo "torchrun $*"'), ("python", 'echo "python $*"')):
        path = bin_dir / name
        path.write_text(f"#!/usr/bin/env bash\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return repo, bin_dir


def run(script, args, repo, bin_dir, **env):
    full = {"PATH": f"{bin_dir}:/usr/bin:/bin", "PROTEUS_REPO": str(repo), "SLURM_JOB_ID": "42",
            "SLURM_JOB_NODELIST": "node[001-003]", **env}
    return subprocess.run(["bash", str(repo / "scripts" / script), *args], env=full, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.slow
def test_slurm_pretrain_takes_nodes_gpus_and_cpus_from_slurm(tmp_path):
    repo, bin_dir = stub_repo(tmp_path)
    proc = run("slurm_pretrain.sh", ["-c", "configs/pretrain/vit_small_dinov2.yaml"], repo, bin_dir,
               SLURM_JOB_NUM_NODES="3", SLURM_GPUS_ON_NODE="4", SLURM_CPUS_PER_TASK="32")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "--nnodes=3 --nproc_per_node=4" in out and "--rdzv_endpoint=node001:29500" in out
    assert "-m pretrain.main --num-workers 7 -c configs/pretrain/vit_small_dinov2.yaml" in out  # 32 / 4 - 1
    # overrides win over SLURM's values; "type:count" GPU strings are read
    proc = run("slurm_pretrain.sh", [], repo, bin_dir, SLURM_JOB_NUM_NODES="3", SLURM_GPUS_PER_NODE="a100:8",
               SLURM_CPUS_PER_TASK="32", NNODES="2", NUM_WORKERS="5")
    assert "--nnodes=2 --nproc_per_node=8" in proc.stdout and "--num-workers 5" in proc.stdout


@pytest.mark.slow
def test_slurm_eval_passes_the_run_dir_and_the_gpu_count(tmp_path):
    repo, bin_dir = stub_repo(tmp_path)
    env = dict(SLURM_GPUS_ON_NODE="2")
    out = run("slurm_eval.sh", ["linear", "RUN", "/data/in"], repo, bin_dir, **env).stdout
    assert "torchrun --nproc_per_node=2 -m linear_eval.main --pretrained RUN --train-root /data/in/train" in out
    out = run("slurm_eval.sh", ["knn", "RUN", "/data/in", "--student", "vit_tiny"], repo, bin_dir, **env).stdout
    assert "-m linear_eval.main --mode knn --pretrained RUN" in out and out.rstrip().endswith("--student vit_tiny")
    out = run("slurm_eval.sh", ["seg", "RUN", "upernet", "train_cfg.max_iters=10"], repo, bin_dir,
              STUDENT="vit_tiny", **env).stdout
    assert ("torchrun --nproc_per_node=2 -m segmentation.train upernet --backbone RUN --student vit_tiny --resume "
            "--cfg-options train_cfg.max_iters=10") in out
    assert "-m segmentation.test upernet --backbone RUN --student vit_tiny --cfg-options" in out
    out = run("slurm_eval.sh", ["depth", "RUN", "dpt"], repo, bin_dir, **env).stdout
    assert "-m depth.train dpt --backbone RUN --resume" in out
    out = run("slurm_eval.sh", ["fine_grained", "RUN", "--multiple"], repo, bin_dir, **env).stdout
    assert "python -m fine_grained.main --dataset cub --data-root cache_data/raw/cub --pretrained RUN --multiple" in out
    assert "python -m tools.report RUN" in out


@pytest.mark.slow
def test_scripts_use_the_repos_venv_when_present(tmp_path):
    repo, bin_dir = stub_repo(tmp_path)
    venv_bin = repo / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    for name in ("python", "torchrun"):
        (venv_bin / name).write_text(f'#!/usr/bin/env bash\necho "venv-{name} $*"\n')
        (venv_bin / name).chmod(0o755)
    out = run("linear_eval.sh", ["RUN", "/data/in"], repo, bin_dir).stdout
    assert out.startswith("venv-torchrun ")
    for script in ("linear_eval.sh", "knn.sh", "fine_grained_all.sh", "seg_ade20k.sh", "depth_nyu.sh",
                   "pretrain.sh", "slurm_pretrain.sh", "slurm_eval.sh"):
        assert "env.sh" in open(os.path.join(REPO, "scripts", script)).read(), script
