"""The project's text describes the software and its measurements, not how it was developed.

README, docs, RESULTS, comments, test names and scripts say what runs and what was measured ("on
4 x H100 with NVLink, one run, command X"). They do not tell which machines were lent or borrowed,
which files were carried to them, numbered work items, sessions, dates of earlier runs, or a
``$OUT`` variable that exists only where the project was developed (GPU scripts take ``--out``).
Each pattern below names one such habit and is precise enough not to fire on ordinary words
("tags carry the epoch", "once per session" of a pytest fixture, CUDA "work items").
"""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUFFIXES = {".md", ".py", ".sh", ".toml", ".txt", ".cfg", ".ini", ".yaml", ".yml", ".cu", ".cuh"}
NAMES = {"Makefile", "run"}  # .ci/run

PATTERNS = {
    "a numbered work item": r"\bissues?[ -]?#?\d+",
    "a development session": r"\b(?:this|that|previous|next|earlier|later|same|another|\d+-GPU) sessions?\b"
                             r"|\bsessions? \d+\b",
    "lent or borrowed machines": r"\b(?:lent|borrowed|borrowing)\b",
    "files carried between machines": r"\bcarr(?:y|ied|ying)\b[^\n]{0,60}?(?:build/|\.whl|\bwheels?\b|pre-?built"
                                      r"|to the GPU|between machines)|\bthe carried\b|\bcan carry\b",
    "the development shell's $OUT": r"\$\{?OUT\b",
    "the device tool": r"\bdevice (?:tool|calls?)\b",
    "a machine kind's name": r"\bnvidia-h(?:100|200)(?:-x\d)?\b",
    # a date of an earlier run; dates that cite a source (a commit, a blog post) are references
    "a dated narrative": r"(?<!` \()(?<!blog )(?<!blog, )(?<!blog/)\b20\d\d-\d\d-\d\d\b",
}


def tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    me = Path(__file__).resolve()
    return [ROOT / n for n in names
            if (Path(n).suffix in SUFFIXES or Path(n).name in NAMES) and (ROOT / n).resolve() != me
            and (ROOT / n).is_file()]


def test_the_project_text_describes_the_software_not_its_development():
    compiled = {what: re.compile(pattern, re.IGNORECASE) for what, pattern in PATTERNS.items()}
    hits = []
    for path in tracked_text_files():
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for what, pattern in compiled.items():
                match = pattern.search(line)
                if match:
                    hits.append(f"{path.relative_to(ROOT)}:{number}: {what}: {match.group(0)!r} in {line.strip()[:100]!r}")
    assert not hits, f"{len(hits)} lines describe how eep was developed:\n" + "\n".join(hits)


def test_the_patterns_fire_on_what_they_name_and_not_on_ordinary_words():
    compiled = [re.compile(p, re.IGNORECASE) for p in PATTERNS.values()]
    fires = ["as in issue 8", "issue-19", "only the one-GPU kind was lent in this session", "carry build/cutlass",
             "the carried library", "--out $OUT/face", "through the device tool", "one device call",
             "(kind nvidia-h100-x4)", "measured on 2026-12-03", "a 4-GPU session"]
    quiet = ["tags carry the epoch", "prepared once per session", "a plan could not be carried out",
             "maps work items source-major", "an SGLang issue", "--out DIR", "equivalent", "the output directory",
             "NVIDIA/nccl `5067397c` (2026-06-11)", "(LMSYS blog, 2026-03-17)"]
    for text in fires:
        assert any(p.search(text) for p in compiled), text
    for text in quiet:
        assert not any(p.search(text) for p in compiled), text
