"""The gradio demo (``demo/app.py``): its chat logic in-process, then end to end through ``gradio_client``.

One demo is launched for the module around the tiny random engine, with a 0.05 MB upload limit so the
oversize case needs no big file. Every request asks for short replies and 4×4-token images.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import PIL.Image
import pytest
import torch

gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

from anygen.api import AnyGen, holed  # noqa: E402
from anygen.generation.generator import SamplingDefaults  # noqa: E402
from anygen.generation.sampling import SamplingConfig  # noqa: E402
from anygen.testing import random_engine  # noqa: E402
from demo import app  # noqa: E402
from demo.app import RANDOM_NOTICE, ChatOptions, ChatRunner, Conversation, build_demo  # noqa: E402
from tokenizers_mm.segments import Image  # noqa: E402

UPLOAD_LIMIT_MB = 0.05
FAST = dict(max_new_tokens=24, image_side=4, aspect="1:1", video_frames=1, video_side=2, seed=0, preview_every=1)


@pytest.fixture(scope="module")
def engine() -> AnyGen:
    return random_engine("tiny")


@pytest.fixture(scope="module")
def url(engine, tmp_path_factory):
    demo = build_demo(engine, notice=RANDOM_NOTICE, max_upload_mb=UPLOAD_LIMIT_MB,
                      workdir=tmp_path_factory.mktemp("demo"))
    _, url, _ = demo.queue(default_concurrency_limit=4).launch(
        prevent_thread_lock=True, server_port=_free_port(), server_name="127.0.0.1", quiet=True)
    yield url
    demo.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _client(url: str):
    return gradio_client.Client(url, verbose=False, download_files=False)


def _send(client, text: str, files: list[str | Path] = (), **options) -> list[dict]:
    message = {"text": text, "files": [gradio_client.handle_file(str(f)) for f in files]}
    chat, _ = client.predict(message, **{**FAST, **options}, api_name="/chat")
    return chat


def _texts(chat: list[dict], role: str) -> list[str]:
    return [c["text"] for m in chat if m["role"] == role for c in m["content"] if c.get("type") == "text"]


def _files(chat: list[dict], role: str = "assistant") -> list[str]:
    out = []
    for m in chat:
        for c in m["content"]:
            if m["role"] == role and c.get("type") == "file":
                f = c["file"]
                out.append(f if isinstance(f, str) else f["path"])
    return out


def _png(path: Path, size: int = 24) -> Path:
    PIL.Image.new("RGB", (size, size), "red").save(path)
    return path


# -- in-process: the chat logic ---------------------------------------------------------------------------------
def test_importing_builds_and_launches_nothing():
    assert not any(isinstance(v, (gr.Blocks, AnyGen, ChatRunner)) for v in vars(app).values())
    assert callable(app.build_demo) and callable(app.main)


@pytest.mark.parametrize("aspect, expected", [("1:1", (8, 8)), ("16:9", (4, 8)), ("3:4", (8, 6)), ("auto", None)])
def test_image_size_follows_aspect(aspect, expected):
    assert ChatOptions(image_side=8, aspect=aspect).image_size(16, 16) == expected


def test_controls_start_at_the_checkpoint_sampling(engine):
    tuned = AnyGen(engine.model, engine.tokenizer, sampling_defaults=SamplingDefaults(
        image=SamplingConfig(temperature=0.3, top_k=7, guidance_scale=4.5, image_guidance_scale=1.5),
        video=SamplingConfig(temperature=0.9, guidance_scale=2.0)))
    options = ChatOptions.for_engine(tuned)
    assert (options.image_temperature, options.image_top_k, options.image_guidance) == (0.3, 7, 4.5)
    assert options.image_source_guidance == 1.5
    assert (options.video_temperature, options.video_guidance) == (0.9, 2.0)
    settings = options.settings(tuned)
    assert settings.image == SamplingConfig(temperature=0.3, top_k=7, guidance_scale=4.5, image_guidance_scale=1.5)
    off = ChatOptions.from_values({**options.__dict__, "image_source_guidance": 0}).settings(tuned)
    assert off.image.image_guidance_scale is None  # the slider's 0 is plain guidance
    assert settings.text == SamplingDefaults().text


def test_video_controls_start_at_the_trained_clip_where_the_tokenizer_records_it(engine, monkeypatch):
    v = engine.tokenizer.vocab
    assert (ChatOptions.for_engine(engine).video_frames, ChatOptions.for_engine(engine).video_side) == (
        min(2, v.max_frames), min(4, v.max_height, v.max_width))  # unknown: the small default
    monkeypatch.setattr(engine.tokenizer, "video_frames", 5)
    t, h, w = engine.tokenizer.video_grid
    options = ChatOptions.for_engine(engine)
    assert (options.video_frames, options.video_side) == (t, min(h, w))
    assert options.settings(engine).video_size == (t, min(h, w), min(h, w))


def test_negatives_are_one_per_line():
    assert ChatOptions(negatives=" a red circle moves down \n\n a red circle moves up\n").negative_texts() == [
        "a red circle moves down", "a red circle moves up"]
    assert ChatOptions().negative_texts() == []
    with pytest.raises(ValueError, match="negatives must be text, one per line, got list"):
        ChatOptions(negatives=["a"]).negative_texts()
    assert ChatOptions(negative_prompt=" a red circle moves down ").negative_prompt_text() == "a red circle moves down"
    with pytest.raises(ValueError, match="negative prompt must be text, got int"):
        ChatOptions(negative_prompt=3).negative_prompt_text()


def test_conversation_is_kept_as_tokens_and_images_are_not_reencoded(engine, tmp_path, monkeypatch):
    runner = ChatRunner(engine, tmp_path)
    calls = {"encode": 0}
    prompts = []
    encode, stream = engine.tokenizer.image.encode, engine.generator.stream

    def counting_encode(x):
        calls["encode"] += 1
        return encode(x)

    def recording_stream(seqs, settings):
        prompts.append(seqs[0])
        return stream(seqs, settings)

    monkeypatch.setattr(engine.tokenizer.image, "encode", counting_encode)
    monkeypatch.setattr(engine.generator, "stream", recording_stream)
    conv = Conversation()
    options = ChatOptions(**{**FAST, "upload_mode": "edit", "start_with": "image"})
    list(runner.respond({"text": "make it yellow", "files": [str(_png(tmp_path / "red.png"))]}, options, conv))
    list(runner.respond({"text": "and now blue", "files": []}, ChatOptions(**FAST), conv))

    assert calls["encode"] == 1  # the first turn's image, once; the second turn reuses its ids
    v = engine.tokenizer.vocab
    first, second = prompts
    assert first.ids[0] == v.bos and (first.ids == v.boi).any()
    turn1 = conv.turns[0].ids
    assert torch.equal(second.ids[:1 + len(turn1)], torch.cat([torch.tensor([v.bos]), turn1]))
    assert len(conv.turns) == 2 and not (conv.turns[1].ids == v.eos).any()
    assert engine.model.cache_valid is None  # the KV cache is released after each reply


def test_understood_images_keep_their_pixels_across_turns(engine, tmp_path, monkeypatch):
    runner = ChatRunner(engine, tmp_path)
    prompts = []
    stream = engine.generator.stream
    monkeypatch.setattr(engine.generator, "stream", lambda seqs, s: (prompts.append(seqs[0]), stream(seqs, s))[1])
    conv = Conversation()
    options = ChatOptions(**{**FAST, "upload_mode": "understand"})
    list(runner.respond({"text": "what is in the picture?", "files": [str(_png(tmp_path / "a.png"))]}, options, conv))
    list(runner.respond("and the colour?", options, conv))
    assert prompts[0].und_pixels.shape[0] == 1 and prompts[1].und_pixels.shape[0] == 1
    assert (prompts[1].ids == engine.tokenizer.vocab.und).sum() == engine.tokenizer.und_tokens


def test_oldest_turns_are_dropped_when_the_context_is_full(engine, tmp_path):
    runner = ChatRunner(engine, tmp_path)
    conv = Conversation()
    filler = torch.randint(0, 256, (250,))  # 250 byte-level text ids
    conv.turns = [app.Turn(filler), app.Turn(filler)]
    chat = list(runner.respond("a blue square", ChatOptions(**FAST), conv))[-1]
    assert len(conv.turns) == 2  # one filler dropped, this reply added
    assert any("dropped the" in m["content"] for m in chat if isinstance(m["content"], str))
    assert 1 + sum(len(t.ids) for t in conv.turns) <= engine.config.max_seq_len


def test_stop_releases_the_cache_and_keeps_the_app_working(engine, tmp_path):
    runner = ChatRunner(engine, tmp_path)
    conv = Conversation()
    options = ChatOptions(**{**FAST, "start_with": "image", "image_side": 16, "max_new_tokens": 300})
    replies = runner.respond("a red circle", options, conv)
    for _ in range(4):  # the user message, the canvas, two previews
        next(replies)
    assert engine.model.cache_valid is not None
    replies.close()  # what gradio does when Stop cancels the event
    assert engine.model.cache_valid is None
    assert conv.turns == [] and "stopped" in conv.messages[-1]["content"]
    chat = list(runner.respond("a blue square", ChatOptions(**FAST), conv))[-1]
    assert chat[-1]["role"] == "assistant" and len(conv.turns) == 1


def test_a_reply_cut_inside_an_image_is_not_kept_half_open(engine, tmp_path):
    v = engine.tokenizer.vocab
    ids = torch.tensor([5, 6, v.boi, v.h_token(2), v.w_token(2), v.image_offset, v.image_offset])
    assert ChatRunner(engine, tmp_path)._reply_ids(ids).tolist() == [5, 6]
    assert ChatRunner(engine, tmp_path)._reply_ids(torch.tensor([5, v.eos])).tolist() == [5]
    whole = [v.boi, v.h_token(1), v.w_token(1), v.image_offset, v.eol, v.eoi, 7]
    assert ChatRunner(engine, tmp_path)._reply_ids(torch.tensor(whole + [v.eos])).tolist() == whole


def _record_rows(engine, monkeypatch) -> list:
    """The ``RowDone`` of every row the engine's generator streams from now on (one per candidate)."""
    stream, rows = engine.generator.stream, []

    def recording_stream(seqs, settings):
        for event in stream(seqs, settings):
            if isinstance(event, app.RowDone):
                rows.append(event)
            yield event

    monkeypatch.setattr(engine.generator, "stream", recording_stream)
    return rows


