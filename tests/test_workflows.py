"""The shipped workflows: valid against the node definitions (this pack's and ComfyUI core's), and they
run end to end on tiny checkpoints with stand-ins for the four core nodes. No ComfyUI host needed."""
from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PACK = "rest_pack_under_test"
# the folder names ComfyUI's template browser scans in each custom node (app/custom_node_manager.py)
TEMPLATE_FOLDERS = ("example_workflows", "example", "examples", "workflow", "workflows")
CORE_ALLOWED = {"LoadImage", "LoadAudio", "CreateVideo", "SaveVideo", "PreviewAny", "Note", "MarkdownNote"}


def _import(name, path, package_dir=None):
    if name not in sys.modules:
        kw = {"submodule_search_locations": [str(package_dir)]} if package_dir else {}
        spec = importlib.util.spec_from_file_location(name, path, **kw)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


pack = _import(PACK, ROOT / "__init__.py", ROOT)  # as ComfyUI imports a custom node folder
check = _import("comfy_host_check", ROOT / "scripts" / "comfy_host_check.py")
WORKFLOWS = check.load_workflows()


@pytest.fixture(scope="module")
def defs():
    return {**check.CORE_NODES, **check.pack_object_info(pack.NODE_CLASS_MAPPINGS, pack.NODE_DISPLAY_NAME_MAPPINGS)}


def test_the_two_use_cases_are_shipped():
    assert len(WORKFLOWS) >= 2
    assert any("long" in name for name in WORKFLOWS)
    used = set()
    for name, wf in WORKFLOWS.items():
        types = {n["type"] for n in wf["nodes"]}
        used |= types
        assert {"LoadImage", "LoadAudio", "SaveVideo", "RESTStreamingSampler"} <= types, name
        assert types <= set(pack.NODE_CLASS_MAPPINGS) | CORE_ALLOWED, name
        assert wf["version"] == 0.4 and wf["last_link_id"] == max(l[0] for l in wf["links"])
        assert wf["last_node_id"] == max(n["id"] for n in wf["nodes"])
    assert set(pack.NODE_CLASS_MAPPINGS) <= used  # every node of the pack appears in a template
    long_types = {n["type"] for name, wf in WORKFLOWS.items() if "long" in name for n in wf["nodes"]}
    assert "RESTStreamToVideo" in long_types and "CreateVideo" not in long_types  # no frame batch for long audio


def test_templates_name_only_files_the_pack_installs():
    """Every input file a template names is one the pack places in ComfyUI's input/ on first start."""
    host = importlib.import_module(f"{PACK}.nodes.host")
    installed = set(host.TEMPLATE_INPUTS) | {host.LONG_SPEECH}
    for name, wf in WORKFLOWS.items():
        for n in wf["nodes"]:
            if n["type"] in ("LoadImage", "LoadAudio"):
                assert n["widgets_values"][0] in installed, (name, n["widgets_values"][0])
            if n["type"] in ("RESTLoadVAE", "RESTLoadCausalDiT"):
                assert (host.DEMO_DIR / n["widgets_values"][0]).is_file(), (name, n["widgets_values"][0])


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_workflow_is_valid_for_the_node_definitions(name, defs):
    assert check.validate_workflow(WORKFLOWS[name], defs) == []


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_video_gets_the_original_audio_and_the_models_fps(name, defs):
    wf = WORKFLOWS[name]
    prompt = check.to_api_prompt(wf, defs)
    by_type = {n["class_type"]: (i, n) for i, n in prompt.items()}
    save = by_type["SaveVideo"][1]["inputs"]
    assert save["format"] in ("auto", "mp4") and save["codec"] in ("auto", "h264")  # a streamed file is copied
    # the sampler gets the VAE on its own socket (for the preview), the same VAE that decodes
    vae = by_type["RESTLoadVAE"][0]
    assert by_type["RESTStreamingSampler"][1]["inputs"]["vae"] == [vae, 0]
    if "CreateVideo" in by_type:
        create = by_type["CreateVideo"][1]["inputs"]
        assert create["audio"] == [by_type["LoadAudio"][0], 0]
        assert create["fps"] == [by_type["RESTAudioEncode"][0], 3]  # Audio Encode's fps output
        assert create["images"] == [by_type["RESTDecodeChunk"][0], 0]
        assert save["video"] == [by_type["CreateVideo"][0], 0]
    else:  # the streamed output: fps comes with the chunks, the sound from Load Audio
        stream = by_type["RESTStreamToVideo"][1]["inputs"]
        assert stream["audio"] == [by_type["LoadAudio"][0], 0] and stream["vae"] == [vae, 0]
        assert save["video"] == [by_type["RESTStreamToVideo"][0], 0]


def test_workflows_are_where_the_template_browser_looks():
    folder = next(f for f in TEMPLATE_FOLDERS if (ROOT / f).is_dir())
    assert sorted(p.stem for p in (ROOT / folder).glob("*.json")) == sorted(WORKFLOWS)
    for name in WORKFLOWS:  # the browser's thumbnail for each
        assert (ROOT / folder / f"{name}.jpg").is_file(), name


