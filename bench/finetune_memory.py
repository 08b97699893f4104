"""Where a fine-tuning step's resident memory peaks: runs `pvq ARGS...` (a quantize job) and
reads the process's peak resident memory (VmHWM, `pvq.memory.peak_memory_bytes`) each time the
part of the step that is running changes (a decoder block's forward or backward pass, the head,
the loss), resetting it for the next part; prints each step's peak per part in MiB.

    python bench/finetune_memory.py quantize --out OUT --work-dir WORK --no-eval --finetune-steps 1
    MALLOC_MMAP_THRESHOLD_=131072 python bench/finetune_memory.py ...   # the tensors alive only

With glibc's mmap threshold fixed at 128 KiB every buffer of that size or more is mapped and
unmapped on its own, so the resident memory is close to the tensors alive; by default the
heap keeps what freed tensors of under 32 MiB held. The job's own peak-memory line is not
meaningful under it (the peak is reset at every part). Numbers: docs/scaling.md.
"""

from __future__ import annotations

import sys

import torch

import pvq.calibrate.finetune as finetune_module
from pvq.cli import main
from pvq.memory import peak_memory_bytes, release_freed_memory, reset_peak_memory

MIB = 2 ** 20
part = ["before the first step"]
peaks: dict[str, int] = {}


def _enter(name: str) -> None:
    """Close the running part (its peak since it began) and start `name`."""
    peaks[part[0]] = max(peaks.get(part[0], 0), peak_memory_bytes())
    reset_peak_memory()
    part[0] = name


def _label(name: str, backward: bool = False):
    def hook(*_):  # the held-out evaluations run without gradients: one label for all their forwards
        _enter(name if backward or torch.is_grad_enabled() else "no-grad passes")
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
            _enter("optimizer step and held-out evaluations")
            shown = {name: round(value / MIB) for name, value in peaks.items()}
            print(f"step peak {max(shown.values())} MiB; by part: {shown}", flush=True)
            peaks.clear()
            return step(self, *a, **k)

        torch.optim.Adam.step = labelled_step
        release_freed_memory()
        _enter("held-out evaluation before the first step")
        peaks.clear()  # the teacher pass and the quantization are not the step's
        return original(model, *args, **kwargs)
    return train


if __name__ == "__main__":
    if not reset_peak_memory():
        raise SystemExit("this needs Linux's /proc/self/clear_refs to reset the peak resident memory")
    finetune_module._train = _train_with_labels(finetune_module._train)
    sys.exit(main(sys.argv[1:]))
