"""The main job end to end on a tiny local model: quantize -> save -> load -> measure."""

import json

import pytest
import torch
from conftest import write_texts

from pvq.cli import main
from pvq.jobs import JobOptions, format_report, run_quantize_job
from pvq.models import tiny_llama

TEXT = "the quick brown fox jumps over the lazy dog. " * 200


def _char_tokenizer(vocab_size: int):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(TEXT + "\n= "))
    vocab = {"<unk>": 0, "<s>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    assert len(vocab) <= vocab_size
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    model = tiny_llama(seed=0)
    model.save_pretrained(root / "model")
    _char_tokenizer(model.config.vocab_size).save_pretrained(root / "model")
    write_texts(root, TEXT, 3000)
    return root


@pytest.mark.parametrize("method,config", [("pvq", {"group_size": 16, "shape_bits": 3.0, "gain": "beta", "gain_bits": 4}),
                                           ("gptq", {"bits": 4, "group_size": 32}),
                                           ("gptvq", {"dim": 2, "bits": 2.0, "group_size": 256, "group_columns": 32})])
def test_quantize_job_reports_and_round_trips(tiny_dir, tmp_path, method, config):
    out = tmp_path / "ckpt"
    report = run_quantize_job(JobOptions(
        model=str(tiny_dir / "model"), method=method, config=config, out=str(out),
        calib_text=str(tiny_dir / "calib.txt"), calib_windows=4, calib_seqlen=64, batch_size=2,
        eval_text=str(tiny_dir / "wiki.test.raw"), eval_seqlen=64, eval_windows=4, agreement_windows=2, finetune=None,
    ))
    # Measured bits per weight are what the stored tensors cost: the nominal figure plus,
    # for Beta gains, one float16 row norm per row (16 / in_features; 64 columns here);
    # gptvq's codebooks (8 rows x 32 columns each) tile every layer exactly.
    extra = report["bits_per_weight_measured"] - report["bits_per_weight_nominal"]
    assert -1e-9 <= extra <= 16 / 64 + 1e-9
    assert report["checkpoint_bytes"] < report["float16_model_bytes"]
    assert report["eval_windows"] == 4 and 0 <= report["top1_agreement"] <= 1 and report["kl_vs_float"] >= 0
    assert torch.isfinite(torch.tensor([report["ppl_float"], report["ppl_quantized"]])).all()
    assert json.loads((out / "job_report.json").read_text())["method"] == method
    # every byte counted: the stored tensors over all parameters, float16 embedding included
    stored = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert report["bits_per_parameter_whole_model"] == stored * 8 / report["parameters"]
    assert report["bits_per_parameter_whole_model"] > report["bits_per_weight_measured"]
    text = format_report(report)
    assert "bits/weight" in text and "perplexity" in text and "peak memory" in text
    assert report["calibration_data"] == f"calibration text file {tiny_dir / 'calib.txt'}"
    assert f"calibration      calibration text file {tiny_dir / 'calib.txt'}" in text


def test_cli_quantize_and_eval(tiny_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    args = [str(tiny_dir / "model"), "--method", "rtn", "--bits", "4", "--group-size", "32", "--out", str(out),
            "--eval-text", str(tiny_dir / "wiki.test.raw"), "--eval-seqlen", "64", "--eval-windows", "2",
            "--device", "cpu", "--fast"]
    assert main(["quantize", *args]) == 0
    assert "measured" in capsys.readouterr().out
    assert main(["eval", str(out), "--seqlen", "64", "--eval-text", str(tiny_dir / "wiki.test.raw"),
                 "--decode-once", "--json", str(tmp_path / "e.json")]) == 0
    assert "pvq checkpoint (rtn" in capsys.readouterr().out
    assert json.loads((tmp_path / "e.json").read_text())["ppl"] > 1


def test_main_job_without_evaluation_text_still_reports(tiny_dir, tmp_path, monkeypatch, capsys):
    """No --eval-text, no $PVQ_WIKITEXT2_TEST, no datasets copy (an empty cache, offline) and no
    ../shared: the job checks that before quantizing, then compares with the float model on
    held-out text sampled from it instead of crashing at the end."""
    import socket

    import huggingface_hub.constants as hub_constants

    from pvq.eval import perplexity

    datasets = pytest.importorskip("datasets")
    monkeypatch.delenv(perplexity.WIKITEXT2_TEST_ENV, raising=False)
    monkeypatch.setattr(perplexity, "shared_wikitext2_test_path", lambda: tmp_path / "nowhere" / "wiki.test.raw")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    lookups = []

    def no_lookup(*args, **kwargs):
        lookups.append(args)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "getaddrinfo", no_lookup)
    report = run_quantize_job(JobOptions(
        model=str(tiny_dir / "model"), method="rtn", config={"bits": 4, "group_size": 32}, out=str(tmp_path / "ck"),
        eval_seqlen=32, agreement_windows=2, finetune=None,
    ))
    assert "ppl_quantized" not in report and report["agreement_tokens"] == 2 * 31
    assert "sampled from the float model" in report["eval_data"]
    assert "not in the datasets cache" in report["eval_data_missing"] and "nowhere" in report["eval_data_missing"]
    assert "perplexity       not measured" in format_report(report) and not lookups
    assert json.loads((tmp_path / "ck" / "job_report.json").read_text())["eval_data"] == report["eval_data"]


def test_main_job_names_the_datasets_source(tiny_dir, tmp_path, monkeypatch):
    """The text from the datasets library (its rows faked here) is the file's text: same
    perplexity, and the report says where it came from."""
    from pvq.eval import perplexity

    rows = perplexity.wikitext2_test_rows(tiny_dir / "wiki.test.raw")
    monkeypatch.delenv(perplexity.WIKITEXT2_TEST_ENV, raising=False)
    monkeypatch.setattr(perplexity, "wikitext2_rows_from_datasets", lambda: (rows, "datasets cache"))
    common = {"model": str(tiny_dir / "model"), "method": "rtn", "config": {"bits": 4, "group_size": 32},
              "eval_seqlen": 64, "eval_windows": 3, "agreement_windows": 2, "finetune": None}
    via_datasets = run_quantize_job(JobOptions(out=str(tmp_path / "a"), **common))
    via_file = run_quantize_job(JobOptions(out=str(tmp_path / "b"), eval_text=str(tiny_dir / "wiki.test.raw"), **common))
    assert via_datasets["eval_data"] == "WikiText-2 test (datasets cache)"
    assert via_file["eval_data"] == f"WikiText-2 test (file {tiny_dir / 'wiki.test.raw'})"
    assert via_datasets["ppl_quantized"] == via_file["ppl_quantized"] and via_datasets["eval_windows"] == 3
    assert "perplexity       WikiText-2 test (datasets cache), 3 windows x 64" in format_report(via_datasets)


def test_job_refuses_late_failures_before_quantizing(tiny_dir, tmp_path, capsys):
    from conftest import cli_error

    base = [str(tiny_dir / "model"), "--method", "rtn", "--group-size", "32", "--device", "cpu"]
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x.txt").write_text("mine")
    assert "not a pvq checkpoint" in cli_error(capsys, ["quantize", *base, "--out", str(tmp_path / "taken")])
    assert "not found" in cli_error(capsys, ["quantize", *base, "--out", str(tmp_path / "a"),
                                             "--eval-text", str(tmp_path / "missing.raw")])
    assert "longer than the model's 512 positions" in cli_error(
        capsys, ["quantize", *base, "--out", str(tmp_path / "b"), "--eval-seqlen", "4096"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert not (tmp_path / "a.work").exists() and not (tmp_path / "b.work").exists()


def test_cli_quantize_gptvq(tiny_dir, tmp_path, capsys):
    out = tmp_path / "cli-gptvq"
    args = [str(tiny_dir / "model"), "--method", "gptvq", "--vq-dim", "2", "--vq-bits", "2", "--vq-group-size", "256",
            "--vq-columns", "32", "--no-codebook-update", "--kmeans-iters", "5", "--vq-init", "mahalanobis",
            "--vq-assignment", "block", "--out", str(out), "--calib-text", str(tiny_dir / "calib.txt"),
            "--calib-windows", "2", "--calib-seqlen", "32", "--no-eval", "--device", "cpu", "--fast"]
    assert main(["quantize", *args]) == 0
    assert "measured 3.0625" in capsys.readouterr().out  # 2 + (16 * 2 * 8 + 16) / 256
    report = json.loads((out / "job_report.json").read_text())
    assert report["method"] == "gptvq"
    assert report["config"] | {"seed": 0} == {
        "dim": 2, "bits": 2.0, "group_size": 256, "group_columns": 32, "kmeans_iters": 5, "init": "mahalanobis",
        "assignment": "block", "codebook_update": False, "update_iters": 10, "error_feedback": True,
        "percdamp": 0.01, "seed": 0}
    assert report["bits_per_weight_measured"] == pytest.approx(2 + (16 * 2 * 8 + 16) / 256)


@pytest.mark.slow
def test_main_job_on_the_whole_real_model(real_model_assets, tmp_path):
    """The README's main job on the whole benchmark model (all 30 blocks, 210 linears),
    one-shot (its fine-tuning left out) with a small calibration and evaluation so that it
    fits in CI."""
    shared = real_model_assets
    out = tmp_path / "ckpt"
    report = run_quantize_job(JobOptions(
        out=str(out), calib_text=str(shared / "tokenized" / "valid.txt"), calib_windows=4, calib_seqlen=256,
        eval_text=str(shared / "raw" / "wiki.test.raw"), eval_seqlen=256, eval_windows=4, agreement_windows=2,
        finetune=None,
    ))
    print("\n" + format_report(report))
    assert report["quantized_layers"] == 210
    nominal, measured = report["bits_per_weight_nominal"], report["bits_per_weight_measured"]
    assert nominal <= measured <= 1.01 * nominal
    # the linears shrink ~4.9x and the embedding (with the tied head) 2x at 8 bits
    assert report["checkpoint_bytes"] < 0.3 * report["float16_model_bytes"]
    assert report["embeddings"]["tied"] and report["embeddings"]["config"] == {"bits": 8, "group_size": 64}
    assert report["ppl_float"] < report["ppl_quantized"] < 1.6 * report["ppl_float"]
    assert report["top1_agreement"] > 0.6
    # the quantizer's working memory (one block's activations, Hessians, codes) is below the
    # float model's size: model + working memory < 2x the model
    assert 0 < report["quantization_working_memory_bytes"] < report["float_model_memory_bytes"]
    # the loaded checkpoint holds packed payloads (the embedding's too) + float32 norms
    assert report["loaded_model_bytes"] < 0.12 * report["float_model_memory_bytes"]


def test_cli_quantizes_a_mixture_of_experts_model_and_reports_its_experts(tmp_path, capsys):
    """`pvq quantize` on a Qwen2-MoE directory: every expert quantized, the token counts per
    expert in the report and job_report.json, and the checkpoint loads back with pvq.load."""
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig

    from pvq.checkpoint import load_checkpoint
    from pvq.runtime import QuantizedLinear

    config = Qwen2MoeConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=256, num_experts=4, num_experts_per_tok=2,
                            moe_intermediate_size=32, shared_expert_intermediate_size=64)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / "model")
    _char_tokenizer(256).save_pretrained(tmp_path / "model")
    write_texts(tmp_path, TEXT, 3000)
    out = tmp_path / "ckpt"
    assert main(["quantize", str(tmp_path / "model"), "--method", "gptq", "--bits", "4", "--group-size", "32",
                 "--out", str(out), "--calib-text", str(tmp_path / "calib.txt"), "--calib-windows", "4",
                 "--calib-seqlen", "64", "--eval-text", str(tmp_path / "wiki.test.raw"), "--eval-seqlen", "64",
                 "--eval-windows", "2", "--quiet", "--fast"]) == 0
    printed = capsys.readouterr().out
    assert "experts          8 quantized; calibration tokens routed per expert" in printed
    report = json.loads((out / "job_report.json").read_text())
    per_expert = report["experts"]["per_expert"]
    assert len(per_expert) == 8 and sum(e["tokens"] for e in per_expert.values()) == 2 * 4 * 64 * 2
    loaded, _, _ = load_checkpoint(out)
    assert sum(isinstance(m, QuantizedLinear) for m in loaded.modules()) == report["quantized_layers"] == 2 * (4 + 3 + 8)