def test_best_of_keeps_the_candidate_the_model_reads_best(engine, tmp_path, monkeypatch):
    runner = ChatRunner(engine, tmp_path)
    rows, scored = _record_rows(engine, monkeypatch), []

    def fake_score(contexts, texts):
        scored.append((contexts, texts))
        return [0.0, 2.0, 1.0][:len(contexts)]  # the second candidate reads back best

    monkeypatch.setattr(engine, "score", fake_score)
    conv = Conversation()
    options = ChatOptions(**{**FAST, "start_with": "image", "best_of": 3})
    chat = list(runner.respond("a red circle", options, conv))[-1]

    assert len(rows) == 3  # three candidates, drawn as one batch
    (contexts, texts), = scored
    assert texts == ["a red circle"] * 3 and all(type(c[0]) is app.Understand for c in contexts)
    kept = sorted(rows, key=lambda e: e.row)[1]
    assert torch.equal(conv.turns[0].ids[-len(runner._reply_ids(kept.ids)):], runner._reply_ids(kept.ids))
    shown = [m["content"] for m in chat if isinstance(m["content"], dict)]
    assert len(shown) == 1 and shown[0]["alt_text"] == "best of 3"  # one image in the chat: the kept one
    kept_image = next(s.image for s in kept.segments if isinstance(s, app.Image))
    assert list(PIL.Image.open(shown[0]["path"]).convert("RGB").getdata()) == list(kept_image.convert("RGB").getdata())
    assert "kept candidate 2" in chat[-1]["content"]


