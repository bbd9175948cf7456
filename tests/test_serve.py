"""serve.py with real clients: the `openai` package and raw HTTP against the server in a subprocess (bundled
tiny model), the request lmms-eval's openai-compatible model sends, every error case, and the batching
engine (minterleave/batching.py) in process: rows joining and leaving a running batch get what they get alone."""

import asyncio
import base64
import http.client
import json
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

import minterleave as mi
from minterleave.batching import Batcher, Job

openai = pytest.importorskip("openai")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED = os.path.join(ROOT, "weights", "minterleave-tiny")
KEY = "test-key"
QUESTION = "What colour is the shape?"


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """media_root/{0..3}.png (one image per domain's first frame), and a file outside with a symlink to it."""
    from minterleave import tasks
    base = tmp_path_factory.mktemp("serve")
    root = base / "media_root"
    root.mkdir()
    paths = []
    for k, domain in enumerate(tasks.DOMAINS):
        tasks.make_sample(domain, 4242 + k, image_size=96).images[0].save(root / f"{k}.png")
        paths.append(str(root / f"{k}.png"))
    (base / "secret.png").write_bytes((root / "0.png").read_bytes())
    os.symlink(base / "secret.png", root / "escape.png")
    return str(root), paths


@pytest.fixture(scope="module")
def server(media, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve_log") / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "serve.py", "--port", "0", "--api-key", KEY, "--media-root", media[0],
                                 "--max-body-mb", "2", "--max-media-mb", "1", "--max-tokens", "32"],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        for _ in range(600):
            text = log.read_text()
            if "serving" in text or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert "serving minterleave-tiny on http://127.0.0.1:" in text, text
        yield int(text.split("http://127.0.0.1:")[1].split("/")[0])
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key=KEY, max_retries=0)


def data_url(path):
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def image_question(path, question=QUESTION):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(path)}},
                                         {"type": "text", "text": question}]}]


def answer(client, messages, **kw):
    return client.chat.completions.create(model="minterleave-tiny", messages=messages, **kw)


def test_openai_client_image_answer_equals_sample_py_and_streams_the_same(client, media, capsys):
    import sample
    path = media[1][0]
    assert sample.main(["--image", path, "--prompt", QUESTION, "--max-new-tokens", "32"]) == 0
    out = capsys.readouterr().out
    expected = out[:out.rindex("\n[prompt")]
    r = answer(client, image_question(path), max_tokens=32)
    assert r.object == "chat.completion" and r.model == "minterleave-tiny"
    assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "stop"
    n_prompt = int(out.split("[prompt ")[1].split()[0])
    assert (r.usage.prompt_tokens, r.usage.total_tokens) == (n_prompt, n_prompt + r.usage.completion_tokens)
    chunks = list(answer(client, image_question(path), max_tokens=32, stream=True,
                         stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-2].choices[0].finish_reason == "stop" and chunks[-1].usage.completion_tokens == \
        r.usage.completion_tokens
    assert [m.id for m in client.models.list().data] == ["minterleave-tiny"]


def test_lmms_eval_request_shape(server, media, client):
    """What lmms-eval's `openai_compatible` model sends: text part first, then base64 PNG image_url parts
    (re-encoded with PIL), its own model name, max_tokens 1024, temperature 0; through AsyncOpenAI."""
    import io
    from PIL import Image
    buffer = io.BytesIO()
    Image.open(media[1][0]).convert("RGB").save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    payload = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": QUESTION}, {"type": "image_url", "image_url": {"url": url}}]}],
        "model": "grok-2-latest", "max_tokens": 1024, "temperature": 0}

    async def ask():
        async with openai.AsyncOpenAI(api_key=KEY, base_url=f"http://127.0.0.1:{server}/v1", max_retries=0) as c:
            return await c.chat.completions.create(**payload)

    r = asyncio.run(ask())
    # the chat template puts a turn's images first, so this is the image-first question's answer
    assert r.choices[0].message.content == answer(client, image_question(media[1][0]), max_tokens=1024).choices[
        0].message.content != ""


