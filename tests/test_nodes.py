"""The seven REST nodes, run without ComfyUI through the entry points ComfyUI uses
(NODE_CLASS_MAPPINGS -> INPUT_TYPES -> FUNCTION), on tiny checkpoints written here."""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PACK = "rest_pack_under_test"
SEVEN = {"RESTLoadVAE": "Load REST VAE", "RESTLoadCausalDiT": "Load Causal DiT", "RESTAudioEncode": "Audio Encode",
         "RESTIDContextCache": "ID-Context Cache", "RESTStreamingSampler": "Streaming Sampler",
         "RESTDecodeChunk": "Decode Chunk", "RESTStreamToVideo": "Stream To Video"}


def load_pack():
    """Import the repo as ComfyUI imports a custom node folder: a package from its __init__.py."""
    if PACK not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK] = module
        spec.loader.exec_module(module)
    return sys.modules[PACK]


def rm(name):
    """A module of the pack's own copy of rest_model (the one the nodes use)."""
    return importlib.import_module(f"{PACK}.rest_model.{name}")


def run(node_id, validate=True, **inputs):
    """Execute a node the way ComfyUI does: defaults from INPUT_TYPES, combo values checked, FUNCTION called."""
    cls = load_pack().NODE_CLASS_MAPPINGS[node_id]
    spec = cls.INPUT_TYPES()
    for name, (kind, opts) in spec["required"].items():
        if name not in inputs:
            assert "default" in opts, f"{node_id}.{name} has no default and was not given"
            inputs[name] = opts["default"]
        if validate and isinstance(kind, list):
            assert inputs[name] in kind, f"{node_id}.{name}: {inputs[name]!r} not in {kind}"
    assert not set(inputs) - set(spec["required"]) - set(spec.get("optional", {}))
    out = getattr(cls(), cls.FUNCTION)(**inputs)
    assert isinstance(out, tuple) and len(out) == len(cls.RETURN_TYPES)
    return out


def speech(seconds, sr=44100, channels=2, seed=0):
    """ComfyUI AUDIO: a voiced, syllable-modulated signal."""
    t = torch.arange(int(seconds * sr)) / sr
    g = torch.Generator().manual_seed(seed)
    voice = sum(torch.sin(2 * math.pi * h * (110 + 40 * torch.rand(1, generator=g)) * t) / h for h in range(1, 6))
    x = 0.3 * voice * torch.sin(2 * math.pi * 4 * t).clamp(min=0)
    return {"waveform": x.expand(1, channels, -1).clone(), "sample_rate": sr}


