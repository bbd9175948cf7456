"""Multi-turn chat with a kept KV cache (minterleave/chat.py, `sample.py --chat`) on the bundled tiny model."""

import io
import json
import os

import pytest
import torch

import minterleave as mi
from minterleave.chat import ChatSession, ContextFull, repl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED = os.path.join(ROOT, "weights", "minterleave-tiny")


@pytest.fixture(scope="module")
def tiny():
    model = mi.Model.from_pretrained(BUNDLED).prepare_for_inference(BUNDLED)  # as sample.py decodes
    return model, mi.Processor.from_pretrained(BUNDLED)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from minterleave import tasks
    root = tmp_path_factory.mktemp("chat_images")
    sample = tasks.make_sample("multi_image", 4242, image_size=96)
    paths = [str(root / f"{k}.png") for k in range(len(sample.images))]
    for image, path in zip(sample.images, paths):
        image.save(path)
    return paths


def test_follow_up_prefills_only_new_tokens_and_equals_re_prefilling(tiny, images):
    model, proc = tiny
    session = ChatSession(model, proc)
    session.add_image(images[0])
    first = session.ask("What colour is the shape?", max_new_tokens=12)
    session.add_image(images[1])
    second = session.ask("And in this one?", max_new_tokens=12)
    # the follow-up ran only its own turn through the model, plus the last answer token (sampled, never fed)
    before = first["conversation"] + len(first["ids"])
    assert second["prefilled"] == second["conversation"] - before + 1 < second["conversation"]
    assert session.cache.length == len(session.ids) - 1  # everything but the last sampled token is cached
    # the same conversation prefilled from nothing gives the same tokens
    prompt = torch.tensor([session.ids[:session.prompt_end]])
    again = model.generate(prompt, pixel_values=torch.cat(session.pixels), max_new_tokens=12,
                           eos_token_id=proc.eos_token_ids)
    assert again[0].tolist() == second["ids"]
    # and turn-by-turn tokenization is the whole conversation's: the processor's ids of the saved messages
    whole = proc(proc.apply_chat_template(session.messages[:-1]), images=images[:2])
    assert whole["input_ids"][0].tolist() == session.ids[:session.prompt_end]
    seconds, n = session.ttft_compare()
    assert n == session.prompt_end and seconds > 0


def test_context_full_is_refused_with_state_kept_then_reset(tiny, images):
    model, proc = tiny
    session = ChatSession(model, proc)
    hello = session.ask("Hello", max_new_tokens=4)["ids"]
    ids, cached = list(session.ids), session.cache.length
    with pytest.raises(ContextFull, match=r"context is 2048 tokens: /reset"):
        session.ask("word " * 2100, max_new_tokens=4)
    assert session.ids == ids and session.cache.length == cached  # nothing of the refused turn was kept
    # a turn that fits but leaves less room than asked: the answer stops at the context ...
    question = "word " * (2048 - len(ids) - 20)
    answer = session.ask(question, max_new_tokens=100)
    assert answer["finish"] == "length" and len(session.ids) == 2048
    with pytest.raises(ContextFull):  # ... and the next turn is refused
        session.ask("more?")
    session.reset()
    assert session.ask("Hello", max_new_tokens=4)["ids"] == hello  # a fresh conversation


def test_repl_commands_never_crash(tiny, images, tmp_path):
    model, proc = tiny
    lines = iter(["/image missing.png", "/video", "/bogus", f"/image {images[0]}", "What colour is the shape?",
                  "/ttft", "word " * 2100, f"/save {tmp_path / 'chat.json'}", "/reset", "Hello", "/quit", "unread"])
    out = io.StringIO()

    def read(prompt):
        return next(lines)

    assert repl(ChatSession(model, proc), dict(max_new_tokens=8), read=read,
                write=lambda *a, end="\n", flush=False: out.write(" ".join(map(str, a)) + end)) == 0
    text = out.getvalue()
    assert "[error: image file not found: missing.png]" in text
    assert "unknown command or wrong arguments: '/video'" in text and "'/bogus'" in text
    assert "re-prefilling all" in text and "first token" in text
    assert "/reset to start over" in text  # the context-full turn offers /reset
    assert "[conversation and cache cleared]" in text
    saved = json.loads((tmp_path / "chat.json").read_text())
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant"]
    assert saved["messages"][0]["content"][0] == {"type": "image", "path": images[0]}
    assert next(lines) == "unread"  # /quit ended the loop


def test_sample_py_chat_keeps_the_first_turn_from_the_flags(images, monkeypatch, capsys):
    import sample
    monkeypatch.setattr("sys.stdin", io.StringIO("And now?\n"))
    assert sample.main(["--chat", "--image", images[0], "--prompt", "What colour is the shape?",
                        "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("> What colour is the shape?\n") and "(conversation " in out


def test_video_and_views_turns(tiny, images, tmp_path):
    from minterleave import tasks
    from minterleave.tasks.render import save_video
    model, proc = tiny
    clip = str(tmp_path / "clip.mp4")
    save_video(tasks.make_sample("video", 4242, image_size=96, placement="front").images, clip)
    session = ChatSession(model, proc)
    lines = iter([f"/video {clip} 2", "What happens first?", f"/views {images[0]} {images[1]}", "How many?",
                  f"/video {clip} 0"])
    out = []
    repl(session, dict(max_new_tokens=4), read=lambda prompt: next(lines, "/quit"), write=lambda *a, **k: out.append(a))
    assert [p.shape[0] for p in session.pixels] == [2, 2]  # 2 frames, then 2 views
    assert session.messages[0]["content"][0] == {"type": "video", "path": clip}
    assert [c["type"] for c in session.messages[2]["content"]] == ["image", "image", "text"]
    assert any("frames must be >= 1, got 0" in str(a) for a in out)
