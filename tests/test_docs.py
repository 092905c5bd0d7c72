"""The docs stay true: the README is a short front door whose links land, the configuration page is the
settings class's own, every setting says what it does, and the site builds with --strict (a broken link or
anchor fails it)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from markdown.extensions.toc import slugify

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs"))

import gen_configuration  # noqa: E402

from server import settings as settings_module  # noqa: E402

README = ROOT / "README.md"
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_readme_is_a_short_front_door() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    first_code = text.split("```bash", 1)[1].split("```", 1)[0]
    assert first_code.strip().splitlines()[0].startswith("make serve")
    assert first_code.strip().splitlines()[1].startswith("make test")


def anchors(page: Path) -> set[str]:
    headings = [line.lstrip("#").strip() for line in page.read_text().splitlines() if line.startswith("#")]
    return {slugify(heading, "-") for heading in headings}


def test_readme_links_land() -> None:
    for target in LINK.findall(README.read_text()):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        page = ROOT / path
        assert page.exists(), target
        if anchor:
            assert anchor in anchors(page), target


def test_configuration_page_is_generated_from_the_settings() -> None:
    page = ROOT / "docs" / "configuration.md"
    assert page.read_text() == gen_configuration.render(), "run `make docs` (docs/gen_configuration.py)"


@pytest.mark.parametrize(
    "model",
    [settings_module.Settings, settings_module.StorageProfile, settings_module.CvatProfile,
     settings_module.ApiKeyEntry],
)  # fmt: skip
def test_every_setting_says_what_it_does(model: type) -> None:
    fields = model.model_fields.items()
    assert not [name for name, field in fields if not (field.description or "").strip()]


def test_docs_site_builds_strictly(tmp_path: Path) -> None:
    mkdocs = Path(sys.executable).parent / "mkdocs"
    # Not --quiet: it hides the warnings that --strict turns into a failure, and the build then passes.
    done = subprocess.run(
        [str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "architecture" / "index.html").exists()
