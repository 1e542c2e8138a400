"""The generation engine on a tiny random model: equivalences, grammar, guidance, batching, seeds, errors."""

import json

import numpy as np
import PIL.Image
import pytest
import torch

from anygen import AnyGen, Understand
from anygen.api import GenerationOutput
from anygen.eval.harness import eval_sampling
from anygen.generation.events import ImageDone, ImageRows, ImageStarted, RowDone, TextDelta, VideoFrameDone
from anygen.generation.generator import DEFAULT_IMAGE, DEFAULT_TEXT, DEFAULT_VIDEO, SamplingDefaults
from anygen.generation.grammar import TEXT, Grammar, GrammarState
from anygen.generation.sampling import SamplingConfig
from anygen.testing import random_engine
from tokenizers_mm.segments import Image, Text, Video

GREEDY = {"temperature": 0.0}
GREEDY_NO_CFG = {"temperature": 0.0, "guidance_scale": 1.0}


@pytest.fixture(scope="module")
def engine() -> AnyGen:
    return random_engine("tiny", seed=0)


def _picture(seed=0, size=(40, 50)):
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray((rng.random((*size, 3)) * 255).astype("uint8"))


def _replay(engine, gen_ids, start_with=None, image_size=(0, 0), video_size=(0, 0, 0)):
    """Yield (mask, forced, token) for each generated id, replaying the grammar."""
    v = engine.tokenizer.vocab
    grammar = Grammar(v)
    t = lambda x: torch.tensor([x])  # noqa: E731
    state = GrammarState.start(t(TEXT), req_h=t(image_size[0]), req_w=t(image_size[1]), req_t=t(video_size[0]),
                               req_vh=t(video_size[1]), req_vw=t(video_size[2]), max_media=t(0))
    for k, tok in enumerate(gen_ids.tolist()):
        mclass, forced = grammar.constraints(state)
        if k == 0 and start_with:
            forced = torch.tensor([v.boi if start_with == "image" else v.bov])
        yield grammar.masks[mclass[0]], int(forced[0]), tok
        state = grammar.advance(state, torch.tensor([tok]))


@pytest.mark.parametrize("start_with", [None, "image", "video"])
def test_cached_generation_matches_full_forward(engine, start_with):
    """Greedy tokens from the KV-cached loop are the argmax of a full, uncached forward at every free step."""
    prompt = "a red circle at the top left"
    out = engine.generate(prompt, max_new_tokens=40, text=GREEDY_NO_CFG, image=GREEDY_NO_CFG, video=GREEDY_NO_CFG,
                          image_size=(2, 3), video_size=(2, 2, 2), start_with=start_with)
    seq = engine.encode_prompt(prompt)
    full = torch.cat([seq.ids, out.ids])[None]
    logits = engine.model(full)[0, len(seq) - 1:-1]  # logits that predicted each generated id
    free = 0
    for k, (mask, forced, tok) in enumerate(_replay(engine, out.ids, start_with, (2, 3), (2, 2, 2))):
        if forced >= 0:
            assert tok == forced
            continue
        free += 1
        assert int(logits[k].masked_fill(~mask, float("-inf")).argmax()) == tok, f"step {k}"
    assert free > 10


def test_image_spans_are_grammatical(engine):
    v = engine.tokenizer.vocab
    out = engine.generate("draw", max_new_tokens=200, start_with="image", image_size=(3, 4), seed=3, max_images=2,
                          text={"temperature": 1.0})
    ids = out.ids.tolist()
    starts = [i for i, t in enumerate(ids) if t == v.boi]
    assert starts, "start_with='image' must open an image"
    for s in starts:
        if v.eoi not in ids[s:]:
            continue
        e = ids.index(v.eoi, s)
        body = ids[s + 3:e]
        assert ids[s + 1:s + 3] == [v.h_token(3), v.w_token(4)]
        assert len(body) == 3 * (4 + 1)  # exactly H x (W + 1) entries
        assert all(v.image_offset <= t < v.video_offset for i, t in enumerate(body) if i % 5 != 4)
        assert all(body[i] == v.eol for i in range(4, len(body), 5))
    images = [s for s in out.segments if isinstance(s, Image) and not s.partial]
    assert images and all(s.codes.shape == (3, 4) and s.image.size == (32, 24) for s in images)


def test_video_spans_are_grammatical(engine):
    out = engine.generate("move", max_new_tokens=120, start_with="video", video_size=(2, 2, 3), seed=0, max_images=1)
    assert out.finish_reason == "max_images"
    (video,) = out.videos
    assert video.codes.shape == (2, 2, 3) and video.frames.shape == (3, 5, 16, 24)
    assert len(out.ids) == 4 + 2 * (2 * (3 + 1) + 1) + 1


def test_routed_heads_only_emit_their_own_modality(engine):
    v = engine.tokenizer.vocab
    outs = engine.generate(["a", "b", "c"], max_new_tokens=80, start_with=["image", "video", None],
                           image_size=(2, 2), video_size=(1, 2, 2), seed=1)
    for out in outs:
        in_image = in_video = False
        for tok in out.ids.tolist():
            if tok == v.boi:
                in_image = True
            elif tok == v.eoi:
                in_image = False
            elif tok == v.bov:
                in_video = True
            elif tok == v.eov:
                in_video = False
            elif v.image_offset <= tok < v.video_offset:
                assert in_image, "an image code outside an image span"
            elif tok >= v.video_offset:
                assert in_video, "a video code outside a video span"
            if in_image or in_video:
                assert tok != v.eos


def test_guidance_scale_one_equals_no_guidance(engine):
    kwargs = dict(max_new_tokens=30, start_with="image", image_size=(2, 3), seed=0, text=GREEDY)
    plain = engine.generate("a blue square", image={"temperature": 0.0, "guidance_scale": 1.0}, **kwargs)
    # video guidance != 1 makes the engine run the unconditional twins; the image (scale 1) must not change
    twins = engine.generate("a blue square", image={"temperature": 0.0, "guidance_scale": 1.0},
                            video={"guidance_scale": 2.0}, **kwargs)
    assert torch.equal(plain.ids, twins.ids)
    guided = engine.generate("a blue square", image={"temperature": 0.0, "guidance_scale": 5.0}, **kwargs)
    assert not torch.equal(plain.ids, guided.ids), "a strong guidance scale should change greedy codes"


def test_guidance_matches_a_reference_computation(engine):
    """Guided greedy codes equal argmax of u + s(c - u), with u from <|bos|><|null|> + the open image span."""
    v = engine.tokenizer.vocab
    scale = 3.0
    prompt = "a red circle"
    out = engine.generate(prompt, max_new_tokens=20, start_with="image", image_size=(2, 3), text=GREEDY,
                          image={"temperature": 0.0, "guidance_scale": scale})
    seq = engine.encode_prompt(prompt)
    gen = out.ids.tolist()
    span = gen[:gen.index(v.eoi) + 1]
    checked = 0
    for k in range(3, len(span)):
        if span[k] in (v.eol, v.eoi):
            continue
        cond = engine.model(torch.tensor([seq.ids.tolist() + span[:k]]))[0, -1]
        unc = engine.model(torch.tensor([[v.bos, v.null] + span[:k]]))[0, -1]
        guided = unc + scale * (cond - unc)
        image_slice = guided[v.image_offset:v.video_offset]
        assert int(image_slice.argmax()) + v.image_offset == span[k], f"code {k}"
        checked += 1
    assert checked == 6


def test_a_row_of_a_mixed_batch_equals_the_row_alone(engine):
    prompts = ["a red circle at the top left", "hi", "a green triangle moves to the right"]
    starts = ["image", None, "video"]
    common = dict(max_new_tokens=40, text=GREEDY, image=GREEDY, video=GREEDY, image_size=(2, 2),
                  video_size=(1, 2, 2))
    batch = engine.generate(prompts, start_with=starts, **common)
    for prompt, start, out in zip(prompts, starts, batch):
        alone = engine.generate(prompt, start_with=start, **common)
        assert torch.equal(out.ids, alone.ids), prompt


