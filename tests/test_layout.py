"""The import graph is the architecture: the inference core (and the nodes on top of it) never imports the
training, data or evaluation wings, so loading a model to generate never pulls in the lab."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WINGS = ("train", "data", "eval")


def modules_after(code: str) -> list[str]:
    """The rest_model modules loaded by running `code` in a fresh interpreter."""
    probe = code + "\nimport json, sys; print(json.dumps(sorted(m for m in sys.modules if 'rest_model' in m)))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def wing_modules(mods: list[str]) -> list[str]:
    return [m for m in mods if any(f"rest_model.{w}" in m for w in WINGS)]


@pytest.mark.parametrize("core", ["rest_model", "rest_model.streamer", "rest_model.checkpoint", "rest_model.cli"])
def test_the_core_imports_no_wing(core):
    mods = modules_after(f"import {core}")
    assert core in mods and wing_modules(mods) == []


def test_the_node_pack_imports_no_wing():
    code = ("import importlib.util, sys; "
            f"spec = importlib.util.spec_from_file_location('pack', {str(ROOT / '__init__.py')!r}, "
            f"submodule_search_locations=[{str(ROOT)!r}]); m = importlib.util.module_from_spec(spec); "
            "sys.modules['pack'] = m; spec.loader.exec_module(m); assert m.NODE_CLASS_MAPPINGS")
    mods = modules_after(code)
    assert "pack.rest_model.streamer" in mods and wing_modules(mods) == []


def test_the_command_line_still_has_every_stage():
    mods = modules_after("from rest_model.__main__ import main")
    assert {"rest_model.train.asd", "rest_model.data.synth", "rest_model.eval.evaluate"} <= set(mods)
    out = subprocess.run([sys.executable, "-m", "rest_model", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    for cmd in ("generate", "export", "synth", "prepare", "train-vae", "train-teacher", "init-student", "distill",
                "train-sync", "eval"):
        assert cmd in out.stdout, cmd


def test_a_lip_sync_expert_file_is_named_to_the_inference_loader(tmp_path):
    """The core knows the expert's kind by name only: asked for a VAE, it says what the file is."""
    code = f"""
import torch
from rest_model.train.sync_expert import SyncExpert
from rest_model.config import sync_expert_config, preset
from rest_model import checkpoint
p = preset('tiny')
checkpoint.save(SyncExpert(sync_expert_config(p.vae, p.dit)), {str(tmp_path / 'e.safetensors')!r})
"""
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)
    sys.path.insert(0, str(ROOT))
    from rest_model import checkpoint
    with pytest.raises(checkpoint.CheckpointError, match="lip-sync expert checkpoint, but a REST VAE was expected"):
        checkpoint.load_vae(tmp_path / "e.safetensors")


def test_the_pack_entry_point_can_be_imported_alone():
    """pytest imports the repository's __init__.py as a lone module when the clone's folder name is no Python
    identifier (`git clone ... comfyui-rest`); it must then do nothing instead of failing every test."""
    code = ("import importlib.util; "
            f"spec = importlib.util.spec_from_file_location('__init__', {str(ROOT / '__init__.py')!r}); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "assert not hasattr(m, 'NODE_CLASS_MAPPINGS')")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT / "tests", check=True, timeout=60)
