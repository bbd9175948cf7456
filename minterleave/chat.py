"""Multi-turn chat that keeps its KV cache across turns (`python sample.py --chat`).

    session = ChatSession(model, proc)
    session.add_image("cat.png")
    session.ask("What is this?", stream=print)      # prefills the whole first turn
    session.ask("And its colour?", stream=print)    # prefills only the new turn's tokens

The conversation is one token sequence, laid out as the processor's chat template lays it out
(`<|im_start|>{role}\\n...<|im_end|>\\n` per message). The KV cache holds every token of it except the
last sampled one, so a follow-up turn runs the model over "the last answer token + `<|im_end|>\\n` + the
new user turn + `<|im_start|>assistant\\n`" only, with the new turn's images, and decodes on. The
template's special tokens split the text before BPE runs, so tokenizing turn by turn gives the ids a
whole-conversation tokenization gives; the answers are kept as the ids that were sampled.
The cache grows by doubling (copying what it holds) up to the model's context; a turn that does not fit
is refused with ContextFull (state unchanged) and the REPL offers `/reset`.
References: gpt-fast's preallocated cache; llama.cpp's and mlx-vlm's chat REPLs for the commands.
"""

import json
import time

import torch

from .decoder import KVCache
from .generate import decode_step, prefill, sample
from .media import check_file
from .processor import IM_END

HELP = """commands: /image PATH, /video PATH [frames], /views P1 P2 ..., /reset, /save FILE, /ttft, /help, /quit
(media wait for the next question; anything else is a question)"""


class ContextFull(ValueError):
    """This turn does not fit the model's context: the REPL offers /reset."""


