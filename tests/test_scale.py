"""Quantizing at scale: streaming from the shards, several processes (torchrun + gloo), and
the memory prediction (`--dry-run`), on tiny models from configs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import printable_char_tokenizer, write_texts
from test_families import tiny, windows

from pvq.checkpoint import load_checkpoint, save_checkpoint
from pvq.models.streaming import StreamedModel, StreamError
from pvq.oneshot import Recipe, oneshot

BIN = Path(sys.executable).parent
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "recipe.yaml", "pvq_index.json",
               "tokenizer.json", "tokenizer_config.json")
TEXT = "the quick brown fox jumps over the lazy dog. " * 200


def _saved(family: str, root: Path) -> Path:
    model = tiny(family).to(torch.bfloat16)
    model.save_pretrained(root, max_shard_size="100KB")  # several shards and an index
    printable_char_tokenizer().save_pretrained(root)
    return root


def _digests(directory: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(directory.iterdir())
            if f.name in MODEL_FILES or f.name.startswith("model-")}


@pytest.mark.parametrize("family,method,config", [
    ("llama", "gptq", {"bits": 4, "group_size": 32}),
    ("gemma3_text", "pvq", {"group_size": 16, "shape_bits": 3.0, "gain": "fp16"}),  # layer kinds: blocks read for the capture
    ("phi3", "rtn", {"bits": 4, "group_size": 32}),  # no Hessian: the weights-only route
])
def test_streaming_writes_the_in_memory_checkpoint_bytes(family, method, config, tmp_path):
    from transformers import AutoModelForCausalLM

    source = _saved(family, tmp_path / "model")
    assert len(list(source.glob("model-*.safetensors"))) > 1
    calibration = windows(8, 32)
    recipe = Recipe(method=method, config=config, batch_size=4, finetune=None)  # a streamed run is one-shot
    in_memory = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    oneshot(in_memory, None, recipe, windows=calibration, progress=False)
    save_checkpoint(in_memory, tmp_path / "a")
    stream = StreamedModel(source)
    assert all(p.device.type == "meta" for p in stream.adapter.get_blocks(stream.model).parameters())
    oneshot(stream.model, None, recipe, windows=calibration, progress=False, stream=stream)
    save_checkpoint(stream.model, tmp_path / "b")
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")


def test_an_interrupted_streamed_run_resumes_to_the_same_bytes(tmp_path):
    from pvq.calibrate import quantize_model

    source = _saved("llama", tmp_path / "model")
    calibration = windows(8, 32)
    recipe = Recipe(method="gptq", config={"bits": 4, "group_size": 32}, batch_size=4, finetune=None)
    stream = StreamedModel(source)
    oneshot(stream.model, None, recipe, windows=calibration, progress=False, stream=stream)
    save_checkpoint(stream.model, tmp_path / "whole")

    class Stop(Exception):
        pass

    def stop_in_block_1(report, qt):
        if report.block == 1:
            raise Stop

    stream = StreamedModel(source)
    from pvq.models import adapter_for

    with pytest.raises(Stop):
        quantize_model(stream.model, adapter_for(stream.model), calibration, "gptq", {"bits": 4, "group_size": 32},
                       work_dir=tmp_path / "work", batch_size=4, progress=False, stream=stream, on_layer=stop_in_block_1)
    stream = StreamedModel(source)
    result = oneshot(stream.model, None, recipe, windows=calibration, progress=False, stream=stream,
                     work_dir=str(tmp_path / "work"))
    assert result.quantized.resumed_blocks == 1
    save_checkpoint(stream.model, tmp_path / "resumed")
    assert _digests(tmp_path / "whole") == _digests(tmp_path / "resumed")


def test_what_cannot_be_streamed_is_refused_by_name(tmp_path):
    moe = tiny("mixtral").to(torch.bfloat16)
    moe.save_pretrained(tmp_path / "moe")
    with pytest.raises(StreamError, match="mixture-of-experts"):
        StreamedModel(tmp_path / "moe")
    with pytest.raises(StreamError, match="no model.safetensors"):
        StreamedModel(tmp_path)
    source = _saved("llama", tmp_path / "model")
    stream = StreamedModel(source)
    with pytest.raises(StreamError, match="rotation"):
        oneshot(stream.model, None, Recipe(method="gptq", config={"bits": 4}, rotate=True, finetune=None),
                windows=windows(), stream=stream)
    # the default calibration (WikiText-2 where reachable) cannot fall back to sampling a streamed model
    from pvq.calibrate import CalibrationError

    with pytest.raises(CalibrationError, match="streamed model needs --calib-text"):
        oneshot(stream.model, None, Recipe(method="gptq", config={"bits": 4}, finetune=None), stream=stream)
    with pytest.raises(StreamError, match="calibration text"):
        oneshot(stream.model, None, Recipe(method="gptq", config={"bits": 4}, finetune=None, calib_text="sampled"),
                stream=stream)
    # the fine-tuning that follows by default runs the whole model: a streamed run must be one-shot
    with pytest.raises(StreamError, match="fine-tuning .*--fast"):
        oneshot(stream.model, None, Recipe(method="gptq", config={"bits": 4}), windows=windows(), stream=stream)
    # a damaged value is named when its block is read
    from safetensors.torch import load_file, save_file

    shard = next(f for f in sorted(source.glob("model-*.safetensors")) if any(".layers." in k for k in load_file(f)))
    tensors = load_file(shard)
    name = next(k for k in tensors if ".layers." in k and tensors[k].is_floating_point())
    tensors[name][0] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    stream = StreamedModel(source)
    with pytest.raises(StreamError, match="non-finite"):
        for i in range(len(stream.adapter.get_blocks(stream.model))):
            stream.load_block(i)


@pytest.fixture(scope="module")
def job_dir(tmp_path_factory):
    from pvq.models import tiny_llama

    root = tmp_path_factory.mktemp("scale")
    tiny_llama(seed=0, layers=3).to(torch.bfloat16).save_pretrained(root / "model")
    printable_char_tokenizer().save_pretrained(root / "model")
    write_texts(root, TEXT, 3000)
    return root


def _job_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["quantize", str(root / "model"), "--method", "gptq", "--bits", "4", "--group-size", "32",
            "--calib-text", str(root / "calib.txt"), "--calib-windows", "8", "--calib-seqlen", "64", "--batch-size", "2",
            "--eval-text", str(root / "wiki.test.raw"), "--eval-seqlen", "64", "--eval-windows", "4", "--quiet",
            "--out", str(out), "--fast", *extra]


def _run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def test_two_gloo_processes_write_the_bytes_of_one(job_dir, tmp_path):
    one = _run([str(BIN / "pvq"), *_job_args(job_dir, tmp_path / "one")])
    assert one.returncode == 0, one.stderr
    two = _run([str(BIN / "torchrun"), "--nproc-per-node", "2", "--no-python", str(BIN / "pvq"),
                *_job_args(job_dir, tmp_path / "two", "--stream")])
    assert two.returncode == 0, two.stderr[-3000:]
    assert _digests(tmp_path / "one") == _digests(tmp_path / "two")
    report = json.loads((tmp_path / "two" / "job_report.json").read_text())
    assert report["world_size"] == 2 and report["streamed"]
    assert two.stdout.count("bits/weight") == 1  # rank 0 reports


_FAILING_RANK = """
import sys, torch
from pvq.models import tiny_llama
from pvq.oneshot import oneshot, Recipe
from pvq.calibrate.distributed import init_from_environment
from pvq.methods import get_method