def test_best_of_reads_images_by_the_generation_paths_likelihood_when_asked(engine, tmp_path, monkeypatch):
    """rerank "likelihood": the candidates' codes are scored after the message by ``score_image`` (the third wins),
    the understanding path is not asked, and the chat says which reader kept it; a model without an understanding
    encoder reranks this way too."""
    runner = ChatRunner(engine, tmp_path)
    rows, scored = _record_rows(engine, monkeypatch), []

    def fake_score_image(contexts, images):
        scored.append((list(contexts), list(images)))
        return [0.0, 1.0, 2.0][:len(contexts)]

    monkeypatch.setattr(engine, "score_image", fake_score_image)
    monkeypatch.setattr(engine, "score", lambda *a, **k: pytest.fail("the understanding path was asked"))
    conv = Conversation()
    options = ChatOptions(**{**FAST, "start_with": "image", "best_of": 3, "rerank": "likelihood"})
    chat = list(runner.respond("a red circle", options, conv))[-1]
    (contexts, images), = scored
    drawn = {e.row: next(s for s in e.segments if isinstance(s, app.Image)) for e in rows}
    assert contexts == ["a red circle"] * 3
    assert all(torch.equal(im.codes, drawn[r].codes) for r, im in enumerate(images))  # the codes as drawn
    kept = sorted(rows, key=lambda e: e.row)[2]
    assert torch.equal(conv.turns[0].ids[-len(runner._reply_ids(kept.ids)):], runner._reply_ids(kept.ids))
    assert "kept candidate 3, the one whose codes the model's generation path finds most likely" in chat[-1]["content"]
    bad = ChatOptions(**{**FAST, "start_with": "image", "best_of": 3, "rerank": "pixels"})
    assert "best of N reads images by one of" in list(runner.respond("a red circle", bad, conv))[-1][-1]["content"]
    plain = ChatRunner(random_engine("tiny", und_encoder=None), tmp_path)
    rows = _record_rows(plain.engine, monkeypatch)
    chat = list(plain.respond("a red circle", options, Conversation()))[-1]  # its own score_image, not patched
    assert len(rows) == 3  # no understanding encoder: the likelihood still reranks
    notes = [m["content"] for m in chat if isinstance(m["content"], str)]
    assert not any("⚠️" in n for n in notes) and any("generation path finds most likely" in n for n in notes)