def test_multi_turn_with_an_image_in_an_earlier_turn_equals_the_chat_session(client, media):
    from minterleave.chat import ChatSession
    session = ChatSession(mi.Model.from_pretrained(BUNDLED).prepare_for_inference(BUNDLED),
                          mi.Processor.from_pretrained(BUNDLED))
    session.add_image(media[1][2])
    first = session.ask(QUESTION, max_new_tokens=16)
    second = session.ask("Are you sure?", max_new_tokens=16)
    messages = image_question(media[1][2]) + [{"role": "assistant", "content": first["text"]},
                                              {"role": "user", "content": [{"type": "text", "text": "Are you sure?"}]}]
    r = answer(client, messages, max_tokens=16)
    assert r.choices[0].message.content == second["text"]
    assert r.usage.prompt_tokens == second["conversation"]


def test_eight_concurrent_clients_get_what_they_get_alone(server, client, media):
    requests = [dict(messages=image_question(p, q), max_tokens=24) for p in media[1][:3]
                for q in (QUESTION, "How many shapes are there?")][:5]
    requests += [dict(messages=[{"role": "user", "content": "Hello"}], max_tokens=20),
                 dict(messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=11, stop=["xyz"]),
                 dict(messages=[{"role": "user", "content": "Hello"}], max_tokens=17, temperature=1.0, seed=3)]
    alone = [answer(client, **r).choices[0].message.content for r in requests]
    before = health(server)
    results, barrier = [None] * 8, threading.Barrier(8)

    def run(i):
        barrier.wait()
        results[i] = answer(client, **requests[i]).choices[0].message.content

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == alone
    after = health(server)
    assert after["requests"] - before["requests"] == 8 and after["max_rows"] >= 2  # they were batched


def test_a_client_leaving_mid_stream_frees_its_row(server):
    before = health(server)["steps"]
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=30)
    conn.request("POST", "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                 body=json.dumps({"messages": HELLO, "max_tokens": 1500, "stream": True}))
    r = conn.getresponse()
    assert r.fp.readline().startswith(b"data: {")
    r.close()
    conn.close()
    time.sleep(1.0)
    steps = health(server)["steps"]
    assert steps - before < 1000  # the 1500-token answer stopped when its reader went away
    time.sleep(0.5)
    assert health(server)["steps"] == steps
    assert raw(server, json.dumps({"messages": HELLO, "max_tokens": 2}).encode())[0] == 200

def health(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/health")
    return json.loads(conn.getresponse().read())


def raw(port, body, headers=None, path="/v1/chat/completions"):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", path, body=body, headers={"Authorization": f"Bearer {KEY}", **(headers or {})})
    r = conn.getresponse()
    return r.status, json.loads(r.read())


HELLO = [{"role": "user", "content": "Hello"}]


def part(kind, url):
    return [{"role": "user", "content": [{"type": kind, kind: {"url": url}}, {"type": "text", "text": "?"}]}]


ERRORS = [  # (name, request, status, code, words in the message)
    ("bad_json", b'{"messages": [', 400, "invalid_json", "invalid JSON"),
    ("not_an_object", b'[1, 2]', 400, "invalid_json", "JSON object"),
    ("wrong_key", {"messages": HELLO, "_key": "nope"}, 401, "invalid_api_key", "invalid API key"),
    ("body_too_large", "3 MB", 413, "request_too_large", "over the limit"),
    ("image_too_large", part("image_url", "data:image/png;base64," + "A" * 1_600_000), 413, None, "over 1 MB"),
    ("not_an_image", part("image_url", "data:image/png;base64," + base64.b64encode(b"garbage").decode()), 400,
     "invalid_media", "cannot read image file messages[0].content[0]"),
    ("not_base64", part("image_url", "data:image/png;base64,@@@"), 400, None, "not valid base64"),
    ("remote_url", part("image_url", "https://example.com/cat.png"), 400, None, "never fetches"),
    ("dot_dot", part("image_url", "../secret.png"), 400, None, "outside --media-root"),
    ("symlink_escape", part("image_url", "escape.png"), 400, None, "outside --media-root"),
    ("file_url_with_a_host", part("image_url", "file://host/0.png"), 400, None, "file:///path"),
    ("missing_file", part("video_url", "nope.mp4"), 400, None, "no such file under --media-root"),
    ("unsupported_part", [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}], 400, None,
     "unsupported content part"),
    ("bad_role", [{"role": "tool", "content": "x"}], 400, None, "role must be"),
    ("temperature", {"messages": HELLO, "temperature": 2.5}, 422, "invalid_value", "temperature must be in [0, 2]"),
    ("top_p", {"messages": HELLO, "top_p": 0}, 422, "invalid_value", "top_p must be in (0, 1]"),
    ("max_tokens", {"messages": HELLO, "max_tokens": 0}, 422, "invalid_value", "max_tokens must be >= 1"),
    ("n", {"messages": HELLO, "n": 2}, 422, "invalid_value", "only n=1"),
    ("prompt_past_context", [{"role": "user", "content": "word " * 2100}], 400, "context_length_exceeded",
     "maximum context length is 2048 tokens. However, your messages resulted in"),
    ("answer_past_context", {"messages": HELLO, "max_tokens": 2040}, 400, "context_length_exceeded",
     "you requested 2053 tokens (13 in the messages, 2040 in the completion)"),
    ("unknown_path", b"{}", 404, "not_found", "no such endpoint"),
]


@pytest.mark.parametrize("name,request_,status,code,words", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors_are_openai_json_and_the_server_keeps_answering(server, media, name, request_, status, code, words):
    if name == "body_too_large":  # the limit is decided from the header: the body is never read
        conn = http.client.HTTPConnection("127.0.0.1", server, timeout=30)
        conn.putrequest("POST", "/v1/chat/completions")
        conn.putheader("Authorization", f"Bearer {KEY}")
        conn.putheader("Content-Length", str(3 * 2**20))
        conn.endheaders()
        r = conn.getresponse()
        got_status, body = r.status, json.loads(r.read())
    elif isinstance(request_, bytes):
        got_status, body = raw(server, request_, path="/v1/nothing" if name == "unknown_path" else
                               "/v1/chat/completions")
    else:
        request_ = dict(request_) if isinstance(request_, dict) else {"messages": request_}
        key = request_.pop("_key", KEY)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key=key, max_retries=0)
        with pytest.raises(openai.APIStatusError) as e:
            c.chat.completions.create(model="minterleave-tiny", **request_)
        got_status, body = e.value.status_code, e.value.response.json()
    assert got_status == status
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "code", "param"}
    assert body["error"]["code"] == code and words in body["error"]["message"], body
    assert raw(server, json.dumps({"messages": HELLO, "max_tokens": 2}).encode())[0] == 200


