"""Live mode: the WebSocket protocol and the server's rules, with aiohttp's in-process test client."""
import asyncio
import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest
import torch
from aiohttp import WSMsgType
from aiohttp import test_utils
from PIL import Image

from rest_model import live, media
from rest_model.streamer import AudioSource, stream
from conftest import speech_like

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RATE = 16000


def _pieces(wave, size=1234):
    return [wave[i:i + size] for i in range(0, wave.numel(), size)]


def _pcm(piece, pcm="f32"):
    if pcm == "s16":
        return (piece.clamp(-1, 1) * 32767).round().short().numpy().astype("<i2").tobytes()
    return piece.numpy().astype("<f4").tobytes()


def _start(**kw):
    return json.dumps({"type": "start", "sample_rate": RATE, "seed": 3, "format": "rgb", **kw})


async def _collect(ws, timeout=60):
    """Read until the server's end or error: (frames [(index, sample, body)], json messages)."""
    frames, msgs = [], []
    while True:
        msg = await ws.receive(timeout=timeout)
        if msg.type == WSMsgType.BINARY:
            frames.append(live.decode_frame_header(msg.data))
        elif msg.type == WSMsgType.TEXT:
            msgs.append(json.loads(msg.data))
            if msgs[-1]["type"] in ("end", "error"):
                return frames, msgs
        else:
            return frames, msgs


def _serve(vae, dit, fn, **kw):
    app = live.make_app(lambda: (vae, dit), **kw)

    async def main():
        async with test_utils.TestClient(test_utils.TestServer(app)) as client:
            return await fn(client, app[live.LIVE_KEY])
    return asyncio.run(main())


async def _talk(client, pieces, pcm="f32", **start):
    ws = await client.ws_connect(live.PREFIX + "/ws")
    await ws.send_str(_start(pcm=pcm, **start))
    for p in pieces:
        await ws.send_bytes(_pcm(p, pcm))
    await ws.send_str(json.dumps({"type": "stop"}))
    out = await _collect(ws)
    await ws.close()
    return out


def _offline(vae, dit, pieces, portrait=None):
    if portrait is None:
        portrait = media.fit_portrait(media.load_image(live.BUNDLED_PORTRAIT), dit.cfg.resolution)
    chunks = stream(vae, dit, portrait, AudioSource(iter(pieces), RATE), dit.cfg.stream, seed=3)
    return np.concatenate([media.to_uint8(c.frames) for c in chunks])


def _rgb(body, dit):
    r = dit.cfg.resolution
    return np.frombuffer(body, np.uint8).reshape(r, r, 3)


