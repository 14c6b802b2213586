#!/usr/bin/env python3
"""End-to-end check of the REST node pack inside a real ComfyUI (run by hand; skips without one).

    .venv/bin/python scripts/comfy_host_check.py /path/to/ComfyUI --python /path/to/comfy/venv/bin/python

Given a ComfyUI checkout (Comfy-Org/ComfyUI, installed in its own venv) it:
  1. links this pack into ComfyUI/custom_nodes/ (a symlink, unless the pack is already there);
  2. starts `main.py --cpu --listen 127.0.0.1` (or uses a running server with --url);
  3. checks the pack imported with no error, /object_info lists the seven REST nodes, the core nodes the
     workflows use match what CI validates against (CORE_NODES below), and /workflow_templates lists
     the shipped workflows;
  4. turns every workflows/*.json (UI format) into an API prompt, POSTs it to /prompt and waits;
  5. checks each run left an mp4 with a video and an audio stream in ComfyUI/output/, and reports the
     server's peak resident memory (VmHWM), e.g. to compare a 10 s and a 10 min long-audio run.
With `--models tiny` (default) it writes random tiny-preset checkpoints into models/rest/ (a wiring
check: the video is noise); `--models workflow` uses the model files the workflows name.
Test inputs (an RGBA portrait, synthetic speech) are written into ComfyUI/input/ as rest_check_*;
`--inputs shipped` runs the templates as shipped instead (the files the pack places in input/ on start).
Talks to loopback only and downloads nothing. Prints a JSON summary; exit 0 = pass or skip.

The workflow helpers (`validate_workflow`, `to_api_prompt`, `pack_object_info`) are also what the CI
tests use to validate the shipped workflows without a ComfyUI host.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = PACK_ROOT / "workflows"
PACK_NODES = ("RESTLoadVAE", "RESTLoadCausalDiT", "RESTAudioEncode", "RESTIDContextCache",
              "RESTStreamingSampler", "RESTDecodeChunk", "RESTStreamToVideo")

# The ComfyUI core nodes the workflows may use, as ComfyUI 0.3.64's /object_info describes them (file
# lists emptied: they depend on the host's input/ folder). CI validates against this; step 3 of the
# host check compares it with the live server, so a stale copy is caught.
CORE_NODES = {
    "LoadImage": {"input": {"required": {"image": [[], {"image_upload": True}]}},
                  "output": ["IMAGE", "MASK"], "output_name": ["IMAGE", "MASK"], "output_node": False},
    "LoadAudio": {"input": {"required": {"audio": [[], {"audio_upload": True}]}},
                  "output": ["AUDIO"], "output_name": ["AUDIO"], "output_node": False},
    "CreateVideo": {"input": {"required": {"images": ["IMAGE", {}],
                                           "fps": ["FLOAT", {"default": 30.0, "min": 1.0, "max": 120.0, "step": 1.0}]},
                              "optional": {"audio": ["AUDIO", {}]}},
                    "output": ["VIDEO"], "output_name": ["VIDEO"], "output_node": False},
    "SaveVideo": {"input": {"required": {"video": ["VIDEO", {}],
                                         "filename_prefix": ["STRING", {"default": "video/ComfyUI", "multiline": False}],
                                         "format": ["COMBO", {"default": "auto", "options": ["auto", "mp4"]}],
                                         "codec": ["COMBO", {"default": "auto", "options": ["auto", "h264"]}]}},
                  "output": [], "output_name": [], "output_node": True},
    "PreviewAny": {"input": {"required": {"source": ["*", {}]}}, "output": [], "output_name": [], "output_node": True},
}
# frontend-only nodes: no Python class, never part of an API prompt
VIRTUAL_NODES = {"Note", "MarkdownNote"}
# combo inputs whose options are files on the user's disk: checked by extension, not by listing
FILE_INPUTS = {("LoadImage", "image"): (".png", ".jpg", ".jpeg", ".webp"),
               ("LoadAudio", "audio"): (".wav", ".mp3", ".flac", ".ogg", ".m4a", ".opus"),
               ("RESTLoadVAE", "vae_name"): (".safetensors",),
               ("RESTLoadCausalDiT", "dit_name"): (".safetensors",)}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")


# -- node definitions ---------------------------------------------------------------------------------
def pack_object_info(mappings: dict, display_names: dict | None = None) -> dict:
    """/object_info entries for classic-API node classes, built the way ComfyUI's server builds them."""
    info = {}
    for name, cls in mappings.items():
        types = cls.INPUT_TYPES()
        info[name] = {"input": {k: types[k] for k in ("required", "optional") if k in types},
                      "output": list(cls.RETURN_TYPES),
                      "output_name": list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)),
                      "output_node": bool(getattr(cls, "OUTPUT_NODE", False)),
                      "display_name": (display_names or {}).get(name, name),
                      "category": getattr(cls, "CATEGORY", "")}
    return info


