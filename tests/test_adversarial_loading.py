"""The loading contract on every route (`pvq.checkpoint.load_checks`): tampered checkpoints whose
integrity index was rewritten to match ("rehash"), hostile config.json files and shard
indexes, and pvq payloads loaded as a float model. Each case: one line and exit code 2 from
`pvq verify` and `pvq generate`, a PVQError from `pvq.load` and from transformers'
``from_pretrained`` after ``import pvq`` (the Auto class and the model class), nothing built.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import pvq  # noqa: E402
from conftest import ADVERSARIAL_TEXT, cli_error, printable_char_tokenizer, write_texts  # noqa: E402
from pvq.errors import PVQError  # noqa: E402
from pvq.checkpoint import save_checkpoint  # noqa: E402
from pvq.models import tiny_llama  # noqa: E402
from pvq.oneshot import Recipe, oneshot  # noqa: E402

RECIPES = {  # one-shot
    "rtn": Recipe(method="rtn", config={"bits": 4, "group_size": 32}, finetune=None),
    "gptq": Recipe(method="gptq", config={"bits": 4, "group_size": 32, "act_order": True}, finetune=None),
    "pvq": Recipe(method="pvq", config={"group_size": 16, "gain": "fp16"}, finetune=None),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("loading")
    write_texts(root, ADVERSARIAL_TEXT)
    for name, recipe in RECIPES.items():
        model = tiny_llama(seed=0)
        calib = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
        oneshot(model, None, recipe, windows=None if name == "rtn" else calib, progress=False)
        save_checkpoint(model, root / name, tokenizer=printable_char_tokenizer())
    return root


def rehashed(src: Path, dst: Path, edit) -> Path:
    """A copy of checkpoint `src` changed by `edit(dst)`, every file it lists (and any it adds)
    re-hashed into pvq_index.json: the integrity index alone cannot catch these."""
    shutil.copytree(src, dst)
    edit(dst)
    index = json.loads((dst / "pvq_index.json").read_text())
    for name in list(index["files"]):
        if (dst / name).is_file() and not (dst / name).is_symlink():
            data = (dst / name).read_bytes()
            index["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (dst / "pvq_index.json").write_text(json.dumps(index))
    return dst


def set_tensor(key: str, change):
    def run(d: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(d / "model.safetensors")
        tensors[key] = change(tensors[key].clone())
        save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    return run


def first_float16(value: float):
    """Set the first element of a float16 field (held as int16 bits) to `value`."""
    def change(t: torch.Tensor) -> torch.Tensor:
        t.view(-1)[0] = int(np.array([value], np.float16).view(np.int16)[0])
        return t
    return change


def perm_entry(i: int, value):
    def change(t: torch.Tensor) -> torch.Tensor:
        t[i] = t[0] if value == "dup" else value
        return t
    return change


def edit_config(change):
    def run(d: Path) -> None:
        config = json.loads((d / "config.json").read_text())
        change(config)
        (d / "config.json").write_text(json.dumps(config))
    return run


def write_config(text: str):
    def run(d: Path) -> None:
        (d / "config.json").write_text(text)
    return run


def config_links_outside(d: Path) -> None:
    outside = d.parent / f"{d.name}-outside-config.json"
    shutil.copy(d / "config.json", outside)
    (d / "config.json").unlink()
    os.symlink(outside, d / "config.json")


def shard_index_outside(d: Path) -> None:
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"model.embed_tokens.codes": "../rtn/model.safetensors"}}))
    index = json.loads((d / "pvq_index.json").read_text())
    index["files"]["model.safetensors.index.json"] = {}
    (d / "pvq_index.json").write_text(json.dumps(index))


Q = "model.layers.0.self_attn.q_proj"
CASES = [
    ("embedding-scale-nan", "rtn", set_tensor("model.embed_tokens.scales", first_float16(float("nan"))),
     "embedding 'model.embed_tokens' \\(rtn\\): stored 'scales' has non-finite values"),
    ("embedding-scale-inf", "rtn", set_tensor("model.embed_tokens.scales", first_float16(float("inf"))),
     "embedding 'model.embed_tokens' \\(rtn\\): stored 'scales' has non-finite values"),
    ("rtn-scale-nan", "rtn", set_tensor(f"{Q}.scales", first_float16(float("nan"))),
     f"layer '{Q}' \\(rtn\\): stored 'scales' has non-finite values"),
    ("gptq-scale-inf", "gptq", set_tensor(f"{Q}.scales", first_float16(float("-inf"))),
     f"layer '{Q}' \\(gptq\\): stored 'scales' has non-finite values"),
    ("pvq-gain-inf", "pvq", set_tensor(f"{Q}.gains", first_float16(float("inf"))),
     f"layer '{Q}' \\(pvq\\): stored 'gains' has non-finite values"),
    ("gptq-perm-duplicate", "gptq", set_tensor(f"{Q}.perm", perm_entry(1, "dup")),
     f"layer '{Q}' \\(gptq\\): stored 'perm' is not a permutation of 64 columns"),
    ("gptq-perm-out-of-range", "gptq", set_tensor(f"{Q}.perm", perm_entry(0, 30000)),
     f"layer '{Q}' \\(gptq\\): stored 'perm' is not a permutation of 64 columns"),
    ("no-quantization-config", "rtn", edit_config(lambda c: c.pop("quantization_config")),
     "has no pvq quantization_config; it is not a pvq checkpoint"),
    ("quant-method-PVQ", "rtn", edit_config(lambda c: c["quantization_config"].update(quant_method="PVQ")),
     "has no pvq quantization_config; it is not a pvq checkpoint"),
    ("quant-method-gptq", "rtn", edit_config(lambda c: c["quantization_config"].update(quant_method="gptq")),
     "has no pvq quantization_config; it is not a pvq checkpoint"),
    ("rope-type-unknown", "rtn", edit_config(lambda c: c.update(rope_parameters={"rope_type": "nonexistent", "rope_theta": 1e4})),
     "rope_parameters asks for rope_type 'nonexistent'"),
    ("heads-1e9", "rtn", edit_config(lambda c: c.update(num_attention_heads=10**9)),
     "not a valid llama config: .*not a multiple of the number of attention heads"),
    ("intermediate-size-huge", "rtn", edit_config(lambda c: c.update(intermediate_size=10**12)),
     "intermediate_size must be a positive integer below 2\\*\\*31, got 1000000000000"),
    ("deep-config", "rtn", write_config('{"a": ' * 100000 + "1" + "}" * 100000), "config.json is nested too deeply"),
    ("config-links-outside", "rtn", config_links_outside, "'config.json' is \\(or lies under\\) a symbolic link"),
    ("generation-config-hostile", "rtn", lambda d: (d / "generation_config.json").write_text('{"max_length": -5}'),
     "generation_config.json: max_length must be a count"),
    ("shard-index-outside", "rtn", shard_index_outside,
     "model.safetensors.index.json names shard '../rtn/model.safetensors', which is not a file of"),
]


@pytest.mark.parametrize("name,source,edit,message", CASES, ids=[c[0] for c in CASES])
def test_every_route_refuses_a_rehashed_tamper(checkpoints, tmp_path, capsys, monkeypatch, name, source, edit, message):
    import re

    import transformers

    bad = rehashed(checkpoints / source, tmp_path / name, edit)
    built = []
    post_init = transformers.PreTrainedModel.post_init
    monkeypatch.setattr(transformers.PreTrainedModel, "post_init", lambda self: (built.append(1), post_init(self))[1])
    assert re.search(message, cli_error(capsys, ["verify", str(bad)]))
    assert re.search(message, cli_error(capsys, ["generate", str(bad), "--prompt", "hi", "--max-new-tokens", "1"]))
    assert re.search(message, cli_error(capsys, ["eval", str(bad), "--eval-text", str(checkpoints / "wiki.test.raw"),
                                                 "--seqlen", "32"]))
    with pytest.raises(PVQError, match=message):
        pvq.load(bad)
    for loader in (transformers.AutoModelForCausalLM, transformers.LlamaForCausalLM):
        with pytest.raises(PVQError, match=message):
            loader.from_pretrained(bad)
    if name in ("no-quantization-config", "quant-method-PVQ", "quant-method-gptq", "rope-type-unknown", "heads-1e9",
                "intermediate-size-huge", "deep-config", "config-links-outside", "shard-index-outside",
                "generation-config-hostile"):
        assert built == []  # refused before transformers built a model


def test_payload_without_its_quantization_config_is_never_a_random_model(checkpoints, tmp_path):
    """Saved without an index (plain save_pretrained) and the quantization_config removed:
    transformers would initialise every quantized layer at random; the guard refuses it."""
    import transformers

    bad = tmp_path / "plain"
    shutil.copytree(checkpoints / "rtn", bad)
    (bad / "pvq_index.json").unlink()
    edit_config(lambda c: c.pop("quantization_config"))(bad)
    for loader in (transformers.AutoModelForCausalLM, transformers.LlamaForCausalLM):
        with pytest.raises(PVQError, match="holds quantized payload tensors .* but its config.json has no pvq "
                                           "quantization_config; refusing to return a model with randomly"):
            loader.from_pretrained(bad)
        model, info = loader.from_pretrained(checkpoints / "rtn", output_loading_info=True)  # the asked-for form
        assert not info["missing_keys"] and not info["unexpected_keys"]


def test_untouched_checkpoints_load_the_same_on_every_route(checkpoints):
    import transformers

    ids = torch.tensor([[3, 1, 4, 1, 5]])
    for name in RECIPES:
        a, _, _ = pvq.load(checkpoints / name)
        b = transformers.AutoModelForCausalLM.from_pretrained(checkpoints / name)
        with torch.no_grad():
            assert torch.equal(a(ids).logits, b(ids).logits)


def test_legacy_config_asking_for_a_huge_model_is_refused_before_allocation(tmp_path, capsys):
    legacy = Path(__file__).parent / "data" / "legacy" / "v1-pvq"
    for value, message in ((2**30, "gives model.layers.0.mlp.gate_proj.weight the shape \\[1073741824, 64\\], the "
                                   "stored tensor is \\[128, 64\\]"),
                           (10**12, "intermediate_size must be a positive integer below 2\\*\\*31")):
        src = tmp_path / f"old-{value}"
        shutil.copytree(legacy, src)
        manifest = json.loads((src / "manifest.json").read_text())
        manifest["config"]["intermediate_size"] = value
        (src / "manifest.json").write_text(json.dumps(manifest))
        import re

        assert re.search(message, cli_error(capsys, ["convert", str(src), str(tmp_path / "new")]))
        assert not (tmp_path / "new").exists()
