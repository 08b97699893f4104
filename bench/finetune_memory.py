"""Where a fine-tuning step's resident memory peaks: runs `pvq ARGS...` (a quantize job) with
a thread sampling the resident memory every 2 ms, labelled by the part of the step that is
running (a decoder block's forward or backward pass, the head, the loss), and prints each
step's peak per part in MiB.

    python bench/finetune_memory.py quantize --out OUT --work-dir WORK --no-eval --finetune-steps 1
    MALLOC_MMAP_THRESHOLD_=131072 python bench/finetune_memory.py ...   # the tensors alive only

With glibc's mmap threshold fixed at 128 KiB every buffer of that size or more is mapped and
unmapped on its own, so the resident memory is close to the tensors alive; by default the
heap keeps what freed tensors of under 32 MiB held. Numbers: docs/scaling.md.
"""

from __future__ import annotations

import sys
import threading
import time

import torch

import pvq.calibrate.finetune as finetune_module
from pvq.cli import main
from pvq.memory import release_freed_memory, resident_memory_bytes

MIB = 2 ** 20
part = ["before the first step"]
peaks: dict[str, int] = {}


def _sample() -> None:
    while True:
        rss = resident_memory_bytes() or 0
        peaks[part[0]] = max(peaks.get(part[0], 0), rss)
        time.sleep(0.002)


def _label(name: str, backward: bool = False):
    def hook(*_):  # the held-out evaluations run without gradients: one label for all their forwards
        part[0] = name if backward or torch.is_grad_enabled() else "no-grad passes"
    return hook


def _train_with_labels(original):
    def train(model, *args, **kwargs):
        for i, block in enumerate(model.model.layers):
            block.register_forward_pre_hook(_label(f"forward, block {i}"))
            block.register_full_backward_pre_hook(_label(f"backward, block {i}", backward=True))
        head = model.get_output_embeddings()
        head.register_forward_pre_hook(_label("forward, head"))
        head.register_forward_hook(_label("loss and its gradient"))
        head.register_full_backward_pre_hook(_label("backward, head", backward=True))
        step = torch.optim.Adam.step

        def labelled_step(self, *a, **k):
            shown = {name: round(value / MIB) for name, value in peaks.items()}
            print(f"step peak {max(shown.values())} MiB; by part: {shown}", flush=True)
            peaks.clear()
            part[0] = "optimizer step and held-out evaluations"
            return step(self, *a, **k)

        torch.optim.Adam.step = labelled_step
        release_freed_memory()
        peaks.clear()  # the teacher pass and the quantization are not the step's
        part[0] = "held-out evaluation before the first step"
        return original(model, *args, **kwargs)
    return train


if __name__ == "__main__":
    finetune_module._train = _train_with_labels(finetune_module._train)
    threading.Thread(target=_sample, daemon=True).start()
    sys.exit(main(sys.argv[1:]))