def image(h=40, w=56, c=3, seed=0):
    """ComfyUI IMAGE [1, H, W, C] in [0, 1], deliberately not square."""
    return torch.rand(1, h, w, c, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny checkpoints in a models folder: a matching VAE + DiT, a DiT of another latent layout, a non-REST file."""
    load_pack()
    d = tmp_path_factory.mktemp("models_rest")
    ckpt, cfg = rm("checkpoint"), rm("config")
    torch.manual_seed(0)
    vae = rm("vae").CausalVAE(cfg.preset("tiny").vae)
    dit = rm("dit").CausalDiT(cfg.preset("tiny").dit)
    # an untrained DiT starts with zero gates and a zero output layer (adaLN-zero), so its output would be
    # pure noise whatever the portrait and audio; give those weights values so the tests see the inputs matter
    with torch.no_grad():
        for p in dit.parameters():
            if not p.any():
                p.normal_(std=0.05)
    ckpt.save(vae, d / "tiny_vae.safetensors")
    ckpt.save(dit, d / "tiny_dit.safetensors")
    other = rm("dit").CausalDiT(dataclasses.replace(cfg.preset("tiny").dit, latent_channels=4))
    ckpt.save(other, d / "other_layout_dit.safetensors")
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(d / "not_rest.safetensors"))
    return d


@pytest.fixture
def env(models, monkeypatch):
    monkeypatch.setenv("REST_MODELS_DIR", str(models))
    return models


@pytest.fixture
def comfy(monkeypatch):
    """Fake comfy.utils / comfy.model_management: records the progress bar, can raise an interrupt."""
    state = types.SimpleNamespace(bars=[], interrupt_at=None, checks=0)

    class InterruptProcessingException(Exception):
        pass

    class ProgressBar:
        def __init__(self, total, node_id=None):
            self.total, self.updates = total, []
            state.bars.append(self)

        def update_absolute(self, value, total=None, preview=None):
            self.updates.append((value, total, preview))

    def throw_exception_if_processing_interrupted():
        state.checks += 1
        if state.interrupt_at is not None and state.checks >= state.interrupt_at:
            state.interrupt_at = None  # ComfyUI clears the flag when it raises
            raise InterruptProcessingException()

    mm = types.ModuleType("comfy.model_management")
    mm.InterruptProcessingException = InterruptProcessingException
    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    mm.get_torch_device = lambda: torch.device("cpu")
    utils = types.ModuleType("comfy.utils")
    utils.ProgressBar = ProgressBar
    pkg = types.ModuleType("comfy")
    pkg.utils, pkg.model_management = utils, mm
    for name, mod in (("comfy", pkg), ("comfy.utils", utils), ("comfy.model_management", mm)):
        monkeypatch.setitem(sys.modules, name, mod)
    state.Interrupt = InterruptProcessingException
    return state


@pytest.fixture
def loaded(env):
    vae, _ = run("RESTLoadVAE", vae_name="tiny_vae.safetensors")
    dit, _ = run("RESTLoadCausalDiT", dit_name="tiny_dit.safetensors", vae=vae)
    return vae, dit


def latents(chunks):
    return torch.cat(chunks.latents, 2)


def portrait_of(img, dit, crop="face"):
    """What the ID-Context Cache node makes of an IMAGE: the model-resolution portrait in [-1, 1]."""
    return rm("framing").frame_portrait(img[0].permute(2, 0, 1), dit.cfg.resolution, crop)[0]


# -- definitions -------------------------------------------------------------------------------------------
def test_seven_nodes_declared_for_comfyui():
    pack = load_pack()
    assert pack.NODE_DISPLAY_NAME_MAPPINGS == SEVEN
    assert set(pack.NODE_CLASS_MAPPINGS) == set(SEVEN)
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert cls.CATEGORY == "REST"
        assert callable(getattr(cls(), cls.FUNCTION))
        assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES) == len(cls.OUTPUT_TOOLTIPS)
        spec = cls.INPUT_TYPES()
        for section in spec.values():
            for name, (_, opts) in section.items():
                assert opts.get("tooltip"), f"{node_id}.{name} has no tooltip"
    sampler = pack.NODE_CLASS_MAPPINGS["RESTStreamingSampler"]
    assert sampler.RETURN_TYPES[0] == "REST_LATENT_CHUNKS"
    assert pack.NODE_CLASS_MAPPINGS["RESTDecodeChunk"].RETURN_TYPES == ("IMAGE",)
    assert pack.NODE_CLASS_MAPPINGS["RESTStreamToVideo"].RETURN_TYPES[0] == "VIDEO"


def test_pack_and_rest_model_import_without_comfyui():
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_nodes as t; "
            "t.load_pack(); import rest_model.cli; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('comfy', 'folder_paths', 'comfy_extras')]; "
            "assert not bad, bad; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


# -- model folder -----------------------------------------------------------------------------------------
def fake_folder_paths(tmp_path, extra_dir):
    """The part of ComfyUI's folder_paths the pack uses, with a `rest:` path from extra_model_paths.yaml."""
    fp = types.ModuleType("folder_paths")
    fp.models_dir = str(tmp_path / "ComfyUI" / "models")
    fp.folder_names_and_paths = {"rest": ([str(extra_dir)], set())}  # what load_extra_path_config leaves

    def add_model_folder_path(name, path, is_default=False):  # ComfyUI's logic
        if name in fp.folder_names_and_paths:
            paths = fp.folder_names_and_paths[name][0]
            if path in paths:
                if is_default and paths[0] != path:
                    paths.remove(path), paths.insert(0, path)
            elif is_default:
                paths.insert(0, path)
            else:
                paths.append(path)
        else:
            fp.folder_names_and_paths[name] = ([path], set())

    def get_filename_list(name):
        paths, exts = fp.folder_names_and_paths[name]
        return sorted({p.name for d in paths if Path(d).is_dir() for p in Path(d).iterdir()
                       if not exts or p.suffix in exts})

    def get_full_path(name, filename):
        return next((str(Path(d) / filename) for d in fp.folder_names_and_paths[name][0]
                     if (Path(d) / filename).is_file()), None)

    fp.add_model_folder_path, fp.get_filename_list, fp.get_full_path = add_model_folder_path, get_filename_list, get_full_path
    fp.get_folder_paths = lambda name: list(fp.folder_names_and_paths[name][0])
    return fp


def test_models_rest_registered_with_folder_paths_keeping_extra_model_paths(models, tmp_path, monkeypatch):
    extra = tmp_path / "shared_models"
    extra.mkdir()
    (extra / "tiny_vae.safetensors").write_bytes((models / "tiny_vae.safetensors").read_bytes())
    (extra / "readme.txt").write_text("not a model")
    fp = fake_folder_paths(tmp_path, extra)
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    host = importlib.import_module(f"{PACK}.nodes.host")
    host.register_model_folder()
    host.register_model_folder()  # idempotent
    paths, exts = fp.folder_names_and_paths["rest"]
    assert paths == [str(extra), str(Path(fp.models_dir) / "rest"), str(host.DEMO_DIR)]
    assert exts == {".safetensors"}
    assert (Path(fp.models_dir) / "rest").is_dir()
    choices = load_pack().NODE_CLASS_MAPPINGS["RESTLoadVAE"].INPUT_TYPES()["required"]["vae_name"][0]
    # the bundled demo VAE first, then the extra path's VAE; never the DiT or the non-model file
    assert choices == ["rest_vae_demo.safetensors", "tiny_vae.safetensors"]
    vae, _ = run("RESTLoadVAE", vae_name="tiny_vae.safetensors")
    assert vae.file == str(extra / "tiny_vae.safetensors")


def test_loaders_list_only_their_kind_demo_first_and_honour_dtype(env):
    classes = load_pack().NODE_CLASS_MAPPINGS
    dits = classes["RESTLoadCausalDiT"].INPUT_TYPES()["required"]["dit_name"]
    vaes = classes["RESTLoadVAE"].INPUT_TYPES()["required"]["vae_name"]
    # a fresh node shows the first entry: the bundled demo file of its own kind, so it runs as it is
    assert dits[0] == ["rest_dit_demo.safetensors", "other_layout_dit.safetensors", "tiny_dit.safetensors"]
    assert vaes[0] == ["rest_vae_demo.safetensors", "tiny_vae.safetensors"]
    vae, info = run("RESTLoadVAE", vae_name="tiny_vae.safetensors", dtype="float16")
    assert vae.dtype == next(vae.module.parameters()).dtype == torch.float16
    assert "REST VAE" in info and "trained on" in info and "tiny_vae.safetensors" in info
    dit, info = run("RESTLoadCausalDiT", dit_name="tiny_dit.safetensors", device="cpu")
    assert next(dit.module.parameters()).dtype == torch.float32 and next(dit.module.parameters()).device.type == "cpu"
    assert "causal DiT" in info and "32x32 at 25 fps" in info and "trained on" in info


def test_loader_lists_follow_a_file_that_changes_kind(env):
    """The kind is read from the header once per file version (mtime, size): replacing a file is seen."""
    host = importlib.import_module(f"{PACK}.nodes.host")
    target = env / "swapped.safetensors"
    target.write_bytes((env / "tiny_vae.safetensors").read_bytes())
    try:
        assert "swapped.safetensors" in host.list_models("vae") and "swapped.safetensors" not in host.list_models("dit")
        target.write_bytes((env / "tiny_dit.safetensors").read_bytes())
        assert "swapped.safetensors" in host.list_models("dit") and "swapped.safetensors" not in host.list_models("vae")
    finally:
        target.unlink()


# -- bad input ----------------------------------------------------------------------------------------------
def test_missing_model_file_names_the_file_and_the_folder(env):
    with pytest.raises(FileNotFoundError, match=r"'gone\.safetensors' not found.*models/rest"):
        run("RESTLoadVAE", validate=False, vae_name="gone.safetensors")


def test_dit_loader_refuses_a_vae_file(env):
    with pytest.raises(ValueError, match=r"tiny_vae\.safetensors is a REST VAE checkpoint, but a causal DiT"):
        run("RESTLoadCausalDiT", validate=False, dit_name="tiny_vae.safetensors")  # unlisted, yet named by a prompt
    with pytest.raises(ValueError, match=r"not_rest\.safetensors .*not a REST checkpoint"):
        run("RESTLoadVAE", validate=False, vae_name="not_rest.safetensors")


def test_mismatched_vae_and_dit_refused_naming_both_files(loaded):
    vae, dit = loaded
    with pytest.raises(ValueError, match=r"other_layout_dit\.safetensors does not fit the VAE .*tiny_vae\.safetensors"
                                         r".*latent_channels: VAE 8 vs DiT 4"):
        run("RESTLoadCausalDiT", dit_name="other_layout_dit.safetensors", vae=vae)
    other, _ = run("RESTLoadCausalDiT", dit_name="other_layout_dit.safetensors")  # alone it loads...
    with pytest.raises(ValueError, match=r"other_layout_dit\.safetensors does not fit"):  # ...but not with this VAE
        run("RESTIDContextCache", image=image(), vae=vae, dit=other)


def test_cuda_choice_without_a_gpu_is_a_clear_error(env):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        run("RESTLoadCausalDiT", dit_name="tiny_dit.safetensors", device="cuda")


def test_empty_or_broken_audio_is_refused(loaded):
    _, dit = loaded
    with pytest.raises(ValueError, match="empty"):
        run("RESTAudioEncode", audio={"waveform": torch.zeros(1, 2, 0), "sample_rate": 44100}, dit=dit)
    bad = speech(0.2)
    bad["waveform"][0, 0, 100] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        run("RESTAudioEncode", audio=bad, dit=dit)
    with pytest.raises(ValueError, match="batch"):
        run("RESTAudioEncode", audio={"waveform": torch.zeros(2, 1, 800), "sample_rate": 16000}, dit=dit)


# -- the nodes' work ------------------------------------------------------------------------------------------
def test_audio_encode_aligns_speech_to_video_frames(loaded):
    _, dit = loaded
    rest_audio, frames, duration, fps = run("RESTAudioEncode", audio=speech(0.5, sr=44100, channels=2), dit=dit)
    assert (frames, fps) == (13, 25.0) and duration == pytest.approx(0.5)  # ceil(0.5 s x 25 fps)
    spf = dit.cfg.audio.samples_per_frame
    assert rest_audio.sample_rate == 25 * spf == dit.module.audio_encoder.sample_rate
    assert rest_audio.waveform.ndim == 1  # mono
    assert math.ceil(rest_audio.waveform.numel() / spf) == frames == rest_audio.num_frames


def test_id_context_cache_handles_rgba_gray_sizes_and_crop_modes(loaded):
    vae, dit = loaded
    r = dit.cfg.resolution
    cache, shown = run("RESTIDContextCache", image=image(c=3), vae=vae, dit=dit, context_frames=3)
    assert shown.shape == (1, r, r, 3) and 0 <= shown.min() and shown.max() <= 1
    assert cache.context_frames == 3
    assert len(cache.sink) == dit.cfg.depth  # ID-Sink: K/V per block, computed here
    assert cache.dit == dit.identity and cache.original.shape == (3, 40, 56)
    for c in (1, 4):
        _, s = run("RESTIDContextCache", image=image(c=c), vae=vae, dit=dit)
        assert s.shape == (1, r, r, 3)
    gray = image(c=1)
    _, s = run("RESTIDContextCache", image=gray, vae=vae, dit=dit, crop="stretch")
    assert torch.allclose(s[..., 0], s[..., 2])  # gray stays gray
    transparent = torch.ones(1, 40, 56)  # Load Image's MASK: 1 = fully transparent
    _, s = run("RESTIDContextCache", image=image(), vae=vae, dit=dit, mask=transparent)
    assert torch.allclose(s, torch.ones_like(s), atol=1e-3)  # composited on white
    no_alpha = torch.zeros(1, 64, 64)  # what Load Image returns for an image without alpha
    _, a = run("RESTIDContextCache", image=image(), vae=vae, dit=dit, mask=no_alpha)
    _, b = run("RESTIDContextCache", image=image(), vae=vae, dit=dit)
    assert torch.allclose(a, b, atol=1e-6)
    crops = [run("RESTIDContextCache", image=image(), vae=vae, dit=dit, crop=m)[1] for m in ("center", "pad", "stretch")]
    assert not torch.allclose(crops[0], crops[1]) and not torch.allclose(crops[0], crops[2])


def test_whole_chain_portrait_and_audio_to_frames(loaded, comfy):
    vae, dit = loaded
    audio = speech(0.5)
    rest_audio, n_frames, _, fps = run("RESTAudioEncode", audio=audio, dit=dit)
    cache, _ = run("RESTIDContextCache", image=image(c=4), vae=vae, dit=dit, context_frames=2)
    chunks, report = run("RESTStreamingSampler", dit=dit, cache=cache, audio=rest_audio, seed=7, steps=2,
                         chunk_frames=2, preview=True, vae=vae)
    frames, = run("RESTDecodeChunk", vae=vae, chunks=chunks)
    r, per_chunk = dit.cfg.resolution, 2 * dit.cfg.temporal_compression
    assert frames.shape == (n_frames, r, r, 3) == (13, 32, 32, 3) and frames.dtype == torch.float32
    assert 0 <= frames.min() and frames.max() <= 1
    assert chunks.num_frames == [8, 5] and len(chunks) == math.ceil(13 / per_chunk)
    assert "2 chunks, 13 frames" in report and "after chunk 2" in report
    # progress: one update per chunk, a live preview on the first and the last (1 per second of video), then
    # one update per decoded chunk
    sampler_bar, decode_bar = comfy.bars
    assert [u[0] for u in sampler_bar.updates] == [1, 2] and sampler_bar.total == 2
    assert all(u[2][0] == "JPEG" and u[2][1].size == (r, r) for u in sampler_bar.updates)
    assert [u[0] for u in decode_bar.updates] == [1, 2]
    # the nodes add nothing to the model: same frames as rest_model's own stream on the same inputs
    streamer = rm("streamer")
    cfg = rm("config").StreamConfig(chunk_frames=2, context_frames=2, steps=2, shift=dit.cfg.stream.shift)
    direct = torch.cat([c.frames for c in streamer.stream(vae.module, dit.module, portrait_of(image(c=4), dit),
                                                          streamer.AudioSource.whole(
        audio["waveform"], audio["sample_rate"]), cfg, seed=7)])
    assert torch.allclose(frames, ((direct.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1), atol=1e-4)


def test_decode_chunk_streams_to_the_same_frames_as_a_full_decode(loaded):
    vae, dit = loaded
    rest_audio, n, _, _ = run("RESTAudioEncode", audio=speech(0.7), dit=dit)
    cache, _ = run("RESTIDContextCache", image=image(), vae=vae, dit=dit)
    chunks, _ = run("RESTStreamingSampler", dit=dit, cache=cache, audio=rest_audio, chunk_frames=1, preview=False)
    assert len(chunks) == 5 and chunks.total_frames == n == 18
    frames, = run("RESTDecodeChunk", vae=vae, chunks=chunks)
    with torch.no_grad():
        full = vae.module.decode(latents(chunks))[0, :, :n].permute(1, 2, 3, 0)
    assert torch.allclose(frames, (full.clamp(-1, 1) + 1) / 2, atol=1e-5)


def test_seed_portrait_and_audio_all_steer_the_sampler(loaded):
    vae, dit = loaded
    a, _, _, _ = run("RESTAudioEncode", audio=speech(0.3, seed=0), dit=dit)
    b, _, _, _ = run("RESTAudioEncode", audio=speech(0.3, seed=1), dit=dit)
    c1, _ = run("RESTIDContextCache", image=image(seed=0), vae=vae, dit=dit)
    c2, _ = run("RESTIDContextCache", image=image(seed=1), vae=vae, dit=dit)
    go = lambda cache, audio, seed: latents(run("RESTStreamingSampler", dit=dit, cache=cache, audio=audio, seed=seed,
                                                preview=False)[0])  # noqa: E731
    base = go(c1, a, 1)
    assert torch.equal(base, go(c1, a, 1))
    assert not torch.allclose(base, go(c1, a, 2))
    assert not torch.allclose(base, go(c2, a, 1), atol=1e-4)
    assert not torch.allclose(base, go(c1, b, 1), atol=1e-4)


def test_interrupt_stops_between_chunks_and_the_next_run_works(loaded, comfy):
    vae, dit = loaded
    rest_audio, _, _, _ = run("RESTAudioEncode", audio=speech(1.0), dit=dit)  # 25 frames: 4 chunks
    cache, _ = run("RESTIDContextCache", image=image(), vae=vae, dit=dit)
    comfy.interrupt_at = comfy.checks + 2  # Cancel pressed while chunk 2 is generated
    with pytest.raises(comfy.Interrupt):
        run("RESTStreamingSampler", dit=dit, cache=cache, audio=rest_audio, seed=3, preview=False)
    assert [u[0] for u in comfy.bars[-1].updates] == [1, 2]  # stopped right after chunk 2 of 4
    again, _ = run("RESTStreamingSampler", dit=dit, cache=cache, audio=rest_audio, seed=3, preview=False)
    fresh_cache, _ = run("RESTIDContextCache", image=image(), vae=vae, dit=dit)
    fresh, _ = run("RESTStreamingSampler", dit=dit, cache=fresh_cache, audio=rest_audio, seed=3, preview=False)
    assert len(again) == 4 and again.total_frames == 25
    assert torch.allclose(latents(again), latents(fresh), atol=1e-6)  # nothing left over from the cut stream


def test_sampler_refuses_inputs_made_for_another_model(loaded, env):
    vae, dit = loaded
    rest_audio, _, _, _ = run("RESTAudioEncode", audio=speech(0.3), dit=dit)
    cache, _ = run("RESTIDContextCache", image=image(), vae=vae, dit=dit)
    other, _ = run("RESTLoadCausalDiT", dit_name="other_layout_dit.safetensors")
    with pytest.raises(ValueError, match=r"ID-Context Cache was computed with another DiT \(.*tiny_dit\.safetensors "
                                         r"\(float32 on cpu\)\) than the one .* \(.*other_layout_dit\.safetensors"):
        run("RESTStreamingSampler", dit=other, cache=cache, audio=rest_audio)
    # the same file in another precision is another model for the sink: refused too
    half, _ = run("RESTLoadCausalDiT", dit_name="tiny_dit.safetensors", dtype="bfloat16")
    with pytest.raises(ValueError, match=r"another DiT .*float32.* than .*bfloat16"):
        run("RESTStreamingSampler", dit=half, cache=cache, audio=rest_audio)
    # ...while the same file loaded again by a second loader node is the same model
    again, _ = run("RESTLoadCausalDiT", dit_name="tiny_dit.safetensors")
    assert run("RESTStreamingSampler", dit=again, cache=cache, audio=rest_audio, preview=False)[0].total_frames == 8
    wrong_rate = dataclasses.replace(rest_audio, sample_rate=8000)
    with pytest.raises(ValueError, match="prepared for 25 fps / 8000 Hz"):
        run("RESTStreamingSampler", dit=dit, cache=cache, audio=wrong_rate)


def test_half_precision_runs_or_says_to_use_float32(env):
    vae, _ = run("RESTLoadVAE", vae_name="tiny_vae.safetensors", dtype="bfloat16")
    dit, _ = run("RESTLoadCausalDiT", dit_name="tiny_dit.safetensors", dtype="bfloat16", vae=vae)
    assert next(dit.module.parameters()).dtype == torch.bfloat16
    try:
        cache, _ = run("RESTIDContextCache", image=image(), vae=vae, dit=dit)
        rest_audio, _, _, _ = run("RESTAudioEncode", audio=speech(0.3), dit=dit)
        chunks, _ = run("RESTStreamingSampler", dit=dit, cache=cache, audio=rest_audio, preview=False)
    except RuntimeError as e:  # a rest_model without half-precision support
        assert "load the VAE and DiT with dtype float32" in str(e)
    else:
        assert chunks.total_frames == 8


def test_sampler_reuses_the_id_sink_the_cache_node_computed(loaded, monkeypatch):
    """The ID-Sink is computed once per portrait (in ID-Context Cache), not again per sampler run, and the
    result equals the streamer computing it from the portrait itself."""
    from rest_model.config import StreamConfig
    from rest_model.streamer import AudioSource, stream
    vae, dit = loaded
    rest_audio, _, _, _ = run("RESTAudioEncode", audio=speech(1.2), dit=dit)  # 4 chunks: the window rolls
    cache, _ = run("RESTIDContextCache", image=image(), vae=vae, dit=dit, context_frames=3)
    calls = []
    real = type(dit.module).id_sink
    monkeypatch.setattr(type(dit.module), "id_sink", lambda self, ref: calls.append(1) or real(self, ref))
    out, _ = run("RESTStreamingSampler", dit=dit, cache=cache, audio=rest_audio, seed=4, preview=False)
    assert calls == []
    direct = [c.latent for c in stream(vae.module, dit.module, portrait_of(image(), dit),
                                       AudioSource.whole(rest_audio.waveform, rest_audio.sample_rate),
                                       StreamConfig(chunk_frames=2, context_frames=3, steps=2), seed=4,
                                       decode=False)]
    assert calls == [1]
    torch.testing.assert_close(latents(out), torch.cat(direct, 2), atol=1e-5, rtol=1e-5)
    # the node feeds the speech in one-second pieces (a bounded audio buffer): bit-identical to the whole track
    whole = [c.latent for c in stream(None, dit.module, None, AudioSource.whole(rest_audio.waveform,
                                                                                 rest_audio.sample_rate),
                                      StreamConfig(chunk_frames=2, context_frames=3, steps=2), seed=4, decode=False,
                                      id_sink=cache.sink)]
    assert torch.equal(latents(out), torch.cat(whole, 2))


# -- sockets: one value each, nothing mutated, nothing decoded twice ---------------------------------------------
def snapshot(value):
    """A deep copy of what a node received: tensors, a model's weights with their device and dtype, records."""
    managed = importlib.import_module(f"{PACK}.nodes.managed")
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, managed.RestModel):
        return {k: v.detach().clone() for k, v in value.module.state_dict().items()}
    if isinstance(value, dict):
        return {k: snapshot(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value):
        return {f.name: snapshot(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list):
        return [snapshot(v) for v in value]
    return value


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def run_untouched(node_id, **inputs):
    """run(), then check that no input (tensor, model weights and their device/dtype, record) changed."""
    before = {k: snapshot(v) for k, v in inputs.items()}
    out = run(node_id, **inputs)
    for k, v in inputs.items():
        assert same(before[k], snapshot(v)), f"{node_id} changed its input {k!r}"
    return out


def test_no_node_changes_an_input_even_with_a_vae_in_another_dtype(env):
    """ComfyUI shares cached outputs by reference: the old ID-Context Cache moved a VAE of another dtype to the
    DiT's in place. Here the VAE is bfloat16 and the DiT float32; every node leaves every input as it got it."""
    vae, _ = run("RESTLoadVAE", vae_name="tiny_vae.safetensors", dtype="bfloat16")
    dit, _ = run("RESTLoadCausalDiT", dit_name="tiny_dit.safetensors", vae=vae)
    img, mask, audio = image(c=3), torch.zeros(1, 40, 56), speech(0.5)
    rest_audio, *_ = run_untouched("RESTAudioEncode", audio=audio, dit=dit)
    cache, _ = run_untouched("RESTIDContextCache", image=img, mask=mask, vae=vae, dit=dit)
    chunks, _ = run_untouched("RESTStreamingSampler", dit=dit, cache=cache, audio=rest_audio, vae=vae, preview=True)
    frames, = run_untouched("RESTDecodeChunk", vae=vae, chunks=chunks)
    video, n = run_untouched("RESTStreamToVideo", vae=vae, chunks=chunks, audio=audio)
    assert next(vae.module.parameters()).dtype == torch.bfloat16 and next(dit.module.parameters()).dtype == torch.float32
    assert frames.shape[0] == n == 13


def test_the_cache_socket_carries_the_id_sink_not_the_models(loaded):
    vae, dit = loaded
    cache, _ = run("RESTIDContextCache", image=image(), vae=vae, dit=dit, context_frames=3)

    def modules(value):
        if isinstance(value, torch.nn.Module):
            return [value]
        if dataclasses.is_dataclass(value):
            return [m for f in dataclasses.fields(value) for m in modules(getattr(value, f.name))]
        if isinstance(value, (list, tuple)):
            return [m for v in value for m in modules(v)]
        return []
    assert modules(cache) == []  # the sampler gets the DiT on its own socket
    assert {f.name for f in dataclasses.fields(cache)} == {"sink", "context_frames", "dit", "original", "framing", "notes"}
    assert cache.dit.file.endswith("tiny_dit.safetensors") and cache.dit.dtype == "torch.float32"
    chunks, _ = run("RESTStreamingSampler", dit=dit, cache=cache, audio=run("RESTAudioEncode", audio=speech(0.3),
                                                                           dit=dit)[0], preview=False)
    assert not any(isinstance(v, torch.nn.Module) for v in vars(chunks).values())


def test_each_chunk_is_decoded_once_and_the_preview_is_a_small_extra(loaded, comfy, monkeypatch):
    """The sampler makes latents only; its preview decodes one latent frame (no carried state) about once per
    second of video; the decoder downstream decodes every chunk exactly once."""
    vae, dit = loaded
    calls = []
    real = type(vae.module).decode_chunk
    monkeypatch.setattr(type(vae.module), "decode_chunk",
                        lambda self, z, state: calls.append((z.shape[2], state is None)) or real(self, z, state))
    rest_audio, n, _, _ = run("RESTAudioEncode", audio=speech(2.0), dit=dit)  # 50 frames: 7 chunks of 8
    cache, _ = run("RESTIDContextCache", image=image(), vae=vae, dit=dit)
    calls.clear()  # (the cache node's domain check reconstructs the portrait once)
    chunks, report = run("RESTStreamingSampler", dit=dit, cache=cache, audio=rest_audio, vae=vae, preview=True)
    assert len(chunks) == 7
    previews = [i for i, u in enumerate(comfy.bars[-1].updates) if u[2] is not None]
    assert previews == [0, 4, 6]  # every ceil(25 fps / 8 frames) = 4th chunk, and the last
    assert calls == [(1, True)] * 3  # one latent frame each, nothing else decoded while sampling
    calls.clear()
    run("RESTDecodeChunk", vae=vae, chunks=chunks)
    assert [c[0] for c in calls] == [2] * 7 and [c[1] for c in calls] == [True] + [False] * 6  # once, state carried
    calls.clear()
    run("RESTStreamToVideo", vae=vae, chunks=chunks)
    assert [c[0] for c in calls] == [2] * 7


def test_old_workflows_without_the_vae_on_the_sampler_still_run_and_say_why_no_preview(loaded, comfy):
    vae, dit = loaded
    rest_audio, *_ = run("RESTAudioEncode", audio=speech(0.5), dit=dit)
    cache, _ = run("RESTIDContextCache", image=image(), vae=vae, dit=dit)
    chunks, report = run("RESTStreamingSampler", dit=dit, cache=cache, audio=rest_audio, preview=True)
    assert chunks.total_frames == 13 and "No live preview: wire the VAE" in report
    assert all(u[2] is None for u in comfy.bars[-1].updates)


def test_latents_stay_on_the_device_they_were_made_on(loaded, monkeypatch):
    """The chunks the sampler hands on are the stream's own latent tensors (no copy to the CPU and back)."""
    vae, dit = loaded
    streamer = importlib.import_module(f"{PACK}.rest_model.streamer")
    made = []
    real = streamer.denoise_chunk
    monkeypatch.setattr(streamer, "denoise_chunk", lambda *a: made.append(real(*a)) or made[-1])
    rest_audio, *_ = run("RESTAudioEncode", audio=speech(1.0), dit=dit)
    cache, _ = run("RESTIDContextCache", image=image(), vae=vae, dit=dit)
    chunks, _ = run("RESTStreamingSampler", dit=dit, cache=cache, audio=rest_audio, preview=False)
    assert len(made) == len(chunks) == 4 and chunks.spilled == 0
    assert all(a is b for a, b in zip(chunks, made))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_latent_videos_spill_to_disk_and_read_back_bit_identical(tmp_path, dtype):
    payloads = importlib.import_module(f"{PACK}.nodes.payloads")
    cfg = rm("config").preset("tiny").dit
    g = torch.Generator().manual_seed(0)
    made = [torch.randn(1, 8, 2, 4, 4, generator=g).to(dtype) for _ in range(10)]
    size = made[0].numel() * made[0].element_size()
    store = payloads.LatentChunks(25, cfg, budget_bytes=3 * size, spill_dir=str(tmp_path))
    for z in made:
        store.append(z, 8)
    assert len(store) == 10 and store.spilled == 7 and store.total_frames == 80
    assert sum(z.numel() * z.element_size() for z in store._memory) <= 3 * size  # the rest is on disk
    back = list(store)
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(back, made)) and len(back) == 10
    assert list(store)[9].data_ptr() != back[9].data_ptr()  # read anew each time, nothing cached


# -- the streamed video output ---------------------------------------------------------------------------------
def mp4_rgb(path):
    import av
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def test_stream_to_video_writes_the_frames_write_video_writes_and_save_video_copies_them(loaded, tmp_path,
                                                                                          monkeypatch):
    vae, dit = loaded
    monkeypatch.setattr(importlib.import_module(f"{PACK}.nodes.host"), "temp_dir", lambda: str(tmp_path))
    audio = speech(1.0)
    rest_audio, n, _, _ = run("RESTAudioEncode", audio=audio, dit=dit)
    cache, _ = run("RESTIDContextCache", image=image(), vae=vae, dit=dit)
    chunks, _ = run("RESTStreamingSampler", dit=dit, cache=cache, audio=rest_audio, seed=5, preview=False)
    video, frames = run("RESTStreamToVideo", vae=vae, chunks=chunks, audio=audio)
    path = video.get_stream_source()
    assert Path(path).parent == tmp_path and frames == n == 25
    # the same frames through the command line's writer
    media, streamer = rm("media"), rm("streamer")
    with torch.no_grad():
        decoded = [f[:k] for f, k in zip(streamer.decode_stream(vae.module, iter(chunks)), chunks.num_frames)]
    media.write_video(tmp_path / "reference.mp4", decoded, 25, audio=audio["waveform"][0], sample_rate=44100)
    ours = mp4_rgb(path)
    assert len(ours) == 25 and all((a == b).all() for a, b in zip(ours, mp4_rgb(tmp_path / "reference.mp4")))
    info = media.probe(path)
    assert info["has_audio"] and info["audio_duration"] == pytest.approx(1.0, abs=0.05)
    assert video.get_dimensions() == (32, 32) and video.get_duration() == pytest.approx(1.0, abs=0.1)
    video.save_to(str(tmp_path / "saved.mp4"), format="auto", codec="auto")  # what core Save Video does
    assert all((a == b).all() for a, b in zip(mp4_rgb(tmp_path / "saved.mp4"), ours))
    assert media.probe(tmp_path / "saved.mp4")["has_audio"]


def test_stream_to_video_leaves_no_file_when_cancelled(loaded, comfy, tmp_path, monkeypatch):
    vae, dit = loaded
    monkeypatch.setattr(importlib.import_module(f"{PACK}.nodes.host"), "temp_dir", lambda: str(tmp_path))
    rest_audio, *_ = run("RESTAudioEncode", audio=speech(1.0), dit=dit)
    cache, _ = run("RESTIDContextCache", image=image(), vae=vae, dit=dit)
    chunks, _ = run("RESTStreamingSampler", dit=dit, cache=cache, audio=rest_audio, preview=False)
    comfy.interrupt_at = comfy.checks + 3  # Cancel while the third chunk is encoded
    with pytest.raises(comfy.Interrupt):
        run("RESTStreamToVideo", vae=vae, chunks=chunks, audio=speech(1.0))
    assert list(tmp_path.iterdir()) == []
    video, n = run("RESTStreamToVideo", vae=vae, chunks=chunks)  # and the next run works (silent video)
    assert n == 25 and not rm("media").probe(video.get_stream_source())["has_audio"]


def test_stream_to_video_memory_does_not_grow_with_audio_length(loaded, tmp_path, monkeypatch):
    """1 s and 10 s of speech through Stream To Video: every frame batch made (the decoder's tensors, the uint8
    arrays) is tracked by a weak reference; the most frame data alive at once is the same, one chunk, and the
    Python-side peak (tracemalloc: numpy, PyAV, the writer, the audio track) does not grow ten-fold."""
    import tracemalloc
    import weakref
    vae, dit = loaded
    monkeypatch.setattr(importlib.import_module(f"{PACK}.nodes.host"), "temp_dir", lambda: str(tmp_path))
    media, video_output = rm("media"), importlib.import_module(f"{PACK}.nodes.video_output")
    made = []  # weak references to every frame batch
    real_decoded, real_uint8, real_write = video_output.decoded_chunks, media.to_uint8, media.VideoWriter.write

    def decoded_chunks(*a):
        for frames in real_decoded(*a):
            made.append(weakref.ref(frames))
            yield frames

    def to_uint8(frames):
        out = real_uint8(frames)
        made.append(weakref.ref(out))
        return out
    monkeypatch.setattr(video_output, "decoded_chunks", decoded_chunks)
    monkeypatch.setattr(media, "to_uint8", to_uint8)
    peaks = {}

    def measure(seconds):
        audio = speech(seconds, sr=16000, channels=1)
        rest_audio, *_ = run("RESTAudioEncode", audio=audio, dit=dit)
        cache, _ = run("RESTIDContextCache", image=image(), vae=vae, dit=dit)
        chunks, _ = run("RESTStreamingSampler", dit=dit, cache=cache, audio=rest_audio, preview=False)
        alive = []

        def write(self, f):
            alive.append(sum(r().nbytes for r in made if r() is not None))
            real_write(self, f)
        monkeypatch.setattr(media.VideoWriter, "write", write)
        made.clear()
        tracemalloc.start()
        _, n = run("RESTStreamToVideo", vae=vae, chunks=chunks, audio=audio)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        peaks[seconds] = (max(alive), peak, n, len(made))

    measure(1.0)
    measure(10.0)
    (short_alive, short_peak, n1, _), (long_alive, long_peak, n10, batches) = peaks[1.0], peaks[10.0]
    assert (n1, n10) == (25, 250) and batches == 2 * 32  # 32 chunks, each decoded and converted once
    one_chunk = 8 * 32 * 32 * 3 * (4 + 1)  # a chunk's frames in float32 and in uint8
    assert long_alive == short_alive == one_chunk, peaks  # the frames of one chunk, never the video's 250
    assert long_peak < 1.5 * short_peak + 256 * 1024, peaks  # 10x the audio, not 10x the memory


# -- templates that run as shipped ----------------------------------------------------------------------------
def test_template_inputs_are_placed_once_and_a_users_file_is_never_touched(tmp_path, monkeypatch):
    host = importlib.import_module(f"{PACK}.nodes.host")
    media = rm("media")
    inp = tmp_path / "input"
    inp.mkdir()
    (inp / "rest_speech.wav").write_bytes(b"the user's own file")
    fp = fake_folder_paths(tmp_path, tmp_path / "none")
    fp.get_input_directory = lambda: str(inp)
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    assert host.install_template_inputs() == ["rest_portrait.png", "rest_speech_long.wav"]
    assert (inp / "rest_speech.wav").read_bytes() == b"the user's own file"
    assert (inp / "rest_portrait.png").read_bytes() == (ROOT / "assets" / "portrait.png").read_bytes()
    long_wave, sr = media.load_audio(inp / "rest_speech_long.wav")
    short_wave, _ = media.load_audio(ROOT / "assets" / "speech.wav")
    assert long_wave.shape[-1] == host.LONG_SPEECH_SECONDS * sr  # the bundled speech tiled to 60 s
    n = short_wave.shape[-1]
    assert torch.allclose(long_wave[:, n:2 * n], short_wave, atol=1 / 32767)  # 16-bit copies of the same speech
    assert sorted(p.name for p in inp.iterdir()) == ["rest_portrait.png", "rest_speech.wav", "rest_speech_long.wav"]
    stamp = (inp / "rest_speech_long.wav").stat().st_mtime_ns
    assert host.install_template_inputs() == []  # a second start changes nothing
    assert (inp / "rest_speech_long.wav").stat().st_mtime_ns == stamp


def test_template_inputs_failure_is_logged_not_fatal(tmp_path, caplog):
    host = importlib.import_module(f"{PACK}.nodes.host")
    blocker = tmp_path / "input"
    blocker.write_text("a file where the input folder should be")
    assert host.install_template_inputs(blocker) == []
    assert "could not place the template inputs" in caplog.text


# -- ComfyUI's model management -------------------------------------------------------------------------------
@pytest.fixture
def model_management(comfy, monkeypatch):
    """comfy.model_patcher.ModelPatcher and model_management.load_models_gpu, recording what the nodes ask."""
    mm = sys.modules["comfy.model_management"]
    comfy.loads = []

    class ModelPatcher:
        def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
            self.model, self.load_device, self.offload_device = model, load_device, offload_device

    def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                        force_full_load=False):
        comfy.loads.append(([m.model for m in models], force_full_load))

    mm.load_models_gpu = load_models_gpu
    mm.unet_offload_device = mm.vae_offload_device = lambda: torch.device("cpu")
    patcher = types.ModuleType("comfy.model_patcher")
    patcher.ModelPatcher = ModelPatcher
    sys.modules["comfy"].model_patcher = patcher
    monkeypatch.setitem(sys.modules, "comfy.model_patcher", patcher)
    return comfy


def test_models_are_registered_with_comfyui_and_loaded_before_each_use(env, model_management):
    vae, _ = run("RESTLoadVAE", vae_name="tiny_vae.safetensors")
    dit, _ = run("RESTLoadCausalDiT", dit_name="tiny_dit.safetensors", device="cpu", vae=vae)
    for m in (vae, dit):
        assert m.patcher.model is m.module and m.patcher.load_device == m.patcher.offload_device == torch.device("cpu")
    assert model_management.loads == []  # loading a file only parks it; nodes load it when they run
    rest_audio, *_ = run("RESTAudioEncode", audio=speech(0.3), dit=dit)
    assert model_management.loads == []  # Audio Encode runs no model
    cache, _ = run("RESTIDContextCache", image=image(), vae=vae, dit=dit)
    chunks, _ = run("RESTStreamingSampler", dit=dit, cache=cache, audio=rest_audio, vae=vae)
    run("RESTDecodeChunk", vae=vae, chunks=chunks)
    run("RESTStreamToVideo", vae=vae, chunks=chunks)
    run("RESTStreamingSampler", dit=dit, cache=cache, audio=rest_audio, vae=vae, preview=False)
    V, D = vae.module, dit.module
    # whole loads (our layers are not comfy.ops, a partial lowvram load would strand weights on the CPU)
    assert model_management.loads == [([V, D], True), ([D, V], True), ([V], True), ([V], True), ([D], True)]


def test_the_live_page_models_are_under_model_management_and_loaded_before_each_stream(env, model_management,
                                                                                     monkeypatch):
    """The live route's pair is read from file once, measured once, and handed to load_models_gpu before every
    stream, as the nodes' models are (ComfyUI may have unloaded them in between)."""
    import asyncio
    lr = importlib.import_module(f"{PACK}.nodes.live_routes")
    live = importlib.import_module(f"{PACK}.rest_model.live")
    monkeypatch.setattr(lr, "pick_models", lambda names: ("tiny_vae.safetensors", "tiny_dit.safetensors"))
    monkeypatch.setattr(lr, "_loaded", {})
    server = live.LiveServer(lr.load_models)
    first = asyncio.run(server.models_ready())
    measured = server.compute_s
    second = asyncio.run(server.models_ready())
    assert first[0] is second[0] and first[1] is second[1] and server.compute_s == measured > 0
    assert model_management.loads == [(list(first), True)] * 2
    monkeypatch.setattr(lr, "pick_models", lambda names: ("tiny_vae.safetensors", "other_layout_dit.safetensors"))
    with pytest.raises(Exception, match="other_layout_dit.safetensors does not fit the VAE"):
        lr.load_models()


# -- framing: face crop, paste-back, plain-words report ----------------------------------------------------------
def test_paste_back_returns_the_portrait_at_its_own_size_untouched_outside_the_face(loaded, tmp_path, monkeypatch):
    vae, dit = loaded
    monkeypatch.setattr(importlib.import_module(f"{PACK}.nodes.host"), "temp_dir", lambda: str(tmp_path))
    img = image(h=41, w=57)  # odd sides: the video leaves the last row and column out
    rest_audio, *_ = run("RESTAudioEncode", audio=speech(0.3), dit=dit)
    cache, _ = run("RESTIDContextCache", image=img, vae=vae, dit=dit, crop="center")
    chunks, _ = run("RESTStreamingSampler", dit=dit, cache=cache, audio=rest_audio, preview=False)
    square, = run("RESTDecodeChunk", vae=vae, chunks=chunks)
    full, = run("RESTDecodeChunk", vae=vae, chunks=chunks, paste_back=True)
    assert square.shape == (8, 32, 32, 3) and full.shape == (8, 41, 57, 3)
    left, top, right, bottom = cache.framing.box  # the centre square: 41x41 at (8, 0)
    assert (left, top, right, bottom) == (8, 0, 49, 41)
    outside = torch.ones(41, 57, dtype=torch.bool)
    outside[:, left:right] = False
    assert torch.allclose(full[:, outside], img[0][outside].expand(8, -1, -1), atol=1e-6)  # the original, exactly
    assert not torch.allclose(full[:, :, left + 10:right - 10], img[:, :, left + 10:right - 10], atol=0.05)
    video, n = run("RESTStreamToVideo", vae=vae, chunks=chunks, paste_back=True)
    assert video.get_dimensions() == (56, 40) and n == 8


def test_the_sampler_report_says_how_the_portrait_was_framed_and_if_it_is_out_of_domain(loaded):
    vae, dit = loaded
    rest_audio, *_ = run("RESTAudioEncode", audio=speech(0.3), dit=dit)
    noise = image(h=48, w=48)  # no face, and nothing like what any VAE was trained on
    cache, _ = run("RESTIDContextCache", image=noise, vae=vae, dit=dit, crop="face")
    _, report = run("RESTStreamingSampler", dit=dit, cache=cache, audio=rest_audio, preview=False)
    assert "Portrait: no face found: centered crop 48x48 at (0, 0)." in report
    assert "Warning: this portrait is far from what the model was trained on" in report