def test_readme_pictures_and_links_exist():
    import re
    text = (ROOT / "README.md").read_text()
    pictures = re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)
    assert "docs/comfyui_frames.png" in pictures and "docs/live_page.png" in pictures  # the real output, the live page
    links = re.findall(r"\]\((docs/[^)#]+)\)", text)
    assert len(text.splitlines()) < 250
    for p in pictures + links:
        assert (ROOT / p).is_file(), p


def test_validator_catches_broken_workflows(defs):
    wf = WORKFLOWS[sorted(WORKFLOWS)[0]]
    ids = {n["type"]: n["id"] for n in wf["nodes"]}

    def broken(edit):
        w = copy.deepcopy(wf)
        edit(w, {n["id"]: n for n in w["nodes"]})
        return "\n".join(check.validate_workflow(w, defs))

    def rename(w, nodes):
        nodes[ids["RESTDecodeChunk"]]["type"] = "RESTDecodeEverything"
    assert "unknown node type" in broken(rename)

    def vae_into_dit(w, nodes):  # Load REST VAE's output wired into the sampler's dit input
        link = next(l for l in w["links"] if l[3] == ids["RESTStreamingSampler"] and l[5] == "REST_DIT")
        link[1], link[5] = ids["RESTLoadVAE"], "REST_VAE"
        nodes[ids["RESTLoadVAE"]]["outputs"][0]["links"].append(link[0])
    assert "(REST_VAE) -> RESTStreamingSampler.dit (REST_DIT) does not match" in broken(vae_into_dit)

    def bad_widgets(w, nodes):
        nodes[ids["RESTStreamingSampler"]]["widgets_values"] = [0, "sometimes", 0, 2, True]
        nodes[ids["RESTIDContextCache"]]["widgets_values"] = [4, "diagonal"]
        nodes[ids["RESTLoadVAE"]]["widgets_values"][0] = "vae.ckpt"
    text = broken(bad_widgets)
    assert "'steps': 0 is outside [1, 100]" in text and "control value 'sometimes'" in text
    assert "'diagonal' is not one of" in text and "'vae.ckpt' is not a .safetensors file" in text

    def unplugged(w, nodes):
        lid = next(i["link"] for i in nodes[ids["RESTDecodeChunk"]]["inputs"] if i["name"] == "chunks")
        w["links"] = [l for l in w["links"] if l[0] != lid]
        nodes[ids["RESTDecodeChunk"]]["inputs"] = [i for i in nodes[ids["RESTDecodeChunk"]]["inputs"] if i["name"] != "chunks"]
    assert "required input 'chunks' is not connected" in broken(unplugged)

    def short_widgets(w, nodes):
        nodes[ids["SaveVideo"]]["widgets_values"] = ["video/x"]
    assert "1 widget values for 3 widget slots" in broken(short_widgets)


# -- running the workflows ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models_rest")
    rm = importlib.import_module(f"{PACK}.rest_model.cli")
    ckpt = importlib.import_module(f"{PACK}.rest_model.checkpoint")
    vae, dit = rm.random_model("tiny", 0)
    ckpt.save(vae, d / "vae.safetensors")
    ckpt.save(dit, d / "dit.safetensors")
    return d


def core_stand_ins(seconds, out_dir, record):
    """The four ComfyUI core nodes the workflows use, reduced to what they do with our data."""
    media = importlib.import_module(f"{PACK}.rest_model.media")

    def load_image(image):
        rgba = torch.rand(1, 50, 70, 4, generator=torch.Generator().manual_seed(0))
        return rgba[..., :3], 1 - rgba[..., 3]  # IMAGE and MASK (1 = transparent), as LoadImage returns them

    def load_audio(audio):
        sr = 44100
        t = torch.arange(int(seconds * sr)) / sr
        return ({"waveform": (0.3 * torch.sin(2 * math.pi * 180 * t)).expand(1, 2, -1).clone(), "sample_rate": sr},)

    def create_video(images, fps, audio=None):
        return ({"images": images, "fps": fps, "audio": audio},)

    def save_video(video, filename_prefix, format, codec):
        path = out_dir / (filename_prefix.replace("/", "_") + ".mp4")
        if hasattr(video, "save_to"):  # a VIDEO file (Stream To Video): Save Video copies its packets
            video.save_to(str(path), format=format, codec=codec)
            record["mp4"] = path
            return ()
        wave = video["audio"]["waveform"][0]
        frames = video["images"].permute(0, 3, 1, 2) * 2 - 1
        media.write_video(path, [frames], int(video["fps"]), audio=wave, sample_rate=video["audio"]["sample_rate"])
        record["mp4"] = path
        return ()

    def preview_any(source):
        record["text"] = source
        return ()

    return {"LoadImage": load_image, "LoadAudio": load_audio, "CreateVideo": create_video, "SaveVideo": save_video,
            "PreviewAny": preview_any}


