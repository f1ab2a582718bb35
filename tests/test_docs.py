"""The docs say what the code does: every `mushcam ...` / `mushcam-train ...` / `deploy/*.sh` command line
in README.md and docs/*.md (code blocks and inline code) names a real command and real options, and the
README's config table matches `device.config.Config` key for key, default for default.

Both sides are read at test time (the docs' text, the Typer apps, `device.config.Config`, the deploy
scripts' --help), so the check keeps holding as either changes.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import tomllib
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest
import typer

from device.cli import app as device_app
from device.config import Config
from train.cli import app as train_app

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
# Every command line in these is checked; the config table only in the README.
DOCS = (README, *sorted((REPO / "docs").glob("*.md")))
APPS = {"mushcam": device_app, "mushcam-train": train_app}
SCRIPTS = ("deploy/flash.sh", "deploy/collect.sh", "deploy/install.sh")


def _code() -> list[tuple[str, str]]:
    """Shell-ish snippets of the docs: each line of a fenced block (continuations joined), each inline span."""
    snippets: list[tuple[str, str]] = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M):
            snippets.extend((doc.name, line) for line in block.replace("\\\n", " ").splitlines())
        prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.S | re.M)
        snippets.extend((doc.name, span) for span in re.findall(r"`([^`\n]+)`", prose))
    return snippets


def _invocations(program_names: tuple[str, ...]) -> list[tuple[str, list[str], str]]:
    """(program, words after it, 'doc: snippet') for every command line of the docs running one of them."""
    found = []
    for doc, snippet in _code():
        code = re.sub(r"(^|\s)#.*$", "", snippet)  # a shell comment
        for segment in re.split(r"\|\||&&|[;|]|\$\(|`", code):
            words = segment.replace("[", " ").replace("]", " ").split()
            while words and (re.fullmatch(r"[A-Z_]+=\S*", words[0]) or words[0] in ("sudo", "$", "time", "nice")):
                words = words[1:]
            if words and words[0].rsplit("/", 1)[-1] in program_names:
                name = words[0] if words[0].startswith("deploy/") else words[0].rsplit("/", 1)[-1]
                found.append((name, words[1:], f"{doc}: {snippet.strip()}"))
    return found


def _options(cmd) -> set[str]:
    opts = {"--help"}
    for p in cmd.params:
        opts.update(o for o in p.opts + p.secondary_opts if o.startswith("--"))
    return opts


def _long_options(words: list[str]) -> list[str]:
    return [m.group(0) for w in words for m in [re.match(r"--[a-z0-9][a-z0-9-]*", w)] if m]


INVOCATIONS = _invocations(tuple(APPS))


def test_the_docs_run_both_command_lines():
    programs = {name for name, _, _ in INVOCATIONS}
    assert programs == set(APPS), f"command lines found in the docs: {sorted(programs)}"


@pytest.mark.parametrize("program, words, snippet", INVOCATIONS, ids=[" ".join([p, *w])[:60] for p, w, _ in INVOCATIONS])
def test_every_documented_command_and_option_exists(program, words, snippet):
    cmd = typer.main.get_command(APPS[program])  # a click command (typer vendors click: duck-typed)
    path = [program]
    rest = list(words)
    # Walk down the groups: `mushcam X`, `mushcam release install`, ...
    while hasattr(cmd, "commands") and rest and not rest[0].startswith("-"):
        name = rest.pop(0)
        assert name in cmd.commands, (
            f"the docs run `{' '.join(path + [name])}` ({snippet!r}), but `{' '.join(path)}` has no such "
            f"command; it has: {', '.join(sorted(cmd.commands))}"
        )
        cmd = cmd.commands[name]
        path.append(name)
    valid = _options(cmd)
    for opt in _long_options(rest):
        assert opt in valid, (
            f"the docs use `{' '.join(path)} {opt}` ({snippet!r}); its options are: {', '.join(sorted(valid))}"
        )


SCRIPT_INVOCATIONS = _invocations(tuple(s.rsplit("/", 1)[-1] for s in SCRIPTS))


@pytest.mark.parametrize("script, words, snippet", SCRIPT_INVOCATIONS, ids=[" ".join([p, *w])[:60] for p, w, _ in SCRIPT_INVOCATIONS])
def test_every_documented_deploy_script_option_is_in_its_help(script, words, snippet):
    path = REPO / "deploy" / script.rsplit("/", 1)[-1]
    assert path.is_file(), f"README runs {script} ({snippet!r}), which does not exist"
    help_text = subprocess.run(["bash", str(path), "--help"], capture_output=True, text=True, timeout=30).stdout
    for opt in _long_options(words):
        assert re.search(rf"(^|[\s,]){re.escape(opt)}\b", help_text), f"the docs use `{script} {opt}` ({snippet!r}); --help has no {opt}"


# --- The configuration table -------------------------------------------------------------------------

def _config_rows() -> list[tuple[str, str]]:
    """(`key` cell, `default` cell) of each row of the README's table under '## Configuration'."""
    text = README.read_text(encoding="utf-8")
    section = re.search(r"^## Configuration\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert section, "README has no '## Configuration' section"
    rows = []
    for line in section.group(1).splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if len(cells) >= 2 and cells[0].startswith("`"):
            rows.append((cells[0].strip("`"), cells[1]))
    assert rows, "no rows in the README's configuration table"
    return rows


def _split_values(cell: str) -> list[str]:
    cell = cell.replace("\\|", "|")
    spans = re.findall(r"`([^`]*)`", cell)
    value = spans[0] if len(spans) == 1 else cell
    return [v.strip() for v in shlex.split(value.replace(",", " , "), posix=False) if v.strip() != ","] if value else []


def _parse(token: str):
    try:
        return tomllib.loads(f"v = {token}")["v"]
    except tomllib.TOMLDecodeError:
        return token  # an unquoted path or word


def _defaults() -> dict[str, object]:
    """'key' or 'section.key' -> the default in device.config.Config."""
    out: dict[str, object] = {}
    cfg = Config()
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if is_dataclass(value):
            for sub in fields(value):
                out[f"{f.name}.{sub.name}"] = getattr(value, sub.name)
        else:
            out[f.name] = value
    return out


def _table() -> dict[str, str]:
    """'key' or 'section.key' -> the README's default cell value (one per key)."""
    table: dict[str, str] = {}
    for keys_cell, default_cell in _config_rows():
        m = re.fullmatch(r"(?:\[(\w+)\]\s*)?(.+)", keys_cell)
        section, names = m.group(1), [k.strip() for k in m.group(2).split(",")]
        keys = [f"{section}.{n}" if section else n for n in names]
        values = _split_values(default_cell)
        if len(keys) == 1 and len(values) != 1:
            values = [default_cell]  # prose (e.g. how model_dir is resolved)
        assert len(values) == len(keys), f"README config row {keys_cell!r}: {len(keys)} keys but defaults {default_cell!r}"
        table.update(zip(keys, values))
    return table


def test_readme_config_table_lists_every_key():
    documented, real = set(_table()), set(_defaults())
    assert not documented - real, f"README documents config keys that do not exist: {sorted(documented - real)}"
    assert not real - documented, f"config keys missing from the README's table: {sorted(real - documented)}"


@pytest.mark.parametrize("key", sorted(_defaults()))
def test_readme_config_default_matches_the_code(key):
    table = _table()
    if key not in table:
        pytest.skip("not in the table (test_readme_config_table_lists_every_key reports it)")
    default = _defaults()[key]
    if default == "":
        return  # an empty default means "resolved at run time"; the README explains how in prose
    documented = _parse(table[key])
    if isinstance(default, bool):
        assert documented is default, f"README says `{key}` defaults to {table[key]}, the code: {default}"
    elif isinstance(default, (int, float)):
        assert isinstance(documented, (int, float)) and not isinstance(documented, bool) and float(documented) == float(default), (
            f"README says `{key}` defaults to {table[key]}, the code: {default}")
    else:
        assert documented == default, f"README says `{key}` defaults to {table[key]}, the code: {default!r}"


# --- The recipe --------------------------------------------------------------------------------------

def _recipe_options(text: str, prefix: str) -> dict[str, dict[str, str]]:
    """subcommand -> {--option: value} for each `PREFIX <subcommand> ...` line (continuations joined)."""
    out: dict[str, dict[str, str]] = {}
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip()
        if not line.startswith(prefix):
            continue
        words = line[len(prefix):].split()
        opts: dict[str, str] = {}
        for i, w in enumerate(words[1:], start=1):
            if w.startswith("--"):
                nxt = words[i + 1] if i + 1 < len(words) else ""
                opts[w] = "" if nxt.startswith("--") else nxt
        out[words[0]] = opts
    return out


def test_training_md_runs_what_make_model_runs():
    """docs/training.md's "real commands" block has every option train/make_model.sh passes, same literal values."""
    script = _recipe_options((REPO / "train" / "make_model.sh").read_text(encoding="utf-8"), '"${TRAIN[@]}" ')
    text = (REPO / "docs" / "training.md").read_text(encoding="utf-8")
    block = re.search(r"^## The real commands.*?^```\w*\n(.*?)^```", text, flags=re.S | re.M)
    assert block, "docs/training.md has no '## The real commands' block"
    docs = _recipe_options(block.group(1), "mushcam-train ")
    assert script, "no mushcam-train commands found in train/make_model.sh"
    for command, opts in script.items():
        assert command in docs, f"make_model.sh runs `{command}`, docs/training.md's real commands do not"
        for opt, value in opts.items():
            assert opt in docs[command], f"make_model.sh runs `{command} {opt} {value}`; docs/training.md lacks {opt}"
            if value and not value.startswith(('"', "$")):  # a literal, not a path from a variable
                assert docs[command][opt] == value, (
                    f"make_model.sh runs `{command} {opt} {value}`; docs/training.md says {docs[command][opt]!r}")