def _kind(spec) -> str:
    return "COMBO" if isinstance(spec[0], list) else spec[0]


def _options(spec) -> list | None:
    if isinstance(spec[0], list):
        return spec[0]
    return spec[1].get("options") if len(spec) > 1 and spec[0] == "COMBO" else None


def _inputs(defn) -> dict:
    out = {}
    for section in ("required", "optional"):
        for name, spec in defn["input"].get(section, {}).items():
            out[name] = (spec, section == "required")
    return out


def widget_slots(defn) -> list[tuple[str, list, int]]:
    """(input name, spec, extra values the frontend stores after it) for each widget, in widgets_values order."""
    slots = []
    for name, (spec, _) in _inputs(defn).items():
        if _kind(spec) not in WIDGET_TYPES:
            continue
        opts = spec[1] if len(spec) > 1 else {}
        extra = 0
        if _kind(spec) == "INT" and (opts.get("control_after_generate") or name in ("seed", "noise_seed")):
            extra = 1  # the "control after generate" combo
        if opts.get("image_upload"):
            extra = 1  # the upload button
        if opts.get("audio_upload"):
            extra = 2  # the audio player and the upload button
        slots.append((name, spec, extra))
    return slots


def _check_value(node_type, name, spec, value) -> str | None:
    kind, opts = _kind(spec), (spec[1] if len(spec) > 1 else {})
    if (node_type, name) in FILE_INPUTS:
        exts = FILE_INPUTS[(node_type, name)]
        if not isinstance(value, str) or not value.lower().endswith(exts):
            return f"{value!r} is not a {'/'.join(exts)} file name"
        return None
    if kind == "COMBO":
        return None if value in _options(spec) else f"{value!r} is not one of {_options(spec)}"
    ok = {"INT": isinstance(value, int) and not isinstance(value, bool),
          "FLOAT": isinstance(value, (int, float)) and not isinstance(value, bool),
          "BOOLEAN": isinstance(value, bool), "STRING": isinstance(value, str)}[kind]
    if not ok:
        return f"{value!r} is not a {kind}"
    if kind in ("INT", "FLOAT") and not (opts.get("min", -math.inf) <= value <= opts.get("max", math.inf)):
        return f"{value} is outside [{opts.get('min')}, {opts.get('max')}]"
    return None


def _compatible(out_type: str, in_type: str) -> bool:
    return out_type == in_type or "*" in (out_type, in_type)


