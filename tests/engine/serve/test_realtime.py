"""The Realtime WebSocket endpoint (`serve --realtime`), driven by the official `openai` SDK's realtime client —
a client nobody here wrote — and by raw websockets for what the SDK will not send (malformed events, bad auth).

One daemon for the module (tiny demo model, short replies, a token). A turn with server VAD on a spoken WAV must
give the transcript and audio that the engine gives the ZMQ client for the same committed audio and seed.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import random
import signal
from pathlib import Path

import numpy as np
import openai
import pytest
import soundfile as sf
import soxr
import websockets
from websockets.exceptions import InvalidStatus

from omni2.engine.client import Client
from tests.engine.serve.daemon_harness import Daemon, free_port

DATA = Path(__file__).resolve().parents[2] / "data"
TOKEN = "realtime-test-token"
RATE = 24000


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    root = tmp_path_factory.mktemp("realtime")
    (root / "token").write_text(TOKEN)
    port = free_port()
    d = Daemon(["--realtime", f"127.0.0.1:{port}", "--demo", "--token-file", str(root / "token"),
                "--max-new-tokens", "12"], root / "daemon.log", token=TOKEN)
    d.realtime_port = port
    d.wait_ready()
    yield d
    assert d.stop() == 0, d.log()
    assert not d.leftovers()


def wav(name: str, rate: int = RATE) -> np.ndarray:
    a, sr = sf.read(DATA / name, dtype="float32")
    return np.clip(np.rint(soxr.resample(a, sr, rate) * 32767), -32768, 32767).astype(np.int16)


def spoken_turn(rate: int) -> np.ndarray:
    """The spoken question between 0.5 s of silence before and 1 s after: one turn for the server VAD."""
    return np.concatenate([np.zeros(rate // 2, np.int16), wav("question.wav", rate), np.zeros(rate, np.int16)])


def b64(pcm: np.ndarray) -> str:
    return base64.b64encode(pcm.astype("<i2").tobytes()).decode()


def sdk(daemon, key: str = TOKEN):
    client = openai.AsyncOpenAI(api_key=key, base_url=f"http://127.0.0.1:{daemon.realtime_port}/v1")
    return client.realtime.connect(model="omni2")


async def append(conn, pcm: np.ndarray, step: int = 4800) -> None:
    for i in range(0, pcm.size, step):
        await conn.input_audio_buffer.append(audio=b64(pcm[i:i + step]))


async def until(conn, *types: str, log: list | None = None):
    """Events up to and including the first of `types` (all of them kept in `log`)."""
    async for ev in conn:
        if log is not None:
            log.append(ev)
        if ev.type == "error" and "error" not in types:
            raise AssertionError(f"error event: {ev.error}")
        if ev.type in types:
            return ev
    raise AssertionError("connection closed")


@contextlib.asynccontextmanager
async def raw(daemon):
    """A bare WebSocket to the endpoint (GA event names), past its session.created."""
    url = f"ws://127.0.0.1:{daemon.realtime_port}/v1/realtime"
    async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {TOKEN}"},
                                  max_size=None) as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"
        yield ws


async def manual_turn(conn, pcm: np.ndarray, up_to: str = "response.done", log: list | None = None):
    """With turn detection off: the turn appended, committed and answered; its events up to `up_to`."""
    await append(conn, pcm)
    await conn.input_audio_buffer.commit()
    await conn.response.create()
    return await until(conn, up_to, log=log)


def reply_of(events: list) -> tuple[str, np.ndarray]:
    text = "".join(e.delta for e in events if e.type == "response.output_audio_transcript.delta")
    pcm = [np.frombuffer(base64.b64decode(e.delta), "<i2") for e in events if e.type == "response.output_audio.delta"]
    return text, np.concatenate(pcm) if pcm else np.zeros(0, np.int16)


def assert_engine_reply(daemon, span: np.ndarray, rate: int, text: str, audio: np.ndarray) -> None:
    """The committed span, sent by the ZMQ client to a fresh session with the same (default) seed and voice, gets
    the transcript and PCM16 the Realtime client got."""
    with daemon.client() as c:
        s = c.open()
        ref = s.reply(span, rate)
        s.close()
    assert text and ref.text == text
    assert np.array_equal(np.clip(np.rint(ref.audio * 32767), -32768, 32767).astype(np.int16), audio)


def test_a_server_vad_turn_equals_the_engine_reply(daemon):
    pcm = spoken_turn(RATE)

    async def talk():
        events = []
        async with sdk(daemon) as conn:
            created = await until(conn, "session.created")
            assert created.session.audio.input.turn_detection.type == "server_vad"
            await append(conn, pcm)
            started = await until(conn, "input_audio_buffer.speech_started", log=events)
            stopped = await until(conn, "input_audio_buffer.speech_stopped", log=events)
            done = await until(conn, "response.done", log=events)
        return started, stopped, done, events

    started, stopped, done, events = asyncio.run(talk())
    # The VAD heard the question where it is: after the leading 0.5 s of silence, less the 300 ms padding.
    assert 150 <= started.audio_start_ms <= 300, started.audio_start_ms
    assert 4300 <= stopped.audio_end_ms <= 4900, stopped.audio_end_ms
    kinds = [e.type for e in events]
    for k in ("input_audio_buffer.committed", "response.created", "response.output_item.added",
              "response.output_audio.done", "response.output_audio_transcript.done", "response.output_item.done"):
        assert k in kinds, (k, kinds)
    # The conversation's items as a client keeps them: the user's, complete when committed; the assistant's,
    # added before any content event and done after its output item.
    items = [(e.type, e.item.id, e.item.role) for e in events if e.type.startswith("conversation.item.")]
    committed = next(e for e in events if e.type == "input_audio_buffer.committed")
    added = next(e for e in events if e.type == "response.output_item.added")
    assert items == [("conversation.item.added", committed.item_id, "user"),
                     ("conversation.item.done", committed.item_id, "user"),
                     ("conversation.item.added", added.item.id, "assistant"),
                     ("conversation.item.done", added.item.id, "assistant")], items
    assert kinds.index("conversation.item.added", kinds.index("response.output_item.added")) < kinds.index(
        "response.content_part.added") and kinds[-2] == "conversation.item.done"
    assert done.response.status in ("completed", "incomplete")
    text, audio = reply_of(events)
    assert text and audio.size > RATE // 10
    assert done.response.output[0].content[0].transcript == text
    assert float(done.response.metadata["omni2_first_audio"]) > 0

    assert_engine_reply(daemon, pcm[started.audio_start_ms * RATE // 1000: stopped.audio_end_ms * RATE // 1000],
                        RATE, text, audio)


def test_turns_keep_the_streams_clock_across_a_clear_and_a_new_rate(daemon):
    """audio_start_ms / audio_end_ms count from the start of the session's input stream, also after a clear and a
    change of input rate (each restarts the turn detector), and the committed turn is the audio they name. A refused
    update changes nothing: the rate check comes before the engine is asked about the voice."""
    rate = 16000
    pcm = spoken_turn(rate)

    async def talk():
        async with sdk(daemon) as conn:
            await until(conn, "session.created")
            await append(conn, np.zeros(RATE, np.int16))  # the stream's first second, then thrown away
            await conn.session.update(session={"type": "realtime", "audio": {
                "input": {"format": {"type": "audio/pcm", "rate": rate}}, "output": {"voice": "nobody"}}})
            refused = await until(conn, "error")
            await conn.input_audio_buffer.clear()
            await until(conn, "input_audio_buffer.cleared")
            await conn.session.update(session={"type": "realtime", "audio": {
                "input": {"format": {"type": "audio/pcm", "rate": rate}}}})
            updated = await until(conn, "session.updated")
            await append(conn, pcm, step=3200)
            started = await until(conn, "input_audio_buffer.speech_started")
            stopped = await until(conn, "input_audio_buffer.speech_stopped")
            events = []
            await until(conn, "response.done", log=events)
        return refused, updated, started, stopped, events

    refused, updated, started, stopped, events = asyncio.run(talk())
    assert (refused.error.code, refused.error.param) == ("invalid_value", "audio.input.format"), refused.error
    assert updated.session.audio.input.format.rate == rate and updated.session.audio.output.voice == "default"
    # The question starts 1.5 s into the stream (the padding puts the turn 300 ms before the speech).
    assert 1150 <= started.audio_start_ms <= 1350, started.audio_start_ms
    assert 5200 <= stopped.audio_end_ms <= 5950, stopped.audio_end_ms
    text, audio = reply_of(events)
    assert_engine_reply(daemon, pcm[(started.audio_start_ms - 1000) * rate // 1000:
                                    (stopped.audio_end_ms - 1000) * rate // 1000], rate, text, audio)


def test_a_turn_keeps_its_rate_and_waits_for_response_create_when_asked(daemon):
    """Turn detection on with create_response false: a turn whose speech stops is committed, not answered, until
    response.create (which then starts it: no response was begun already). The committed audio keeps the rate it
    was sent at though the input rate changes before it is answered; the reply equals the engine's for that audio,
    and its item's content is an output_audio part. A truncate while the response streams is refused."""
    pcm = spoken_turn(RATE)

    async def talk():
        events = []
        async with sdk(daemon) as conn:
            await until(conn, "session.created")
            await conn.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": {
                "type": "server_vad", "create_response": False}}}})
            updated = await until(conn, "session.updated")
            await append(conn, pcm)
            started = await until(conn, "input_audio_buffer.speech_started")
            stopped = await until(conn, "input_audio_buffer.speech_stopped")
            await until(conn, "input_audio_buffer.committed")
            await conn.input_audio_buffer.clear()  # what followed the turn: a new rate needs an empty buffer
            await until(conn, "input_audio_buffer.cleared")
            await conn.session.update(session={"type": "realtime", "audio": {"input": {
                "format": {"type": "audio/pcm", "rate": 16000}}}})
            await until(conn, "session.updated")
            await conn.response.create()
            await until(conn, "response.created")
            await conn.conversation.item.truncate(item_id="item_x", content_index=0, audio_end_ms=0)
            refused = await until(conn, "error", log=events)
            done = await until(conn, "response.done", log=events)
        return updated, started, stopped, refused, done, events

    updated, started, stopped, refused, done, events = asyncio.run(talk())
    assert updated.session.audio.input.turn_detection.create_response is False
    assert refused.error.code == "conversation_already_has_active_response"
    item = next(e for e in events if e.type == "response.output_item.done").item
    assert item.content[0].type == "output_audio"
    text, audio = reply_of(events)
    assert item.content[0].transcript == text
    assert_engine_reply(daemon, pcm[started.audio_start_ms * RATE // 1000: stopped.audio_end_ms * RATE // 1000],
                        RATE, text, audio)


def beta_sdk(daemon):
    """The SDK's beta namespace (`OpenAI-Beta: realtime=v1`): beta event names and session fields."""
    client = openai.AsyncOpenAI(api_key=TOKEN, base_url=f"http://127.0.0.1:{daemon.realtime_port}/v1",
                                websocket_base_url=f"ws://127.0.0.1:{daemon.realtime_port}/v1")
    return client.beta.realtime.connect(model="omni2")


def test_response_cancel_mid_reply_then_the_next_turn(daemon):
    """Through the SDK's beta client, so the beta spellings are covered too: `turn_detection` at the top of the
    session, `response.audio.delta` / `response.audio_transcript.delta` instead of the GA names."""
    question = wav("question.wav")

    async def talk():
        async with beta_sdk(daemon) as conn:
            created = await until(conn, "session.created")
            assert created.session.turn_detection.type == "server_vad"
            await conn.session.update(session={"turn_detection": None})
            updated = await until(conn, "session.updated")
            assert updated.session.turn_detection is None
            await append(conn, question)
            await conn.input_audio_buffer.commit()
            committed = await until(conn, "input_audio_buffer.committed")
            user = await until(conn, "conversation.item.created")  # beta: created, no added/done
            await conn.response.create()
            log = []
            await until(conn, "response.audio.delta", log=log)
            assistant = next(e for e in log if e.type == "conversation.item.created")
            assert (user.item.id, user.item.role) == (committed.item_id, "user")
            assert assistant.item.role == "assistant" and assistant.previous_item_id == user.item.id
            await conn.response.cancel()
            cancelled = await until(conn, "response.done")
            # Nothing to cancel now: an error event, and the connection goes on.
            await conn.response.cancel()
            err = await until(conn, "error")
            second = await manual_turn(conn, question)
        return cancelled, err, second

    cancelled, err, second = asyncio.run(talk())
    assert cancelled.response.status == "cancelled"
    assert cancelled.response.status_details.reason == "client_cancelled"
    assert err.error.code == "response_cancel_not_active"
    assert second.response.status in ("completed", "incomplete")
    assert second.response.metadata["omni2_turn"] == "1"  # the engine's second turn of this session


def test_barge_in_cancels_the_reply_and_the_next_turn_is_answered(daemon):
    question, interruption = wav("question.wav"), wav("interruption.wav")
    silence = np.zeros(RATE // 2, np.int16)

    async def talk():
        events = []
        async with sdk(daemon) as conn:
            await until(conn, "session.created")
            await append(conn, np.concatenate([question, silence, silence]))
            await until(conn, "response.output_audio.delta", log=events)
            await append(conn, np.concatenate([interruption, silence, silence]))
            first = await until(conn, "response.done", log=events)
            second = await until(conn, "response.done", log=events)
        return first, second, [e.type for e in events]

    first, second, kinds = asyncio.run(talk())
    assert first.response.status == "cancelled"
    assert first.response.status_details.reason == "turn_detected"
    assert kinds.count("input_audio_buffer.speech_started") == 2
    assert kinds.index("input_audio_buffer.speech_started", kinds.index("response.created")) < kinds.index(
        "response.done")
    assert second.response.status in ("completed", "incomplete")
    assert second.response.output[0].content[0].transcript


def test_wrong_or_missing_token_is_refused_at_the_handshake(daemon):
    async def connect(headers):
        url = f"ws://127.0.0.1:{daemon.realtime_port}/v1/realtime"
        with pytest.raises(InvalidStatus) as e:
            async with websockets.connect(url, additional_headers=headers):
                pass
        return e.value.response.status_code

    assert asyncio.run(connect({"Authorization": "Bearer nope"})) == 401
    assert asyncio.run(connect({})) == 401
    with pytest.raises(InvalidStatus):
        asyncio.run(sdk(daemon, key="wrong").__aenter__())


def fuzz_messages(n: int, seed: int = 0) -> list:
    """Messages a careless or hostile client might send: not JSON, not objects, unknown types, bad fields."""
    rng = random.Random(seed)
    good = ['{"type": "session.update", "session": {}}', '{"type": "input_audio_buffer.append", "audio": ""}']
    shapes = [
        lambda: "".join(chr(rng.randrange(32, 127)) for _ in range(rng.randrange(0, 40))),
        lambda: json.dumps(rng.choice([None, 1, "x", [], [1, 2], True])),
        lambda: json.dumps({"type": rng.choice(["", "nope", "response.audio", "session", 7, None])}),
        lambda: json.dumps({"type": "input_audio_buffer.append", "audio": rng.choice(["@@@", "QQ=", 5, None, "QUJD"])}),
        lambda: json.dumps({"type": "session.update", "session": rng.choice([
            None, [], {"audio": {"input": {"format": {"type": "audio/pcmu"}}}},
            {"audio": {"input": {"format": {"type": "audio/pcm", "rate": rng.choice([1, 10**9, "24k"])}}}},
            {"audio": {"input": {"turn_detection": {"type": "semantic_vad"}}}},
            {"audio": {"input": {"turn_detection": {"threshold": rng.choice([-1, 2, "x"])}}}},
            {"output_modalities": rng.choice([[], ["video"], "audio"])}, {"voice": rng.choice([3, None, []])}])}),
        lambda: json.dumps({"type": rng.choice(["response.cancel", "input_audio_buffer.commit",
                                                "conversation.item.truncate", "response.create"])}),
        lambda: rng.choice(good)[: rng.randrange(1, 30)],
        lambda: bytes(rng.randrange(256) for _ in range(rng.randrange(1, 20))),
    ]
    return [rng.choice(shapes)() for _ in range(n)]


def test_malformed_messages_get_error_events_and_the_connection_keeps_working(daemon):
    async def fuzz():
        async with raw(daemon) as ws:
            await ws.send(json.dumps({"type": "session.update", "session": {
                "audio": {"input": {"turn_detection": None}}}}))
            assert json.loads(await ws.recv())["type"] == "session.updated"
            errors = codes = 0
            seen = set()
            for msg in fuzz_messages(2000):
                await ws.send(msg)
                ev = json.loads(await asyncio.wait_for(ws.recv(), 10))
                if ev["type"] == "error":
                    errors += 1
                    seen.add(ev["error"]["code"])
                    codes += bool(ev["error"]["code"] and ev["error"]["message"])
            # An append over the per-message limit (15 MiB of base64): refused, nothing kept.
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": "A" * ((15 << 20) + 4)}))
            big = json.loads(await ws.recv())
            await ws.send(json.dumps({"type": "input_audio_buffer.commit", "event_id": "evt_mine"}))
            empty = json.loads(await ws.recv())
            await ws.send(json.dumps({"type": "session.update", "session": {"voice": "default"}}))
            alive = json.loads(await ws.recv())
            odd = []  # shapes that once escaped the handlers (TypeError, RecursionError) and closed the connection
            for msg in (json.dumps({"type": "session.update", "session": {"output_modalities": [["audio"]]}}),
                        json.dumps({"type": "session.update", "session": {"output_modalities": [{}]}}),
                        "[" * 100_000):
                await ws.send(msg)
                odd.append(json.loads(await ws.recv())["error"]["code"])
            # Committed turns that wait for response.create are bounded (each may hold 30 s of audio).
            for _ in range(8):
                await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": b64(np.ones(240, np.int16))}))
                await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
                committed = json.loads(await ws.recv())
                assert committed["type"] == "input_audio_buffer.committed"
                # The user item exists (GA: added, then done: it is complete), after the one before it.
                added, done = json.loads(await ws.recv()), json.loads(await ws.recv())
                assert (added["type"], done["type"]) == ("conversation.item.added", "conversation.item.done")
                assert added["item"]["id"] == done["item"]["id"] == committed["item_id"]
                assert added["previous_item_id"] == committed["previous_item_id"]
                assert added["item"]["role"] == "user" and added["item"]["content"][0]["type"] == "input_audio"
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": b64(np.ones(240, np.int16))}))
            await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
            full = json.loads(await ws.recv())
            return errors, codes, seen, big, empty, alive, odd, full

    errors, codes, seen, big, empty, alive, odd, full = asyncio.run(fuzz())
    assert odd == ["invalid_value", "invalid_value", "invalid_json"]
    assert full["error"]["code"] == "too_many_pending_turns"
    assert errors >= 1500 and codes == errors
    assert {"invalid_json", "invalid_event", "unknown_event_type", "invalid_value"} <= seen, seen
    assert big["error"]["code"] == "input_audio_buffer_append_too_large"
    assert empty["error"]["code"] == "input_audio_buffer_commit_empty"
    assert empty["error"]["event_id"] == "evt_mine"
    assert alive["type"] == "session.updated"
    with Client(daemon.address, token=TOKEN) as c:  # and the daemon serves on
        assert c.ping() < 5


def test_truncate_cuts_the_answer_to_what_was_heard(daemon):
    """conversation.item.truncate at audio_end_ms: the next turn reads only the text the voice had reached there
    (Read-3-Write-10: 600 ms = 15 units of 40 ms, written in the second chunk, after 6 text tokens) — the same
    reply the ZMQ client gets after conversation.truncate(turn 0, 6 tokens). (The tiny model's babble does not
    change with the cut; that the thinker reads the cut answer is tests/stages/test_llm.py's, and that the
    engine names it tests/engine/runtime/test_engine.py's.)"""
    question, interruption = wav("question.wav"), wav("interruption.wav")

    async def turn(conn, pcm):
        events = []
        return await manual_turn(conn, pcm, log=events), events

    async def talk():
        async with sdk(daemon) as conn:
            await until(conn, "session.created")
            await conn.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": None}}})
            await until(conn, "session.updated")
            first, _ = await turn(conn, question)
            item = first.response.output[0].id
            await conn.conversation.item.truncate(item_id=item, content_index=0, audio_end_ms=600)
            truncated = await until(conn, "conversation.item.truncated")
            await conn.conversation.item.truncate(item_id="item_nope", content_index=0, audio_end_ms=0)
            unknown = await until(conn, "error")
            await conn.conversation.item.truncate(item_id=item, content_index=0, audio_end_ms=10**7)
            too_far = await until(conn, "error")
            second, events = await turn(conn, interruption)
        return first, truncated, unknown, too_far, second, events

    first, truncated, unknown, too_far, second, events = asyncio.run(talk())
    assert first.response.usage.output_tokens >= 9  # the cut falls inside the text
    assert int(first.response.metadata["omni2_audio_ms"]) == 40 * int(first.response.metadata["omni2_units"])
    assert truncated.audio_end_ms == 600 and truncated.item_id == first.response.output[0].id
    assert unknown.error.code == "item_truncate_invalid_item_id"
    assert too_far.error.code == "invalid_value"
    text, audio = reply_of(events)

    with daemon.client() as c:
        s = c.open()
        s.reply(question, RATE)
        assert s.truncate(0, 6) == 6
        ref = s.reply(interruption, RATE)
        s.close()
    assert ref.text == text
    assert np.array_equal(np.clip(np.rint(ref.audio * 32767), -32768, 32767).astype(np.int16), audio)


def chromium() -> str | None:
    """Debian's chromium (`make install` installs it where it can), or $OMNI2_CHROMIUM."""
    import os
    import shutil

    return os.environ.get("OMNI2_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def test_the_browser_demo_answers_the_microphone(daemon, tmp_path):
    """The --demo page in a real headless Chromium whose fake microphone plays a spoken question: it connects,
    server VAD ends the turn, the reply streams and plays (the page's own counters), and a screenshot is kept."""
    from playwright import sync_api

    exe = chromium()
    if exe is None:
        pytest.skip("no chromium (make install installs Debian's chromium where apt-get can run)")
    mic = tmp_path / "mic.wav"
    silence = np.zeros(RATE, np.int16)
    sf.write(mic, np.concatenate([silence, wav("question.wav"), silence, silence, silence]), RATE,
             subtype="PCM_16")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True, args=[
            "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={mic}%noloop", "--autoplay-policy=no-user-gesture-required",
            "--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{daemon.realtime_port}/")
            page.fill("#token", TOKEN)
            page.click("#start")
            page.wait_for_function("omni2.turns.length > 0 && omni2.turns[0].status !== 'in_progress'",
                                   timeout=120_000)
            page.wait_for_function("omni2.samplesPlayed > 0", timeout=30_000)
            state = page.evaluate("({connected: omni2.connected, deltas: omni2.deltas, played: omni2.samplesPlayed,"
                                  " turns: omni2.turns.map(t => ({status: t.status, first: t.firstAudioMs})),"
                                  " transcript: omni2.transcript, errors: omni2.errors})")
            page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
            # Speech over a finished reply that still plays: the page tells the server what was heard (here 1 s of
            # the item) so that the next turn reads only that; over a reply still streaming, the server cancels.
            barge_in = """(streaming) => {
                const sent = [], send0 = send;
                send = (e) => sent.push(e);
                heard = {id: "item_x", samples: 24000}; sources = [{stop() {}}]; current = streaming ? {} : null;
                onEvent({type: "input_audio_buffer.speech_started", audio_start_ms: 0});
                send = send0; current = null;
                return sent;
            }"""
            over_finished, over_streaming = page.evaluate(barge_in, False), page.evaluate(barge_in, True)
            page.click("#stop")
        finally:
            browser.close()
    assert state["connected"] and not state["errors"], state
    assert state["turns"][0]["status"] in ("completed", "incomplete")
    assert state["turns"][0]["first"] > 0  # ms from the VAD's end of speech to the first audio, as the page saw it
    assert state["deltas"] > 0 and state["played"] > 0
    assert state["transcript"]
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    assert over_finished == [{"type": "conversation.item.truncate", "item_id": "item_x", "content_index": 0,
                              "audio_end_ms": 1000}] and over_streaming == []


def test_one_append_longer_than_a_turn_becomes_two_turns(daemon):
    """40 s of unbroken speech in a single append: the first turn is committed at the engine's 30 s and the speech
    after it is the next turn (it was lost: the detector had already scored the whole append)."""
    speech_40s = np.tile(wav("question.wav"), 10)[: 40 * RATE]
    pcm = np.concatenate([np.zeros(RATE // 2, np.int16), speech_40s, np.zeros(3 * RATE, np.int16)])
    async def talk():
        async with raw(daemon) as ws:
            await ws.send(json.dumps({"type": "session.update", "session": {"audio": {"input": {"turn_detection": {
                "type": "server_vad", "silence_duration_ms": 1500, "create_response": False}}}}}))
            assert json.loads(await ws.recv())["type"] == "session.updated"
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": b64(pcm)}))
            events = []
            while sum(e["type"] == "input_audio_buffer.committed" for e in events) < 2:
                events.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
            return events

    events = asyncio.run(talk())
    starts = [e["audio_start_ms"] for e in events if e["type"] == "input_audio_buffer.speech_started"]
    stops = [e["audio_end_ms"] for e in events if e["type"] == "input_audio_buffer.speech_stopped"]
    assert len(starts) == len(stops) == 2, events
    assert 29_000 <= stops[0] - starts[0] <= 30_600  # committed at the cap (the span itself is cut at 30 s)
    assert stops[0] - 1_000 <= starts[1] <= stops[0] + 600  # the rest of the speech, at once
    assert abs(stops[1] - 40_500) <= 600, stops  # to the end of the speech


def test_a_reply_that_fails_mid_stream_closes_its_item(daemon):
    """The vocoder worker is killed while a reply streams: an error event, then the item the client was told of is
    closed (content_part.done, output_item.done and conversation.item.done, incomplete) before response.done
    (failed), whose output is that item. The worker comes back and the next turn is answered."""
    question = wav("question.wav")

    def kill_vocoder() -> int:
        with Client(daemon.address, token=TOKEN) as c:
            pid = c.status()["stages"]["vocoder"]["pid"]
        os.kill(pid, signal.SIGKILL)
        return pid

    async def talk():
        events = []
        async with sdk(daemon) as conn:
            await until(conn, "session.created")
            await conn.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": None}}})
            await until(conn, "session.updated")
            await manual_turn(conn, question, "response.output_audio.delta", log=events)
            killed = kill_vocoder()
            async for ev in conn:
                events.append(ev)
                if ev.type == "response.done":
                    break
            after = await manual_turn(conn, question)
        return killed, events, after

    killed, events, after = asyncio.run(talk())
    kinds = [e.type for e in events]
    tail = kinds[kinds.index("error"):]
    assert tail == ["error", "response.content_part.done", "response.output_item.done", "conversation.item.done",
                    "response.done"], kinds
    done = events[-1].response
    assert done.status == "failed" and [o.id for o in done.output] == [events[-2].item.id]
    assert events[-3].item.status == "incomplete" and events[kinds.index("error")].error.code == "worker_crashed"
    assert after.response.status in ("completed", "incomplete")
    with Client(daemon.address, token=TOKEN) as c:
        assert c.status()["stages"]["vocoder"]["pid"] != killed


def test_a_commit_mid_speech_commits_the_item_speech_started_named(daemon):
    async def talk():
        async with raw(daemon) as ws:
            await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                      "audio": b64(np.concatenate([np.zeros(RATE // 2, np.int16),
                                                                   wav("question.wav")]))}))
            started = json.loads(await ws.recv())
            await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
            committed = json.loads(await ws.recv())
            return started, committed

    started, committed = asyncio.run(talk())
    assert started["type"] == "input_audio_buffer.speech_started", started
    assert committed["type"] == "input_audio_buffer.committed" and committed["item_id"] == started["item_id"]