def test_streamed_frames_equal_the_offline_stream_with_their_sample_positions(tiny):
    vae, dit = tiny
    pieces = _pieces(speech_like(1.5, RATE))
    frames, msgs = _serve(vae, dit, lambda c, s: _talk(c, pieces))
    want = _offline(vae, dit, pieces)
    assert msgs[0]["type"] == "ready" and msgs[-1]["type"] == "end", msgs
    assert [f[0] for f in frames] == list(range(len(want)))
    fps = dit.cfg.fps
    assert [f[1] for f in frames] == [i * RATE // fps for i in range(len(want))]
    for (index, _, body), ref in zip(frames, want):
        assert np.array_equal(_rgb(body, dit), ref), f"frame {index} differs from the offline stream"
    end = msgs[-1]
    assert end["frames_made"] == end["frames_sent"] == len(want) and end["frames_dropped"] == 0
    assert end["recording"] is None


def test_jpeg_frames_and_int16_pcm(tiny):
    vae, dit = tiny
    wave = speech_like(1.0, RATE)
    pieces = _pieces(wave, 800)
    frames, msgs = _serve(vae, dit, lambda c, s: _talk(c, pieces, pcm="s16", format="jpeg"))
    # the server hears what int16 carries: the offline stream of the same quantised audio
    q = [(p.clamp(-1, 1) * 32767).round() / 32768.0 for p in pieces]
    want = _offline(vae, dit, q)
    assert len(frames) == len(want) == 25
    for (index, sample, body), ref in zip(frames, want):
        assert body == live.encode_frame(ref, index, sample, "jpeg")[live.FRAME_HEADER.size:]
        assert np.array(Image.open(io.BytesIO(body))).shape == ref.shape


def test_one_stream_too_many_is_told_busy_and_the_running_one_is_unaffected(tiny):
    vae, dit = tiny
    pieces = _pieces(speech_like(1.0, RATE))

    async def run(client, server):
        a = await client.ws_connect(live.PREFIX + "/ws")
        await a.send_str(_start())
        ready = json.loads((await a.receive(timeout=30)).data)
        b = await client.ws_connect(live.PREFIX + "/ws")
        busy_frames, busy = await _collect(b)
        assert (await b.receive(timeout=10)).type in (WSMsgType.CLOSE, WSMsgType.CLOSED)
        for p in pieces:
            await a.send_bytes(_pcm(p))
        await a.send_str(json.dumps({"type": "stop"}))
        frames, msgs = await _collect(a)
        await a.close()
        return ready, busy, frames, msgs
    ready, busy, frames, msgs = _serve(vae, dit, run, max_streams=1)
    assert ready["type"] == "ready"
    assert busy == [{"type": "error", "code": "busy", "message": busy[0]["message"]}]
    assert "1 of 1" in busy[0]["message"]
    want = _offline(vae, dit, pieces)
    assert len(frames) == len(want) and msgs[-1]["type"] == "end"
    assert all(np.array_equal(_rgb(f[2], dit), ref) for f, ref in zip(frames, want))


def _wait(cond, timeout=30.0):
    t = time.monotonic()
    while not cond():
        if time.monotonic() - t > timeout:
            raise AssertionError("timed out")
        time.sleep(0.02)


class RawWebSocket:
    """A bare blocking WebSocket client whose socket reads only when told to: a client on a network
    slower than the stream (aiohttp's own client keeps reading into its buffers behind our back)."""

    def __init__(self, port: int, path: str):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: buffers fill fast
        self.sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                          f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                          .encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            self.buf += self.sock.recv(4096)
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        assert b" 101 " in head.split(b"\r\n")[0], head

    def send(self, data, opcode):
        mask = os.urandom(4)
        n = len(data)
        head = bytes([0x80 | opcode]) + (bytes([0x80 | n]) if n < 126 else
                                         bytes([0x80 | 126]) + n.to_bytes(2, "big") if n < 65536 else
                                         bytes([0x80 | 127]) + n.to_bytes(8, "big"))
        body = (np.frombuffer(data, np.uint8) ^ np.resize(np.frombuffer(mask, np.uint8), n)).tobytes()
        self.sock.sendall(head + mask + body)

    def _read(self, n):
        while len(self.buf) < n:
            more = self.sock.recv(1 << 16)
            if not more:
                raise ConnectionError("closed")
            self.buf += more
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def receive(self):
        """-> (opcode, payload); the server never masks."""
        b0, b1 = self._read(2)
        n = b1 & 0x7F
        if n == 126:
            n = int.from_bytes(self._read(2), "big")
        elif n == 127:
            n = int.from_bytes(self._read(8), "big")
        return b0 & 0x0F, self._read(n)


def test_a_client_that_stops_reading_loses_frames_and_never_stalls_the_generator(tiny):
    vae, dit = tiny
    seconds = 20.0
    pieces = _pieces(speech_like(seconds, RATE), 8000)
    n_frames = int(seconds * dit.cfg.fps)

    def client_side(port, server):
        ws = RawWebSocket(port, live.PREFIX + "/ws")
        ws.send(_start(format="rgb").encode(), 1)
        assert json.loads(ws.receive()[1])["type"] == "ready"
        for p in pieces:  # then it reads nothing while the whole stream is made
            ws.send(_pcm(p), 2)
        ws.send(json.dumps({"type": "stop"}).encode(), 1)
        stream_ = next(iter(server.active))
        _wait(lambda: stream_.done)
        held = (stream_.made, stream_.dropped, stream_.max_queued)
        frames, msgs = [], []
        while not msgs or msgs[-1]["type"] not in ("end", "error"):
            opcode, data = ws.receive()
            if opcode == 2:
                frames.append(live.decode_frame_header(data))
            elif opcode == 1:
                msgs.append(json.loads(data))
        ws.sock.close()
        return held, frames, msgs

    async def run(client, server):
        return await asyncio.get_running_loop().run_in_executor(None, client_side, client.server.port, server)
    (made, dropped, max_queued), frames, msgs = _serve(vae, dit, run, max_audio_ahead_s=60, frame_queue=8)
    assert made == n_frames, "the generator stalled behind the client"
    assert dropped > 0 and max_queued <= 8, "frames for a client that does not read must be dropped, not queued"
    end = msgs[-1]
    assert end["type"] == "end" and end["frames_made"] == n_frames
    assert end["frames_sent"] + end["frames_dropped"] == n_frames
    assert len(frames) == end["frames_sent"]
    assert [f[0] for f in frames] == sorted(f[0] for f in frames)  # what arrives is in order
    assert frames[-1][0] == n_frames - 1  # the newest frames are the ones kept


def _b64_png():
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 100, 50)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