# -- workflow validation and conversion -----------------------------------------------------------------
def validate_workflow(wf: dict, defs: dict) -> list[str]:
    """Problems that would make ComfyUI refuse or misrun this UI-format workflow (empty list = valid)."""
    problems = []
    nodes = {n["id"]: n for n in wf.get("nodes", [])}
    links = {l[0]: l for l in wf.get("links", [])}
    for node in nodes.values():
        where = f"node {node['id']} ({node['type']})"
        if node["type"] in VIRTUAL_NODES:
            if node.get("inputs") or node.get("outputs"):
                problems.append(f"{where}: a note must have no sockets")
            continue
        if node["type"] not in defs:
            problems.append(f"{where}: unknown node type (neither this pack's nor a known ComfyUI core node)")
            continue
        if node.get("mode", 0) != 0:
            problems.append(f"{where}: muted or bypassed")
        defn, declared = defs[node["type"]], _inputs(defs[node["type"]])
        linked = set()
        for inp in node.get("inputs", []):
            if inp["name"] not in declared:
                problems.append(f"{where}: input {inp['name']!r} does not exist")
            elif inp.get("link") is not None:
                linked.add(inp["name"])
                if inp["link"] not in links:
                    problems.append(f"{where}: input {inp['name']!r} names missing link {inp['link']}")
        for name, (spec, required) in declared.items():
            if required and _kind(spec) not in WIDGET_TYPES and name not in linked:
                problems.append(f"{where}: required input {name!r} is not connected")
        outs = node.get("outputs", [])
        if [o["type"] for o in outs] != defn["output"]:
            problems.append(f"{where}: outputs {[o['type'] for o in outs]} differ from the node's {defn['output']}")
        slots, values = widget_slots(defn), list(node.get("widgets_values", []))
        want = sum(1 + extra for _, _, extra in slots)
        if len(values) != want:
            problems.append(f"{where}: {len(values)} widget values for {want} widget slots")
            continue
        i = 0
        for name, spec, extra in slots:
            err = _check_value(node["type"], name, spec, values[i])
            if err:
                problems.append(f"{where}: widget {name!r}: {err}")
            if extra and _kind(spec) == "INT" and values[i + 1] not in CONTROL_VALUES:
                problems.append(f"{where}: widget {name!r}: control value {values[i + 1]!r} not in {CONTROL_VALUES}")
            i += 1 + extra
    for lid, (_, src, src_slot, dst, dst_slot, ltype) in links.items():
        where = f"link {lid}"
        if src not in nodes or dst not in nodes:
            problems.append(f"{where}: connects a missing node")
            continue
        s, d = nodes[src], nodes[dst]
        if s["type"] not in defs or d["type"] not in defs:
            continue  # already reported
        souts, dins = s.get("outputs", []), d.get("inputs", [])
        if src_slot >= len(defs[s["type"]]["output"]) or dst_slot >= len(dins):
            problems.append(f"{where}: slot out of range")
            continue
        out_type = defs[s["type"]]["output"][src_slot]
        inp = dins[dst_slot]
        if inp.get("link") != lid or lid not in (souts[src_slot].get("links") or []):
            problems.append(f"{where}: not recorded on both of its sockets")
        spec = _inputs(defs[d["type"]]).get(inp["name"], (None,))[0]
        in_type = _kind(spec) if spec else None
        if ltype != out_type or in_type is None or not _compatible(out_type, in_type):
            problems.append(f"{where}: {s['type']}.{defs[s['type']]['output_name'][src_slot]} ({out_type}) -> "
                            f"{d['type']}.{inp['name']} ({in_type}) does not match (link says {ltype})")
    return problems


def to_api_prompt(wf: dict, defs: dict, overrides: dict | None = None) -> dict:
    """UI-format workflow -> the API prompt the frontend would POST. overrides: {(type, input): value}."""
    links = {l[0]: l for l in wf["links"]}
    prompt = {}
    for node in wf["nodes"]:
        if node["type"] in VIRTUAL_NODES:
            continue
        values, inputs = list(node.get("widgets_values", [])), {}
        for name, _, extra in widget_slots(defs[node["type"]]):
            if not values:  # a workflow saved before this input existed: the node's default applies
                break
            inputs[name] = values.pop(0)
            del values[:extra]
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                l = links[inp["link"]]
                inputs[inp["name"]] = [str(l[1]), l[2]]
        for (ntype, name), value in (overrides or {}).items():
            if ntype == node["type"] and name in inputs and not isinstance(inputs[name], list):
                inputs[name] = value(node) if callable(value) else value
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                   "_meta": {"title": node.get("title", node["type"])}}
    return prompt


def load_workflows() -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(WORKFLOWS.glob("*.json"))}


# -- the host check ---------------------------------------------------------------------------------------
class Server:
    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict):
        req = urllib.request.Request(self.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"POST {path} -> {e.code}: {e.read().decode(errors='replace')[:2000]}") from None

    def up(self) -> bool:
        try:
            self.get("/system_stats")
            return True
        except (OSError, ValueError):
            return False


def is_comfy_checkout(path: Path) -> bool:
    return (path / "main.py").is_file() and (path / "folder_paths.py").is_file() and (path / "custom_nodes").is_dir()


