"""Hostile or damaged work directories and conversions (issue 31): a work-directory block
edited with its digest rewritten is recomputed, never shipped; a full disk while the work
directory is written is one line naming it, with nothing half-written kept; `pvq convert`
writes NEW only when complete (a failure leaves nothing there, or the old checkpoint as it
was) and keeps the source's recipe.yaml.

Style of test_adversarial.py: every error case ends in one line and exit code 2."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from conftest import adversarial_env, cli_error  # noqa: E402
from pvq.models import adapter_for, tiny_llama  # noqa: E402
from pvq.calibrate import quantize_model  # noqa: E402
from pvq.calibrate import workdir as wd  # noqa: E402
from pvq.methods.rtn import RTNConfig  # noqa: E402

LEGACY = Path(__file__).parent / "data" / "legacy"
RECIPE = "# pvq quantize --recipe recipe.yaml --out NEW_DIR\nmethod: rtn\nbits: 4\ngroup_size: 32\nfast: true\n"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return adversarial_env(tmp_path_factory.mktemp("advwd"), extra_files={"recipe.yaml": RECIPE})


def gptq_args(env: Path, out: Path, work: Path, *extra: str) -> list[str]:
    """A calibrated quantization (the one that keeps a work directory) of the tiny model, one-shot."""
    return ["quantize", str(env / "model"), "--out", str(out), "--method", "gptq", "--group-size", "32",
            "--calib-text", str(env / "calib.txt"), "--calib-windows", "2", "--calib-seqlen", "32",
            "--work-dir", str(work), "--no-eval", "--fast", *extra]


@pytest.fixture(scope="module")
def clean_run(env, tmp_path_factory):
    """model.safetensors of an undisturbed `pvq quantize` (gptq, with a work directory)."""
    from pvq.cli import main

    root = tmp_path_factory.mktemp("clean")
    assert main(gptq_args(env, root / "out", root / "work")) == 0
    return (root / "out" / "model.safetensors").read_bytes()


def _rewrite_digests(work: Path) -> None:
    """Record the current sha256 of every file the state lists, and the state's own digest:
    an edit that the digests alone cannot reveal."""
    state = json.loads((work / wd.STATE_FILE).read_text())
    state["files"] = {name: wd.sha256_file(work / name) for name in state["files"]}
    wd.write_state(work, state)
    assert wd.read_state(work) is not None


def _leftovers(work: Path) -> list[str]:
    return sorted(p.name for p in work.iterdir() if ".tmp" in p.name)


# --------------------------------------------------------------------------- 1. edited blocks, digests rewritten


def _scale_payload(work: Path) -> None:
    from safetensors.numpy import load_file, save_file

    path = work / "block_0001.safetensors"
    arrays = load_file(path)
    key = next(k for k in arrays if k.endswith("/scales"))
    arrays[key] = (arrays[key].astype(np.float32) * 3).astype(arrays[key].dtype)  # valid payload, other weights
    save_file(arrays, path)


def _edit_meta(work: Path) -> None:
    path = work / "block_0001.json"
    doc = json.loads(path.read_text())
    layer = next(iter(doc["layers"].values()))
    layer["meta"]["bits"] = 2
    path.write_text(json.dumps(doc))


def _swap_blocks(work: Path) -> None:
    for suffix in (".safetensors", ".json"):
        shutil.copy(work / f"block_0000{suffix}", work / f"block_0001{suffix}")


def _garbage(work: Path) -> None:
    (work / "block_0001.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{" + bytes(300))


def _wrong_dtype(work: Path) -> None:
    from safetensors.numpy import load_file, save_file

    path = work / "block_0001.safetensors"
    arrays = load_file(path)
    key = next(k for k in arrays if k.endswith("/codes"))
    arrays[key] = arrays[key].astype(np.int32)  # the same values: dequantizes alike, is not the payload spec
    save_file(arrays, path)


@pytest.mark.parametrize("edit,reason", [
    (_scale_payload, "its weights differ from the quantized block the state recorded"),
    (_edit_meta, "meta bits=2, the settings give 3"),
    (_swap_blocks, "block 1 cannot be read"),
    (_garbage, "block 1 cannot be read"),
    (_wrong_dtype, "tensor 'codes' is int32"),
])
def test_a_block_edited_with_its_digest_rewritten_is_recomputed(tmp_path, caplog, edit, reason):
    """A finished run's block 1 of 3 edited, every digest rewritten to match: the resume
    detects it from the settings and the recorded quantized weights, recomputes blocks 1
    and 2 (replaying block 0 for their inputs), and gives the bytes of an undamaged run."""
    windows = torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(0))
    config = RTNConfig(bits=3, group_size=32)
    clean = tiny_llama(seed=0, layers=3)
    full = quantize_model(clean, adapter_for(clean), windows, "rtn", config, work_dir=tmp_path / "a", batch_size=4,
                          progress=False)
    work = tmp_path / "w"
    shutil.copytree(tmp_path / "a", work)
    edit(work)
    _rewrite_digests(work)
    model = tiny_llama(seed=0, layers=3)
    with caplog.at_level(logging.WARNING, logger="pvq"):
        again = quantize_model(model, adapter_for(model), windows, "rtn", config, work_dir=work, batch_size=4,
                               progress=False)
    assert "block 1 does not hold what the state recorded" in caplog.text and reason in caplog.text, caplog.text
    assert again.resumed_blocks == 1  # block 0 kept, 1 and 2 recomputed
    assert list(again) == list(full)
    for name, qt in full.items():
        assert again[name].meta == qt.meta
        assert all(again[name].tensors[k].dtype == qt.tensors[k].dtype
                   and again[name].tensors[k].tobytes() == qt.tensors[k].tobytes() for k in qt.tensors), name
    for (k, a), b in zip(clean.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k
    for name in ("block_0001.safetensors", "block_0002.safetensors"):  # rewritten as a clean run's (the JSON has timings)
        assert (work / name).read_bytes() == (tmp_path / "a" / name).read_bytes(), name


def test_an_untouched_work_directory_still_resumes_without_recomputing(tmp_path, caplog, monkeypatch):
    windows = torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(0))
    config = RTNConfig(bits=3, group_size=32)
    m = tiny_llama(seed=0, layers=3)
    full = quantize_model(m, adapter_for(m), windows, "rtn", config, work_dir=tmp_path / "a", batch_size=4,
                          progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    from pvq.methods import rtn

    monkeypatch.setattr(rtn, "quantize", lambda *a: pytest.fail("a finished block was quantized again"))
    m = tiny_llama(seed=0, layers=3)
    with caplog.at_level(logging.WARNING, logger="pvq"):
        done = quantize_model(m, adapter_for(m), windows, "rtn", config, work_dir=tmp_path / "a", batch_size=4,
                              progress=False)
    assert done.resumed_blocks == 3 and not caplog.text
    assert all(done[n].tensors[k].tobytes() == full[n].tensors[k].tobytes() for n in full for k in full[n].tensors)
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == before


def test_an_edited_block_is_not_shipped_by_the_cli(env, clean_run, tmp_path, capsys):
    from pvq.cli import main

    out, work = tmp_path / "out", tmp_path / "work"
    assert main(gptq_args(env, out, work)) == 0
    _scale_payload(work)
    _rewrite_digests(work)
    capsys.readouterr()
    assert main(gptq_args(env, out, work, "--overwrite")) == 0
    assert "does not hold what the state recorded" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == clean_run


# --------------------------------------------------------------------------- 2. out of disk in the work directory


@pytest.mark.parametrize("target,nth", [
    ("block_0001.safetensors", 1),
    ("block_0001.json", 1),
    ("hidden.safetensors", 1),
    ("state.json", 3),  # the initial state, after block 0, after block 1
    (".pvq-workdir", 1),
])
def test_a_full_disk_while_writing_the_work_directory_is_one_line(env, clean_run, tmp_path, capsys, monkeypatch,
                                                                   target, nth):
    """ENOSPC part-way through a work-directory file: one line naming the work directory and
    the file, no temporary file and no block the state does not list; the rerun resumes
    and gives the bytes of an undisturbed run."""
    from pvq.cli import main

    out, work = tmp_path / "out", tmp_path / "work"
    seen = {"n": 0}
    real = wd.replace_durably

    def full_disk(tmp, path):
        if Path(path).name == target:
            seen["n"] += 1
            if seen["n"] == nth:
                data = Path(tmp).read_bytes()
                Path(tmp).write_bytes(data[: len(data) // 2])  # the write stopped half-way
                raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
        real(tmp, path)

    monkeypatch.setattr(wd, "replace_durably", full_disk)
    line = cli_error(capsys, gptq_args(env, out, work))
    monkeypatch.undo()
    assert f"work directory {work}: cannot write {target}: No space left on device" in line, line
    assert "nothing half-written was kept" in line and "--work-dir" in line
    assert not out.exists()
    assert _leftovers(work) == []
    state = wd.read_state(work)
    if state is not None:
        listed = sorted(n for n in state["files"] if n.startswith("block_"))
        assert sorted(p.name for p in work.glob("block_*")) == listed
        assert all(wd.intact(work, n, state["files"]) for n in listed)
        assert state["blocks_done"] == (1 if target in ("block_0001.safetensors", "block_0001.json", "state.json")
                                        else 0)
    capsys.readouterr()
    assert main(gptq_args(env, out, work)) == 0
    assert (out / "model.safetensors").read_bytes() == clean_run


def _safetensors_full_disk(tensors, filename, metadata=None):
    """How safetensors' Rust writer reports a full disk: its own exception type, not OSError."""
    from safetensors import SafetensorError

    Path(filename).write_bytes(b"\x00" * 64)
    raise SafetensorError(f'Error while serializing: I/O error: No space left on device (os error 28) at path "{filename}"')


