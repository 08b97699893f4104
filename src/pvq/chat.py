"""A multi-turn conversation with a model in the terminal: what `pvq chat CKPT` runs.

Each turn renders the tokenizer's chat template over the whole history, feeds the model
only the tokens its KV cache does not hold yet (the cache is kept between turns and cut
back to the longest prefix the new rendering shares with it), streams the greedy reply,
and prints tokens/s and resident memory. When the history no longer fits the model's
positions the oldest turns are dropped (the system message is kept) and the cache is
rebuilt. Ctrl-C during a reply stops that reply; Ctrl-C or EOF at the prompt ends the chat.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any, Callable

import torch

from pvq.chat_template import chat_ids, check_text
from pvq.generate import GenerationError, _TimedStreamer

__all__ = ["Conversation", "run_chat"]


class Conversation:
    """The history, the token ids the KV cache holds, and the cache itself."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, system: str | None = None,
                 max_new_tokens: int = 256) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise GenerationError("this tokenizer has no chat template; `pvq chat` needs one (use `pvq generate`)")
        if system is not None:
            check_text(system, "the system message")
        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, int(max_new_tokens)
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        # a template that fails (or is refused) fails here, before the first message is asked for
        self._render(self.messages + [{"role": "user", "content": "hello"}])
        self.cache = None
        self.cached_ids = torch.zeros((1, 0), dtype=torch.long)
        positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self.positions = positions if isinstance(positions, int) and positions > 0 else None
        self.dropped_turns = 0

    def _render(self, messages: list[dict[str, str]]) -> torch.Tensor:
        """The token ids of `messages` through the chat template (within a budget: `pvq.chat_template`)."""
        return chat_ids(self.tokenizer, messages)

    def _fits(self, ids: torch.Tensor) -> bool:
        return self.positions is None or ids.shape[1] + self.max_new_tokens <= self.positions

    def _fit(self) -> torch.Tensor:
        """The rendered history, oldest turns dropped until it and a reply fit the model (a new
        message too long on its own is refused before anything is dropped)."""
        first = 1 if self.messages and self.messages[0]["role"] == "system" else 0
        alone = self._render(self.messages[:first] + self.messages[-1:])
        if not self._fits(alone):
            raise GenerationError(f"the message is {alone.shape[1]} tokens; with {self.max_new_tokens} new tokens "
                                  f"it exceeds the model's {self.positions} positions")
        while True:
            ids = self._render(self.messages)
            if self._fits(ids):
                return ids
            del self.messages[first:first + 2]  # one user turn and its reply
            self.dropped_turns += 1
            self.cache, self.cached_ids = None, torch.zeros((1, 0), dtype=torch.long)

    def _reuse_cache(self, ids: torch.Tensor) -> None:
        """Cut the cache back to the prefix it shares with `ids` (keeping at least one token to feed)."""
        n = min(self.cached_ids.shape[1], ids.shape[1] - 1)
        same = (self.cached_ids[0, :n] == ids[0, :n]).tolist()
        keep = same.index(False) if False in same else n
        held = self.cache.get_seq_length() if self.cache is not None else 0
        if keep < held:
            self.cache.crop(keep - held)  # transformers' crop takes the (negative) number of tokens to remove
        self.cached_ids = ids[:, :keep]

    def reply(self, text: str, out: IO[str] | None = None) -> dict[str, Any]:
        """Add the user's message, stream the reply to `out`, add it to the history; stats."""
        from transformers import DynamicCache

        check_text(text, "the message")
        self.messages.append({"role": "user", "content": text})
        try:
            ids = self._fit()
        except GenerationError:
            self.messages.pop()
            raise
        self._reuse_cache(ids)
        reused = self.cached_ids.shape[1]
        if self.cache is None:
            self.cache = DynamicCache()
        streamer = _TimedStreamer(self.tokenizer, out)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        device = next(self.model.parameters()).device
        t0 = time.perf_counter()
        interrupted = False
        output = None
        try:
            with torch.inference_mode():
                output = self.model.generate(ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                                             cache=self.cache, max_new_tokens=self.max_new_tokens,
                                             do_sample=False, num_beams=1, num_return_sequences=1,
                                             streamer=streamer, pad_token_id=pad)
        except KeyboardInterrupt:
            interrupted = True
        t_end = time.perf_counter()
        if output is None:  # stopped before the first token: the cache may hold a partial step
            self.cache, self.cached_ids = None, torch.zeros((1, 0), dtype=torch.long)
            self.messages.pop()
            return {"interrupted": True, "new_tokens": 0, "text": ""}
        new = output[0, ids.shape[1]:].cpu()
        answer = self.tokenizer.decode(new, skip_special_tokens=True)
        self.messages.append({"role": "assistant", "content": answer})
        self.cached_ids = output[:, : self.cache.get_seq_length()].cpu()
        times = streamer.times[1:]
        first = times[0] if times else t_end
        decode_tokens = max(len(times) - 1, 0)
        decode_s = (times[-1] - first) if decode_tokens else 0.0
        return {
            "text": answer, "interrupted": interrupted, "prompt_tokens": int(ids.shape[1]), "reused_tokens": reused,
            "new_tokens": int(new.numel()), "prefill_seconds": first - t0,
            "decode_tokens_per_second": decode_tokens / decode_s if decode_s > 0 else float("nan"),
        }


def run_chat(model: torch.nn.Module, tokenizer: Any, *, system: str | None = None, max_new_tokens: int = 256,
             read: Callable[[str], str] | None = None, out: IO[str] | None = None, err: IO[str] | None = None) -> int:
    """The interactive loop: a line from `read`, the streamed reply on `out`, stats on `err`.
    Returns the number of replies."""
    import builtins

    from pvq.memory import resident_memory_bytes

    read = read or builtins.input
    out, err = out or sys.stdout, err or sys.stderr
    conv = Conversation(model, tokenizer, system=system, max_new_tokens=max_new_tokens)
    print("chat: type a message and press Enter; Ctrl-D (EOF) or Ctrl-C ends it", file=err)
    replies = undecodable = 0
    while True:
        try:
            text = read("you> ")
        except (EOFError, KeyboardInterrupt):
            print("", file=err)
            return replies
        except UnicodeDecodeError as e:  # the terminal sent bytes that are not UTF-8
            undecodable += 1
            print(f"error: the message is not valid UTF-8 text ({e.reason}); type it again", file=err)
            if undecodable >= 3:  # a stream of bytes, not a person typing
                raise GenerationError("the input is not UTF-8 text") from None
            continue
        undecodable = 0
        if not text.strip():
            continue
        dropped = conv.dropped_turns
        try:
            stats = conv.reply(text, out=out)
        except GenerationError as e:
            print(f"error: {e}", file=err)
            continue
        out.flush()
        if conv.dropped_turns > dropped:
            print(f"[the history was too long for the model: dropped the {conv.dropped_turns - dropped} oldest "
                  f"turn(s)]", file=err)
        if stats["interrupted"]:
            print("\n[reply stopped]", file=err)
        if stats["new_tokens"]:
            replies += 1
            rss = resident_memory_bytes()
            mem = f", the process {rss / 2**20:.0f} MiB resident" if rss is not None else ""
            print(f"[{stats['new_tokens']} tokens, {stats['decode_tokens_per_second']:.1f} tokens/s; "
                  f"{stats['prompt_tokens'] - stats['reused_tokens']} new prompt tokens "
                  f"({stats['reused_tokens']} from the cache){mem}]", file=err)