def test_local_paths_inside_the_media_root_and_videos(client, media):
    expected = answer(client, part("image_url", data_url(media[1][0])), max_tokens=4).choices[0].message.content
    for url in ("0.png", f"file://{media[0]}/0.png", f"{media[0]}/0.png"):
        assert answer(client, part("image_url", url), max_tokens=4).choices[0].message.content == expected
    from minterleave.tasks.render import save_video
    from minterleave import tasks
    clip = os.path.join(media[0], "clip.mp4")
    save_video(tasks.make_sample("video", 4242, image_size=96, placement="front").images, clip)
    with open(clip, "rb") as f:
        inline = "data:video/mp4;base64," + base64.b64encode(f.read()).decode()
    by_path, by_data = (answer(client, part("video_url", url), max_tokens=8) for url in ("clip.mp4", inline))
    assert by_path.choices[0].message.content == by_data.choices[0].message.content
    # the checkpoint's 4 frames of 9 tokens each, then the text
    assert by_path.usage.prompt_tokens == by_data.usage.prompt_tokens > 4 * 9


# ------------------------------------------------------------------------------------- the engine in process

@pytest.fixture(scope="module")
def tiny():
    model = mi.Model.from_pretrained(BUNDLED).prepare_for_inference(BUNDLED)
    return model, mi.Processor.from_pretrained(BUNDLED)


