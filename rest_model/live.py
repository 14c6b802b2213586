"""Live mode: speech arrives over a WebSocket in small PCM pieces, the talking head goes back frame by frame.

One streamer (`streamer.stream`), two front doors: `python -m rest_model serve` builds an aiohttp
application with `add_live_routes`, and the node pack adds the same routes to ComfyUI's own server.
The page in `live_page/` is served by both.

Protocol on `/rest/live/ws` (one connection = one stream):

    client -> server  text   {"type": "start", "sample_rate": 48000, "seed": 0, "pcm": "f32" | "s16",
                              "portrait": "bundled" | "<base64 image>", "format": "jpeg" | "rgb",
                              "record": false}
                      binary PCM pieces: mono, little-endian float32 in [-1, 1] ("f32") or int16 ("s16"),
                              each at most MAX_PIECE_SECONDS long, sent as the audio is captured
                      text   {"type": "stop"}: the audio has ended; the rest is generated, then "end"
    server -> client  text   {"type": "ready", ...}: the stream's timing (fps, chunk, look-ahead)
                      binary a frame: FRAME_HEADER (magic b"REST", frame index uint32, sample position
                              uint64) + JPEG bytes (or raw RGB H*W*3); the sample position is the first
                              sample of the frame at the client's own sample rate
                      text   {"type": "stats", ...} about once a second, {"type": "end", ...} at the end,
                              {"type": "error", "code": ..., "message": ...} before the server closes

Sync is by sample counts: frame i belongs to samples [i * rate / fps, (i + 1) * rate / fps) of the
client's own audio, so a client that plays its audio on its own clock and shows the frame whose sample
has come cannot drift, however long the session.

Bounds: frames wait in a queue of `frame_queue` per stream; a client that reads slower than the stream
makes them loses the oldest (counted in stats as `frames_dropped`), the generator never waits for it.
Audio that the generator has not consumed yet may reach `max_audio_ahead_s`; more (audio arriving
faster than real time, or a machine too slow for real time) ends the stream with the error
`audio_ahead`. Silence is speech like any other: the client keeps sending (zero) samples while
nobody speaks and the model's silence embedding keeps the portrait alive; a stream that receives no
samples at all waits for them (frames follow audio).

Generation runs in a worker thread per stream (torch.no_grad, models shared read-only); the event
loop only moves bytes. Nothing is written to disk unless the start message asks to record: then an mp4
(H.264 + AAC of the received audio) is written under a temporary name and renamed when the stream
ends with "stop".
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import dataclasses
import io
import json
import logging
import os
import queue
import socket
import struct
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from aiohttp import WSMsgType, web
from PIL import Image, UnidentifiedImageError

from . import media
from .audio import chunk_lookahead_frames
from .config import StreamConfig
from .streamer import AudioSource, stream

log = logging.getLogger("rest_model.live")

PREFIX = "/rest/live"
PAGE_DIR = Path(__file__).resolve().parent / "live_page"
BUNDLED_PORTRAIT = Path(__file__).resolve().parent.parent / "assets" / "portrait.png"
FRAME_HEADER = struct.Struct("<4sIQ")  # magic, frame index, sample position at the client's rate
FRAME_MAGIC = b"REST"
SAMPLE_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 88200, 96000)
PCM_FORMATS = {"f32": np.dtype("<f4"), "s16": np.dtype("<i2")}
MAX_PIECE_SECONDS = 1.0
MAX_PORTRAIT_BYTES = 16 * 2 ** 20
START_TIMEOUT_S = 30.0
STATS_EVERY_S = 1.0
JPEG_QUALITY = 85
# the kernel's send buffer per stream: frames a slow client cannot take wait here at most about a second
# (at 128x128 JPEG), then in our frame queue, where the oldest are dropped; autotuned, it holds megabytes
SEND_BUFFER_BYTES = 128 * 1024

ModelsProvider = Callable[[], tuple]  # () -> (vae, dit) ready to run, asked for before every stream; shared read-only


class ProtocolError(ValueError):
    """A bad message from the client: it gets `code` and `message`, and its stream is closed."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class StartRequest:
    sample_rate: int
    seed: int = 0
    pcm: str = "f32"
    portrait: torch.Tensor | None = None  # [3, H, W] in [-1, 1], fitted to the model; None: bundled
    format: str = "jpeg"
    record: bool = False