def test_same_seed_same_output(engine):
    a = engine.generate("a red circle", max_new_tokens=30, seed=7, start_with="image", image_size=(2, 2))
    b = engine.generate("a red circle", max_new_tokens=30, seed=7, start_with="image", image_size=(2, 2))
    c = engine.generate("a red circle", max_new_tokens=30, seed=8, start_with="image", image_size=(2, 2))
    assert torch.equal(a.ids, b.ids)
    assert not torch.equal(a.ids, c.ids)


def test_understanding_and_editing_prompts(engine):
    out = engine.generate([Understand(_picture()), "what is in the picture?"], max_new_tokens=10, seed=0)
    assert out.ids.numel() >= 1
    # an image given as VQ context (editing) and a batch mixing rows with and without understood images
    outs = engine.generate([[_picture(1), "make the circle yellow"], [Understand(_picture(2)), "caption"],
                            ["plain text"]], max_new_tokens=8, seed=0)
    assert len(outs) == 3
    alone = engine.generate([Understand(_picture(2)), "caption"], max_new_tokens=8, seed=0, text=GREEDY)
    batch = engine.generate([[_picture(1), "edit"], [Understand(_picture(2)), "caption"]], max_new_tokens=8,
                            seed=0, text=GREEDY)
    assert torch.equal(alone.ids, batch[1].ids)


def test_stream_events(engine):
    events = list(engine.stream("draw", max_new_tokens=60, start_with="image", image_size=(3, 2), seed=0,
                                preview_every=1, max_images=1))
    started = [e for e in events if isinstance(e, ImageStarted)]
    rows = [e for e in events if isinstance(e, ImageRows)]
    done = [e for e in events if isinstance(e, ImageDone)]
    assert len(started) == 1 and (started[0].height, started[0].width) == (3, 2)
    assert [e.rows_done for e in rows] == [1, 2, 3]
    assert rows[0].preview.size == (16, 8) and rows[-1].preview.size == (16, 24)
    assert len(done) == 1 and isinstance(events[-1], RowDone) and events[-1].reason == "max_images"

    text_events = list(engine.stream("tell me", max_new_tokens=25, seed=1, text={"temperature": 1.0}))
    deltas = "".join(e.text for e in text_events if isinstance(e, TextDelta))
    final = text_events[-1]
    assert isinstance(final, RowDone)
    assert deltas == "".join(s.text for s in final.segments if isinstance(s, Text))

    vid = list(engine.stream("v", max_new_tokens=80, start_with="video", video_size=(2, 1, 1), seed=0, max_images=1))
    assert [e.frame for e in vid if isinstance(e, VideoFrameDone)] == [0, 1]
    assert isinstance(vid[-1].segments[0], Video)


def test_save_load_same_logits_and_tokens(engine, tmp_path):
    engine.save_pretrained(tmp_path)
    again = AnyGen.from_pretrained(tmp_path)
    ids = engine.encode_prompt(["a red circle", Image(codes=torch.zeros(2, 2, dtype=torch.long))]).ids[None]
    assert torch.equal(engine.model(ids), again.model(ids))
    kwargs = dict(max_new_tokens=20, seed=3, start_with="image", image_size=(2, 2))
    assert torch.equal(engine.generate("x", **kwargs).ids, again.generate("x", **kwargs).ids)


def test_checkpoint_generation_config_sets_the_default_sampling(engine, tmp_path):
    engine.save_pretrained(tmp_path)
    assert AnyGen.from_pretrained(tmp_path).sampling_defaults == SamplingDefaults()  # written, the library's
    (tmp_path / "generation_config.json").write_text(json.dumps({"image": {"temperature": 0.0,
                                                                            "guidance_scale": 1.0}}))
    tuned = AnyGen.from_pretrained(tmp_path)
    assert tuned.sampling_defaults.image == SamplingConfig(temperature=0.0, guidance_scale=1.0,
                                                           image_guidance_scale=DEFAULT_IMAGE.image_guidance_scale)
    assert tuned.sampling_defaults.text == DEFAULT_TEXT and tuned.sampling_defaults.video == DEFAULT_VIDEO
    kwargs = dict(max_new_tokens=30, start_with="image", image_size=(3, 3), max_images=1)  # the image alone
    greedy = engine.generate("x", image=GREEDY_NO_CFG, **kwargs).ids
    # the checkpoint's settings apply when the call sets none, whatever the seed; a call's own settings win
    assert torch.equal(tuned.generate("x", seed=1, **kwargs).ids, greedy)
    assert torch.equal(tuned.generate("x", seed=2, **kwargs).ids, greedy)
    sampled = [tuned.generate("x", seed=s, image={"temperature": 1.0}, **kwargs).ids for s in range(4)]
    assert any(not torch.equal(ids, greedy) for ids in sampled)
    tuned.save_pretrained(tmp_path / "again")
    assert AnyGen.from_pretrained(tmp_path / "again").sampling_defaults == tuned.sampling_defaults
    assert eval_sampling(defaults=tuned.sampling_defaults)["image"]["temperature"] == 0.0
    assert eval_sampling()["image"]["temperature"] == DEFAULT_IMAGE.temperature


@pytest.mark.parametrize("content, match", [
    ("{oops", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"audio": {}}', r"unknown modality \['audio'\]"),
    ('{"image": {"temprature": 1}}', r"unknown image sampling option\(s\) \['temprature'\]"),
    ('{"image": {"temperature": -1}}', "temperature must be a number >= 0"),
    ('{"text": 3}', "must be a SamplingConfig or a dict"),
])
def test_bad_generation_config_is_refused_by_name(engine, tmp_path, content, match):
    engine.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(content)
    with pytest.raises(ValueError, match=match) as err:
        AnyGen.from_pretrained(tmp_path)
    assert "generation_config.json" in str(err.value)


