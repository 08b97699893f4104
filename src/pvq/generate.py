"""Greedy text generation with timing: what `pvq generate` and `bench/runtime.py` run.

`generate_text` streams the continuation of a prompt through transformers' ``generate``
(greedy, KV cache) and times it from the streamer's callbacks: prefill is the time from
the start to the first new token (the forward over the whole prompt), decode the time per
token after it. It reports which kernel each quantized layer ran.
"""

from __future__ import annotations

import time
from typing import IO, Any

import torch

from pvq.errors import GenerationError

__all__ = ["GenerationError", "generate_text", "warm_imports", "warm_up"]


def warm_imports(spec: str) -> None:
    """Import transformers and the modelling code of `spec`'s architecture (config.json's
    model_type; llama for a GGUF or hub id) now, so that a resident-memory figure taken
    around the load counts the model and not the code."""
    import json
    from pathlib import Path

    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = "llama"
    config = Path(spec) / "config.json"
    if config.is_file():
        try:
            found = json.loads(config.read_text()).get("model_type", model_type)
            model_type = found if isinstance(found, str) else model_type
        except (OSError, ValueError, AttributeError, RecursionError):
            pass  # the load itself reports what is wrong with the file
    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if isinstance(name, str):
        getattr(transformers, name, None)
    # the codec's compiled code (numba and its LLVM) is code, not model: load it now too
    import torch

    from pvq.methods import get_method

    for method, config in (("pvq", {"group_size": 4, "shape_bits": 2.0, "gain": "empirical", "use_hessian": False}),
                           ("rtn", {"bits": 4, "group_size": 4})):
        m = get_method(method)
        m.dequantize(m.quantize(torch.ones(2, 8), None, m.make_config(config)))


def warm_up(model: torch.nn.Module) -> float:
    """Run the model once on 3 tokens and once on 1 (both kernel paths: decode + GEMM and the
    GEMV), so that loading the kernels' compiled code (numba's on-disk cache; a compile on a
    machine's first run) is not counted in a prompt's time. Returns the seconds it took."""
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    ids = torch.zeros((1, 3), dtype=torch.long, device=device)
    with torch.inference_mode():
        model(ids)
        model(ids[:, :1])
    return time.perf_counter() - t0


class _TimedStreamer:
    """A transformers streamer that prints decoded text as it comes and records the time of every token."""

    def __init__(self, tokenizer: Any, out: IO[str] | None) -> None:
        from transformers import TextStreamer

        self.text = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if out is not None else None
        self.times: list[float] = []
        self.out = out

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())
        if self.text is not None:
            self.text.put(value)

    def end(self) -> None:
        if self.text is not None:
            self.text.end()


def generate_text(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    chat: bool = False,
    out: IO[str] | None = None,
) -> dict[str, Any]:
    """Greedy continuation of `prompt` (printed to `out` as it is generated); returns the
    text, token counts, prefill and decode speed, and {kernel: layers that ran it}.
    `chat`: the prompt as a user message through the tokenizer's chat template (rendered
    within a budget of time and size: `pvq.chat_template`)."""
    from pvq.chat_template import chat_ids, check_text
    from pvq.runtime import QuantizedLinear

    check_text(prompt, "the prompt")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise GenerationError("the tokenizer has no chat template; generate without chat")
        ids = chat_ids(tokenizer, [{"role": "user", "content": prompt}])
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if ids.numel() == 0:
        raise GenerationError("the prompt encodes to no tokens; give some text")
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(positions, int) and ids.shape[1] + max_new_tokens > positions:
        raise GenerationError(f"{ids.shape[1]} prompt tokens + {max_new_tokens} new tokens exceed the model's "
                              f"{positions} positions; ask for at most {max(positions - ids.shape[1], 0)} new tokens")
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    device = next(model.parameters()).device
    ids = ids.to(device)
    streamer = _TimedStreamer(tokenizer, out)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    t0 = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                do_sample=False, num_beams=1, num_return_sequences=1, streamer=streamer,
                                pad_token_id=pad)
    t_end = time.perf_counter()
    new = output[0, ids.shape[1]:]
    token_times = streamer.times[1:]  # the first put is the prompt itself
    first = token_times[0] if token_times else t_end
    prefill = first - t0
    decode_tokens = max(len(token_times) - 1, 0)
    decode_seconds = (token_times[-1] - first) if decode_tokens else 0.0
    kernels: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, QuantizedLinear) and m.last_kernel:
            kernels[m.last_kernel] = kernels.get(m.last_kernel, 0) + 1
    return {
        "text": tokenizer.decode(new, skip_special_tokens=True),
        "prompt_tokens": int(ids.shape[1]),
        "new_tokens": int(new.numel()),
        "prefill_seconds": prefill,
        "prefill_tokens_per_second": ids.shape[1] / prefill if prefill > 0 else float("nan"),
        "decode_seconds": decode_seconds,
        "decode_tokens_per_second": decode_tokens / decode_seconds if decode_seconds > 0 else float("nan"),
        "kernels": kernels,
    }