def parse_start(text: str, resolution: int) -> StartRequest:
    """The first message of a stream -> StartRequest, or ProtocolError naming what is wrong."""
    try:
        msg = json.loads(text)
    except json.JSONDecodeError as e:
        raise ProtocolError("bad_json", f"the start message is not JSON ({e})") from None
    if not isinstance(msg, dict) or msg.get("type") != "start":
        raise ProtocolError("bad_message", 'the first message must be {"type": "start", "sample_rate": ...}')
    rate = msg.get("sample_rate")
    if isinstance(rate, bool) or not isinstance(rate, int) or rate not in SAMPLE_RATES:
        raise ProtocolError("bad_rate", f"sample_rate must be one of {list(SAMPLE_RATES)} (integer Hz), got {rate!r}")
    seed = msg.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
        raise ProtocolError("bad_seed", f"seed must be a non-negative integer, got {seed!r}")
    pcm = msg.get("pcm", "f32")
    if pcm not in PCM_FORMATS:
        raise ProtocolError("bad_pcm", f"pcm must be one of {list(PCM_FORMATS)}, got {pcm!r}")
    fmt = msg.get("format", "jpeg")
    if fmt not in ("jpeg", "rgb"):
        raise ProtocolError("bad_format", f'format must be "jpeg" or "rgb", got {fmt!r}')
    record = msg.get("record", False)
    if not isinstance(record, bool):
        raise ProtocolError("bad_record", f"record must be true or false, got {record!r}")
    portrait = msg.get("portrait", "bundled")
    return StartRequest(rate, seed, pcm, decode_portrait(portrait, resolution), fmt, record)


def decode_portrait(value, resolution: int) -> torch.Tensor | None:
    """"bundled" (or nothing) -> None; base64 (optionally a data: URL) of an image -> the fitted portrait."""
    if value in (None, "", "bundled"):
        return None
    if not isinstance(value, str):
        raise ProtocolError("bad_portrait", "portrait must be \"bundled\" or a base64-encoded image")
    if value.startswith("data:"):
        value = value.partition(",")[2]
    if len(value) > MAX_PORTRAIT_BYTES * 4 // 3 + 4:
        raise ProtocolError("bad_portrait", f"portrait is larger than {MAX_PORTRAIT_BYTES // 2 ** 20} MiB")
    try:
        raw = base64.b64decode(value, validate=True)
        with Image.open(io.BytesIO(raw)) as im:
            im.load()
            image = media.pil_to_tensor(im)
    except (binascii.Error, ValueError):
        raise ProtocolError("bad_portrait", "portrait is not valid base64") from None
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise ProtocolError("bad_portrait", f"portrait is not an image PIL can read ({e})") from None
    return media.fit_portrait(image, resolution)


def parse_pcm(data: bytes, pcm: str, sample_rate: int) -> torch.Tensor:
    """One binary message -> mono float samples [S], or ProtocolError (odd length, oversize, not PCM)."""
    dtype = PCM_FORMATS[pcm]
    if len(data) == 0 or len(data) % dtype.itemsize:
        raise ProtocolError("bad_pcm", f"an audio piece must be a whole number of {pcm} samples "
                                       f"({dtype.itemsize} bytes each), got {len(data)} bytes")
    n = len(data) // dtype.itemsize
    if n > MAX_PIECE_SECONDS * sample_rate:
        raise ProtocolError("oversize", f"an audio piece may hold at most {MAX_PIECE_SECONDS:g} s "
                                        f"({int(MAX_PIECE_SECONDS * sample_rate)} samples), got {n}")
    x = np.frombuffer(data, dtype)
    if pcm == "s16":
        return torch.from_numpy(x.astype(np.float32) / 32768.0)
    # float PCM lives in [-1, 1]; garbage bytes read as float32 are huge, tiny or NaN
    if not np.isfinite(x).all() or np.abs(x).max() > 4.0:
        raise ProtocolError("bad_pcm", "audio piece is not float32 PCM (NaN, infinite or far outside [-1, 1]); "
                                       'send little-endian float32 in [-1, 1], or say "pcm": "s16"')
    return torch.from_numpy(x.copy())