def link_pack(comfy: Path) -> Path:
    """The pack's folder in custom_nodes/, symlinking it there unless it already is."""
    for entry in (comfy / "custom_nodes").iterdir():
        if entry.is_dir() and entry.resolve() == PACK_ROOT:
            return entry
    link = comfy / "custom_nodes" / "comfyui-rest"
    if link.exists() or link.is_symlink():
        raise SystemExit(f"{link} exists and is not this pack ({PACK_ROOT}); remove it or link the pack yourself")
    link.symlink_to(PACK_ROOT, target_is_directory=True)
    return link


def write_inputs(input_dir: Path, seconds: float, long_seconds: float, rate: int = 44100, channels: int = 2) -> dict:
    """An RGBA, non-square portrait and synthetic speech (syllables with pauses; stereo 44.1 kHz by default)."""
    import wave

    import numpy as np
    from PIL import Image, ImageDraw

    input_dir.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGBA", (300, 400), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    d.ellipse((50, 60, 250, 330), fill=(224, 172, 140, 255))
    d.ellipse((100, 150, 130, 170), fill=(40, 40, 60, 255)), d.ellipse((170, 150, 200, 170), fill=(40, 40, 60, 255))
    d.ellipse((120, 250, 180, 275), fill=(150, 60, 60, 255))
    im.save(input_dir / "rest_check_portrait.png")

    def speech(path, secs, sr=rate):
        t = np.arange(int(secs * sr)) / sr
        f0 = 120 + 20 * np.sin(2 * np.pi * 0.5 * t)
        voice = sum(np.sin(2 * np.pi * h * np.cumsum(f0) / sr) / h for h in range(1, 8))
        syllables = np.clip(np.sin(2 * np.pi * 4 * t), 0, None) * (np.sin(2 * np.pi * 0.3 * t) > -0.5)
        x = (0.3 * voice * syllables).astype(np.float32)
        pcm = (np.stack([x, 0.9 * x][:channels], 1).clip(-1, 1) * 32767).astype("<i2")
        with wave.open(str(path), "wb") as w:
            w.setnchannels(channels), w.setsampwidth(2), w.setframerate(sr), w.writeframes(pcm.tobytes())

    speech(input_dir / "rest_check_speech.wav", seconds)
    speech(input_dir / "rest_check_speech_long.wav", long_seconds)
    return {"portrait": "rest_check_portrait.png", "speech": ("rest_check_speech.wav", seconds),
            "long": ("rest_check_speech_long.wav", long_seconds)}


def write_tiny_models(models_dir: Path) -> tuple[str, str]:
    sys.path.insert(0, str(PACK_ROOT))
    from rest_model import checkpoint
    from rest_model.cli import random_model

    models_dir.mkdir(parents=True, exist_ok=True)
    vae, dit = random_model("tiny", 0)
    checkpoint.save(vae, models_dir / "rest_check_tiny_vae.safetensors")
    checkpoint.save(dit, models_dir / "rest_check_tiny_dit.safetensors")
    return "rest_check_tiny_vae.safetensors", "rest_check_tiny_dit.safetensors"


def probe_mp4(path: Path) -> dict:
    import av
    with av.open(str(path)) as c:
        v, a = c.streams.video, c.streams.audio
        out = {"path": str(path), "video_streams": len(v), "audio_streams": len(a)}
        if v:
            out.update(video_codec=v[0].codec_context.name, width=v[0].width, height=v[0].height,
                       fps=float(v[0].average_rate), frames=sum(1 for _ in c.decode(video=0)))
    with av.open(str(path)) as c:
        if c.streams.audio:
            a = c.streams.audio[0]
            out.update(audio_codec=a.codec_context.name, audio_rate=a.rate,
                       audio_seconds=float(a.duration * a.time_base) if a.duration else None)
    return out


def frames_picture(mp4: Path, out: Path, count: int = 8, size: int = 160) -> None:
    """A strip of `count` evenly spaced frames of a video (the README's picture of the output)."""
    import av
    from PIL import Image, ImageDraw

    with av.open(str(mp4)) as c:
        frames = [f.to_image() for f in c.decode(video=0)]
    picks = [round(i * (len(frames) - 1) / max(count - 1, 1)) for i in range(count)]
    sheet = Image.new("RGB", (count * (size + 8) + 8, size + 32), "white")
    draw = ImageDraw.Draw(sheet)
    for k, i in enumerate(picks):
        sheet.paste(frames[i].resize((size, size), Image.NEAREST if frames[i].width < size else Image.BILINEAR),
                    (8 + k * (size + 8), 8))
        draw.text((8 + k * (size + 8), size + 14), f"frame {i}", fill="black")
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)