def execute(prompt, stand_ins):
    """Run an API prompt in dependency order, as ComfyUI's executor does (no caching)."""
    results = {}

    def outputs(node_id):
        if node_id not in results:
            node = prompt[node_id]
            kwargs = {k: outputs(v[0])[v[1]] if isinstance(v, list) else v for k, v in node["inputs"].items()}
            cls = pack.NODE_CLASS_MAPPINGS.get(node["class_type"])
            results[node_id] = getattr(cls(), cls.FUNCTION)(**kwargs) if cls else stand_ins[node["class_type"]](**kwargs)
        return results[node_id]

    for node_id in prompt:
        outputs(node_id)


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_workflow_runs_to_an_mp4_with_audio(name, defs, tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("REST_MODELS_DIR", str(tiny_models))
    media = importlib.import_module(f"{PACK}.rest_model.media")
    seconds, record = (1.0 if "long" in name else 0.5), {}
    prompt = check.to_api_prompt(WORKFLOWS[name], defs, {("RESTLoadVAE", "vae_name"): "vae.safetensors",
                                                         ("RESTLoadCausalDiT", "dit_name"): "dit.safetensors"})
    execute(prompt, core_stand_ins(seconds, tmp_path, record))
    info = media.probe(record["mp4"])
    assert info["frames"] == math.ceil(seconds * 25) and info["fps"] == 25 and info["has_audio"]
    assert (info["width"], info["height"]) == (32, 32)
    if "PreviewAny" in {n["class_type"] for n in prompt.values()}:
        assert "memory" in record["text"] and f"{math.ceil(seconds * 25)} frames" in record["text"]


# -- the real-host check script -----------------------------------------------------------------------------------
def test_host_check_skips_cleanly_without_a_comfyui_checkout(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    for args in ([], [str(tmp_path)]):
        out = subprocess.run([sys.executable, str(ROOT / "scripts" / "comfy_host_check.py"), *args],
                             capture_output=True, text=True, timeout=60, env=env)
        assert out.returncode == 0 and out.stdout.startswith("SKIP"), out.stdout + out.stderr


@pytest.mark.skipif(not os.environ.get("REST_COMFYUI_PATH"), reason="set REST_COMFYUI_PATH (and REST_COMFYUI_PYTHON) "
                    "to run the real-host check")
def test_real_comfyui_host(tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts" / "comfy_host_check.py"), os.environ["REST_COMFYUI_PATH"],
           "--python", os.environ.get("REST_COMFYUI_PYTHON", sys.executable), "--long-seconds", "8",
           "--report", str(tmp_path / "report.json")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert json.loads((tmp_path / "report.json").read_text())["ok"]


# -- packaging --------------------------------------------------------------------------------------------
def test_registry_metadata_and_requirements_never_touch_torch():
    import re
    import tomllib
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project, comfy = meta["project"], meta["tool"]["comfy"]
    # Comfy Registry rules for the node id and version
    assert re.fullmatch(r"[A-Za-z](?:[A-Za-z0-9]|[-_.](?![-_.]))*", project["name"]) and len(project["name"]) < 100
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert project["urls"]["Repository"].startswith("https://")
    assert comfy["PublisherId"] and comfy["DisplayName"] and comfy["Icon"].startswith("https://")
    assert "workflows" in comfy["includes"]
    reqs = [l.split("#")[0].strip() for l in (ROOT / "requirements.txt").read_text().splitlines()]
    for dep in [r for r in reqs if r] + project["dependencies"]:
        assert not re.match(r"(torch|torchaudio|torchvision)\b", dep), dep


def test_nodes_never_install_or_download_anything():
    import re
    for path in (ROOT / "nodes").glob("*.py"):
        text = path.read_text()
        assert not re.search(r"pip\b.*install|subprocess|urllib|requests|hf_hub|snapshot_download|torch\.hub", text), path


def test_a_workflow_saved_before_the_socket_redesign_still_runs(defs, tiny_models, tmp_path, monkeypatch):
    """Node keys did not change and every new input is optional: the pre-redesign template (loaders with one
    output, no VAE on the sampler) runs to the same kind of mp4 (ComfyUI's frontend adds the new outputs)."""
    monkeypatch.setenv("REST_MODELS_DIR", str(tiny_models))
    media = importlib.import_module(f"{PACK}.rest_model.media")
    old = json.loads((ROOT / "tests" / "fixtures" / "rest_talking_head_v0.json").read_text())
    problems = check.validate_workflow(old, defs)
    # only what the frontend fills in itself: the loaders' new info output, Decode Chunk's new paste_back widget
    assert problems and all(("differ from the node's" in p and "'STRING'" in p) or
                            ("RESTDecodeChunk" in p and "0 widget values for 1 widget slots" in p) for p in problems)
    record = {}
    prompt = check.to_api_prompt(old, defs, {("RESTLoadVAE", "vae_name"): "vae.safetensors",
                                             ("RESTLoadCausalDiT", "dit_name"): "dit.safetensors"})
    execute(prompt, core_stand_ins(0.5, tmp_path, record))
    info = media.probe(record["mp4"])
    assert info["frames"] == 13 and info["has_audio"]