BAD = [
    ("garbage json", ["{not json"], "bad_json"),
    ("binary first", [b"\x00\x01\x02\x03"], "bad_message"),
    ("not a start", [json.dumps({"type": "hello"})], "bad_message"),
    ("odd rate", [_start(sample_rate=44100.5)], "bad_rate"),
    ("unsupported rate", [_start(sample_rate=12345)], "bad_rate"),
    ("portrait not an image", [_start(portrait=base64.b64encode(b"hello, not an image").decode())], "bad_portrait"),
    ("portrait not base64", [_start(portrait="%%%")], "bad_portrait"),
    ("odd pcm length", [_start(), b"\x00" * 7], "bad_pcm"),
    ("not float pcm", [_start(), b"\x7f\x7f\x7f\x7f" * 100], "bad_pcm"),
    ("oversize piece", [_start(), np.zeros(RATE + 1, "<f4").tobytes()], "oversize"),
    ("unknown control", [_start(), json.dumps({"type": "pause"})], "bad_message"),
    ("control not json", [_start(), "stop"], "bad_json"),
]


@pytest.mark.parametrize("name,messages,code", BAD, ids=[b[0] for b in BAD])
def test_a_bad_message_gets_a_clear_error_and_the_server_serves_the_next_stream(tiny, name, messages, code):
    vae, dit = tiny
    pieces = _pieces(speech_like(0.4, RATE))

    async def run(client, server):
        ws = await client.ws_connect(live.PREFIX + "/ws")
        for m in messages:
            await (ws.send_bytes(m) if isinstance(m, bytes) else ws.send_str(m))
        _, msgs = await _collect(ws)
        closed = (await ws.receive(timeout=10)).type
        await asyncio.get_running_loop().run_in_executor(None, _wait, lambda: not server.active)
        after = await _talk(client, pieces)
        return msgs, closed, after
    msgs, closed, (frames, after) = _serve(vae, dit, run, max_streams=1)
    assert msgs[-1]["type"] == "error" and msgs[-1]["code"] == code, msgs
    assert len(msgs[-1]["message"]) > 20
    assert closed in (WSMsgType.CLOSE, WSMsgType.CLOSED)
    assert after[-1]["type"] == "end" and len(frames) == 10


def test_a_portrait_image_of_any_size_is_fitted(tiny):
    vae, dit = tiny
    pieces = _pieces(speech_like(0.4, RATE))
    frames, msgs = _serve(vae, dit, lambda c, s: _talk(c, pieces, portrait="data:image/png;base64," + _b64_png()))
    portrait = live.decode_portrait(_b64_png(), dit.cfg.resolution)
    assert msgs[-1]["type"] == "end"
    want = _offline(vae, dit, pieces, portrait)
    assert all(np.array_equal(_rgb(f[2], dit), ref) for f, ref in zip(frames, want))


def _stream_threads():
    return [t for t in threading.enumerate() if t.name == "rest-live-stream"]


