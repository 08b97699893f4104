"""Hostile chat templates, prompts and generation_config.json for `pvq generate` (--chat) and
`pvq chat`: each ends in one line and exit code 2 (a GenerationError in the API), quickly,
with no code of the checkpoint's run. A normal template renders exactly as transformers does.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from conftest import cli_error, printable_char_tokenizer, scripted_input  # noqa: E402
from pvq.chat_template import ChatTemplateError, chat_ids, render_chat  # noqa: E402
from pvq.checkpoint.load_checks import check_generation_config  # noqa: E402
from pvq.generate import GenerationError  # noqa: E402

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello {{ x }} <s>"},
            {"role": "assistant", "content": "hi"}, {"role": "user", "content": "and  more\n"}]

NORMAL_TEMPLATES = {
    "plain": ("{% for m in messages %}<s>{{ m['role'][0] }}:{{ m['content'] }}\n{% endfor %}"
              "{% if add_generation_prompt %}<s>a:{% endif %}"),
    "chatml": ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
               "{{ '<|im_start|>system\nYou are helpful<|im_end|>\n' }}{% endif %}"
               "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    "llama3": ("{{- bos_token }}\n{%- if not date_string is defined %}{%- set date_string = \"26 Jul 2024\" %}{%- endif %}\n"
               "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
               "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = \"\" %}{%- endif %}\n"
               "{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}{{- \"Today Date: \" + date_string + \"\\n\\n\" }}"
               "{{- system_message }}{{- \"<|eot_id|>\" }}\n{%- for message in messages %}\n"
               "    {%- if not (message.role == 'tool' or 'tool_calls' in message) %}\n"
               "        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim"
               " + '<|eot_id|>' }}\n    {%- endif %}\n{%- endfor %}\n"
               "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}\n"),
    "features": ("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + m.content|length %}"
                 "{% if loop.first %}[{{ loop.length }}]{% endif %}{{ loop.index }}{{ m.role|upper }}="
                 "{{ m.content|trim|tojson }}{% if not loop.last %}|{% endif %}{% endfor %}{{ ns.n }}"
                 "{{ messages|map(attribute='role')|join(',') }}{{ '%05d' % 42 }}{{ '{:>6}'.format('ab') }}"
                 "{{ messages[:2]|tojson(indent=2) }}{% macro f(x) %}<{{ x }}>{% endmacro %}{{ f('q') }}"
                 "{% for x in [[1, [2, 3]], [4]] recursive %}({{ x if x is number else loop(x) }}){% endfor %}"
                 "{{ 'abc'.replace('b', 'BB') }}{{ ' '.join(['a', 'b']) }}{{ 'x'.center(9) }}{{ 'ab' * 3 }}"
                 "{{ 2 ** 10 }}{% set t %}{{ 'set' ~ 1 }}{% endset %}{{ t }}{{ {'k': (1, 2)}['k'] }}"
                 "{% for a, b in [(1, 2)] %}{{ a + b }}{% endfor %}{% generation %}G{% endgeneration %}"
                 "{{ raise_exception is defined }}{{ dict(a=1)|tojson }}{{ 'a\\tb'.expandtabs(4) }}"),
}


@pytest.mark.parametrize("name", sorted(NORMAL_TEMPLATES))
def test_normal_templates_render_as_transformers_does(name):
    tok = printable_char_tokenizer()
    tok.chat_template = NORMAL_TEMPLATES[name]
    for messages in (MESSAGES, MESSAGES[1:2]):
        for prompt in (True, False):
            expected = tok.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False)
            assert render_chat(tok, messages, add_generation_prompt=prompt) == expected
            ids = tok.apply_chat_template(messages, add_generation_prompt=prompt, return_tensors="pt",
                                          return_dict=True)["input_ids"]
            ours = chat_ids(tok, messages, add_generation_prompt=prompt)
            assert ours.shape == ids.shape and ours.tolist() == ids.tolist()


HOSTILE_TEMPLATES = [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "takes too long"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{{ '' }}{% endfor %}{% endfor %}", "takes too long"),
    ("{% macro m(n) %}{{ m(n + 1) }}{% endmacro %}{{ m(0) }}", "recurses too deeply"),
    ("{% for x in [1] recursive %}{{ loop(range(100000)) }}{% endfor %}", "recurses too deeply|too long"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
     "builds a value"),
    ("{{ 'a' * 10**10 }}", "builds a value"),
    ("{{ 9 ** 100000 }}", "integer of over"),
    ("{{ 'a'|center(10**9) }}", "builds a value"),
    ("{{ 'a'.ljust(10**9) }}", "builds a value"),
    ("{% set s = 'a' * 100000 %}{{ s.replace('a', s)|length }}", "builds a value"),
    ("{% set s = 'a' * 100000 %}{{ s.join([s] * 1000)|length }}", "builds a value"),
    ("{{ range(100000)|map('center', 100000)|join|length }}", "in all"),
    ("{{ '%999999999d' % 1 }}", "builds a value"),
    ("{{ '{:>999999999}'.format(1) }}", "builds a value"),
    ("{{ ('\t' * 100000).expandtabs(100000) }}", "builds a value"),
    ("{{ ('\n' * 100000)|indent('x' * 100000) }}", "builds a value"),
    ("{{ [1]|batch(1000000, 'x' * 1000) }}", "builds a value"),
    ("{{ (range(10000)|list)|tojson(indent=100000) }}", "builds a value"),
    ("{% macro m() %}{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}{% endmacro %}{{ m()|length }}",
     "in all"),
    ("{% set ns = namespace(l=[]) %}{% for i in range(200) %}{% set ns.l = [ns.l, ns.l] %}{% endfor %}{{ ns.l }}",
     "builds a value|too long|deep"),
    ("{% for i in range(100000) %}" + "y" * 1000 + "{% endfor %}", "renders over"),
    ("{{ lipsum(10**6) }}", "lipsum"),
    ("{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}", "nests too deeply"),
    ("x" * (1 << 19), "characters long"),
    ("{% for m in messages %}{{ m.content }", "does not parse"),
    ("{{ foo.bar }}", "'foo' is undefined"),
    ("{{ raise_exception('Conversation roles must alternate user/assistant') }}", "raised an error: Conversation"),
    ("{{ 1 + 'a' }}", "TypeError"),
    ("{{ ''.__class__.__mro__ }}", "outside Jinja's sandbox"),
    ("{{ messages.__class__.__base__.__subclasses__() }}", "outside Jinja's sandbox"),
    ("{{ cycler.__init__.__globals__.os.system('touch {marker}') }}", "outside Jinja's sandbox"),
    ("{{ namespace(_x=1) }}", "outside Jinja's sandbox|underscore"),
    ("{{ messages.append(1) }}", "outside Jinja's sandbox|is not safely callable|undefined"),
]


@pytest.mark.parametrize("template,message", HOSTILE_TEMPLATES, ids=range(len(HOSTILE_TEMPLATES)))
def test_hostile_templates_are_refused_quickly_in_one_line(tmp_path, template, message):
    marker = tmp_path / "ran"
    tok = printable_char_tokenizer()
    tok.chat_template = template.replace("{marker}", str(marker))
    t0 = time.perf_counter()
    with pytest.raises(ChatTemplateError, match=message) as e:
        render_chat(tok, MESSAGES[1:2])
    assert time.perf_counter() - t0 < 30  # the budget stops it in about 3 s; loose for a loaded machine
    assert isinstance(e.value, GenerationError) and "\n" not in str(e.value) and "chat template" in str(e.value)
    assert not marker.exists()


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    from pvq.checkpoint import save_checkpoint
    from pvq.models import tiny_llama
    from pvq.oneshot import Recipe, oneshot

    root = tmp_path_factory.mktemp("advgen")
    model = tiny_llama(seed=0)
    oneshot(model, None, Recipe(method="rtn", config={"bits": 4, "group_size": 32}, finetune=None), progress=False)
    save_checkpoint(model, root / "ck", tokenizer=printable_char_tokenizer())
    return root / "ck"


def tampered(ck: Path, dst: Path, files: dict[str, str]) -> Path:
    """A copy of the checkpoint with `files` written (added or replaced) and its integrity index
    recomputed to cover them (a consistent tamper: the index does not catch it)."""
    shutil.copytree(ck, dst)
    for name, text in files.items():
        (dst / name).write_text(text, encoding="utf-8")
    index = json.loads((dst / "pvq_index.json").read_text())
    for name in set(index["files"]) | set(files):
        data = (dst / name).read_bytes()
        index["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (dst / "pvq_index.json").write_text(json.dumps(index))
    return dst


def test_a_looping_template_fails_generate_and_chat_within_seconds(ck, tmp_path, capsys):
    bad = tampered(ck, tmp_path / "loop", {
        "chat_template.jinja": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"})
    for argv in (["generate", str(bad), "--prompt", "hi", "--chat", "--max-new-tokens", "2"],
                 ["chat", str(bad), "--max-new-tokens", "2"]):
        t0 = time.perf_counter()
        line = cli_error(capsys, argv)
        assert time.perf_counter() - t0 < 60  # the load included; the render itself stops in about a second
        assert f"{bad}: the chat template is refused: it takes too long to render" in line


@pytest.mark.parametrize("template,message", [
    ("{% if %}", "the chat template does not parse"),
    ("{{ ''.__class__.__mro__ }}", "the chat template is refused: it reaches outside Jinja's sandbox"),
    ("{{ raise_exception('no system role') }}", "the chat template raised an error: no system role"),
    ("{{ messages[0].content.nope.deeper }}", "the chat template fails"),
])
def test_failing_templates_are_one_line_naming_the_chat_template(ck, tmp_path, capsys, template, message):
    bad = tampered(ck, tmp_path / "bad", {"chat_template.jinja": template})
    assert message in cli_error(capsys, ["generate", str(bad), "--prompt", "hi", "--chat", "--max-new-tokens", "2"])
    assert message in cli_error(capsys, ["chat", str(bad), "--max-new-tokens", "2"])


def test_a_normal_template_in_a_checkpoint_still_generates_and_chats(ck, tmp_path, capsys, monkeypatch):
    from pvq.cli import main

    good = tampered(ck, tmp_path / "good", {"chat_template.jinja": NORMAL_TEMPLATES["plain"]})
    assert main(["generate", str(good), "--prompt", "hi", "--chat", "--max-new-tokens", "2"]) == 0
    scripted_input(monkeypatch, ["hello"])
    assert main(["chat", str(good), "--max-new-tokens", "2"]) == 0
    assert "tokens/s" in capsys.readouterr().err


def test_chat_without_a_template_is_refused(ck, capsys):
    import torch

    from pvq.generate import generate_text

    assert "no chat template" in cli_error(capsys, ["generate", str(ck), "--prompt", "hi", "--chat"])
    assert "no chat template" in cli_error(capsys, ["chat", str(ck)])
    with pytest.raises(GenerationError, match="no chat template"):
        generate_text(torch.nn.Linear(2, 2), printable_char_tokenizer(), "hi", chat=True)


def test_prompts_that_are_not_utf8_are_one_line(ck, tmp_path, capsys):
    import torch

    from pvq.chat import Conversation, run_chat
    from pvq.generate import generate_text

    undecodable = "a\udcffb"  # how Python hands over the byte 0xff in a command-line argument
    line = cli_error(capsys, ["generate", str(ck), "--prompt", undecodable])
    assert "--prompt is not valid UTF-8 text (byte 0xff at character 1)" in line
    assert "--prompt is not valid UTF-8" in cli_error(capsys, ["generate", str(ck), "--prompt", undecodable, "--chat"])
    good = tampered(ck, tmp_path / "good", {"chat_template.jinja": NORMAL_TEMPLATES["plain"]})
    assert "--system is not valid UTF-8" in cli_error(capsys, ["chat", str(good), "--system", "\udcfe"])
    tok = printable_char_tokenizer()
    with pytest.raises(GenerationError, match="the prompt is not valid UTF-8 text"):
        generate_text(torch.nn.Linear(2, 2), tok, "\ud800")  # a lone surrogate
    from pvq.models import tiny_llama

    model = tiny_llama(seed=0).eval()
    tok.chat_template = NORMAL_TEMPLATES["plain"]
    with pytest.raises(GenerationError, match="the message is not valid UTF-8"):
        Conversation(model, tok, max_new_tokens=2).reply("x\udc80")
    # in the chat loop: undecodable input is an error line and the chat goes on
    reads = iter([UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "x\udc80", "hello"])

    def read(prompt):
        item = next(reads, None)
        if item is None:
            raise EOFError
        if isinstance(item, Exception):
            raise item
        return item

    err = io.StringIO()
    assert run_chat(model, tok, max_new_tokens=2, read=read, out=io.StringIO(), err=err) == 1
    assert err.getvalue().count("not valid UTF-8") == 2 and "tokens/s" in err.getvalue()


HOSTILE_GENERATION_CONFIGS = [
    ('{"max_length": -5}', "max_length must be a count"),
    ('{"max_new_tokens": "x"}', "max_new_tokens must be a count"),
    ('{"temperature": "hot"}', "temperature must be a non-negative number"),
    ('{"eos_token_id": [1e30]}', "eos_token_id must be a token id"),
    ('{"eos_token_id": 99999999999999999999999}', "eos_token_id must be a token id"),
    ('{"pad_token_id": "a"}', "pad_token_id must be a token id"),
    ('{"do_sample": "yes"}', "do_sample must be true or false"),
    ('{"top_p": NaN}', "not valid JSON"),
    ('{"early_stopping": "sometimes"}', "transformers refuses it"),
    ("[1, 2]", "must hold a JSON object"),
    ('"text"', "must hold a JSON object"),
    ("not json", "not valid JSON"),
    ('{"a": ' * 100000 + "1" + "}" * 100000, "nested too deeply"),
]


@pytest.mark.parametrize("text,message", HOSTILE_GENERATION_CONFIGS, ids=range(len(HOSTILE_GENERATION_CONFIGS)))
def test_hostile_generation_configs_name_the_file(ck, tmp_path, capsys, text, message):
    bad = tampered(ck, tmp_path / "bad", {"generation_config.json": text})
    line = cli_error(capsys, ["generate", str(bad), "--prompt", "hi", "--max-new-tokens", "2"])
    assert "generation_config.json" in line and message in line, line


def test_hostile_generation_config_in_chat_and_a_float_model(ck, tmp_path, capsys):
    from conftest import save_tiny_model

    bad = tampered(ck, tmp_path / "bad", {"generation_config.json": '{"eos_token_id": [1e30]}'})
    assert "generation_config.json: eos_token_id" in cli_error(capsys, ["chat", str(bad)])
    float_dir = save_tiny_model(tmp_path / "float")
    (float_dir / "generation_config.json").write_text('{"max_length": -5}')
    assert "generation_config.json: max_length" in cli_error(
        capsys, ["generate", str(float_dir), "--prompt", "hi"])


def test_real_world_generation_configs_pass(tmp_path):
    for config in ({"bos_token_id": 128000, "do_sample": True, "eos_token_id": [128001, 128008, 128009],
                    "temperature": 0.6, "top_p": 0.9, "transformers_version": "4.45.0"},
                   {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": -1,
                    "max_length": 4096, "repetition_penalty": 1.05, "top_k": 20, "use_cache": True}):
        (tmp_path / "generation_config.json").write_text(json.dumps(config))
        check_generation_config(tmp_path)
    check_generation_config(tmp_path / "absent")  # no directory, no file: nothing to check
