"""A non-editable install, used the way a new user on a machine without the Hub would: the one slow test (a minute
or two) that proves the built-in data, presets and licences ship in the package and that training needs nothing
else."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from transformers import AutoTokenizer

REPO = Path(__file__).resolve().parents[1]
SHIPPED = [
    "builtin/tinystories/tinystories_sample.jsonl.gz",
    "builtin/tinystories/tinystories_instruct.jsonl.gz",
    "builtin/tinystories/LICENSE-CDLA-Sharing-1.0.txt",
    "builtin/tinystories/README.md",
    "builtin/deepseek-coder/tokenizer.json",
    "builtin/deepseek-coder/tokenizer_config.json",
    "builtin/deepseek-coder/LICENSE-MODEL",
    "builtin/deepseek-coder/NOTICE",
]


def test_wheel_installed_outside_the_repository_trains_offline_on_the_builtin_pair(tmp_path):
    # A copy, so the build's own files (build/, *.egg-info) never land in the working tree.
    clone = tmp_path / "clone"
    local = {".git", ".venv", ".ci-venv", "build", "dist", "runs", "data", ".pytest_cache"}  # at the top only
    shutil.copytree(REPO, clone, symlinks=True, ignore=lambda folder, names: [
        name for name in names
        if (Path(folder) == REPO and name in local) or name == "__pycache__" or name.endswith(".egg-info")])
    run = dict(capture_output=True, text=True, timeout=600)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "wheel"), str(clone)], **run)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "wheel").glob("tinyseek-*.whl")
    site = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                                str(wheel)], **run)
    assert installed.returncode == 0, installed.stderr

    package = site / "tinyseek"
    presets = sorted(path.name for path in (REPO / "configs").iterdir() if path.suffix in (".yaml", ".toml"))
    for name in [*SHIPPED, *(f"configs/{preset}" for preset in presets)]:
        assert (package / name).is_file(), name
    assert not (package / "configs").is_symlink()
    (dist_info,) = site.glob("tinyseek-*.dist-info")
    assert any(path.name == "LICENSE" for path in dist_info.rglob("LICENSE"))

    # A fresh user: the installed package first on the path, no Hub, an empty Hugging Face cache and home, no shared
    # data, and a working directory outside the repository.
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    env = {key: value for key, value in os.environ.items() if key not in ("TINYSEEK_SHARED_DATA", "PYTHONPATH")}
    env.update(PYTHONPATH=str(site), HOME=str(home), HF_HOME=str(home / "hf"), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    script = [sys.executable, "-c", "import sys; from tinyseek.cli import main; sys.exit(main())"]
    where = subprocess.run([sys.executable, "-c", "import tinyseek; print(tinyseek.__file__)"], env=env, cwd=work, **run)
    assert Path(where.stdout.strip()).is_relative_to(site)

    trained = subprocess.run([*script, "train", "--config", "seed", "--max-steps", "3", "--checkpoint-every", "3",
                              "--out-dir", "D"], env=env, cwd=work, **run)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "Hub offline (HF_HUB_OFFLINE=1) and not in the local cache: training on the built-in TinyStories sample " \
           "with the built-in DeepSeek-Coder tokenizer" in trained.stderr
    checkpoint = work / "D" / "checkpoints" / "step_00000003"
    assert AutoTokenizer.from_pretrained(checkpoint)("Once upon a time").input_ids[:2] == [32013, 10503]
    # The chat template travels with the built-in tokenizer into every checkpoint.
    chat = AutoTokenizer.from_pretrained(checkpoint).apply_chat_template([{"role": "user", "content": "Hi"}],
                                                                         add_generation_prompt=True)
    assert chat["input_ids"] == [32013, 32019, 11041, 32020]

    # `python train.py` from the clone, in the same conditions.
    scripted = subprocess.run([sys.executable, "train.py", "--max-steps", "3", "--checkpoint-every", "3",
                               "--out-dir", str(work / "E")], env=env, cwd=clone, **run)
    assert scripted.returncode == 0, scripted.stderr[-3000:]
    assert "training on the built-in TinyStories sample" in scripted.stderr
    assert (work / "E" / "checkpoints" / "step_00000003" / "model.safetensors").is_file()