def test_a_disconnect_mid_chunk_frees_the_stream_and_the_next_one_runs(tiny, tmp_path):
    vae, dit = tiny
    spf = RATE // dit.cfg.fps
    pieces = _pieces(speech_like(0.4, RATE))

    async def run(client, server):
        ws = await client.ws_connect(live.PREFIX + "/ws")
        await ws.send_str(_start(record=True))
        await ws.receive(timeout=30)
        await ws.send_bytes(_pcm(speech_like(0.1, RATE)[: 3 * spf + 17]))  # less than one chunk of audio
        assert len(server.active) == 1 and len(_stream_threads()) == 1
        await ws.close()  # no stop: the tab was closed
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, _wait, lambda: not server.active and not _stream_threads())
        return await _talk(client, pieces)
    frames, msgs = _serve(vae, dit, run, max_streams=1, record_dir=tmp_path)
    assert msgs[-1]["type"] == "end" and len(frames) == 10
    assert list(tmp_path.iterdir()) == [], "an abandoned recording must leave nothing behind"


def test_audio_faster_than_real_time_is_refused_beyond_the_bound(tiny):
    vae, dit = tiny
    slow = dit.chunk

    def chunk(*a, **k):  # a machine that is slower than the audio: 0.3 s per DiT pass
        time.sleep(0.3)
        return slow(*a, **k)
    dit.chunk = chunk
    pieces = _pieces(speech_like(3.0, RATE), 1600)

    async def run(client, server):
        ws = await client.ws_connect(live.PREFIX + "/ws")
        await ws.send_str(_start())
        for p in pieces:
            await ws.send_bytes(_pcm(p))
        return await _collect(ws)
    frames, msgs = _serve(vae, dit, run, max_audio_ahead_s=1.0)
    assert msgs[-1]["code"] == "audio_ahead" and "real time" in msgs[-1]["message"], msgs


def test_silence_keeps_the_portrait_alive(tiny):
    vae, dit = tiny
    pieces = _pieces(torch.zeros(RATE), 1600)
    frames, msgs = _serve(vae, dit, lambda c, s: _talk(c, pieces))
    assert msgs[-1]["type"] == "end" and len(frames) == dit.cfg.fps
    imgs = [_rgb(f[2], dit) for f in frames]
    assert any(not np.array_equal(imgs[0], im) for im in imgs[1:]), "silence froze the frame"
    assert np.array_equal(np.stack(imgs), _offline(vae, dit, pieces))


def test_recording_is_an_mp4_with_the_sound_and_nothing_is_written_otherwise(tiny, tmp_path):
    vae, dit = tiny
    pieces = _pieces(speech_like(1.0, RATE))
    frames, msgs = _serve(vae, dit, lambda c, s: _talk(c, pieces, record=True), record_dir=tmp_path / "rec")
    path = msgs[-1]["recording"]
    assert os.listdir(tmp_path / "rec") == [os.path.basename(path)]
    info = media.probe(path)
    assert info["frames"] == len(frames) == 25 and info["has_audio"]
    assert abs(info["audio_duration"] - 1.0) < 0.05
    assert info["width"] == dit.cfg.resolution
    frames, msgs = _serve(vae, dit, lambda c, s: _talk(c, pieces), record_dir=tmp_path / "none")
    assert msgs[-1]["recording"] is None and not (tmp_path / "none").exists()


def test_info_and_page_are_served(tiny):
    vae, dit = tiny

    async def run(client, server):
        info = await (await client.get(live.PREFIX + "/info")).json()
        page = await client.get("/", allow_redirects=True)
        js = await client.get(live.PREFIX + "/live.js")
        missing = await client.get(live.PREFIX + "/..%2Fcli.py")
        return info, page.status, str(page.url), await page.text(), js.status, missing.status
    info, status, url, html, js, missing = _serve(vae, dit, run)
    assert info["fps"] == dit.cfg.fps and info["max_streams"] == 1 and info["active_streams"] == 0
    assert status == 200 and url.endswith(live.PREFIX + "/") and "<video" not in html and "live.js" in html
    assert js == 200 and missing == 404


