"""`python sample.py` with no arguments: one fresh synthetic question per domain for the bundled model.

Each example is made by tasks.make_sample from a seed that training never uses (data.py keeps
training seeds >= 1e9), saved to disk so you can look at it (PNG images; the video domain as an
mp4 that goes through the real PyAV path), asked with the same prompt layout training used, and
answered in a stream next to the expected answer.
"""

import os
import sys
import time

from . import tasks
from .data import prompt_for
from .tasks.render import save_video

DEMO_SEED = 4242  # an evaluation-range seed (< 1e9): never seen in training


def stream_answer(model, proc, prompt, images=(), videos=(), num_frames=None, multi_patch=False, out=None,
                  **generate_kwargs):
    """Generate the answer to `prompt`, writing it to `out` as it comes (never a broken UTF-8 piece; default: the
    sys.stdout of the call, not of the import). Returns (text, prompt tokens, new tokens, seconds)."""
    out = sys.stdout if out is None else out
    inputs = proc(prompt, images=list(images) or None, videos=list(videos) or None, num_frames=num_frames,
                  multi_patch=multi_patch)
    stream = proc.stream_decoder()

    def show(token):
        piece = stream.put([int(token[0])])
        if piece:
            out.write(piece)
            out.flush()

    t0 = time.time()
    new = model.generate(**inputs, eos_token_id=proc.eos_token_ids, stream=show, **generate_kwargs)
    seconds = time.time() - t0
    out.write(stream.flush() + "\n")
    return proc.decode(new[0]), inputs["input_ids"].shape[1], new.shape[1], seconds


def run_demo(model, proc, generate_kwargs, model_name="the model", out_dir="sample_out", seed=DEMO_SEED,
             write=print):
    os.makedirs(out_dir, exist_ok=True)
    write(f"Asking {model_name} one question per domain; inputs are saved in {out_dir}/\n")
    correct = 0
    for domain in tasks.DOMAINS:
        # the video goes in as one clip, so its frames must sit together: front placement
        sample = tasks.make_sample(domain, seed, image_size=proc.image_size,
                                   placement="front" if domain == "video" else None)
        files = []
        for k, image in enumerate(sample.images):
            files.append(os.path.join(out_dir, f"{domain}_{k}.png"))
            image.save(files[-1])
        question, images, videos = sample.question, files, []
        if domain == "video":
            clip = os.path.join(out_dir, "video.mp4")
            save_video(sample.images, clip)
            question = question.replace("<image>" * len(files), "<video>", 1)
            images, videos = [], [clip]
        shown = question.replace("\n", " ")
        write(f"[{domain}] {shown}\n  inputs: {', '.join(videos or files)}")
        t0 = time.time()
        write("  answer: ", end="")
        text, _, _, _ = stream_answer(model, proc, prompt_for(proc, question), images, videos, len(sample.images),
                                      sample.multi_patch, **generate_kwargs)
        ok = text.strip().lower() == sample.answer.lower()
        correct += ok
        write(f"  expected: {sample.answer}  ({'right' if ok else 'wrong'}; chance {sample.chance:.2f}; "
              f"{time.time() - t0:.1f} s)\n")
    write(f"{correct}/{len(tasks.DOMAINS)} right.")
    return 0