def sample_position(frame: int, sample_rate: int, fps: int) -> int:
    """First sample (at the client's rate) of video frame `frame`."""
    return frame * sample_rate // fps


def encode_frame(frame_uint8: np.ndarray, index: int, sample: int, fmt: str) -> bytes:
    """[H, W, 3] uint8 -> one binary frame message."""
    if fmt == "rgb":
        body = np.ascontiguousarray(frame_uint8).tobytes()
    else:
        buf = io.BytesIO()
        Image.fromarray(frame_uint8).save(buf, format="JPEG", quality=JPEG_QUALITY)
        body = buf.getvalue()
    return FRAME_HEADER.pack(FRAME_MAGIC, index, sample) + body


def decode_frame_header(data: bytes) -> tuple[int, int, bytes]:
    magic, index, sample = FRAME_HEADER.unpack_from(data)
    if magic != FRAME_MAGIC:
        raise ValueError("not a REST frame message")
    return index, sample, data[FRAME_HEADER.size:]


def open_recording(folder: str | os.PathLike, fps: int, size: int, sample_rate: int) -> media.AtomicVideo:
    """The mp4 (H.264 + AAC) of a live stream, written as frames and audio arrive (memory flat) through the
    atomic video output: `commit()` makes it appear under its name, `discard()` removes it."""
    name = f"rest_live_{time.strftime('%Y%m%d-%H%M%S')}_{uuid.uuid4().hex[:6]}.mp4"
    return media.atomic_video(Path(folder) / name, fps, width=size, height=size, audio_rate=sample_rate).open()


async def on_passing_thread(fn, *args):
    """`await fn(*args)` run on a thread of its own that ends with it: how the live server runs torch work.

    A thread's OpenMP team (libgomp, torch's CPU threads) lives as long as the thread, and once more threads
    hold one than the machine has cores, libgomp makes every team's workers sleep between parallel regions
    instead of spinning: each of the DiT's ~1000 small ops per call then waits for a wake-up. Model loading
    left on the main thread or on a pooled executor thread made the stream's generator thread 1.6x slower on
    2 cores (25 vs 40 fps, the same stream; bench/live_bench.py).
    """
    with ThreadPoolExecutor(1, thread_name_prefix="rest-live-torch") as pool:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)


class _Cancelled(Exception):
    pass


_END = object()


