import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from rest_model import checkpoint
from rest_model.checkpoint import CheckpointError
from rest_model.config import preset, to_json
from conftest import audio_features, latent


@pytest.fixture
def files(tiny, tmp_path):
    vae, dit = tiny
    checkpoint.save(vae, tmp_path / "vae.safetensors")
    checkpoint.save(dit, tmp_path / "dit.safetensors")
    return tmp_path / "vae.safetensors", tmp_path / "dit.safetensors"


def test_round_trip_reproduces_outputs_exactly(tiny, files):
    vae, dit = tiny
    vae2, dit2 = checkpoint.load_pair(*files)
    assert vae2.cfg == vae.cfg and dit2.cfg == dit.cfg
    c = dit.cfg
    z = latent(c, 2)
    assert torch.equal(vae.decode(z), vae2.decode(z))
    x, t, ref, a = latent(c, 2, 1), torch.rand(1, 2), latent(c, 1, 2), audio_features(c, 2)
    assert torch.equal(dit(x, t, a, ref), dit2(x, t, a, ref))
    wave = torch.randn(8000) * 0.1
    assert torch.equal(dit.audio_encoder.encode(wave, 8000), dit2.audio_encoder.encode(wave, 8000))


def test_metadata_carries_config_and_version(files):
    meta = checkpoint.read_metadata(files[1])
    assert meta["kind"] == "dit" and meta["format_version"] == str(checkpoint.FORMAT_VERSION)
    assert json.loads(meta["config"])["depth"] == 2


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found.*nope.safetensors"):
        checkpoint.load_vae(tmp_path / "nope.safetensors")


def test_not_a_rest_file(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match="not a REST checkpoint"):
        checkpoint.load_dit(path)


def test_vae_given_as_dit(files):
    with pytest.raises(CheckpointError, match="is a REST VAE checkpoint, but a causal DiT was expected"):
        checkpoint.load_dit(files[0])


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.01])
def test_truncated_file(files, tmp_path, keep):
    data = files[1].read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        checkpoint.load_dit(path)


def test_pickle_is_never_loaded(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(pickle.dumps({"weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match="pickle, which is never loaded"):
        checkpoint.load_vae(path)


def test_config_weight_mismatch(tiny, tmp_path):
    _, dit = tiny
    state = {k: v.contiguous() for k, v in dit.state_dict().items()}
    cfg = json.loads(to_json(dit.cfg))
    cfg["dim"] = 128  # the config now disagrees with the stored weights
    meta = {"format": "rest-node-pack", "format_version": "1", "kind": "dit", "config": json.dumps(cfg)}
    path = tmp_path / "liar.safetensors"
    save_file(state, path, metadata=meta)
    with pytest.raises(CheckpointError, match="liar.safetensors: weights do not match.*wrong shape"):
        checkpoint.load_dit(path)
    del state["out.weight"]
    meta["config"] = to_json(dit.cfg)
    save_file(state, path, metadata=meta)
    with pytest.raises(CheckpointError, match="1 missing.*out.weight"):
        checkpoint.load_dit(path)


def test_newer_format_version_is_refused(tiny, tmp_path):
    vae, _ = tiny
    path = tmp_path / "future.safetensors"
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, path,
              metadata={"format": "rest-node-pack", "format_version": "99", "kind": "vae", "config": to_json(vae.cfg)})
    with pytest.raises(CheckpointError, match="format version 99"):
        checkpoint.load_vae(path)


def test_mismatched_vae_and_dit(files, tmp_path):
    p = preset("tiny")
    p.vae.latent_channels = 4
    from rest_model.vae import CausalVAE
    checkpoint.save(CausalVAE(p.vae), tmp_path / "vae4.safetensors")
    with pytest.raises(CheckpointError, match="dit.safetensors does not fit .*vae4.safetensors.*latent_channels: VAE 4 vs DiT 8"):
        checkpoint.load_pair(tmp_path / "vae4.safetensors", files[1])


def test_save_is_atomic(tiny, tmp_path):
    vae, _ = tiny
    checkpoint.save(vae, tmp_path / "v.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.safetensors"]


def test_float16_export_halves_the_file_and_loads_as_float32(tiny, files, tmp_path):
    """`export --dtype float16` (how the demo model ships): half the bytes, float32 modules, same outputs
    to float16 rounding; a non-float buffer keeps its dtype."""
    from rest_model.__main__ import main
    vae, dit = tiny
    out = tmp_path / "dit16.safetensors"
    assert main(["export", "--in", str(files[1]), "--out", str(out), "--dtype", "float16"]) == 0
    assert out.stat().st_size < 0.55 * files[1].stat().st_size
    dit16 = checkpoint.load_any(out)
    assert next(dit16.parameters()).dtype == torch.float32
    c = dit.cfg
    x, t, ref, a = latent(c, 2, 1), torch.rand(1, 2), latent(c, 1, 2), audio_features(c, 2)
    with torch.no_grad():
        torch.testing.assert_close(dit16(x, t, a, ref), dit(x, t, a, ref), atol=2e-2, rtol=2e-2)
    vae16 = tmp_path / "vae16.safetensors"
    assert main(["export", "--in", str(files[0]), "--out", str(vae16)]) == 0
    assert checkpoint.read_metadata(vae16)["kind"] == "vae"
    checkpoint.load_pair(vae16, out)  # still a matching pair
