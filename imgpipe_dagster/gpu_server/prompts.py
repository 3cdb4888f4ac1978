"""Versioned prompt files (resources/prompts/<name>.txt) and the Qwen chat layout around them."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

DEFAULT_PROMPT = "analysis_v1"
SYSTEM_TEXT = "You are a helpful assistant."
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


def prompts_dir() -> Path:
    try:
        from imgpipe_dagster.paths import resource_path

        return resource_path("prompts")
    except (ImportError, FileNotFoundError):
        # A checkout without paths.py yet: resources/ sits beside the package.
        return Path(__file__).resolve().parents[2] / "resources" / "prompts"


@dataclass(frozen=True)
class Prompt:
    name: str
    text: str  # the user instruction that follows the image
    version: str  # "<name>@<first 12 hex of sha256(text)>": changes whenever the wording does

    def chat_parts(self) -> tuple[str, str]:
        """Chat text before and after the image placeholder (Qwen2-VL template, one image)."""
        before = f"<|im_start|>system\n{SYSTEM_TEXT}<|im_end|>\n<|im_start|>user\n<|vision_start|>"
        after = f"<|vision_end|>{self.text}<|im_end|>\n<|im_start|>assistant\n"
        return before, after


class UnknownPromptError(ValueError):
    pass


@lru_cache(maxsize=64)
def load_prompt(name: str = DEFAULT_PROMPT, directory: str | None = None) -> Prompt:
    if not _NAME_RE.match(name):
        raise UnknownPromptError(f"bad prompt name {name!r}")
    path = Path(directory or prompts_dir()) / f"{name}.txt"
    if not path.is_file():
        # the message reaches HTTP clients: name the prompts there are, never the server's folders
        known = ", ".join(available_prompts(directory)) or "none"
        raise UnknownPromptError(f"unknown prompt {name!r} (this server has: {known})")
    text = path.read_text(encoding="utf-8").strip()
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
    return Prompt(name=name, text=text, version=f"{name}@{digest}")


def available_prompts(directory: str | None = None) -> list[str]:
    return sorted(p.stem for p in Path(directory or prompts_dir()).glob("*.txt"))