@dataclass(eq=False)  # compared (and hashed) by identity: one object per connection
class LiveStream:
    """The state of one connection's stream: its audio queue, its frame queue, its counters."""
    request: StartRequest
    loop: asyncio.AbstractEventLoop
    frame_queue: int
    max_audio_ahead: int  # samples at the client's rate
    audio: queue.Queue = field(default_factory=queue.Queue)  # pieces for the generator thread
    frames: collections.deque = field(default_factory=collections.deque)  # encoded frame messages
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    received: int = 0  # samples received
    consumed: int = 0  # samples handed to the streamer
    waited_s: float = 0.0  # time the generator spent waiting for audio
    made: int = 0
    sent: int = 0
    dropped: int = 0
    max_queued: int = 0
    chunk_seconds: collections.deque = field(default_factory=lambda: collections.deque(maxlen=25))
    chunk_latency: collections.deque = field(default_factory=lambda: collections.deque(maxlen=25))
    last_piece_at: float = 0.0  # when the generator took the latest audio piece
    chunk_made_at: collections.deque = field(default_factory=lambda: collections.deque(maxlen=50))
    cancelled: threading.Event = field(default_factory=threading.Event)  # the client is gone
    done: bool = False
    error: BaseException | None = None
    recording: str | None = None

    def push_audio(self, samples: torch.Tensor):
        ahead = self.received + samples.numel() - self.consumed
        if ahead > self.max_audio_ahead:
            raise ProtocolError("audio_ahead", f"audio is {ahead / self.request.sample_rate:.1f} s ahead of the "
                                f"generator (limit {self.max_audio_ahead / self.request.sample_rate:g} s): send "
                                f"audio in real time; if you do, this machine is too slow for this stream")
        self.received += samples.numel()
        self.audio.put(samples)

    def pieces(self):
        """The streamer's audio source: blocks until a piece arrives, ends on stop, raises on cancel."""
        while True:
            t = time.perf_counter()
            piece = self.audio.get()
            self.last_piece_at = time.perf_counter()
            self.waited_s += self.last_piece_at - t
            if self.cancelled.is_set():  # gone: the audio still queued is not worth a frame
                raise _Cancelled()
            if piece is _END:
                return
            self.consumed += piece.numel()
            yield piece

    def cancel(self):
        self.cancelled.set()
        self.audio.put(_END)  # wakes a generator waiting for audio

    def to_loop(self, fn, *args):
        """From the generator thread: run fn on the event loop, unless the loop is gone (server shut down)."""
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            self.cancelled.set()

    def deliver(self, message: bytes):
        """On the event loop: queue a frame for the client, dropping the oldest when it is not reading."""
        self.made += 1
        if len(self.frames) >= self.frame_queue:
            self.frames.popleft()
            self.dropped += 1
        self.frames.append(message)
        self.max_queued = max(self.max_queued, len(self.frames))
        self.wake.set()

    def finish(self, error: BaseException | None = None, recording: str | None = None):
        self.done, self.error, self.recording = True, error, recording
        self.wake.set()

    def stats(self) -> dict:
        rate = self.request.sample_rate
        made = list(self.chunk_made_at)
        fps = None
        if len(made) >= 2 and made[-1][0] > made[0][0]:
            fps = (made[-1][1] - made[0][1]) / (made[-1][0] - made[0][0])
        compute, latency = sorted(self.chunk_seconds), sorted(self.chunk_latency)
        return {"frames_made": self.made, "frames_sent": self.sent, "frames_dropped": self.dropped,
                "frames_queued": len(self.frames), "frame_queue": self.frame_queue,
                "fps": None if fps is None else round(fps, 2),
                "compute_ms_per_chunk": round(1000 * compute[len(compute) // 2], 1) if compute else None,
                "chunk_latency_ms": round(1000 * latency[len(latency) // 2], 1) if latency else None,
                "audio_received_s": round(self.received / rate, 3),
                "audio_ahead_s": round((self.received - self.consumed) / rate, 3)}


def measure_compute(vae, dit, cfg: StreamConfig, overlap_decode: bool = False, chunks: int = 6) -> float:
    """Seconds from a chunk's last audio piece arriving to its frames coming out, here: the median over a short
    silent stream fed a video frame of audio at a time, run when the models load (what `chunk_latency_ms`
    reports per stream). It also warms the kernels up, so a user's first chunk is not the slow one. The page
    plans its first playout delay with it (chunk + look-ahead + this + transport), before any frame of its
    own has arrived."""
    d = dit.cfg
    spf = d.audio.samples_per_frame
    n = ((chunks * cfg.chunk_frames + 2) * d.temporal_compression + chunk_lookahead_frames(d)) * spf
    portrait = torch.zeros(3, d.resolution, d.resolution)
    times, last = [], [0.0]

    def pieces():
        for _ in range(0, n, spf):
            last[0] = time.perf_counter()
            yield torch.zeros(spf)
    with torch.no_grad():
        for _ in stream(vae, dit, portrait, AudioSource(pieces(), dit.audio_encoder.sample_rate), cfg,
                        callback=lambda chunk: times.append(time.perf_counter() - last[0]),
                        overlap_decode=overlap_decode):
            pass
    steady = sorted(times[1:-1] or times)  # the first chunk also made the ID-Sink; the last one is short
    return steady[len(steady) // 2]


def generate(live: LiveStream, vae, dit, portrait: torch.Tensor, recorder: media.AtomicVideo | None,
             cfg: StreamConfig, overlap_decode: bool = False) -> None:
    """Worker thread: run the one streamer over the connection's audio and hand each frame to the loop."""
    req, d = live.request, dit.cfg
    torch.set_grad_enabled(False)  # grad mode is per thread; the models are shared read-only

    def recorded_pieces():
        for piece in live.pieces():
            if recorder is not None:
                recorder.write_audio(piece.clamp(-1, 1).numpy()[None].astype(np.float32))
            yield piece

    error, recording = None, None
    try:
        t_prev, waited_prev = time.perf_counter(), 0.0
        for chunk in stream(vae, dit, portrait, AudioSource(recorded_pieces(), req.sample_rate), cfg, seed=req.seed,
                            overlap_decode=overlap_decode):
            now = time.perf_counter()
            frames = media.to_uint8(chunk.frames)
            if recorder is not None:
                recorder.write(frames)
            for i, frame in enumerate(frames):
                index = chunk.first_frame + i
                msg = encode_frame(frame, index, sample_position(index, req.sample_rate, d.fps), req.format)
                live.to_loop(live.deliver, msg)
            live.chunk_seconds.append(now - t_prev - (live.waited_s - waited_prev))  # compute, not waiting
            live.chunk_latency.append(now - live.last_piece_at)  # its last audio piece in -> its frames out
            live.chunk_made_at.append((now, chunk.first_frame + len(frames)))
            t_prev, waited_prev = time.perf_counter(), live.waited_s
        if recorder is not None:
            recording, recorder = recorder.commit(), None
    except _Cancelled:
        pass
    except Exception as e:  # reported to this client; the server goes on
        log.exception("live stream failed")
        error = e
    finally:
        if recorder is not None:
            recorder.discard()
        live.to_loop(live.finish, error, recording)


class LiveServer:
    """The live routes' state: the shared models, the stream limit, the streams running now."""

    def __init__(self, models: ModelsProvider, max_streams: int = 1, frame_queue: int = 8,
                 max_audio_ahead_s: float = 5.0, record_dir: str | os.PathLike = "out/live",
                 portrait_path: str | os.PathLike = BUNDLED_PORTRAIT, chunk_frames: int | None = None,
                 overlap_decode: bool = False):
        """`chunk_frames`: latent frames per chunk instead of the model's (fewer: less latency, more cost).
        `overlap_decode`: the streamer's VAE decode on a second thread (streamer.stream)."""
        if max_streams < 1:
            raise ValueError(f"max_streams must be at least 1, got {max_streams}")
        self.models, self.max_streams, self.frame_queue = models, max_streams, frame_queue
        self.max_audio_ahead_s, self.record_dir, self.portrait_path = max_audio_ahead_s, record_dir, portrait_path
        self.chunk_frames, self.overlap_decode = chunk_frames, overlap_decode
        self.active: set[LiveStream] = set()
        self._models = None
        self._models_lock = threading.Lock()
        self.compute_s: float | None = None  # one chunk's compute, measured when the models load

    def _load(self):
        with self._models_lock:  # asked for before every stream (a host may have moved them), shared read-only
            vae, dit = self.models()
            vae, dit = vae.eval(), dit.eval()
            if self._models is None or self._models[0] is not vae or self._models[1] is not dit:
                self.compute_s = measure_compute(vae, dit, self.stream_config(dit), self.overlap_decode)
                log.info("live: one chunk takes %.0f ms here", 1000 * self.compute_s)
            self._models = (vae, dit)
        return self._models

    async def models_ready(self):
        return await on_passing_thread(self._load)

    def bundled_portrait(self, resolution: int) -> torch.Tensor:
        return media.fit_portrait(media.load_image(self.portrait_path), resolution)

    def stream_config(self, dit) -> StreamConfig:
        if self.chunk_frames is None:
            return dit.cfg.stream
        return dataclasses.replace(dit.cfg.stream, chunk_frames=self.chunk_frames)

    async def info(self, request: web.Request) -> web.Response:
        vae, dit = await self.models_ready()
        d = dit.cfg
        return web.json_response({"fps": d.fps, "resolution": d.resolution, "sample_rates": list(SAMPLE_RATES),
                                  "chunk_video_frames": self.stream_config(dit).chunk_frames * d.temporal_compression,
                                  "lookahead_video_frames": chunk_lookahead_frames(d),
                                  "compute_s_per_chunk": self.compute_s,
                                  "max_streams": self.max_streams, "active_streams": len(self.active),
                                  "max_piece_seconds": MAX_PIECE_SECONDS, "pcm": list(PCM_FORMATS)})

    async def page(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info.get("name") or "index.html"
        path = (PAGE_DIR / name).resolve()
        if path.parent != PAGE_DIR or not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path, headers={"Cache-Control": "no-cache"})

    async def portrait(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(self.portrait_path)

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        # the largest message is a portrait (base64) or one audio piece; larger ones are refused by aiohttp
        ws = web.WebSocketResponse(max_msg_size=MAX_PORTRAIT_BYTES * 4 // 3 + 4096, heartbeat=30)
        await ws.prepare(request)
        sock = request.transport.get_extra_info("socket") if request.transport else None
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        if len(self.active) >= self.max_streams:
            await _send_error(ws, "busy", f"the server is busy: {len(self.active)} of {self.max_streams} live "
                                          f"stream(s) running; try again when one ends")
            return ws
        live = None

        def free():  # before any error goes out, so the client may start again at once
            if live is not None:
                live.cancel()  # the generator stops at its next piece of audio; a finished one ignores it
                self.active.discard(live)
        try:
            vae, dit = await self.models_ready()
            live = await self._start(ws, vae, dit)
            if live is not None:
                await self._run(ws, live)
        except ProtocolError as e:
            free()
            await _send_error(ws, e.code, str(e))
        except (ConnectionError, RuntimeError) as e:  # the client went away while we were sending
            log.info("live client gone: %s", e)
        except Exception as e:  # e.g. the recording folder is not writable: this client hears it, others go on
            log.exception("live stream could not run")
            free()
            await _send_error(ws, "server_error", f"the server could not run this stream: {e}")
        finally:
            free()
            if not ws.closed:
                await ws.close()
        return ws

    async def _start(self, ws: web.WebSocketResponse, vae, dit) -> LiveStream | None:
        try:
            msg = await ws.receive(timeout=START_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise ProtocolError("timeout", f"no start message within {START_TIMEOUT_S:g} s") from None
        if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
            return None
        if msg.type != WSMsgType.TEXT:
            raise ProtocolError("bad_message", "the first message must be the JSON start message, not binary data")
        d, loop = dit.cfg, asyncio.get_running_loop()
        # decoding a portrait takes a while: off the event loop, which is moving other streams' frames
        req = await on_passing_thread(parse_start, msg.data, d.resolution)
        portrait = req.portrait
        if portrait is None:
            portrait = await on_passing_thread(self.bundled_portrait, d.resolution)
        if len(self.active) >= self.max_streams:  # another stream started while this one was starting
            raise ProtocolError("busy", f"the server is busy: {len(self.active)} of {self.max_streams} live "
                                        f"stream(s) running; try again when one ends")
        recorder = open_recording(self.record_dir, d.fps, d.resolution, req.sample_rate) if req.record else None
        live = LiveStream(req, loop, self.frame_queue, int(self.max_audio_ahead_s * req.sample_rate))
        self.active.add(live)
        cfg = self.stream_config(dit)
        threading.Thread(target=generate, args=(live, vae, dit, portrait, recorder, cfg, self.overlap_decode), daemon=True,
                         name="rest-live-stream").start()
        await ws.send_json({"type": "ready", "fps": d.fps, "resolution": d.resolution, "sample_rate": req.sample_rate,
                            "pcm": req.pcm, "format": req.format, "seed": req.seed, "record": req.record,
                            "chunk_video_frames": cfg.chunk_frames * d.temporal_compression,
                            "lookahead_video_frames": chunk_lookahead_frames(d), "compute_s_per_chunk": self.compute_s,
                            "samples_per_frame": req.sample_rate / d.fps, "frame_queue": self.frame_queue,
                            "max_audio_ahead_s": self.max_audio_ahead_s})
        return live

    async def _run(self, ws: web.WebSocketResponse, live: LiveStream):
        sender = asyncio.ensure_future(_send_frames(ws, live))
        try:
            async for msg in ws:
                if msg.type == WSMsgType.BINARY:
                    live.push_audio(parse_pcm(msg.data, live.request.pcm, live.request.sample_rate))
                elif msg.type == WSMsgType.TEXT:
                    if _parse_control(msg.data) == "stop":
                        live.audio.put(_END)
                        break
                else:
                    break
            else:  # the client closed (or vanished) without stop
                return
            await sender  # stop: the rest of the audio is generated and sent
        finally:
            if not sender.done():
                sender.cancel()
                await asyncio.gather(sender, return_exceptions=True)


def _parse_control(text: str) -> str:
    try:
        msg = json.loads(text)
    except json.JSONDecodeError as e:
        raise ProtocolError("bad_json", f"message is not JSON ({e})") from None
    kind = msg.get("type") if isinstance(msg, dict) else None
    if kind != "stop":
        raise ProtocolError("bad_message", f'unknown message {kind!r} during a stream (only {{"type": "stop"}}; '
                                           f"audio goes as binary PCM)")
    return kind


async def _send_error(ws: web.WebSocketResponse, code: str, message: str):
    log.info("live client error %s: %s", code, message)
    if not ws.closed:
        try:
            await ws.send_json({"type": "error", "code": code, "message": message})
        except (ConnectionError, RuntimeError):
            pass


async def _send_frames(ws: web.WebSocketResponse, live: LiveStream):
    """Send queued frames as fast as the client takes them, stats once a second, then "end"."""
    next_stats = time.monotonic() + STATS_EVERY_S
    while True:
        if not live.frames and not live.done:
            live.wake.clear()
            try:
                await asyncio.wait_for(live.wake.wait(), timeout=max(0.01, next_stats - time.monotonic()))
            except asyncio.TimeoutError:
                pass
        while live.frames:
            await ws.send_bytes(live.frames.popleft())
            live.sent += 1
        if time.monotonic() >= next_stats:
            await ws.send_json({"type": "stats", **live.stats()})
            next_stats = time.monotonic() + STATS_EVERY_S
        if live.done and not live.frames:
            break
    if live.error is not None:
        await _send_error(ws, "generation_failed", f"generation failed: {live.error}")
    else:
        await ws.send_json({"type": "end", "recording": live.recording, **live.stats()})


def add_live_routes(target, models: ModelsProvider, max_streams: int = 1, **kw) -> LiveServer:
    """Add the live page and WebSocket under /rest/live to an aiohttp `web.Application` or `RouteTableDef`
    (ComfyUI's `PromptServer.instance.routes`). `models()` returns (vae, dit) ready to run; it is called before
    every stream (and for /info), so a host can load them onto their device then; it should be cheap."""
    server = LiveServer(models, max_streams, **kw)
    routes = [("/ws", server.websocket), ("/info", server.info), ("/portrait.png", server.portrait),
              ("", _redirect_to_page), ("/", server.page), ("/{name}", server.page)]
    for path, handler in routes:
        if isinstance(target, web.Application):
            target.router.add_get(PREFIX + path, handler)
        else:
            target.get(PREFIX + path)(handler)
    return server


async def _redirect_to_page(request: web.Request):
    raise web.HTTPFound(PREFIX + "/")


LIVE_KEY = web.AppKey("live", LiveServer)


def make_app(models: ModelsProvider, max_streams: int = 1, **kw) -> web.Application:
    """The standalone server's application: the live routes, and / sends the browser to the page."""
    app = web.Application()
    app[LIVE_KEY] = add_live_routes(app, models, max_streams, **kw)
    app.router.add_get("/", _redirect_to_page)
    return app


def default_max_streams() -> int:
    """What the machine sustains in real time: one stream per GPU, one on a CPU."""
    return max(1, torch.cuda.device_count())


def rss_mb() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError, IndexError):
        return None


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


__all__ = ["add_live_routes", "make_app", "LiveServer", "ProtocolError", "FRAME_HEADER", "decode_frame_header",
           "sample_position", "SAMPLE_RATES", "default_max_streams", "is_loopback"]