def test_checkpoint_errors(engine, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        AnyGen.from_pretrained(tmp_path / "nope")
    engine.save_pretrained(tmp_path / "ck")
    (tmp_path / "ck" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="lacks model.safetensors"):
        AnyGen.from_pretrained(tmp_path / "ck")
    # weights of another shape under the same config.json
    other = random_engine("tiny", seed=1, d_model=32, intermediate_size=64)
    other.save_pretrained(tmp_path / "other")
    engine.save_pretrained(tmp_path / "mixed")
    (tmp_path / "mixed" / "model.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="does not match config.json: shape mismatch"):
        AnyGen.from_pretrained(tmp_path / "mixed")
    # a config whose vocabulary does not match the tokenizer files
    engine.save_pretrained(tmp_path / "vocab")
    meta = json.loads((tmp_path / "vocab" / "config.json").read_text())
    meta["model"]["text_size"] += 1
    (tmp_path / "vocab" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="mismatched checkpoint"):
        AnyGen.from_pretrained(tmp_path / "vocab")
    (tmp_path / "vocab" / "config.json").write_text("{oops")
    with pytest.raises(ValueError, match="not valid JSON"):
        AnyGen.from_pretrained(tmp_path / "vocab")


def test_bad_requests_fail_before_any_work(engine):
    ctx = engine.config.max_seq_len
    with pytest.raises(ValueError, match=f"context is {ctx}"):
        engine.generate("word " * ctx, max_new_tokens=4)
    with pytest.raises(ValueError, match="the requested image needs 76 tokens but only 40 fit"):
        engine.generate("x", max_new_tokens=40, start_with="image", image_size=(8, 8))
    with pytest.raises(ValueError, match="cannot be produced"):
        engine.generate("x", image_size=(100, 2), start_with="image")
    with pytest.raises(ValueError, match="unknown image sampling option"):
        engine.generate("x", image={"temprature": 0.5})
    with pytest.raises(ValueError, match="top_p must be in"):
        engine.generate("x", text={"top_p": 0.0})
    with pytest.raises(ValueError, match="start_with must be"):
        engine.generate("x", start_with="audio")
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
        engine.generate("x", max_new_tokens=0)
    with pytest.raises(TypeError, match="accepted: str, Text, PIL.Image"):
        engine.generate(["x", 3.5])


def test_stream_frees_its_cache_and_takes_token_sequences(engine):
    seq = engine.encode_prompt("a red circle")
    a = engine.generate(seq, max_new_tokens=12, seed=0)
    assert engine.model.cache_valid is None  # released after the call
    b = engine.generate("a red circle", max_new_tokens=12, seed=0)
    assert torch.equal(a.ids, b.ids)
    frames = [e for e in engine.stream("v", max_new_tokens=40, start_with="video", video_size=(2, 1, 1), seed=0,
                                       preview_every=1, max_images=1) if isinstance(e, VideoFrameDone)]
    assert [tuple(e.preview.shape) for e in frames] == [(3, 1, 8, 8), (3, 5, 8, 8)]


def test_cli_generate_defaults_to_the_trained_image_size(tmp_path, capsys):
    """``anygen generate --start-with image`` without ``--image-size`` draws at the tokenizer's size (not the
    grammar's largest, which may not fit the context), writes the PNG and prints its path."""
    import PIL.Image

    from anygen.cli_generate import main
    from anygen.testing import random_engine

    tok = random_engine("tiny").tokenizer
    assert main(["a red circle", "--random-tiny", "--start-with", "image", "--max-new-tokens", "64",
                 "--out", str(tmp_path)]) == 0
    written = tmp_path / "0000" / "image_0.png"
    assert str(written) in capsys.readouterr().out
    assert PIL.Image.open(written).size == (tok.image_size[1], tok.image_size[0])
    with pytest.raises(SystemExit):  # argparse names the flag and the accepted form
        main(["a red circle", "--random-tiny", "--image-size", "0x3", "--out", str(tmp_path)])
    assert "--image-size must be HxW in tokens" in capsys.readouterr().err


def test_cli_generate_best_of(tmp_path, capsys):
    from anygen.cli_generate import main

    assert main(["a red circle", "--random-tiny", "--start-with", "image", "--best-of", "3", "--seed", "0",
                 "--out", str(tmp_path)]) == 0
    assert (tmp_path / "0000" / "image_0.png").is_file()
    assert main(["a red circle", "--random-tiny", "--best-of", "3", "--out", str(tmp_path)]) == 2  # no image at all
    assert "pass start_with='image'" in capsys.readouterr().err
    assert main(["a red circle", "--random-tiny", "--start-with", "image", "--best-of", "3", "--rerank", "likelihood",
                 "--out", str(tmp_path / "likely")]) == 0
    assert (tmp_path / "likely" / "0000" / "image_0.png").is_file()
    assert main(["a red circle", "--random-tiny", "--start-with", "image", "--rerank", "likelihood",
                 "--out", str(tmp_path)]) == 2  # reaches generate, which needs best_of for it
    assert "pass best_of > 1 with it" in capsys.readouterr().err
    picture = tmp_path / "in.png"
    _picture(4, (32, 32)).save(picture)
    assert main(["--random-tiny", "--understand", str(picture), "--best-of", "2", "--seed", "0",
                 "--max-new-tokens", "6", "--out", str(tmp_path / "reply")]) == 0  # a caption, reranked: no text
    assert (tmp_path / "reply" / "0000" / "text.txt").is_file()
    assert main(["--random-tiny", "--out", str(tmp_path)]) == 2  # neither text nor a picture
    assert "give a prompt (text, --image / --understand pictures, or both)" in capsys.readouterr().err


def test_cli_generate_best_of_video_takes_negatives_from_the_flag_or_the_prompts_file(tmp_path, capsys):
    from anygen.cli_generate import main

    video = ["--random-tiny", "--start-with", "video", "--video-size", "1x2x2", "--best-of", "2", "--seed", "0"]
    assert main(["a red circle moves up", *video, "--out", str(tmp_path / "none")]) == 2
    assert "text→video needs negatives" in capsys.readouterr().err
    assert main(["a red circle moves up", *video, "--negative", "a red circle moves down", "--negative",
                 "a red circle moves to the left", "--out", str(tmp_path / "flag")]) == 0
    assert (tmp_path / "flag" / "0000" / "video_0.mp4").is_file()
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a red circle moves up", "negatives": ["a red circle moves down"]}) +
                       '\n"a blue square moves up"\n')  # the second line takes the flag's
    assert main(["--prompts", str(prompts), *video, "--negative", "a blue square moves down",
                 "--out", str(tmp_path / "file")]) == 0
    assert sorted(p.name for p in (tmp_path / "file").iterdir()) == ["0000", "0001"]
    assert main(["--prompts", str(prompts), *video, "--out", str(tmp_path / "half")]) == 2  # line 2 has none
    assert "text→video needs negatives=[...] for every prompt" in capsys.readouterr().err
    mixed = tmp_path / "mixed.jsonl"  # a negative prompt on one line only: the other's guidance is the plain one
    mixed.write_text(json.dumps({"prompt": "a red circle moves up", "negative_prompt": "a red circle moves down"}) +
                     '\n"a blue square moves up"\n')
    assert main(["--prompts", str(mixed), *video[:-4], "--video-guidance-scale", "2", "--max-images", "1",
                 "--out", str(tmp_path / "mixed")]) == 0
    assert sorted(p.name for p in (tmp_path / "mixed").iterdir()) == ["0000", "0001"]
    steered = ["a red circle moves up", *video, "--video-guidance-scale", "2", "--negative-prompt",
               "a red circle moves down", "--negative", "a red circle moves down"]
    assert main([*steered, "--out", str(tmp_path / "steered")]) == 0
    assert (tmp_path / "steered" / "0000" / "video_0.mp4").is_file()
    assert main(["a red circle moves up", *video[:-4], "--max-images", "1", "--negative-prompt",
                 "a red circle moves down", "--out", str(tmp_path / "unguided")]) == 2  # one clip, unguided
    assert "a negative prompt steers classifier-free guidance" in capsys.readouterr().err
    prompts.write_text(json.dumps({"prompt": "x", "negative_prompt": ["a list"]}) + "\n")
    assert main(["--prompts", str(prompts), *video, "--out", str(tmp_path / "bad")]) == 2
    assert 'p.jsonl:1: "negative_prompt" must be a str' in capsys.readouterr().err
    prompts.write_text(json.dumps({"prompt": "x", "negatives": "not a list"}) + "\n")
    assert main(["--prompts", str(prompts), *video, "--out", str(tmp_path / "bad")]) == 2
    assert 'p.jsonl:1: "negatives" must be a list of str' in capsys.readouterr().err


def test_cli_generate_prompts_file_mixes_text_and_picture_prompts_in_one_batch(tmp_path, capsys):
    """``--prompts``: text-only and picture lines share a batch (a mixed list is a batch, not one prompt's
    segments), each gets its own folder; a reranked batch that cannot be reranked says why; bad lines are named."""
    from anygen.cli_generate import main

    picture = tmp_path / "in.png"
    _picture(4, (32, 32)).save(picture)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join([json.dumps("a red circle"), json.dumps({"prompt": "what is it?", "understand": [
        str(picture)]}), "", json.dumps({"prompt": "a blue square"})]) + "\n")
    out = tmp_path / "out"
    assert main(["--prompts", str(prompts), "--random-tiny", "--max-new-tokens", "5", "--seed", "0",
                 "--batch-size", "4", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["0000", "0001", "0002"]
    printed = capsys.readouterr().out
    assert printed.count("wrote") >= 3 and "[2]" in printed
    # best of N on text → image needs text-only prompts: the picture line is refused by the API's rule, by name
    assert main(["--prompts", str(prompts), "--random-tiny", "--start-with", "image", "--best-of", "2",
                 "--out", str(tmp_path / "bo")]) == 2
    assert "every prompt must be a str" in capsys.readouterr().err
    # and on image → text, a prompt without a picture
    assert main(["--prompts", str(prompts), "--random-tiny", "--best-of", "2", "--out", str(tmp_path / "bo")]) == 2
    assert "prompt #0 holds 0" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('"fine"\n{"prompt": "x", "image": ["a.png"]}\n')
    assert main(["--prompts", str(bad), "--random-tiny", "--out", str(tmp_path / "bad")]) == 2
    assert "bad.jsonl:2: unknown keys ['image']; accepted: prompt, images, understand" in capsys.readouterr().err


def test_a_list_of_whole_prompts_is_a_batch_even_when_their_kinds_mix():
    engine = random_engine("tiny")
    picture = _picture(2, (32, 32))
    outs = engine.generate(["a red circle", [Image(picture), "make it blue"]], max_new_tokens=3, seed=0)
    assert isinstance(outs, list) and len(outs) == 2
    alone = engine.generate([Image(picture), "make it blue"], max_new_tokens=3, seed=0)  # one prompt's segments
    assert not isinstance(alone, list)


def test_api_forced_video_start_defaults_to_the_trained_clip_size(monkeypatch):
    """``generate(start_with="video")`` without ``video_size`` draws at ``tokenizer.video_grid`` where the tokenizer
    records the trained clip length; without one the model chooses, and the largest clip does not fit this budget."""
    engine = random_engine("tiny")
    with pytest.raises(ValueError, match="the requested video needs"):
        engine.generate("a red circle moves up", max_new_tokens=64, start_with="video", max_images=1)
    monkeypatch.setattr(engine.tokenizer, "video_frames", 5)
    out = engine.generate("a red circle moves up", max_new_tokens=64, start_with="video", max_images=1, seed=0)
    (clip,) = out.videos
    assert tuple(clip.codes.shape) == engine.tokenizer.video_grid == (2, 2, 2)
    asked = engine.generate("a red circle moves up", max_new_tokens=64, start_with="video", max_images=1, seed=0,
                            video_size=(1, 2, 3))
    assert tuple(asked.videos[0].codes.shape) == (1, 2, 3)  # a size asked for wins


def test_api_forced_image_start_defaults_to_the_trained_size():
    """``generate(start_with="image")`` without ``image_size`` draws at ``tokenizer.image_grid``: the largest grid
    the grammar allows would not fit this 64-token budget, and the call used to refuse it."""
    engine = random_engine("tiny")
    v = engine.tokenizer.vocab
    assert engine.generator.image_span_len(v.max_height, v.max_width) > 64  # the worst case does not fit
    out = engine.generate("a red circle", max_new_tokens=64, start_with="image", max_images=1, seed=0)
    images = [s for s in out.segments if isinstance(s, Image)]
    assert len(images) == 1 and tuple(images[0].codes.shape) == engine.tokenizer.image_grid


# -- score and best_of (text→image reranked by the understanding path) --------------------------------------------


def _reference_score(engine, context, text):
    """Sum of log-softmax over the text slice at each continuation id (and <|eos|>), from one full forward."""
    v = engine.tokenizer.vocab
    head = engine.encode_prompt(context)
    tail = engine.tokenizer.text.encode(text) + [v.eos]
    ids = torch.cat([head.ids, torch.tensor(tail)])[None]
    with torch.no_grad():
        logits = engine.model(ids, und_pixels=head.und_pixels)[0, :, :v.image_offset].log_softmax(-1)
    return sum(float(logits[len(head) - 1 + k, t]) for k, t in enumerate(tail))


def test_score_is_the_teacher_forced_log_probability_and_batches_exactly(engine):
    picture = _picture(3)
    contexts = [[Understand(picture)], ["a red circle"], [Understand(_picture(4)), "what is it?"]]
    texts = ["a red circle at the top left", "on the right", "a square"]
    expected = [_reference_score(engine, c, t) for c, t in zip(contexts, texts)]
    batched = engine.score(contexts, texts)  # three lengths: right padding, two understood images in order
    one_by_one = [engine.score([c], [t])[0] for c, t in zip(contexts, texts)]
    assert batched == pytest.approx(expected, abs=1e-4) and one_by_one == pytest.approx(expected, abs=1e-4)
    assert engine.score([Understand(picture)], texts[0], eos=False)[0] > expected[0]  # one log-prob fewer
    with pytest.raises(ValueError, match="one continuation per context, got 2 for 3"):
        engine.score(contexts, texts[:2])
    with pytest.raises(ValueError, match="continuation #0 is empty"):
        engine.score("x", "", eos=False)
    with pytest.raises(ValueError, match="model's context is"):
        engine.score("x", "a red circle " * engine.config.max_seq_len)


def test_best_of_keeps_the_image_the_understanding_path_scores_best(engine):
    prompts = ["a red circle", "a blue square at the top"]
    kwargs = dict(start_with="image", image_size=(2, 2), seed=5, image={"temperature": 1.0})
    best = engine.generate(prompts, best_of=3, **kwargs)
    drawn = engine.generate([p for p in prompts for _ in range(3)], max_images=1, **kwargs)  # what best_of draws
    assert len({tuple(out.ids.tolist()) for out in drawn}) > 1  # the candidates differ, so the choice matters
    scores = engine.score([[Understand(out.images[0])] for out in drawn], [p for p in prompts for _ in range(3)])
    for i, out in enumerate(best):
        pick = max(range(3 * i, 3 * i + 3), key=lambda k: scores[k])
        assert torch.equal(out.ids, drawn[pick].ids), i
    assert torch.equal(engine.generate(prompts[0], best_of=1, **kwargs).ids,
                       engine.generate(prompts[0], **kwargs).ids)  # 1: off


def test_best_of_with_rerank_likelihood_keeps_the_image_whose_codes_the_prompt_makes_most_likely(engine):
    prompts = ["a red circle", "a blue square at the top", "a green triangle", "a cyan circle on the left"]
    kwargs = dict(start_with="image", image_size=(2, 2), seed=5, image={"temperature": 1.0})
    best = engine.generate(prompts, best_of=3, rerank="likelihood", **kwargs)
    drawn = engine.generate([p for p in prompts for _ in range(3)], max_images=1, **kwargs)  # what best_of draws
    codes = [next(s for s in out.segments if isinstance(s, Image)) for out in drawn]
    likely = engine.score_image([p for p in prompts for _ in range(3)], codes)  # the drawn codes, not re-tokenized
    read = engine.score([[Understand(out.images[0])] for out in drawn], [p for p in prompts for _ in range(3)])
    picks = [max(range(3 * i, 3 * i + 3), key=lambda k: likely[k]) for i in range(len(prompts))]
    assert picks != [max(range(3 * i, 3 * i + 3), key=lambda k: read[k]) for i in range(len(prompts))]  # it matters
    for i, out in enumerate(best):
        assert torch.equal(out.ids, drawn[picks[i]].ids), i
    plain = random_engine("tiny", und_encoder=None)  # the generation path reads without an understanding encoder
    assert plain.generate("a red circle", best_of=2, rerank="likelihood", **kwargs).images
    with pytest.raises(ValueError, match="rerank='likelihood' reads them with the generation path instead"):
        plain.generate("a red circle", best_of=2, **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    ({"best_of": 2, "rerank": "clip"}, "rerank must be one of \\('understanding', 'likelihood'\\)"),
    ({"rerank": "likelihood"}, "reads the images it draws: pass best_of > 1 with it"),
    ({"best_of": 2, "rerank": "likelihood", "start_with": "video", "negatives": ["x"]},
     "pass start_with='image' with it \\(got start_with='video'"),
    ({"best_of": 32, "rerank": "likelihood", "start_with": None}, "clips and replies have one reader each"),
])
def test_rerank_refuses_what_it_does_not_choose(engine, kwargs, match):
    kwargs = {"start_with": "image", "image_size": (2, 2), **kwargs}
    with pytest.raises(ValueError, match=match):
        engine.generate("a red circle", **kwargs)


def test_score_candidates_by_likelihood_is_score_image_and_a_cut_off_image_scores_minus_infinity(engine):
    picture = _picture(12, (32, 32))
    drawn = next(s for s in engine.generate("a red circle", start_with="image", image_size=(2, 2), seed=1).segments
                 if isinstance(s, Image))
    prompt, negatives = "a red circle", ["a blue square", "a red square"]
    cut = Image(drawn.image, codes=drawn.codes[:1], partial=True)
    scores = engine.score_candidates([picture, drawn, None, cut], prompt, rerank="likelihood")
    assert scores[2] == scores[3] == float("-inf")
    assert scores[:2] == pytest.approx(engine.score_image([prompt, prompt], [picture, drawn]), abs=1e-4)
    assert scores[0] != pytest.approx(engine.score_candidates([picture], prompt)[0], abs=1e-3)  # not the reader's
    read = torch.tensor(engine.score_image([prompt, *negatives], drawn))
    (contrast,) = engine.score_candidates([drawn], prompt, negatives, rerank="likelihood")
    assert contrast == pytest.approx(float(read[0] - read.logsumexp(0)), abs=1e-4)
    with pytest.raises(ValueError, match="rerank must be one of"):
        engine.score_candidates([drawn], prompt, rerank="pixels")


def _reference_image_score(engine, context, picture):
    """Sum of log-softmax over the image codebook at each of the picture's codes after ``context``, one forward."""
    v = engine.tokenizer.vocab
    head = engine.encode_prompt(context)
    span = torch.tensor(engine.tokenizer.encode_segment(picture))
    ids = torch.cat([head.ids, span])[None]
    with torch.no_grad():
        logits = engine.model(ids, und_pixels=head.und_pixels)[0, :, v.image_offset:v.video_offset].log_softmax(-1)
    codes = [k for k, t in enumerate(span.tolist()) if v.image_offset <= t < v.video_offset]
    assert len(codes) == engine.tokenizer.image_grid[0] * engine.tokenizer.image_grid[1]
    return sum(float(logits[len(head) - 1 + k, span[k] - v.image_offset]) for k in codes)


def test_score_image_is_the_log_probability_of_the_codes_alone(engine):
    picture, other = _picture(5, (32, 32)), _picture(6, (32, 32))
    contexts = [["a red circle"], [Understand(_picture(7)), "a blue square at the top"], ["x"],
                [Understand(_picture(10)), "two understood pictures in one batch: their rows keep their order"]]
    expected = [_reference_image_score(engine, c, picture) for c in contexts]
    assert engine.score_image(contexts, picture) == pytest.approx(expected, abs=1e-4)  # right-padded, one batch
    assert engine.score_image(contexts, Understand(picture)) == pytest.approx(expected, abs=1e-4)  # its pixels
    assert engine.score_image(contexts, picture, batch_size=1) == pytest.approx(expected, abs=1e-4)
    per_context = engine.score_image(contexts[:2], [picture, other])
    assert per_context == pytest.approx([expected[0], _reference_image_score(engine, contexts[1], other)], abs=1e-4)
    with pytest.raises(ValueError, match="one image per context .* got 2 for 4"):
        engine.score_image(contexts, [picture, other])
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        engine.score_image(contexts, picture, batch_size=0)
    with pytest.raises(ValueError, match="image #0 is a str"):
        engine.score_image(["a"], ["not an image"])


def test_score_replies_scores_what_fits_and_gives_the_rest_minus_infinity(engine):
    picture = _picture(5, (32, 32))
    room = engine.config.max_seq_len - len(engine.tokenizer.image_span(engine.tokenizer.image_codes(
        Image(picture)))) - 1
    too_long = "a red circle " * room  # more text tokens than the context leaves before the picture
    assert len(engine.tokenizer.text.encode(too_long)) > room
    replies = ["a red circle", "", too_long, "a blue square at the top"]
    scores = engine.score_replies(replies, Understand(picture))
    assert scores[1] == scores[2] == float("-inf")
    assert [scores[0], scores[3]] == pytest.approx([_reference_image_score(engine, [r], picture)
                                                    for r in (replies[0], replies[3])], abs=1e-4)
    assert engine.score_replies(["", too_long], picture) == [float("-inf")] * 2  # nothing to score: no forward
    with pytest.raises(ValueError, match="picture is a str; accepted"):
        engine.score_replies(["a"], "not an image")


def test_best_of_keeps_the_reply_under_which_the_generation_path_finds_the_image_most_likely(engine):
    pictures = [_picture(8, (32, 32)), _picture(9, (32, 32))]
    prompts = [[Understand(pictures[0])], [pictures[1], "what is in the picture?"]]
    kwargs = dict(max_new_tokens=6, max_images=1, seed=3, text={"temperature": 0.0})
    best = engine.generate(prompts, best_of=3, **kwargs)
    # what it draws: the greedy replies, then two more a prompt sampled at temperature 1
    greedy = engine.generate(prompts, **kwargs)
    sampled = engine.generate([p for p in prompts for _ in range(2)], **{**kwargs, "text": {"temperature": 1.0}})
    for i, out in enumerate(best):
        candidates = [greedy[i], *sampled[2 * i:2 * i + 2]]
        texts = [c.text for c in candidates]
        assert len(set(texts)) > 1, texts  # the choice matters
        scores = [engine.score_image(t, pictures[i])[0] if t else float("-inf") for t in texts]
        assert out.text == texts[max(range(3), key=lambda k: scores[k])], i
    sampling = {**kwargs, "text": {"temperature": 1.0}}  # sampled text: the n candidates are drawn alike
    drawn = engine.generate([prompts[0]] * 3, **sampling)
    scores = [engine.score_image(d.text, pictures[0])[0] if d.text else float("-inf") for d in drawn]
    assert engine.generate(prompts[0], best_of=3, **sampling).text == drawn[max(range(3), key=lambda k: scores[k])].text


def test_best_of_a_reply_takes_a_bare_picture_and_keeps_the_first_when_none_can_be_scored(engine, monkeypatch):
    out = engine.generate(Understand(_picture(3, (32, 32))), best_of=2, max_new_tokens=4, seed=0)  # one prompt
    assert isinstance(out, GenerationOutput)
    real = engine.generate

    def textless(prompt, **kw):  # every candidate ends without text: nothing to score
        if kw.get("best_of", 1) != 1:
            return real(prompt, **kw)
        return [GenerationOutput(finish_reason=f"row {k}") for k in range(len(engine._split_batch(prompt)[0]))]

    monkeypatch.setattr(engine, "generate", textless)
    kept = engine.generate([Understand(_picture(3, (32, 32)))], best_of=3, text={"temperature": 0.0})
    assert kept.finish_reason == "row 0"  # the greedy candidate, not an error from scoring nothing
    with pytest.raises(ValueError, match="not as a TokenSequence"):
        real([engine.encode_prompt([Understand(_picture(3))])], best_of=2)


@pytest.mark.parametrize("prompt, holds", [("a red circle", 0), ([_picture(1), Understand(_picture(2)), "x"], 2)])
def test_best_of_a_reply_needs_exactly_one_image_in_the_prompt(engine, prompt, holds):
    with pytest.raises(ValueError, match=f"exactly one image .* holds {holds}.*pass start_with='image'"):
        engine.generate(prompt, best_of=2, max_new_tokens=4)


@pytest.mark.parametrize("kwargs, match", [
    ({"best_of": 0}, "best_of must be an int >= 1"),
    ({"best_of": 2, "start_with": None}, "holds 0"),  # no start_with: image→text, and "a red circle" has no image
    ({"best_of": 2, "start_with": "video"}, "text→video needs negatives=\\[...\\]"),
    ({"best_of": 2, "max_new_tokens": 4, "start_with": None, "negatives": ["a blue square"]},
     "negatives, negative_prompt and regions go with best_of on text→image or text→video"),
    ({"negatives": ["a blue square"]}, "pass best_of > 1 with them"),
    ({"best_of": 2, "negatives": ["a red circle "]}, "negative #0 of prompt #0 is the prompt itself"),
    ({"best_of": 2, "negatives": ["a blue square", ""]}, "negative #1 of prompt #0 must be a non-empty str"),
    ({"best_of": 2, "negatives": []}, "negatives of prompt #0 must be a non-empty list of str"),
    ({"best_of": 2, "prompt": ["a", "b"], "negatives": ["c", "d"]}, "one list of str per prompt"),
    ({"best_of": 2, "prompt": ["a", "b"], "negatives": [["c"]]}, "a batch of 2 prompts"),
    ({"best_of": 2, "max_images": 2}, "max_images 0 or 1"),
    ({"best_of": 2, "prompt": [Understand(PIL.Image.new("RGB", (8, 8))), "x"]}, "every prompt must be a str"),
])
def test_best_of_refuses_what_it_cannot_rerank(engine, kwargs, match):
    kwargs = {"prompt": "a red circle", "start_with": "image", "image_size": (2, 2), **kwargs}
    with pytest.raises(ValueError, match=match):
        engine.generate(kwargs.pop("prompt"), **kwargs)


def _contrast_pick(engine, drawn, prompts, negatives, n, read):
    """The candidate of each prompt whose reading most favours the prompt over its negatives, recomputed, and the
    one the prompt's score alone would keep (``(contrast picks, plain picks)``)."""
    picks, plain = [], []
    for i, prompt in enumerate(prompts):
        texts = [prompt, *negatives[i]]
        scores = [torch.tensor(engine.score([read(drawn[k])] * len(texts), texts)) for k in range(i * n, (i + 1) * n)]
        picks.append(i * n + max(range(n), key=lambda k: float(scores[k][0] - scores[k].logsumexp(0))))
        plain.append(i * n + max(range(n), key=lambda k: float(scores[k][0])))
    return picks, plain


def test_best_of_with_negatives_keeps_the_clip_that_reads_most_like_its_prompt_and_least_like_them(engine):
    prompts = ["a red circle moves up", "a blue square moves to the left"]
    negatives = [["a red circle moves down", "a red circle moves to the left"], ["a blue square moves up"]]
    kwargs = dict(start_with="video", video_size=(1, 2, 2), seed=2, video={"temperature": 1.0})
    best = engine.generate(prompts, best_of=3, negatives=negatives, **kwargs)
    drawn = engine.generate([p for p in prompts for _ in range(3)], max_images=1, **kwargs)  # what best_of draws
    assert len({tuple(out.ids.tolist()) for out in drawn}) > 1  # the candidates differ, so the choice matters
    read = lambda out: [Video(codes=out.videos[0].codes)]  # noqa: E731 - the clip as the context it is read in
    picks, plain = _contrast_pick(engine, drawn, prompts, negatives, 3, read)
    assert picks != plain  # the negatives change a choice here, so ignoring them fails
    for i, out in enumerate(best):
        assert torch.equal(out.ids, drawn[picks[i]].ids), i
    one = engine.generate(prompts[0], best_of=3, negatives=negatives[0], **kwargs)  # one prompt: a flat list
    drawn = engine.generate([prompts[0]] * 3, max_images=1, **kwargs)
    (pick,), _ = _contrast_pick(engine, drawn, prompts[:1], negatives[:1], 3, read)
    assert torch.equal(one.ids, drawn[pick].ids)
    assert torch.equal(engine.generate(prompts[0], best_of=3, negatives=negatives[0] * 2, **kwargs).ids,
                       one.ids)  # a negative given twice counts once
    alone = engine.generate(prompts[1], best_of=3, negatives=negatives[1][0], **kwargs)  # or one str
    assert torch.equal(alone.ids, engine.generate(prompts[1], best_of=3, negatives=negatives[1], **kwargs).ids)


def test_best_of_with_negatives_ranks_images_by_the_same_contrast(engine):
    prompts = ["a red circle", "a blue square at the top"]
    negatives = [["a green circle", "a red square"], ["a blue square at the bottom"]]
    kwargs = dict(start_with="image", image_size=(2, 2), seed=5, image={"temperature": 1.0})
    best = engine.generate(prompts, best_of=3, negatives=negatives, **kwargs)
    drawn = engine.generate([p for p in prompts for _ in range(3)], max_images=1, **kwargs)
    picks, plain = _contrast_pick(engine, drawn, prompts, negatives, 3, lambda out: [Understand(out.images[0])])
    assert picks != plain  # the negatives change a choice here, so ignoring them fails
    for i, out in enumerate(best):
        assert torch.equal(out.ids, drawn[picks[i]].ids), i


def test_score_candidates_reads_images_and_clips_and_scores_nothing_drawn_as_minus_infinity(engine):
    picture = _picture(11, (32, 32))
    clip = engine.generate("a red circle moves up", start_with="video", video_size=(1, 2, 2), seed=0).videos[0]
    prompt, negatives = "a red circle moves up", ["a red circle moves down"]
    plain = engine.score_candidates([picture, None, Image(picture), clip], prompt)
    assert plain[1] == float("-inf") and plain[0] == pytest.approx(plain[2], abs=1e-5)  # a PIL image or a segment
    assert plain[0] == pytest.approx(engine.score([Understand(picture)], prompt)[0], abs=1e-4)
    assert plain[3] == pytest.approx(engine.score([Video(codes=clip.codes)], prompt)[0], abs=1e-4)
    read = torch.tensor([engine.score([Video(codes=clip.codes)], t)[0] for t in [prompt, *negatives]])
    (contrast,) = engine.score_candidates([clip], prompt, negatives)
    assert contrast == pytest.approx(float(read[0] - read.logsumexp(0)), abs=1e-4)
    assert engine.score_candidates([clip], prompt, negatives[0]) == [contrast]  # one str is one negative
    assert engine.score_candidates([clip], prompt, negatives * 2) == [contrast]  # given twice, counted once
    with pytest.raises(ValueError, match="a negative is the prompt itself"):
        engine.score_candidates([clip], prompt, [prompt + " "])
    assert engine.score_candidates([None, None], prompt) == [float("-inf")] * 2  # nothing to read: no forward
    with pytest.raises(ValueError, match="candidate #0 is a str; accepted: PIL.Image, Image, Video, None"):
        engine.score_candidates(["a picture"], prompt)
    with pytest.raises(ValueError, match="each negative must be a non-empty str"):
        engine.score_candidates([clip], prompt, [""])


def test_best_of_for_video_needs_a_video_tokenizer(engine, monkeypatch):
    monkeypatch.setattr(engine.tokenizer, "video", None)
    with pytest.raises(ValueError, match="has no video tokenizer"):
        engine.generate("a red circle moves up", start_with="video", best_of=2, negatives=["a red circle moves down"])


def test_best_of_needs_an_understanding_encoder():
    plain = random_engine("tiny", und_encoder=None)
    with pytest.raises(ValueError, match="has none"):
        plain.generate("a red circle", start_with="image", image_size=(2, 2), best_of=2)


# -- negative prompts (the guidance twin reads a text instead of the empty context) ------------------------------


def _first_code_is_guided_against(engine, prompt, negative, scale, kind):
    """Greedy, guided: the first body code drawn is the argmax of ``u + s·(c − u)``, with ``c`` the logits after the
    prompt and ``u`` those after ``negative``, both followed by the span written so far (one full forward each)."""
    v = engine.tokenizer.vocab
    greedy = {"temperature": 0.0, "guidance_scale": scale}
    size = dict(image_size=(2, 2)) if kind == "image" else dict(video_size=(1, 2, 2))
    out = engine.generate(prompt, start_with=kind, max_images=1, seed=0, negative_prompt=negative,
                          **{kind: greedy}, **size)
    lo, hi = (v.image_offset, v.video_offset) if kind == "image" else (v.video_offset, v.video_offset +
                                                                      v.video_codebook_size)
    ids = out.ids.tolist()
    k = next(i for i, t in enumerate(ids) if lo <= t < hi)  # the first body code
    prefix = torch.tensor(ids[:k])
    with torch.no_grad():
        c = engine.model(torch.cat([engine.encode_prompt(prompt).ids, prefix])[None])[0, -1, lo:hi]
        u = engine.model(torch.cat([engine.encode_prompt(negative).ids, prefix])[None])[0, -1, lo:hi]
        empty = engine.model(torch.cat([torch.tensor([v.bos, v.null]), prefix])[None])[0, -1, lo:hi]
    return ids[k] - lo, int((u + scale * (c - u)).argmax()), int((empty + scale * (c - empty)).argmax())


@pytest.mark.parametrize("kind", ["image", "video"])
def test_negative_prompt_is_what_the_guidance_twin_reads(engine, kind):
    # a large scale, so the twin's context decides the code (at 3 this random model's c alone does)
    drawn, expected, unconditional = _first_code_is_guided_against(
        engine, "a red circle moves up", "a red circle moves down and is much longer than the prompt", 30.0, kind)
    assert drawn == expected != unconditional


def test_negative_prompt_of_the_empty_context_is_plain_guidance_and_another_text_changes_the_draw(engine):
    v = engine.tokenizer.vocab
    greedy = {"temperature": 0.0, "guidance_scale": 3.0}
    prompts = ["a red circle moves up", "draw a cat on a mat"]
    kwargs = dict(start_with="video", video_size=(2, 2, 2), max_images=1, video=greedy)
    plain = engine.generate(prompts, **kwargs)
    from tokenizers_mm.multimodal import TokenSequence
    from tokenizers_mm.vocab import Modality

    empty = TokenSequence(ids=torch.tensor([v.bos, v.null]), modality=torch.tensor([Modality.TEXT] * 2))
    same = engine.generate(prompts, negative_prompt=[empty, empty], **kwargs)
    assert [o.ids.tolist() for o in same] == [o.ids.tolist() for o in plain]
    steered = engine.generate(prompts, negative_prompt="a red circle moves down", **kwargs)  # one str: every prompt
    assert [o.ids.tolist() for o in steered] != [o.ids.tolist() for o in plain]
    one = engine.generate(prompts[0], negative_prompt="a red circle moves down", **kwargs)
    assert one.ids.tolist() == steered[0].ids.tolist()  # rows do not see each other's twins
    fast = engine.generate(prompts, negative_prompt="a red circle moves down", speculative=3, **kwargs)
    assert [o.ids.tolist() for o in fast] == [o.ids.tolist() for o in steered]  # speculative: the same ids


@pytest.mark.parametrize("kwargs, match", [
    ({"negative_prompt": "a red circle moves down"}, "off \\(guidance_scale 1\\) for every medium .* video="),
    ({"negative_prompt": ["a", "b"], "video": {"guidance_scale": 2.0}}, "one str per prompt \\(1\\)"),
    ({"negative_prompt": "  ", "video": {"guidance_scale": 2.0}}, "negative_prompt #0 must be a non-empty str"),
    ({"negatives": ["a red circle moves down"]}, "to steer the drawing itself away from a text, pass negative_prompt"),
    ({"negative_prompt": "__understood__", "video": {"guidance_scale": 2.0}}, "cannot be one"),
    ({"negative_prompt": "a red circle " * 400, "video": {"guidance_scale": 2.0}},
     "negative prompt #0 is \\d+ tokens but the model's context is .* shorten the negative prompt"),
])
def test_negative_prompt_refusals_say_what_to_pass(engine, kwargs, match):
    if kwargs.get("negative_prompt") == "__understood__":  # an encoded prompt holding an understood image
        kwargs = {**kwargs, "negative_prompt": [engine.encode_prompt([Understand(_picture(2)), "x"])]}
    with pytest.raises(ValueError, match=match):
        engine.generate("a red circle moves up", start_with="video", video_size=(1, 2, 2), max_images=1, **kwargs)


def test_best_of_draws_every_candidate_with_its_prompts_negative_prompt(engine):
    prompts = ["a red circle moves up", "a blue square moves to the left"]
    negatives = [["a red circle moves down"], ["a blue square moves to the right"]]
    steer = ["a red circle moves down", "a blue square moves to the right"]
    kwargs = dict(start_with="video", video_size=(1, 2, 2), seed=4, video={"temperature": 1.0, "guidance_scale": 2.0})
    best = engine.generate(prompts, best_of=2, negatives=negatives, negative_prompt=steer, **kwargs)
    drawn = engine.generate([p for p in prompts for _ in range(2)], max_images=1,
                            negative_prompt=[n for n in steer for _ in range(2)], **kwargs)
    read = lambda out: [Video(codes=out.videos[0].codes)]  # noqa: E731
    picks, _ = _contrast_pick(engine, drawn, prompts, negatives, 2, read)
    assert [o.ids.tolist() for o in best] == [drawn[k].ids.tolist() for k in picks]
    with pytest.raises(ValueError, match="negative_prompt and regions go with best_of on text→image or text→video"):
        engine.generate([Understand(_picture(1))], best_of=2, negative_prompt="x", image={"guidance_scale": 2.0})


# -- image guidance (InstructPix2Pix: a second twin reads only the prompt's images and clips) ---------------------


def _first_code_under_image_guidance(engine, prompt, scale, source_scale, kind="image"):
    """Greedy: the first body code drawn with image guidance, and the argmax of ``u + s_I·(c_m − u) + s·(c − c_m)``
    and of plain ``u + s·(c − u)`` from full forwards (``c``: the prompt, ``u``: ``<|bos|><|null|>``, ``c_m``:
    ``<|bos|>`` and the prompt's VQ spans, each followed by the span written so far)."""
    v = engine.tokenizer.vocab
    size = dict(image_size=(2, 2)) if kind == "image" else dict(video_size=(1, 2, 2))
    out = engine.generate(prompt, start_with=kind, max_images=1, seed=0, **size,
                          **{kind: {"temperature": 0.0, "guidance_scale": scale, "image_guidance_scale": source_scale}})
    lo, hi = (v.image_offset, v.video_offset) if kind == "image" else (v.video_offset,
                                                                      v.video_offset + v.video_codebook_size)
    ids = out.ids.tolist()
    k = next(i for i, t in enumerate(ids) if lo <= t < hi)
    prefix = torch.tensor(ids[:k])
    full = engine.encode_prompt(prompt).ids.tolist()
    media, i = [v.bos], 0
    while i < len(full):  # the test's own reading of "the prompt's closed spans"
        if full[i] in (v.boi, v.bov):
            j = full.index(v.eoi if full[i] == v.boi else v.eov, i)
            media += full[i:j + 1]
            i = j
        i += 1
    with torch.no_grad():
        read = lambda ctx: engine.model(torch.cat([torch.tensor(ctx), prefix])[None])[0, -1, lo:hi]  # noqa: E731
        c, u, m = read(full), read([v.bos, v.null]), read(media)
    two = u + source_scale * (m - u) + scale * (c - m)
    return ids[k] - lo, int(two.argmax()), int((u + scale * (c - u)).argmax())


@pytest.mark.parametrize("kind", ["image", "video"])
def test_image_guidance_draws_from_the_source_twin_formula(engine, kind):
    prompt = [Image(_picture(1)), "make the circle yellow", Image(_picture(2))]
    drawn, expected, plain = _first_code_under_image_guidance(engine, prompt, 4.0, 30.0, kind)
    assert drawn == expected != plain


def test_image_guidance_changes_nothing_without_a_source_or_at_the_plain_scale(engine):
    """A prompt without images or clips is guided plainly (a batch mixing both guides that row as if alone), and
    ``image_guidance_scale == guidance_scale`` is plain guidance; a different scale changes an edit's draw."""
    kw = dict(start_with="image", image_size=(2, 3), max_images=1, seed=2)
    edit = [Image(_picture(3)), "make it red"]
    for sampling in ({"temperature": 0.0, "guidance_scale": 3.0}, {"temperature": 1.0, "guidance_scale": 2.0}):
        plain = engine.generate(["a red circle", edit], image={**sampling, "image_guidance_scale": None}, **kw)
        same = engine.generate(["a red circle", edit], image={**sampling, "image_guidance_scale":
                                                              sampling["guidance_scale"]}, **kw)
        assert [o.ids.tolist() for o in same] == [o.ids.tolist() for o in plain]
        if sampling["temperature"] == 0.0:  # greedy: a row's draw does not depend on the batch's noise
            mixed = engine.generate(["a red circle", edit], image={**sampling, "image_guidance_scale": 30.0}, **kw)
            assert mixed[0].ids.tolist() == plain[0].ids.tolist()
            assert mixed[1].ids.tolist() != plain[1].ids.tolist()
    alone = engine.generate("a red circle", image={"temperature": 1.0, "image_guidance_scale": 5.0}, **kw)
    off = engine.generate("a red circle", image={"temperature": 1.0, "image_guidance_scale": None}, **kw)
    assert alone.ids.tolist() == off.ids.tolist()


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
def test_image_guidance_runs_a_second_twin_per_row_only_when_a_prompt_has_a_source(engine, fast):
    from anygen.generation.generator import GenerationSettings, Generator

    generator = Generator(engine.model, engine.tokenizer, fast=fast)
    settings = GenerationSettings(max_new_tokens=16, start_with="image", image_size=(2, 2), max_images=1,
                                  image=SamplingConfig(temperature=0.0, guidance_scale=3.0, image_guidance_scale=1.5))
    texts = [engine.encode_prompt(p) for p in ("a red circle", "a blue square")]
    generator.generate(texts, settings)
    assert engine.model.cache_valid.shape[0] == 4
    sourced = [texts[0], engine.encode_prompt([Image(_picture(4)), "make it red"])]
    generator.generate(sourced, settings)
    assert engine.model.cache_valid.shape[0] == 6
    only_source = GenerationSettings(**{**settings.__dict__, "image": SamplingConfig(temperature=0.0,
                                                                                     image_guidance_scale=1.5)})
    generator.generate(texts, only_source)  # guidance 1 and no source: nothing to guide, no twins
    assert engine.model.cache_valid.shape[0] == 2
    generator.generate(sourced, only_source)  # the source against the empty context: both groups
    assert engine.model.cache_valid.shape[0] == 6
    v = engine.tokenizer.vocab
    twin = generator._source_twin(engine.encode_prompt(["a", Image(_picture(5)), "b", Understand(_picture(6)), "c"]))
    full = engine.encode_prompt(["a", Image(_picture(5)), "b"]).ids.tolist()
    span = full[full.index(v.boi):full.index(v.eoi) + 1]
    assert twin.tolist() == [v.bos, *span]  # the VQ span kept; text and the understood image left out
    assert generator._source_twin(texts[0]) is None


def test_image_guidance_is_the_same_in_both_loops_and_speculative(engine):
    from anygen.generation.generator import GenerationSettings, Generator

    prompts = [engine.encode_prompt(p) for p in ([Image(_picture(7)), "make it red"], "a red circle")]
    greedy = GenerationSettings(max_new_tokens=24, start_with="image", image_size=(3, 3), max_images=1,
                                image=SamplingConfig(temperature=0.0, guidance_scale=3.0, image_guidance_scale=1.5))
    fast = [r.ids.tolist() for r in Generator(engine.model, engine.tokenizer).generate(prompts, greedy)]
    plain = [r.ids.tolist() for r in Generator(engine.model, engine.tokenizer, fast=False).generate(prompts, greedy)]
    assert fast == plain
    kw = dict(start_with="image", image_size=(3, 3), max_images=1,
              image={"temperature": 0.0, "guidance_scale": 3.0, "image_guidance_scale": 1.5})
    raw = [[Image(_picture(7)), "make it red"], "a red circle"]
    spec = engine.generate(raw, speculative=3, **kw)
    assert [o.ids.tolist() for o in spec] == [o.ids.tolist() for o in engine.generate(raw, **kw)]


@pytest.mark.parametrize("field, value, message", [
    *[("image_guidance_scale", v, "image_guidance_scale must be None \\(off\\) or a number >= 0")
      for v in (-1.0, True, "2")],
    *[("guidance_start", v, "guidance_start must be a fraction in \\[0, 1\\)") for v in (-0.1, 1.0, True, "0.1")],
])
def test_guidance_settings_refuse_what_is_not_a_scale_or_a_fraction(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**{field: value})


@pytest.mark.parametrize("flag, field, value", [("--image-image-guidance-scale", "image_guidance_scale", 1.5),
                                                ("--image-guidance-start", "guidance_start", 0.1)])
def test_cli_takes_a_guidance_setting_as_a_number_and_leaves_it_to_the_checkpoint_otherwise(flag, field, value):
    from anygen.cli_generate import _sampling, build_parser

    args = build_parser().parse_args(["make it red", flag, str(value)])
    assert _sampling(args, "image") == {field: value}
    assert field not in _sampling(build_parser().parse_args(["x"]), "image")


# -- guidance_start: a span's first codes drawn from the conditional alone ------------------------------------------


def _codes(out, kind="image"):
    """The codes of the output's first image or clip."""
    return next(s.codes for s in out.segments if isinstance(s, Image if kind == "image" else Video))


@pytest.mark.parametrize("kind", ["image", "video"])
def test_guidance_start_draws_the_first_codes_unguided_and_guides_the_rest(engine, kind):
    """Greedy, so each code is the argmax of its logits: with ``guidance_start`` 0.5 the first half of the span's
    codes (raster order, across frames for a clip) are the unguided draw's and the rest are guided."""
    size = dict(image_size=(4, 4)) if kind == "image" else dict(video_size=(2, 2, 4))
    kw = dict(start_with=kind, max_images=1, seed=0, **size)
    prompt = "a red circle"

    def draw(**sampling):
        out = engine.generate(prompt, **kw, **{kind: {"temperature": 0.0, **sampling}})
        return _codes(out, kind).flatten().tolist()

    unguided, guided = draw(guidance_scale=1.0), draw(guidance_scale=8.0)
    half = draw(guidance_scale=8.0, guidance_start=0.5)
    n = len(unguided)
    assert unguided != guided  # the test needs guidance to matter on this model
    assert half[:n // 2] == unguided[:n // 2]
    assert half != unguided
    assert draw(guidance_scale=8.0, guidance_start=0.0) == guided


def test_guidance_start_is_the_same_in_both_loops_and_speculative(engine):
    from anygen.generation.generator import GenerationSettings, Generator

    prompts = [engine.encode_prompt(p) for p in ([Image(_picture(7)), "make it red"], "a red circle")]
    sampling = dict(temperature=0.0, guidance_scale=6.0, image_guidance_scale=1.5, guidance_start=0.4)
    greedy = GenerationSettings(max_new_tokens=40, start_with="image", image_size=(4, 4), max_images=1,
                                image=SamplingConfig(**sampling))
    fast = [r.ids.tolist() for r in Generator(engine.model, engine.tokenizer).generate(prompts, greedy)]
    plain = [r.ids.tolist() for r in Generator(engine.model, engine.tokenizer, fast=False).generate(prompts, greedy)]
    assert fast == plain
    raw = [[Image(_picture(7)), "make it red"], "a red circle"]
    kw = dict(start_with="image", image_size=(4, 4), max_images=1, image=sampling)
    spec = engine.generate(raw, speculative=3, **kw)
    assert [o.ids.tolist() for o in spec] == [o.ids.tolist() for o in engine.generate(raw, **kw)]
    always = engine.generate(raw, **{**kw, "image": {**sampling, "guidance_start": 0.0}})
    assert [o.ids.tolist() for o in always] != fast  # the start changed something the loops agree on


def test_guidance_start_travels_through_the_eval_sampling():
    defaults = SamplingDefaults(image=SamplingConfig(guidance_scale=3.0, guidance_start=0.2))
    assert eval_sampling(defaults=defaults)["image"]["guidance_start"] == 0.2
    assert eval_sampling(defaults=defaults, guidance_start=0.0)["image"]["guidance_start"] == 0.0