def test_best_of_reranks_an_image_to_text_reply_by_the_picture(engine, tmp_path, monkeypatch):
    """One uploaded picture, sampled text: N replies, scored by how likely the generation path finds the picture
    after each (``score_image``); the kept one replaces the first in the chat and in the model's context."""
    runner = ChatRunner(engine, tmp_path)
    rows, scored = _record_rows(engine, monkeypatch), []

    def fake_score_image(contexts, image):
        scored.append((list(contexts), image))
        return [float(len(c)) for c in contexts]  # the longest reply reads best

    monkeypatch.setattr(engine, "score_image", fake_score_image)
    conv = Conversation()
    options = ChatOptions(**{**FAST, "best_of": 4, "text_temperature": 1.0, "max_new_tokens": 12})
    message = {"text": "what is in the picture?", "files": [str(_png(tmp_path / "a.png"))]}
    chat = list(runner.respond(message, options, conv))[-1]

    assert len(rows) == 4  # four candidates, drawn as one batch
    texts = {e.row: "".join(s.text for s in e.segments if isinstance(s, app.Text)) for e in rows}
    (contexts, image), = scored
    assert sorted(contexts) == sorted(t for t in texts.values() if t) and len(contexts) >= 2
    assert isinstance(image, app.Image) and image.codes is not None  # the picture, VQ-encoded once
    best = max((r for r in texts if texts[r]), key=lambda r: (len(texts[r]), -r))
    kept = next(e for e in rows if e.row == best)
    assert torch.equal(conv.turns[0].ids[-len(runner._reply_ids(kept.ids)):], runner._reply_ids(kept.ids))
    notes = [m["content"] for m in chat if isinstance(m["content"], str)]
    assert any(f"kept reply {best + 1}," in n for n in notes)
    shown = "".join(m["content"] for m in chat if m["role"] == "assistant" and isinstance(m["content"], str))
    assert texts[best] in shown
    if best != 0 and texts[0] and texts[0] not in texts[best]:
        assert texts[0] not in shown  # the first candidate's reply was replaced, not kept beside the new one
    # greedy text gives one reply N times: it draws once and says so
    rows.clear()
    greedy = ChatOptions(**{**FAST, "best_of": 4, "text_temperature": 0.0, "max_new_tokens": 12})
    chat = list(runner.respond({"text": "and this?", "files": [str(_png(tmp_path / "b.png"))]}, greedy, conv))[-1]
    assert len(rows) == 1 and any("draws once" in m["content"] for m in chat if isinstance(m["content"], str))


def test_best_of_keeps_the_clip_that_reads_as_the_message_against_the_negatives(engine, tmp_path, monkeypatch):
    """A text → video reply with negatives draws N clips in one batch and keeps the one ``score_candidates``
    ranks first; the kept clip replaces the first one in the chat and in the model's context."""
    runner = ChatRunner(engine, tmp_path)
    rows, scored = _record_rows(engine, monkeypatch), []

    def fake_score_candidates(candidates, prompt, negatives=None, rerank="understanding"):
        scored.append((list(candidates), prompt, negatives))
        return [0.0, -1.0, 3.0][:len(candidates)]  # the third clip reads best

    monkeypatch.setattr(engine, "score_candidates", fake_score_candidates)
    saved, save_video = [], runner._save_video
    monkeypatch.setattr(runner, "_save_video", lambda conv, video: saved.append(video) or save_video(conv, video))
    conv = Conversation()
    negatives = "a red circle moves down\na red circle moves to the left"
    options = ChatOptions(**{**FAST, "start_with": "video", "best_of": 3, "negatives": negatives,
                             "max_new_tokens": 64})
    chat = list(runner.respond("a red circle moves up", options, conv))[-1]

    assert len(rows) == 3  # three candidates, drawn as one batch
    (candidates, prompt, given), = scored
    assert prompt == "a red circle moves up" and given == ["a red circle moves down", "a red circle moves to the left"]
    assert all(isinstance(c, app.Video) and c.codes is not None for c in candidates)
    kept = sorted(rows, key=lambda e: e.row)[2]
    assert torch.equal(conv.turns[0].ids[-len(runner._reply_ids(kept.ids)):], runner._reply_ids(kept.ids))
    kept_clip = next(s for s in kept.segments if isinstance(s, app.Video))
    assert torch.equal(candidates[2].codes, kept_clip.codes)
    videos = [m["content"] for m in chat if isinstance(m["content"], dict)]
    assert len(videos) == 1  # one video in the chat: the kept one, in the first one's place
    assert torch.equal(saved[-1].codes, kept_clip.codes) and videos[0]["path"].endswith(".mp4")
    assert "kept clip 3" in chat[-1]["content"]
    # without negatives a clip cannot be ranked: it draws once and says so
    rows.clear()
    plain = ChatOptions(**{**FAST, "start_with": "video", "best_of": 3, "max_new_tokens": 64})
    chat = list(runner.respond("a red circle moves up", plain, conv))[-1]
    assert len(rows) == 1 and any("draws once" in m["content"] for m in chat if isinstance(m["content"], str))