def test_serve_warns_when_bound_beyond_loopback(monkeypatch, capsys):
    from aiohttp import web

    from rest_model import cli
    calls = []
    monkeypatch.setattr(web, "run_app", lambda app, **kw: calls.append(kw))
    assert cli.main(["serve", "--random-weights", "--host", "0.0.0.0", "--port", "9999"]) == 0
    out = capsys.readouterr()
    assert calls[0]["host"] == "0.0.0.0" and calls[0]["port"] == 9999
    assert "WARNING" in out.err and "0.0.0.0" in out.err and "http://0.0.0.0:9999/rest/live/" in out.out
    assert cli.main(["serve", "--random-weights", "--max-streams", "0"]) == 2


def test_serve_command_serves_the_page_on_loopback(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "rest_model", "serve", "--random-weights", "--port", str(port)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/rest/live/" in line, line + proc.stderr.read()
        for _ in range(100):
            try:
                info = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/rest/live/info", timeout=5))
                break
            except OSError:
                time.sleep(0.1)
        assert info["max_streams"] == 1
    finally:
        proc.terminate()
        proc.wait(10)


def test_the_live_server_is_core_and_imports_no_wing():
    from test_layout import modules_after, wing_modules
    mods = modules_after("import rest_model.live")
    assert "rest_model.live" in mods and wing_modules(mods) == []


def test_comfyui_gets_the_same_page_and_websocket_on_its_own_server(monkeypatch):
    """The pack imported as ComfyUI imports it, with a stand-in for ComfyUI's `server` module: the routes land
    on PromptServer.instance.routes and stream the bundled demo model; WEB_DIRECTORY holds the menu entry."""
    import importlib.util
    import types

    from aiohttp import web
    routes = web.RouteTableDef()
    fake = types.ModuleType("server")
    fake.PromptServer = type("PromptServer", (), {"instance": types.SimpleNamespace(routes=routes)})
    monkeypatch.setitem(sys.modules, "server", fake)
    name = "rest_pack_live_under_test"
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "__init__.py"),
                                                  submodule_search_locations=[ROOT])
    pack = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, pack)
    spec.loader.exec_module(pack)
    paths = {r.path for r in routes}
    assert {"/rest/live/ws", "/rest/live/", "/rest/live/info"} <= paths
    menu = os.path.join(ROOT, pack.WEB_DIRECTORY, "rest_live.js")
    assert "rest/live/" in open(menu).read()
    assert [f for f in os.listdir(os.path.join(ROOT, pack.WEB_DIRECTORY)) if f.endswith(".js")] == ["rest_live.js"]
    lr = sys.modules[name + ".nodes.live_routes"]
    assert lr.pick_models(["a/my_dit.safetensors", "rest_dit_demo.safetensors", "rest_vae_demo.safetensors"]) == \
        lr.DEMO_PAIR
    assert lr.pick_models(["x_vae.safetensors", "y_dit.safetensors"]) == ("x_vae.safetensors", "y_dit.safetensors")
    with pytest.raises(FileNotFoundError, match="needs a REST VAE and DiT"):
        lr.pick_models(["x_vae.safetensors"])

    app = web.Application()
    app.add_routes(routes)

    async def run():
        async with test_utils.TestClient(test_utils.TestServer(app)) as client:
            page = await client.get("/rest/live/")
            frames, msgs = await _talk(client, _pieces(speech_like(0.4, RATE)), format="jpeg")
            return page.status, frames, msgs
    status, frames, msgs = asyncio.run(run())
    assert status == 200 and msgs[0]["resolution"] == 128 and msgs[-1]["type"] == "end"
    assert [f[0] for f in frames] == list(range(10))
    assert Image.open(io.BytesIO(frames[0][2])).size == (128, 128)


def test_a_stream_the_server_cannot_run_is_told_why_and_the_next_one_runs(tiny, tmp_path):
    vae, dit = tiny
    blocked = tmp_path / "a_file"
    blocked.write_text("the recording folder cannot be made here")
    pieces = _pieces(speech_like(0.4, RATE))

    async def run(client, server):
        first = await _talk(client, pieces, record=True)
        return first, await _talk(client, pieces)
    (_, first), (frames, second) = _serve(vae, dit, run, max_streams=1, record_dir=blocked / "rec")
    assert first[-1]["code"] == "server_error" and "rec" in first[-1]["message"], first
    assert second[-1]["type"] == "end" and len(frames) == 10