def run_workflow(server: Server, name: str, wf: dict, defs: dict, overrides: dict, timeout: float) -> dict:
    prompt = to_api_prompt(wf, defs, overrides)
    t0 = time.time()
    pid = server.post("/prompt", {"prompt": prompt, "client_id": str(uuid.uuid4()), "extra_data": {
        "extra_pnginfo": {"workflow": wf}}})["prompt_id"]
    while time.time() - t0 < timeout:
        hist = server.get(f"/history/{pid}").get(pid)
        if hist and hist.get("status", {}).get("completed") is not None:
            break
        time.sleep(1)
    else:
        raise RuntimeError(f"{name}: no result after {timeout} s")
    status = hist["status"]
    result = {"workflow": name, "prompt_id": pid, "status": status.get("status_str"), "seconds": round(time.time() - t0, 1)}
    errors = [m for m in status.get("messages", []) if m[0] == "execution_error"]
    if errors:
        result["error"] = {k: errors[0][1].get(k) for k in ("node_type", "exception_message")}
    for node_id, out in hist.get("outputs", {}).items():
        if prompt[node_id]["class_type"] == "SaveVideo":
            result["saved"] = out.get("images", [])
        if "text" in out:
            result.setdefault("text", []).extend(out["text"])
    return result


def host_check(args) -> dict:
    comfy = Path(args.comfy).resolve()
    summary = {"comfyui": str(comfy), "ok": False}
    summary["pack_dir"] = str(link_pack(comfy))
    inputs = write_inputs(comfy / "input", args.seconds, args.long_seconds, args.speech_rate, args.speech_channels)
    overrides = {("LoadImage", "image"): inputs["portrait"],
                 ("LoadAudio", "audio"): lambda node: inputs["long" if "long" in str(node["widgets_values"][0])
                                                            else "speech"][0]}
    if args.inputs == "shipped":  # the file names the templates carry; the pack writes them at start
        overrides = {}
        inputs["speech"], inputs["long"] = ("rest_speech.wav", None), ("rest_speech_long.wav", None)
    if args.models == "tiny":
        vae_name, dit_name = write_tiny_models(comfy / "models" / "rest")
        overrides.update({("RESTLoadVAE", "vae_name"): vae_name, ("RESTLoadCausalDiT", "dit_name"): dit_name})

    proc, log_path = None, comfy / "user" / "rest_host_check_server.log"
    server = Server(args.url or f"http://127.0.0.1:{args.port}")
    try:
        if not args.url:
            if server.up():
                raise SystemExit(f"something already listens on port {args.port}; pass --url to use it or --port")
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "w") as log:
                proc = subprocess.Popen([args.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port",
                                         str(args.port)], cwd=comfy, stdout=log, stderr=subprocess.STDOUT)
            t0 = time.time()
            while not server.up():
                if proc.poll() is not None or time.time() - t0 > args.start_timeout:
                    raise RuntimeError(f"ComfyUI did not start; see {log_path}")
                time.sleep(1)
            text = log_path.read_text(errors="replace")
            pack_lines = [l.strip() for l in text.splitlines() if str(summary["pack_dir"]) in l]
            summary["import_lines"] = pack_lines
            summary["import_failed"] = any("IMPORT FAILED" in l for l in pack_lines) or \
                f"Cannot import {summary['pack_dir']}" in text
        if args.inputs == "shipped":
            summary["shipped_inputs"] = {n: (comfy / "input" / n).is_file()
                                         for n in ("rest_portrait.png", "rest_speech.wav", "rest_speech_long.wav")}
        info = server.get("/object_info")
        summary["nodes_listed"] = [n for n in PACK_NODES if n in info]
        summary["core_drift"] = [f"{n}: {sec}.{k}" for n, d in CORE_NODES.items() for sec, ins in d["input"].items()
                                 for k, spec in ins.items()
                                 if n in info and _kind(info[n]["input"].get(sec, {}).get(k, [None])) != _kind(spec)] + \
                                [f"{n}: missing" for n in CORE_NODES if n not in info]
        templates = server.get("/workflow_templates")
        summary["templates"] = templates.get(Path(summary["pack_dir"]).name, [])
        workflows = load_workflows()
        summary["validation"] = {n: validate_workflow(wf, info) for n, wf in workflows.items()}
        summary["runs"] = []
        for name, wf in workflows.items():
            if args.only and args.only not in name:
                continue
            res = run_workflow(server, name, wf, info, overrides, args.run_timeout)
            res["mp4"] = [probe_mp4(comfy / "output" / s.get("subfolder", "") / s["filename"])
                          for s in res.get("saved", []) if s["filename"].endswith(".mp4")]
            summary["runs"].append(res)
    finally:
        if proc is not None:
            summary["server_peak_rss_mib"] = peak_rss_mib(proc.pid)
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    fps = 25  # both the tiny and the demo preset
    for res in summary["runs"]:
        secs = inputs["long" if "long" in res["workflow"] else "speech"][1]
        res["expected_frames"] = None if secs is None else math.ceil(secs * fps)
        res["ok"] = res["status"] == "success" and any(
            m["video_streams"] == 1 and m["audio_streams"] == 1
            and (args.models != "tiny" or secs is None or m["frames"] == res["expected_frames"])
            for m in res["mp4"])
    summary["ok"] = (not summary.get("import_failed") and len(summary["nodes_listed"]) == len(PACK_NODES)
                     and not summary["core_drift"] and not any(summary["validation"].values())
                     and sorted(summary["templates"]) == sorted(load_workflows())
                     and bool(summary["runs"]) and all(r["ok"] for r in summary["runs"])
                     and all(summary.get("shipped_inputs", {}).values()))
    return summary