class ChatSession:
    def __init__(self, model, proc, seed=None):
        self.model, self.proc = model, proc
        self.limit = model.cfg.text.max_position_embeddings
        self.im_end = proc.tokenizer.token_to_id(IM_END)
        self.generator = None
        if seed is not None:  # one generator for the session: seeded turns are reproducible as a whole
            self.generator = torch.Generator(device=model.device).manual_seed(seed)
        self.reset()

    def reset(self):
        """Forget the conversation, its cache and any media waiting for a question."""
        self.messages = []  # the chat-messages shape (what /save writes)
        self.ids = []  # every token of the conversation so far; the cache holds all but the last
        self.pixels = []  # each turn's pixel values, for re-prefilling the whole conversation (ttft_compare)
        self.prompt_end = 0  # len(self.ids) when the last answer started
        self.cache = None
        self.pending = []  # (kind, path, frames) waiting for the next question

    # ------------------------------------------------------------------------------------- media
    def add_image(self, path):
        check_file(path, "image")  # a missing file is said now, not at the next question
        self.pending.append(("image", path, None))

    def add_video(self, path, frames=None):
        check_file(path, "video")
        self.pending.append(("video", path, frames))

    def add_views(self, paths):
        for p in paths:
            check_file(p, "image")
        self.pending += [("image", p, None) for p in paths]

    # ------------------------------------------------------------------------------------- turns
    def _turn(self, question):
        """The new user turn: (ids after the conversation so far, pixel values or None, its message)."""
        frames = {f for kind, _, f in self.pending if kind == "video"}
        if len(frames) > 1:
            raise ValueError(f"the videos of one turn must use one frame count, got {sorted(frames, key=str)}")
        content = [{"type": kind, "path": path} for kind, path, _ in self.pending]
        message = {"role": "user", "content": content + [{"type": "text", "text": question}]}
        text = self.proc.apply_chat_template([message])
        if self.ids:  # close the last answer as the template does: <|im_end|>\n before the next message
            text = ("\n" if self.ids[-1] == self.im_end else IM_END + "\n") + text
        try:
            inputs = self.proc(text, images=[p for k, p, _ in self.pending if k == "image"] or None,
                               videos=[p for k, p, _ in self.pending if k == "video"] or None,
                               num_frames=frames.pop() if frames else None)
        except ValueError as e:
            if "the model's context" in str(e):  # this turn alone is too long (counted before any decoding)
                raise ContextFull(f"this turn alone: {e}: /reset to start over") from None
            raise
        return inputs["input_ids"][0].tolist(), inputs.get("pixel_values"), message

    def _reserve(self, n):
        """A cache with room for n tokens: the old one, or one twice as large holding what it held."""
        if self.cache is not None and self.cache.max_len >= n:
            return
        size = min(self.limit, max(n, 2 * self.cache.max_len if self.cache else 256))
        cache = KVCache(self.model.cfg.text, 1, size, self.model.dtype, self.model.device)
        if self.cache is not None:
            held = self.cache.length
            cache.k[..., :held, :] = self.cache.k[..., :held, :]  # (L, 1, n_kv, held, hs)
            cache.v[..., :held, :] = self.cache.v[..., :held, :]
            cache.length = held
        self.cache = cache

    @torch.no_grad()
    def ask(self, question, max_new_tokens=256, temperature=0.0, top_k=None, top_p=None, stream=None):
        """Answer `question` (with the media added since the last turn); stream(piece) gets the text as it comes.

        Returns a dict: text, ids (the answer's tokens), prefilled (tokens run this turn), conversation
        (tokens in it before the answer), ttft and seconds (wall clock), finish ("stop" or "length")."""
        if not question.strip():
            raise ValueError("empty question")
        turn, pixels, message = self._turn(question)
        total = len(self.ids) + len(turn)
        room = self.limit - total
        if room < 1:
            raise ContextFull(f"the conversation would be {total} tokens with this turn, but the model's context "
                              f"is {self.limit} tokens: /reset to start over")
        max_new = min(max_new_tokens, room)
        self._reserve(total + max_new)
        new = self.ids[self.cache.length:] + turn  # the last answer's last token, then the new turn
        eos = set(self.proc.eos_token_ids)
        decoder = self.proc.stream_decoder()
        out, t0 = [], time.perf_counter()
        logits = prefill(self.model, torch.tensor([new], device=self.model.device), pixels, None, self.cache)
        ttft = None
        for step in range(max_new):
            token = sample(logits, temperature, top_k, top_p, self.generator)  # (1,)
            ttft = ttft or time.perf_counter() - t0
            out.append(int(token))
            piece = decoder.put(out[-1:])
            if piece and stream:
                stream(piece)
            if out[-1] in eos or step == max_new - 1:
                break
            logits = decode_step(self.model, token, None, self.cache)
        tail = decoder.flush()
        if tail and stream:
            stream(tail)
        seconds = time.perf_counter() - t0
        finish = "stop" if out[-1] in eos else "length"
        if finish == "stop" and out[-1] != self.im_end:
            out.pop()  # another end token (<|endoftext|>): the next turn closes the answer with <|im_end|>
        text = self.proc.decode(out)
        self.ids += turn
        self.prompt_end = len(self.ids)
        self.ids += out
        if pixels is not None:
            self.pixels.append(pixels)
        # a string, which the template renders verbatim: as the answer was generated after "assistant\n"
        self.messages += [message, {"role": "assistant", "content": text}]
        self.pending = []
        return dict(text=text, ids=out, prefilled=len(new), conversation=total, ttft=ttft, seconds=seconds,
                    finish=finish)

    @torch.no_grad()
    def ttft_compare(self):
        """The last turn's prompt prefilled from nothing, as a server without a kept cache must:
        (seconds to the first token, tokens prefilled). Its result is thrown away."""
        if not self.prompt_end:
            raise ValueError("no turn yet: ask a question first")
        ids = torch.tensor([self.ids[:self.prompt_end]], device=self.model.device)
        pixels = torch.cat(self.pixels) if self.pixels else None
        cache = KVCache(self.model.cfg.text, 1, self.prompt_end, self.model.dtype, self.model.device)
        t0 = time.perf_counter()
        sample(prefill(self.model, ids, pixels, None, cache))
        return time.perf_counter() - t0, self.prompt_end

    def save(self, path):
        """The conversation as JSON in the chat-messages shape (media as {"type", "path"} parts)."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"messages": self.messages}, f, indent=2, ensure_ascii=False)


def repl(session, gen, read=input, write=print):
    """The interactive loop: commands (HELP) or questions, until /quit or end of input. Errors in a line
    (a missing file, a turn past the context) are said and the loop goes on."""
    write(HELP)
    last = None
    while True:
        try:
            line = read("> ").strip()
        except EOFError:
            return 0
        if not line:
            continue
        cmd, _, rest = line.partition(" ") if line.startswith("/") else ("", "", line)
        args = rest.split()
        try:
            if cmd in ("/quit", "/exit"):
                return 0
            elif cmd == "/help":
                write(HELP)
            elif cmd == "/reset":
                session.reset()
                write("[conversation and cache cleared]")
            elif cmd == "/image" and len(args) == 1:
                session.add_image(args[0])
                write(f"[image {args[0]} added to the next question]")
            elif cmd == "/video" and len(args) in (1, 2):
                frames = int(args[1]) if len(args) == 2 else None
                if frames is not None and frames < 1:
                    raise ValueError(f"frames must be >= 1, got {frames}")
                session.add_video(args[0], frames)
                write(f"[video {args[0]} added to the next question]")
            elif cmd == "/views" and args:
                session.add_views(args)
                write(f"[{len(args)} views added to the next question]")
            elif cmd == "/save" and len(args) == 1:
                session.save(args[0])
                write(f"[conversation saved to {args[0]}]")
            elif cmd == "/ttft":
                if last is None:
                    raise ValueError("no turn yet: ask a question first")
                full, n = session.ttft_compare()
                write(f"[last turn: first token {last['ttft'] * 1e3:.1f} ms after prefilling {last['prefilled']} "
                      f"new tokens; re-prefilling all {n} tokens of the conversation: {full * 1e3:.1f} ms "
                      f"({full / last['ttft']:.1f}x)]")
            elif cmd:
                raise ValueError(f"unknown command or wrong arguments: {line!r}\n{HELP}")
            else:
                last = session.ask(rest, stream=lambda piece: write(piece, end="", flush=True), **gen)
                write(f"\n[prefilled {last['prefilled']} new tokens (conversation {last['conversation']}), first "
                      f"token {last['ttft'] * 1e3:.1f} ms, {len(last['ids'])} new tokens"
                      + (", cut at max tokens" if last["finish"] == "length" else "") + "]")
        except ContextFull as e:
            write(f"[{e}]")
        except (OSError, ValueError) as e:  # a bad file or value: say it, keep the conversation
            write(f"[error: {e}]")