def test_rows_joining_and_leaving_a_running_batch_get_what_they_get_alone(tiny, media):
    model, proc = tiny
    batcher = Batcher(model, proc.eos_token_ids, proc.decode)

    def prompt(text, image=None):
        content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]
        inputs = proc(proc.apply_chat_template([{"role": "user", "content": content}]), images=image)
        return inputs["input_ids"][0].tolist(), inputs.get("pixel_values")

    jobs = [(prompt("Hello"), dict(max_new=30)),  # runs first; the others join while it decodes
            (prompt(QUESTION, media[1][1]), dict(max_new=12)),  # longer than the running rows: they shift right
            (prompt("Hi"), dict(max_new=5)),  # shorter: left-padded; leaves first
            (prompt("Hello"), dict(max_new=9, temperature=1.0, seed=11))]  # seeded sampling: its own generator
    running = batcher.submit(Job(*jobs[0][0], **jobs[0][1]))
    while len(running.out) < 6:
        time.sleep(0.01)
    later = [batcher.submit(Job(*p, **kw)) for p, kw in jobs[1:]]
    for job in [running] + later:
        assert list(job.stream())[-1][0] == "done"
    assert batcher.stats["max_rows"] == 4
    for job, ((ids, pixels), kw) in zip([running] + later, jobs):
        alone = model.generate(torch.tensor([ids]), pixel_values=pixels, max_new_tokens=kw["max_new"],
                               temperature=kw.get("temperature", 0.0), seed=kw.get("seed"),
                               eos_token_id=proc.eos_token_ids)
        assert job.out == alone[0].tolist()


def test_local_paths_without_a_media_root_are_refused(tiny, media):
    from minterleave.server import App, APIError
    app = App(*tiny, "tiny")  # no --media-root: only data: URLs
    for url in ("0.png", media[1][0], f"file://{media[1][0]}"):
        with pytest.raises(APIError, match="local paths are refused") as e:
            app.job({"messages": part("image_url", url)})
        assert e.value.status == 400
    job, stream, usage = app.job({"messages": part("image_url", data_url(media[1][0])), "stream": True})
    assert job.pixels.shape[0] == 1 and stream and not usage


def test_bench_serve_load_test_counts_what_the_server_answered(server):
    import bench
    bodies = [{"messages": [{"role": "user", "content": "Hello"}], "max_tokens": n} for n in (3, 5, 7, 2)]
    seconds, tokens = bench.load_test(server, bodies, 3, key=KEY)
    assert seconds > 0 and tokens == 3 + 5 + 7 + 2  # the tiny model says "green" until max_tokens
    with pytest.raises(RuntimeError, match="serve.py answered 401: invalid API key"):
        bench.load_test(server, bodies[:1], 1)


@pytest.mark.slow
def test_bench_serve_runs_end_to_end_on_the_tiny_model(tmp_path, capsys):
    import bench
    assert bench.main(["serve", "--model", BUNDLED, "--dtype", "float32", "--clients", "1,2", "--requests", "2",
                       "--max-tokens", "4", "--ttft-rounds", "1", "--json", str(tmp_path / "serve.json")]) == 0
    results = json.loads((tmp_path / "serve.json").read_text())["results"]
    assert set(results["throughput"]) == {f"{k} {c}" for k in ("batched", "sequential", "gain") for c in (1, 2)}
    assert results["chat_ttft"]["kept_tokens"] < results["chat_ttft"]["full_tokens"]
    assert "| 2 |" in capsys.readouterr().out


def test_a_failing_request_fails_alone_and_the_running_batch_goes_on(tiny, media):
    model, proc = tiny
    batcher = Batcher(model, proc.eos_token_ids, proc.decode)
    ids = proc(proc.apply_chat_template([{"role": "user", "content": "Hello"}]))["input_ids"][0].tolist()
    running = batcher.submit(Job(ids, max_new=20))
    while len(running.out) < 3:
        time.sleep(0.01)
    broken = batcher.submit(Job(ids[:-1] + [model.cfg.image_token_id], max_new=5))  # an image token, no pixels
    assert list(broken.stream())[-1][0] == "error"
    assert list(running.stream())[-1] == ("done", "length", 20)
    assert running.out == model.generate(torch.tensor([ids]), max_new_tokens=20)[0].tolist()


def test_stop_strings_end_the_answer_before_them_and_are_never_streamed(tiny):
    model, proc = tiny
    batcher = Batcher(model, proc.eos_token_ids, proc.decode)
    ids = proc(proc.apply_chat_template([{"role": "user", "content": "Hello"}]))["input_ids"][0].tolist()
    free = list(batcher.submit(Job(ids, max_new=3)).stream())
    assert "".join(e[1] for e in free if e[0] == "text") == "greengreengreen"  # what the tiny model says
    events = list(batcher.submit(Job(ids, max_new=10, stop=["xyz", "engr"])).stream())
    assert [e[1] for e in events if e[0] == "text"] == ["gr", "e"]  # "en" held back until it could not be "engr"
    assert events[-1] == ("done", "stop", 2)