def test_the_server_measures_a_chunk_when_the_models_load_and_tells_the_page(tiny):
    vae, dit = tiny

    async def run(client, server):
        info = await (await client.get(live.PREFIX + "/info")).json()
        frames, msgs = await _talk(client, _pieces(speech_like(0.5, RATE)))
        return info, msgs[0], msgs[-1], server.compute_s
    info, ready, end, measured = _serve(vae, dit, run)
    assert ready["type"] == "ready" and 0 < measured < 10
    assert info["compute_s_per_chunk"] == ready["compute_s_per_chunk"] == measured
    # and per stream: a chunk's whole cost, and its last audio piece in -> its frames out (the commit is after)
    assert end["type"] == "end" and 0 < end["chunk_latency_ms"] and 0 < end["compute_ms_per_chunk"]


def test_torch_work_runs_on_threads_that_end_not_on_the_loop_or_a_pooled_thread(tiny, monkeypatch):
    """A thread that keeps an OpenMP team slows every other thread's torch ops down (live.on_passing_thread):
    loading, the warm-up, the portrait and the stream itself run on threads that are gone afterwards."""
    vae, dit = tiny
    ran = []
    parse = live.parse_start
    monkeypatch.setattr(live, "parse_start", lambda *a: (ran.append(threading.current_thread()), parse(*a))[1])
    real = live.generate
    alive_at_start = []

    def generate(*a):  # while the stream runs, the threads that loaded and parsed must be gone already
        alive_at_start.extend(t.is_alive() for t in ran)
        ran.append(threading.current_thread())
        return real(*a)
    monkeypatch.setattr(live, "generate", generate)

    def models():
        ran.append(threading.current_thread())
        return vae, dit

    async def run(client, server):
        return await _talk(client, _pieces(speech_like(0.5, RATE)))
    app = live.make_app(models)

    async def main():
        async with test_utils.TestClient(test_utils.TestServer(app)) as client:
            return await run(client, app[live.LIVE_KEY])
    frames, msgs = asyncio.run(main())
    assert msgs[-1]["type"] == "end" and len(frames) > 0
    time.sleep(0.2)  # the generator thread ends right after its last frame
    assert len(ran) == 3 and len(set(ran)) == 3, ran
    assert alive_at_start == [False, False], "a thread that did torch work outlived it"
    assert all(t is not threading.main_thread() and not t.is_alive() for t in ran), ran


def test_an_overlapped_decode_hands_each_chunk_out_before_the_next_chunks_audio_is_in(tiny):
    """With the VAE decode on a second thread a chunk goes out as soon as it is decoded (checked between audio
    pieces), not after the next chunk is made: no added latency live; and the frames are the in-line ones."""
    from rest_model.audio import chunk_lookahead_frames
    vae, dit = tiny
    d = dit.cfg
    spf = RATE // d.fps
    wave = speech_like(1.5, RATE)
    pieces = [wave[i:i + spf] for i in range(0, wave.numel(), spf)]  # one video frame of audio each
    portrait = media.fit_portrait(media.load_image(live.BUNDLED_PORTRAIT), d.resolution)
    consumed = [0]

    def live_pieces():
        for p in pieces:
            time.sleep(0.01)  # audio arrives over time, as it does live
            consumed[0] += 1
            yield p
    out = []
    for c in stream(vae, dit, portrait, AudioSource(live_pieces(), RATE), d.stream, seed=3, overlap_decode=True):
        out.append((c, consumed[0]))
    inline = list(stream(vae, dit, portrait, AudioSource(iter(pieces), RATE), d.stream, seed=3))
    assert len(out) == len(inline) > 3
    assert all(torch.equal(a.frames, b.frames) for (a, _), b in zip(out, inline))
    per_chunk = d.stream.chunk_frames * d.temporal_compression
    for c, frames_in in out[:-2]:
        next_needs = (c.index + 2) * per_chunk + chunk_lookahead_frames(d)  # the next chunk's last frame + look-ahead
        assert frames_in < next_needs, f"chunk {c.index} went out after {frames_in} frames of audio, not before {next_needs}"