def peak_rss_mib(pid: int) -> float | None:
    """The process's peak resident set (VmHWM) so far, in MiB (Linux)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("comfy", nargs="?", default=os.environ.get("COMFYUI_PATH"),
                    help="ComfyUI checkout (default: $COMFYUI_PATH); without one the check is skipped")
    ap.add_argument("--python", default=sys.executable, help="python of ComfyUI's venv (default: this one)")
    ap.add_argument("--url", help="use an already running ComfyUI at this URL instead of starting one")
    ap.add_argument("--port", type=int, default=8188)
    ap.add_argument("--models", choices=("tiny", "workflow"), default="tiny",
                    help="tiny: write random tiny checkpoints and use them; workflow: the files the workflows name")
    ap.add_argument("--inputs", choices=("check", "shipped"), default="check",
                    help="check: write rest_check_* test inputs and use them; shipped: the templates' own files")
    ap.add_argument("--only", help="run only the workflows whose name contains this")
    ap.add_argument("--seconds", type=float, default=2.0, help="speech length for the short workflows")
    ap.add_argument("--long-seconds", type=float, default=20.0, help="speech length for the long-audio workflow")
    ap.add_argument("--speech-rate", type=int, default=44100, help="sample rate of the test speech")
    ap.add_argument("--speech-channels", type=int, choices=(1, 2), default=2, help="channels of the test speech")
    ap.add_argument("--start-timeout", type=float, default=300)
    ap.add_argument("--run-timeout", type=float, default=900)
    ap.add_argument("--report", help="also write the JSON summary here")
    ap.add_argument("--frames-picture", help="save a strip of frames of the first workflow's mp4 here (PNG)")
    args = ap.parse_args(argv)
    if not args.comfy or not is_comfy_checkout(Path(args.comfy)):
        print(f"SKIP: no ComfyUI checkout given (got {args.comfy!r}); pass its path or set COMFYUI_PATH")
        return 0
    summary = host_check(args)
    mp4s = [m["path"] for r in summary.get("runs", []) for m in r["mp4"]]
    if args.frames_picture and mp4s:
        frames_picture(Path(mp4s[0]), Path(args.frames_picture))
    text = json.dumps(summary, indent=2)
    print(text)
    if args.report:
        Path(args.report).write_text(text)
    print("PASS" if summary["ok"] else "FAIL")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