w = init_from_environment()
gptq = get_method("gptq")

class FailsOnRank1:
    name, config_class = "gptq", gptq.config_class
    def quantize(self, W, H, config):
        if w.rank == 1 and W.shape[0] == 128:
            raise RuntimeError("boom on an MLP layer")
        return gptq.quantize(W, H, config)
    def dequantize(self, qt):
        return gptq.dequantize(qt)
    def needs_hessian(self, config):
        return True

from pvq.calibrate import quantize_model
from pvq.models import adapter_for
model = tiny_llama(seed=0)
try:
    quantize_model(model, adapter_for(model), torch.randint(3, 250, (8, 32)), FailsOnRank1(), {"bits": 4, "group_size": 32},
                   batch_size=2, progress=False)
    message = "finished"
except Exception as e:
    message = f"{type(e).__name__}: {e}"
open(sys.argv[1] + f"/rank{w.rank}.txt", "w").write(message)
sys.exit(0 if message == "finished" else 1)
"""


def test_a_rank_that_fails_stops_every_rank_with_its_message(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(_FAILING_RANK)
    run = _run([str(BIN / "torchrun"), "--nproc-per-node", "2", str(script), str(tmp_path)])
    assert run.returncode != 0
    for rank in (0, 1):
        message = (tmp_path / f"rank{rank}.txt").read_text()
        assert message.startswith("DistributedError: rank 1 of 2: model.layers.0.mlp.")
        assert "RuntimeError: boom on an MLP layer" in message


@pytest.mark.parametrize("extra", [(), ("--stream",)])
def test_the_memory_prediction_is_within_a_quarter_of_the_measured_peak(job_dir, tmp_path, extra):
    run = _run([str(BIN / "pvq"), *_job_args(job_dir, tmp_path / "out", *extra)])
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "out" / "job_report.json").read_text())
    ratio = report["predicted_peak_memory_bytes"] / report["peak_memory_bytes"]
    assert 0.75 <= ratio <= 1.25, (ratio, report["predicted_memory"], report["peak_memory_bytes"])


def test_dry_run_prints_the_plan_and_refuses_an_impossible_run(job_dir, tmp_path, capsys):
    from transformers import LlamaConfig

    from pvq.cli import main

    assert main(_job_args(job_dir, tmp_path / "planned", "--dry-run")) == 0
    printed = capsys.readouterr().out
    assert "predicted memory" in printed and "host, quantize" in printed and "disk, checkpoint" in printed
    assert not (tmp_path / "planned").exists()
    # a 400B-parameter configuration (no weights needed to plan it) cannot fit this machine
    huge = tmp_path / "huge"
    LlamaConfig(hidden_size=16384, intermediate_size=53248, num_hidden_layers=126, num_attention_heads=128,
                num_key_value_heads=8, vocab_size=128256).save_pretrained(huge)
    for extra in ((), ("--stream", "--fast")):  # a streamed run is one-shot
        code = main(["quantize", str(huge), "--calib-text", str(job_dir / "calib.txt"), "--out",
                     str(tmp_path / "never"), "--dry-run", *extra])
        err = capsys.readouterr().err
        assert code == 2 and "predicted to need" in err and "--ignore-memory-check" in err
        assert len(err.strip().splitlines()) == 1
        assert not (tmp_path / "never").exists()
    shutil.rmtree(huge)


def test_offloaded_activations_give_the_same_bytes_and_resume(tmp_path):
    from pvq.models import adapter_for, tiny_llama
    from pvq.calibrate import WorkDirError, quantize_model

    calibration = windows(8, 32)
    config = {"bits": 4, "group_size": 32}

    def run(work, offload, on_layer=None):
        model = tiny_llama(seed=0, layers=3)
        result = quantize_model(model, adapter_for(model), calibration, "gptq", config, work_dir=work, batch_size=3,
                                progress=False, offload_activations=offload, on_layer=on_layer)
        return {name: qt.tensors for name, qt in result.items()}

    plain = run(tmp_path / "plain", False)

    class Stop(Exception):
        pass

    def stop_in_block_2(report, qt):
        if report.block == 2:
            assert sorted(p.name for p in (tmp_path / "off" / "activations" / "0").iterdir()) == \
                ["0-3.safetensors", "3-6.safetensors", "6-8.safetensors"]  # block 2's inputs, batch by batch
            raise Stop

    with pytest.raises(Stop):
        run(tmp_path / "off", True, stop_in_block_2)
    with pytest.raises(WorkDirError, match="offload_activations: saved True, now False"):
        run(tmp_path / "off", False)
    resumed = run(tmp_path / "off", True)
    assert resumed.keys() == plain.keys()
    for name in plain:
        for key in plain[name]:
            assert (resumed[name][key] == plain[name][key]).all(), (name, key)
    assert not (tmp_path / "off" / "activations").exists()  # removed with the last block


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # gemma2: scaled embeddings, soft-capped logits
def test_the_streamed_float_reference_gives_the_model_s_logits(family, tmp_path):
    from transformers import AutoModelForCausalLM

    from pvq.eval.streamed import streamed_reference

    source = _saved(family, tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    ids = windows(3, 24, seed=5)
    reference = streamed_reference(StreamedModel(source), ids, batch_size=2, progress=False)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    got = torch.cat([reference.logits(0, 2), reference.logits(2, 3)])
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_a_streamed_run_stores_the_quantized_embedding_of_the_in_memory_run(tmp_path):
    from transformers import AutoModelForCausalLM

    source = _saved("gemma3_text", tmp_path / "model")  # a scaled, tied embedding
    recipe = Recipe(method="rtn", config={"bits": 4, "group_size": 32}, embeddings={"bits": 8, "group_size": 32},
                    finetune=None)
    in_memory = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    oneshot(in_memory, None, recipe, progress=False)
    save_checkpoint(in_memory, tmp_path / "a")
    stream = StreamedModel(source)
    oneshot(stream.model, None, recipe, progress=False, stream=stream)
    save_checkpoint(stream.model, tmp_path / "b")
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")
    assert "embed_tokens.codes" in " ".join(load_checkpoint(tmp_path / "b")[0].state_dict())
