"""The repository stands on its own: its licence file matches the declared licence, and
its documents and code cite no document that is not in it."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: what is checked
TEXTS = ["README.md", "Makefile", "pyproject.toml", "sample_data/*/README.md", "src/**/*.py", "tests/**/*.py", "bench/*.py", "bench/*.md"]
URL = re.compile(r"https?://([A-Za-z0-9.-]+)")
#: hosts that are not documents: loopback, placeholders, names reserved for examples
#: (RFC 2606) and names that only exist on a private network
LOCAL_HOST = re.compile(r"^(127[\d.]*|localhost|0\.0\.0\.0|host|x|\.+|example\.(com|org|net)|[a-z0-9.-]+\.(internal|example|invalid|test))$")
#: an issue or pull request (owner/repo#123, repo#123), a design note or article kept outside the repository
CITATION = re.compile(r"\b[\w.-]+#\d+\b|DESIGN\.md|seed article|\bseed 00\d")


def texts() -> list[Path]:
    return sorted({path for pattern in TEXTS for path in ROOT.glob(pattern) if path.is_file()})


def test_the_licence_file_is_the_declared_licence():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"]
    assert declared == "Apache-2.0"
    licence = (ROOT / "LICENSE").read_text()
    assert "Apache License" in licence and "Version 2.0, January 2004" in licence
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in licence and "END OF TERMS AND CONDITIONS" in licence
    # the bundled sample keeps its own (MIT) notice, as its licence requires
    sample = (ROOT / "sample_data" / "fashion-mnist" / "LICENSE").read_text()
    assert "Copyright (c) 2017 Zalando SE" in sample and "Permission is hereby granted" in sample


def test_nothing_cites_a_document_outside_the_repository():
    found = []
    this = Path(__file__).resolve()
    for path in texts():
        if path == this:
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            hosts = [h for h in URL.findall(line) if not LOCAL_HOST.match(h.lower())]
            if hosts or CITATION.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "cites documents that are not in the repository:\n" + "\n".join(found)