def test_negative_prompt_goes_to_every_candidates_guidance_twin_and_is_refused_unguided(engine, tmp_path,
                                                                                        monkeypatch):
    runner = ChatRunner(engine, tmp_path)
    seen, stream = [], engine.generator.stream
    monkeypatch.setattr(engine.generator, "stream",
                        lambda seqs, s, negatives=None: (seen.append(negatives), stream(seqs, s, negatives))[1])
    conv = Conversation()
    steered = ChatOptions(**{**FAST, "start_with": "video", "best_of": 2, "max_new_tokens": 64, "video_guidance": 2.0,
                             "negatives": "a red circle moves down", "negative_prompt": " a red circle moves down "})
    list(runner.respond("a red circle moves up", steered, conv))
    (twins,) = seen
    assert len(twins) == 2 and all(t.ids.tolist() == engine.encode_prompt("a red circle moves down").ids.tolist()
                                   for t in twins)
    assert len(conv.turns) == 1
    seen.clear()
    unguided = ChatOptions(**{**FAST, "start_with": "video", "max_images": 1, "max_new_tokens": 64,
                              "video_guidance": 1.0, "negative_prompt": "a red circle moves down"})
    chat = list(runner.respond("a red circle moves up", unguided, conv))[-1]
    assert "a negative prompt steers classifier-free guidance" in chat[-1]["content"] and len(conv.turns) == 1
    seen.clear()
    list(runner.respond("a red circle moves up", ChatOptions(**{**FAST, "start_with": "video"}), conv))
    assert seen == [None]  # no negative prompt: the empty context, as before


def test_best_of_draws_once_where_it_cannot_rerank(engine, tmp_path, monkeypatch):
    runner = ChatRunner(engine, tmp_path)
    batches = []
    stream = engine.generator.stream
    monkeypatch.setattr(engine.generator, "stream", lambda seqs, s: (batches.append(len(seqs)), stream(seqs, s))[1])
    conv = Conversation()
    chat = list(runner.respond("a red circle", ChatOptions(**{**FAST, "best_of": 4}), conv))[-1]  # start: auto
    assert batches == [1] and len(conv.turns) == 1
    assert any("draws once" in m["content"] for m in chat if isinstance(m["content"], str))


@pytest.mark.parametrize("best_of", [0, app.MAX_BEST_OF + 1, -1])
def test_best_of_out_of_range_is_a_message(engine, tmp_path, best_of):
    conv = Conversation()
    options = ChatOptions(**{**FAST, "start_with": "image", "best_of": best_of})
    chat = list(ChatRunner(engine, tmp_path).respond("a red circle", options, conv))[-1]
    assert f"best of must be an int from 1 (off) to {app.MAX_BEST_OF}" in chat[-1]["content"] and conv.turns == []