def test_a_full_disk_reported_by_safetensors_is_one_line_too(env, clean_run, tmp_path, capsys, monkeypatch):
    from pvq.cli import main

    out, work = tmp_path / "out", tmp_path / "work"
    monkeypatch.setattr(wd, "torch_save_file", _safetensors_full_disk)  # the saved block inputs (hidden states)
    line = cli_error(capsys, gptq_args(env, out, work))
    monkeypatch.undo()
    assert f"work directory {work}: cannot write hidden.safetensors: No space left on device" in line, line
    assert not out.exists() and _leftovers(work) == [] and not list(work.glob("block_*"))
    assert main(gptq_args(env, out, work)) == 0
    assert (out / "model.safetensors").read_bytes() == clean_run


@pytest.mark.parametrize("writer", ["replace_durably", "torch_save_file"])
def test_a_full_disk_writing_offloaded_activations_names_the_work_directory(tmp_path, monkeypatch, writer):
    from pvq.errors import PVQError

    def full_disk(tmp, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp))

    monkeypatch.setattr(wd, writer, full_disk if writer == "replace_durably" else _safetensors_full_disk)
    acts = wd.OffloadedActivations(tmp_path, 0, (2, 3, 4), torch.float32, fresh=True)
    with pytest.raises(PVQError, match=rf"work directory {tmp_path}: cannot write activations/0/0-2.safetensors: "
                                       "No space left on device"):
        acts[0:2] = torch.zeros(2, 3, 4)
    assert list(acts.folder.iterdir()) == [] and acts.digests == {}


