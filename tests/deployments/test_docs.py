"""The README and the docs stay true: links resolve, named files and flags exist, settings are real.

Config snippets are parsed in test_shipped_configs.py, the start command in test_serve_env.py. Plain
text only (tests/deployments/docs_text.py): the whole module runs in well under a second.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pytest

from deployments.config import REPO_ROOT
from tests.deployments.docs_text import (
    ALL_PAGES,
    CHECKED,
    README,
    anchors,
    command_texts,
    links,
    read,
    rel,
    sections,
)

README_MAX_LINES = 300
_PATH = re.compile(
    r"(?<![\w./~$-])((?:deployments|engine|model_zoo|benchmarks|tests|configs|docs|\.ci)/[\w./-]*"
    r"|serve_config\.yaml|pyproject\.toml)"
)
_SCRIPT = re.compile(r"(?:benchmarks/)?\b(\w+)\.py\b|\b(llmserve)\s+(?:serve|env)\b")
_FLAG = re.compile(r"(?<![\w-])(--[a-z][\w-]*)")
_RATIO = re.compile(r"\b\d+(?:\.\d+)?(?:-\d+(?:\.\d+)?)?x\b")
_DATE = re.compile(r"\b20\d\d-\d\d-\d\d\b")
_CPU = re.compile(r"Zen 5|Zen 4|Zen 3|Ice Lake|Xeon with AMX")
_DTYPE = re.compile(r"\bbf16\b|bfloat16|float32")


def page_ids(pages: list[Path]) -> list[str]:
    return [rel(p) for p in pages]


def test_the_readme_is_short():
    num_lines = len(read(README).splitlines())
    assert num_lines <= README_MAX_LINES, f"README.md has {num_lines} lines; at most {README_MAX_LINES}"


# --- links --------------------------------------------------------------------------------------------


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in links(page):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        linked = (page.parent / path_part).resolve() if path_part else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {rel(linked)}")
    return broken


@pytest.mark.parametrize("page", ALL_PAGES, ids=page_ids(ALL_PAGES))
def test_links_resolve(page: Path):
    assert broken_links(page) == []


def test_a_broken_link_is_seen(tmp_path: Path, monkeypatch):
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other\n## A section\n")
    page.write_text("[ok](other.md#a-section) [gone](missing.md) [bad](other.md#nope) [web](https://x.y)\n")
    monkeypatch.setattr("tests.deployments.docs_text.REPO_ROOT", tmp_path)
    assert broken_links(page) == ["missing.md: no such file", "other.md#nope: no heading #nope in other.md"]


# --- files, flags and settings the pages name -------------------------------------------------------------


def named_paths(page: Path) -> set[str]:
    texts = command_texts(page)
    return {m.rstrip(".,:") for text in texts for m in _PATH.findall(text)}


@pytest.mark.parametrize("page", CHECKED, ids=page_ids(CHECKED))
def test_named_files_exist(page: Path):
    missing = sorted(p for p in named_paths(page) if not (REPO_ROOT / p).exists())
    assert missing == [], f"{rel(page)} names files that are not in the repository"


@cache
def flags_of(program: str) -> frozenset[str]:
    """The long options a benchmark script (or `llmserve`) declares."""
    source = REPO_ROOT / ("deployments/cli.py" if program == "llmserve" else f"benchmarks/{program}.py")
    text = source.read_text(encoding="utf-8")
    flags = set(re.findall(r'"(--[a-z][\w-]*)"', text))
    if "engine_switches" in text:  # --no-<switch> and --<opt-in>, built from the EngineConfig fields
        from benchmarks.engine_switches import OPT_IN, SWITCHES

        flags |= {"--no-" + field.replace("_", "-") for field in SWITCHES}
        flags |= {"--" + field.replace("_", "-") for field in OPT_IN}
    return frozenset(flags | {"--help"})


def unknown_flags(text: str) -> list[str]:
    """Flags written after a benchmark script or `llmserve` in one command that it does not declare."""
    unknown, program, start = [], None, 0
    for match in _SCRIPT.finditer(text + " "):
        if program:
            unknown += [f for f in _FLAG.findall(text[start : match.start()]) if f not in flags_of(program)]
        name = match.group(1) or match.group(2)
        is_ours = name == "llmserve" or (REPO_ROOT / "benchmarks" / f"{name}.py").is_file()
        program, start = (name if is_ours else None), match.end()
    if program:
        unknown += [f for f in _FLAG.findall(text[start:]) if f not in flags_of(program)]
    return unknown


@pytest.mark.parametrize("page", CHECKED, ids=page_ids(CHECKED))
def test_flags_exist(page: Path):
    unknown = sorted({f"{text!r}: {flag}" for text in command_texts(page) for flag in unknown_flags(text)})
    assert unknown == []


def test_an_unknown_flag_is_seen():
    assert unknown_flags("python benchmarks/serve_bench.py --peer http://x --compare-engine") == []
    assert unknown_flags("engine_bench.py --skip-baselines --no-native-linear") == []
    assert unknown_flags("llmserve serve cfg.yaml --address auto") == []
    assert unknown_flags("python benchmarks/serve_bench.py --peer-url x") == ["--peer-url"]
    assert unknown_flags("llmserve serve --port 9000") == ["--port"]
    assert unknown_flags("serve run x --address y; ray start --head") == []  # Ray's, not ours


@cache
def ray_serve_settings() -> str:
    import ray.serve

    return "".join(p.read_text(encoding="utf-8") for p in Path(ray.serve.__file__).parent.rglob("*.py"))


@cache
def our_settings() -> str:
    """The project's sources, the tests' (test settings such as LLMSERVE_TEST_PROFILE) and .ci/run."""
    return "".join(
        p.read_text(encoding="utf-8")
        for d in ("deployments", "engine", "model_zoo", "tests")
        for p in (REPO_ROOT / d).rglob("*.py")
    ) + (REPO_ROOT / ".ci" / "run").read_text(encoding="utf-8")


@pytest.mark.parametrize("page", CHECKED, ids=page_ids(CHECKED))
def test_environment_variables_exist(page: Path):
    text = read(page)
    unknown = sorted(
        {
            v
            for v in re.findall(r"\bRAY_SERVE_[A-Z0-9_]*[A-Z0-9]\b", text)
            if f'"{v}"' not in ray_serve_settings()
        }
        | {v for v in re.findall(r"\bLLMSERVE_[A-Z0-9_]*[A-Z0-9]\b", text) if f'"{v}"' not in our_settings()}
    )
    assert unknown == [], f"{rel(page)} names settings that neither Ray Serve nor this project reads"


# --- figures against a peer -------------------------------------------------------------------------------


def unlabelled_peer_ratios(page: Path) -> list[str]:
    """Sections that give a ratio and speak of vLLM without naming the CPU, a dtype and a date."""
    missing = []
    for title, text in sections(page):
        if "vLLM" not in text or not _RATIO.search(text):
            continue
        lacks = [
            name
            for name, rule in (("date", _DATE), ("CPU", _CPU), ("dtype", _DTYPE))
            if not rule.search(text)
        ]
        if lacks:
            missing.append(f"{rel(page)} '{title}': no {', '.join(lacks)}")
    return missing


@pytest.mark.parametrize("page", ALL_PAGES, ids=page_ids(ALL_PAGES))
def test_every_ratio_against_a_peer_names_cpu_dtype_and_date(page: Path):
    assert unlabelled_peer_ratios(page) == []


def test_an_unlabelled_ratio_is_seen(tmp_path: Path, monkeypatch):
    page = tmp_path / "p.md"
    page.write_text("## Fast\n4.0-4.9x vLLM-CPU.\n## Labelled\n1.2x vLLM-CPU (Zen 4, bf16, 2026-12-05).\n")
    monkeypatch.setattr("tests.deployments.docs_text.REPO_ROOT", tmp_path)
    assert unlabelled_peer_ratios(page) == ["p.md 'Fast': no date, CPU, dtype"]