def test_main_reports_a_missing_checkpoint(tmp_path, capsys):
    assert app.main(["--checkpoint", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


# -- end to end: gradio_client against a launched demo ----------------------------------------------------------
def test_text_to_image_streams_previews_then_a_real_image(url):
    client = _client(url)
    job = client.submit({"text": "a red circle", "files": []}, **FAST, start_with="image", max_images=1,
                        api_name="/chat")
    updates = [chat for chat, _ in job]
    chat = job.result()[0]
    images = _files(chat)
    assert images, chat
    with PIL.Image.open(images[0]) as image:
        assert image.size == (32, 32)  # 4×4 tokens, 8× downsampling
    shown = {f for update in updates for f in _files(update)}
    assert len(shown) >= 3  # the grey canvas, row previews, the final image: each a fresh file
    assert _texts(chat, "user") == ["a red circle"]


def test_text_to_video_shows_an_mp4(url):
    chat = _send(_client(url), "a green triangle moves to the right", start_with="video", max_images=1,
                 max_new_tokens=64)
    videos = [f for f in _files(chat) if f.endswith(".mp4")]
    assert videos and Path(videos[0]).stat().st_size > 0, chat


def test_sessions_at_once_do_not_share_history(url):
    alice, bob = _client(url), _client(url)
    _send(alice, "alpha one")

    def submit(client, text):
        return client.submit({"text": text, "files": []}, **FAST, api_name="/chat")

    jobs = [submit(alice, "alpha two"), submit(bob, "bravo")]  # queued together, served in turn
    alice_chat, bob_chat = (job.result()[0] for job in jobs)
    assert _texts(alice_chat, "user") == ["alpha one", "alpha two"]
    assert _texts(bob_chat, "user") == ["bravo"]
    assert _texts(_client(url).predict(api_name="/new_chat")[0] or [], "user") == []


@pytest.mark.parametrize("name, content, error", [
    ("garbage.png", b"this is a text file, not a png" * 4, "not a readable image"),
    ("notes.xyz", b"hello", "unsupported file type"),
    ("huge.png", b"\x89PNG" + b"\0" * 80_000, "upload limit"),
    ("broken.mp4", b"\0\0\0\x18ftypmp42" + b"garbage" * 50, "broken.mp4"),
])
def test_bad_uploads_become_chat_messages_and_the_app_keeps_working(url, tmp_path, name, content, error):
    path = tmp_path / name
    path.write_bytes(content)
    client = _client(url)
    chat = _send(client, "what is this?", [path])
    message = chat[-1]["content"][0]["text"]
    assert error in message and "⚠️" in message and str(tmp_path) not in message
    chat = _send(client, "a red circle", [_png(tmp_path / "ok.png")], upload_mode="understand")
    assert _files(chat, "user") and "⚠️" not in chat[-1]["content"][0].get("text", "")


def test_a_prompt_that_cannot_fit_is_a_message(url):
    client = _client(url)
    chat = _send(client, "a red circle and a blue square " * 200)
    assert "context" in chat[-1]["content"][0]["text"]
    chat = _send(client, "a red circle")
    assert "⚠️" not in chat[-1]["content"][0].get("text", "")


def test_cancel_frees_the_engine_for_the_next_request(url, engine, monkeypatch):
    stream = engine.generator.stream

    def slow_stream(seqs, settings):  # a reply that surely lasts until the cancel arrives
        for event in stream(seqs, settings):
            time.sleep(0.05)
            yield event

    monkeypatch.setattr(engine.generator, "stream", slow_stream)
    client = _client(url)
    job = client.submit({"text": "a red circle", "files": []}, **{**FAST, "image_side": 16, "max_new_tokens": 400},
                        start_with="image", api_name="/chat")
    deadline = time.monotonic() + 30
    while not any(_files(chat) for chat, _ in job.outputs()) and time.monotonic() < deadline:
        time.sleep(0.02)  # until the reply's image is on screen: generation is under way
    assert engine.model.cache_valid is not None and not job.done()
    job.cancel()
    deadline = time.monotonic() + 30
    while engine.model.cache_valid is not None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.model.cache_valid is None
    monkeypatch.undo()
    chat = _send(client, "a blue square")
    assert _texts(chat, "user") == ["a red circle", "a blue square"]
    assert any("stopped" in t for t in _texts(chat, "assistant"))  # cut mid-reply, not finished


def test_regions_go_to_every_candidate_and_a_bad_line_is_said_in_the_chat(engine, tmp_path, monkeypatch):
    assert ChatOptions(regions=" 0,0,0.5,1: a red circle \n\n0.5,0,1,1:a blue square").region_list() == [
        ("a red circle", (0.0, 0.0, 0.5, 1.0)), ("a blue square", (0.5, 0.0, 1.0, 1.0))]
    runner = ChatRunner(engine, tmp_path)
    seen, stream = [], engine.generator.stream
    monkeypatch.setattr(engine.generator, "stream", lambda seqs, s, negatives=None, regions=None: (
        seen.append(regions), stream(seqs, s, negatives, regions))[1])
    conv = Conversation()
    options = ChatOptions(**{**FAST, "start_with": "image", "best_of": 2, "regions": "0,0,1,0.5: a red circle"})
    list(runner.respond("a blue square", options, conv))
    (rows,) = seen
    assert len(rows) == 2 and all(
        [(p.ids.tolist(), box) for p, box in row] == [(engine.encode_prompt("a red circle").ids.tolist(),
                                                       (0.0, 0.0, 1.0, 0.5))] for row in rows)
    assert len(conv.turns) == 1
    seen.clear()
    bad = ChatOptions(**{**FAST, "start_with": "image", "regions": "0,0,1,0.5: a red circle\n0,0,1: a blue square"})
    chat = list(runner.respond("a blue square", bad, conv))[-1]
    assert "regions, line 2: a region is X0,Y0,X1,Y1:TEXT" in chat[-1]["content"] and not seen
    list(runner.respond("a blue square", ChatOptions(**{**FAST, "start_with": "image"}), conv))
    assert seen == [None]  # no regions: the stream is called as before


def test_inpaint_redraws_the_boxes_of_the_edited_upload_and_a_bad_line_is_said_in_the_chat(engine, tmp_path,
                                                                                           monkeypatch):
    assert ChatOptions(inpaint=" 0,0,0.5,1 \n\n0.5,0.5,1,1").inpaint_boxes() == [(0.0, 0.0, 0.5, 1.0),
                                                                                 (0.5, 0.5, 1.0, 1.0)]
    runner = ChatRunner(engine, tmp_path)
    seen, stream = [], engine.generator.stream
    monkeypatch.setattr(engine.generator, "stream", lambda seqs, s, **rows: (
        seen.append((s, rows.get("inpaint"))), stream(seqs, s, **rows))[1])
    picture = _png(tmp_path / "red.png", 64)
    source = engine.tokenizer.image_codes(Image(PIL.Image.open(picture)))
    conv = Conversation()
    options = ChatOptions(**{**FAST, "start_with": "image", "upload_mode": "edit", "max_images": 1,
                             "max_new_tokens": 400, "inpaint": "0,0,0.5,0.5"})
    list(runner.respond({"text": "make it blue", "files": [str(picture)]}, options, conv))
    (settings, grids), = seen
    assert settings.image_size == tuple(source.shape)  # drawn at the picture's size, not the size control's
    (grid,) = grids
    h, w = source.shape
    assert bool((grid[:h // 2, :w // 2] == -1).all()) and int((grid == -1).sum()) == (h // 2) * (w // 2)
    assert torch.equal(grid[grid >= 0], source[grid >= 0])
    reply = engine.tokenizer.decode(conv.turns[-1].ids, pixels=False)
    drawn = [s for s in reply if isinstance(s, Image)][-1].codes  # the reply's image: the upload outside the box
    assert torch.equal(drawn[grid >= 0], source[grid >= 0])
    seen.clear()
    fresh = Conversation()
    chat = list(runner.respond("a blue square", options, fresh))[-1]
    assert "holds none written as VQ codes" in chat[-1]["content"] and not seen
    bad = ChatOptions(**{**FAST, "start_with": "image", "inpaint": "0,0,1"})
    chat = list(runner.respond("a blue square", bad, Conversation()))[-1]
    assert "inpaint, line 1: a box is X0,Y0,X1,Y1" in chat[-1]["content"] and not seen


@pytest.mark.parametrize("onto", ["empty", "last"])
def test_compose_draws_each_region_alone_onto_the_canvas_then_the_reply_copies_it(engine, tmp_path, monkeypatch,
                                                                                   onto):
    """The regions are drawn by ``compose_codes`` onto an empty picture (the shapes scenes' background) or the
    edited upload, best of N reranking each region there; the reply is one row that copies the composed picture."""
    from anygen.data.shapes import BACKGROUND

    runner = ChatRunner(engine, tmp_path)
    composed, streamed = [], []
    compose, stream = engine.compose_codes, engine.generator.stream
    monkeypatch.setattr(engine, "compose_codes", lambda *args: composed.append(args) or compose(*args))
    monkeypatch.setattr(engine.generator, "stream", lambda seqs, s, *args, **rows: (
        streamed.append((len(seqs), args, rows)), stream(seqs, s, *args, **rows))[1])
    monkeypatch.setattr(engine, "score_candidates", lambda drawn, text, negatives=None, rerank="understanding":
                        [0.0] * len(drawn))
    side = 4 * engine.tokenizer.image.downsample  # the reply's 4x4 codes (FAST)
    upload = _png(tmp_path / "red.png", side)
    regions = "0,0,0.5,0.5: a red circle\n0.5,0.5,1,1: a blue square"
    options = ChatOptions(**{**FAST, "start_with": "image", "max_images": 1, "max_new_tokens": 400,
                             "upload_mode": "edit" if onto == "last" else "understand", "regions": regions,
                             "canvas": onto, "best_of": 2})
    message = {"text": "two things", "files": [str(upload)] if onto == "last" else []}
    conv = Conversation()
    chat = list(runner.respond(message, options, conv))[-1]

    (context, canvases, routed, settings, negatives, n, grids, rerank), = composed
    picture = PIL.Image.open(upload) if onto == "last" else PIL.Image.new("RGB", (side, side), BACKGROUND)
    assert torch.equal(canvases[0], engine.tokenizer.image_codes(Image(picture)))
    assert [[(p.ids.tolist(), box) for p, box in row] for row in routed] == [[
        (engine.encode_prompt("a red circle").ids.tolist(), (0.0, 0.0, 0.5, 0.5)),
        (engine.encode_prompt("a blue square").ids.tolist(), (0.5, 0.5, 1.0, 1.0))]]
    assert n == 2 and negatives is None and grids is None and rerank == "understanding"
    draw, reply = streamed  # the regions drawn (2 regions x best of 2) by compose_codes, then the reply
    assert draw[0] == 4 and reply[0] == 1 and "regions" not in reply[2]
    (grid,) = reply[2]["inpaint"]
    assert bool((grid >= 0).all())  # nothing left to draw: the reply copies the composed picture
    drawn = [s for s in engine.tokenizer.decode(conv.turns[-1].ids, pixels=False) if isinstance(s, Image)][-1]
    assert torch.equal(drawn.codes, grid)
    outside = holed(canvases[0], [(0, 0, 0.5, 0.5), (0.5, 0.5, 1, 1)], "boxes") >= 0
    assert torch.equal(grid[outside], canvases[0][outside])
    assert any("composing 2 region(s)" in m["content"] for m in chat if isinstance(m["content"], str))


def test_compose_with_inpaint_puts_the_drawing_into_the_edited_uploads_boxes(engine, tmp_path):
    """An edit's object drawn alone onto an empty picture, then put into the inpaint box of the upload."""
    runner = ChatRunner(engine, tmp_path)
    upload = _png(tmp_path / "red.png", 4 * engine.tokenizer.image.downsample)
    source = engine.tokenizer.image_codes(Image(PIL.Image.open(upload)))
    options = ChatOptions(**{**FAST, "start_with": "image", "max_images": 1, "max_new_tokens": 400,
                             "upload_mode": "edit", "regions": "0,0,0.5,0.5: a yellow circle", "canvas": "empty",
                             "inpaint": "0,0,0.5,0.5", "seed": 3, "image_temperature": 1.0})
    conv = Conversation()
    chat = list(runner.respond({"text": "make it yellow", "files": [str(upload)]}, options, conv))[-1]
    drawn = [s for s in engine.tokenizer.decode(conv.turns[-1].ids, pixels=False) if isinstance(s, Image)][-1].codes
    box = holed(source, [(0, 0, 0.5, 0.5)], "box") == -1
    assert torch.equal(drawn[~box], source[~box]) and not torch.equal(drawn[box], source[box])
    assert any("inside the inpaint boxes" in m["content"] for m in chat if isinstance(m["content"], str))


@pytest.mark.parametrize("change, match", [
    (dict(regions=""), "there are none: give regions"),
    (dict(inpaint="0,0,0.5,0.5"), "holds none written as VQ codes"),  # no picture to put the drawing into
    (dict(start_with="auto"), "set start to image"),
    (dict(canvas="white"), "compose onto must be 'none', 'last' or 'empty'"),
    (dict(canvas="last"), "holds none written as VQ codes"),
    (dict(aspect="auto", grid=None), "needs the reply's image size"),  # a tokenizer that records no size
])
def test_a_reply_that_cannot_compose_says_why_in_the_chat(engine, tmp_path, monkeypatch, change, match):
    change = dict(change)
    if "grid" in change:  # the size the tokenizer records for its pictures
        grid = change.pop("grid")
        monkeypatch.setattr(type(engine.tokenizer), "image_grid", property(lambda self: grid))
    runner = ChatRunner(engine, tmp_path)
    streamed, stream = [], engine.generator.stream
    monkeypatch.setattr(engine.generator, "stream", lambda *args, **rows: streamed.append(1) or stream(*args, **rows))
    options = ChatOptions(**{**FAST, "start_with": "image", "regions": "0,0,0.5,0.5: a red circle", "canvas": "empty",
                             **change})
    chat = list(runner.respond("a red circle", options, Conversation()))[-1]
    assert match in chat[-1]["content"] and not streamed


def test_plan_button_fills_the_regions_the_chat_then_composes(url):
    """"plan the regions from the prompt": the scene read into one region per object (its grown cell), composed
    onto an empty picture, the reply started with an image; the regions it writes parse back to the plan's."""
    from anygen.plan import plan_layout

    prompt = "a red circle at the top left and a blue square at the bottom right"
    regions, inpaint, canvas, start, _ = _client(url).predict({"text": prompt, "files": []}, api_name="/plan")
    assert (inpaint, canvas, start) == ("", "empty", "image")
    parsed = ChatOptions(regions=regions).region_list()
    planned = plan_layout(prompt, 16).regions
    assert [t for t, _ in parsed] == [t for t, _ in planned]
    assert all(b == pytest.approx(p, abs=1e-3) for (_, b), (_, p) in zip(parsed, planned))
    chat = _send(_client(url), prompt, regions=regions, canvas=canvas, start_with=start, max_images=1)
    assert any("composing 2 region(s) onto an empty picture" in t for t in _texts(chat, "assistant")), chat


def test_plan_button_says_why_a_prompt_cannot_be_planned():
    with pytest.raises(gr.Error, match="cannot plan a layout: .*'<colour> <shape> <where>'"):
        app.plan_controls({"text": "a photo of a dog", "files": []})


def test_plan_button_finds_an_edits_cell_and_the_chat_redraws_it(url, tmp_path):
    """With a picture attached, a recolouring is planned as an inpaint box over the object's cell under its new
    caption (here the instruction names the place, so the random model is not asked), the picture as VQ codes."""
    from anygen.data.shapes import SceneObject, cell_box, render_scene

    scene = tmp_path / "scene.png"
    render_scene([SceneObject("circle", "red", "top left")], 32).save(scene)
    message = {"text": "make the circle at the top left yellow", "files": [gradio_client.handle_file(str(scene))]}
    regions, inpaint, canvas, start, mode = _client(url).predict(message, api_name="/plan")
    assert (canvas, start, mode) == ("empty", "image", "edit")
    (text, box), = ChatOptions(regions=regions).region_list()
    assert text == "a yellow circle at the top left" and box == pytest.approx(cell_box("top left"), abs=1e-3)
    assert ChatOptions(inpaint=inpaint).inpaint_boxes() == [pytest.approx(cell_box("top left"), abs=1e-3)]
    chat = _send(_client(url), message["text"], [scene], regions=regions, inpaint=inpaint, canvas=canvas,
                 start_with=start, upload_mode=mode, max_images=1)
    assert _files(chat), chat  # the edited picture came back


def test_plan_button_refuses_what_it_cannot_plan(engine, tmp_path):
    from anygen.data.shapes import render_scene

    runner = ChatRunner(engine, tmp_path)
    scene = tmp_path / "scene.png"
    render_scene([], 32).save(scene)
    with pytest.raises(gr.Error, match="the planner reads recolourings"):
        runner.plan({"text": "draw a dog", "files": [str(scene)]})
    with pytest.raises(gr.Error, match="2 attachments"):
        runner.plan({"text": "make the circle red", "files": [str(scene), str(scene)]})
    with pytest.raises(gr.Error, match="cannot plan a layout"):
        runner.plan({"text": "a photo of a dog", "files": []})
    with pytest.raises(gr.Error, match="attach the picture it edits"):
        runner.plan({"text": "make the circle yellow", "files": []})