# --------------------------------------------------------------------------- 3. conversions: all or nothing


def _siblings(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _fail_second_save(monkeypatch, safetensors_error=False):
    """The second save_pretrained (the converted checkpoint, after the legacy stage) runs out of disk half-way."""
    from transformers import PreTrainedModel

    real, calls = PreTrainedModel.save_pretrained, {"n": 0}

    def save(self, directory, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            if safetensors_error:
                _safetensors_full_disk({}, Path(directory) / "model.safetensors")
            (Path(directory) / "model.safetensors").write_bytes(b"\x00" * 100)
            raise OSError(errno.ENOSPC, "No space left on device", str(Path(directory) / "model.safetensors"))
        return real(self, directory, *a, **k)

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save)


def _codes_out_of_range(src: Path) -> None:
    """A pvq 0.1 checkpoint whose layer codes do not decode, its manifest digests rewritten to match."""
    from safetensors.numpy import load_file, save_file

    arrays = load_file(src / "blocks-001.safetensors")
    arrays["model.layers.1.mlp.down_proj.codes"][:] = 0xFF
    save_file(arrays, src / "blocks-001.safetensors")
    manifest = json.loads((src / "manifest.json").read_text())
    data = (src / "blocks-001.safetensors").read_bytes()
    manifest["files"]["blocks-001.safetensors"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (src / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("existing,safetensors_error", [(False, False), (True, False), (False, True)],
                         ids=["new", "overwrite", "safetensors-error"])
def test_a_convert_that_fails_while_writing_leaves_nothing(tmp_path, capsys, monkeypatch, existing, safetensors_error):
    from pvq.cli import main

    src, dst = LEGACY / "v1-pvq", tmp_path / "new"
    if existing:
        assert main(["convert", str(LEGACY / "v3-gptq-rot-act"), str(dst)]) == 0
    before = {p.name: p.read_bytes() for p in dst.iterdir()} if existing else None
    _fail_second_save(monkeypatch, safetensors_error)
    line = cli_error(capsys, ["convert", str(src), str(dst), *(["--overwrite"] if existing else [])])
    assert f"converting {src} into {dst} failed" in line and "No space left on device" in line, line
    if existing:
        assert "the checkpoint there is unchanged" in line
        assert {p.name: p.read_bytes() for p in dst.iterdir()} == before
        assert main(["verify", str(dst)]) == 0
    else:
        assert "nothing was written there" in line and not dst.exists()
    assert _siblings(tmp_path) == (["new"] if existing else [])  # no stage, no partial


def test_a_convert_of_a_damaged_source_leaves_nothing(tmp_path, capsys):
    from pvq.cli import main

    src = tmp_path / "old"
    shutil.copytree(LEGACY / "v1-pvq", src)
    _codes_out_of_range(src)
    line = cli_error(capsys, ["convert", str(src), str(tmp_path / "new")])
    assert "model.layers.1.mlp.down_proj" in line and "out of range" in line, line
    assert _siblings(tmp_path) == ["old"]
    # an existing checkpoint at NEW stays as it was
    dst = tmp_path / "new"
    assert main(["convert", str(LEGACY / "v3-gptq-rot-act"), str(dst)]) == 0
    before = {p.name: p.read_bytes() for p in dst.iterdir()}
    cli_error(capsys, ["convert", str(src), str(dst), "--overwrite"])
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before
    assert _siblings(tmp_path) == ["new", "old"]


def test_a_convert_that_fails_half_way_leaves_nothing(tmp_path, capsys, monkeypatch):
    """A failure after the pvq 0.1 stage was written (here: while re-encoding) removes the stage."""
    import pvq.checkpoint.reencode as reencode
    from pvq.runtime.errors import CheckpointError

    def damaged(model):
        raise CheckpointError("layer 'model.layers.0.mlp.down_proj': simulated damage found while re-encoding")

    monkeypatch.setattr(reencode, "reencode_split", damaged)
    line = cli_error(capsys, ["convert", str(LEGACY / "v1-pvq"), str(tmp_path / "new")])
    assert "simulated damage found while re-encoding" in line
    assert _siblings(tmp_path) == []


def test_a_convert_onto_an_existing_checkpoint_is_refused_before_the_work(env, tmp_path, capsys, monkeypatch):
    import pvq.checkpoint.legacy as legacy

    shutil.copytree(env / "ck", tmp_path / "ck")
    monkeypatch.setattr(legacy, "read_manifest", lambda *a: pytest.fail("the source was read"))
    line = cli_error(capsys, ["convert", str(LEGACY / "v1-pvq"), str(tmp_path / "ck")])
    assert "already holds a pvq checkpoint" in line
    assert _siblings(tmp_path) == ["ck"]


# --------------------------------------------------------------------------- 4. the recipe travels


def test_convert_keeps_the_recipe_in_the_checkpoint_and_its_index(env, tmp_path, capsys):
    from pvq.cli import main

    assert main(["convert", str(env / "ck"), str(tmp_path / "new")]) == 0
    new = tmp_path / "new"
    assert (new / "recipe.yaml").read_text() == RECIPE
    index = json.loads((new / "pvq_index.json").read_text())
    data = (new / "recipe.yaml").read_bytes()
    assert index["files"]["recipe.yaml"] == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert main(["verify", str(new)]) == 0
    # a source without a recipe converts without one
    assert main(["convert", str(LEGACY / "v1-pvq"), str(tmp_path / "leg")]) == 0
    assert not (tmp_path / "leg" / "recipe.yaml").exists()


def test_a_recipe_that_is_not_text_stops_the_convert(env, tmp_path, capsys):
    src = tmp_path / "ck"
    shutil.copytree(env / "ck", src)
    (src / "recipe.yaml").write_bytes(b"method: \xff\xfe rtn\n")
    index = json.loads((src / "pvq_index.json").read_text())
    data = (src / "recipe.yaml").read_bytes()
    index["files"]["recipe.yaml"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (src / "pvq_index.json").write_text(json.dumps(index))
    line = cli_error(capsys, ["convert", str(src), str(tmp_path / "new")])
    assert f"{src}/recipe.yaml is not UTF-8 text" in line
    assert _siblings(tmp_path) == ["ck"]
