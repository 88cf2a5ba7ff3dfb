"""Prompts: the text around a question, and the exact split of a chat into cacheable segments.

A conversation is rendered by the checkpoint's own chat template; :class:`Frame` recovers that template's
fixed text by rendering sentinels, so the same code follows Qwen3-VL, Qwen2.5-VL or the tiny model's
template exactly. A question is then the concatenation of four segments::

    prefix   = <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n      (identical for every question)
    image    = <|vision_start|><|image_pad|> x n <|vision_end|>
    question = 질문: {question}\\n
    options  = 선택지:\\na. ...\\nd. ...\\n{instruction}<|im_end|>\\n<|im_start|>assistant\\n

The answer letter is predicted at the last token of ``options``. Each boundary sits after a special token
or a newline, where Qwen's byte-level BPE never merges across, so tokenizing segments separately gives the
same ids as tokenizing the whole string (tested). Training and inference both call :meth:`Prompt.user_text`
and :class:`Frame`: there is one prompt builder.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from mcvqa.config import LETTERS
from mcvqa.errors import ConfigError

BUILTIN = ("fewshot_ko", "plain_ko", "plain_en")
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
_SYS = "\u2063SYSTEM\u2063"
_USR = "\u2063USER\u2063"


@dataclass(frozen=True)
class Prompt:
    name: str
    system: str
    question_template: str
    options_header: str
    option_template: str
    instruction: str

    def __post_init__(self) -> None:
        if "{question}" not in self.question_template:
            raise ConfigError(f"prompt {self.name}: question_template must contain {{question}}")
        if not self.question_template.endswith("\n"):
            # The question/options boundary must follow a newline to be tokenization-stable (see module doc).
            raise ConfigError(f"prompt {self.name}: question_template must end with a newline")
        if "{letter}" not in self.option_template or "{text}" not in self.option_template:
            raise ConfigError(f"prompt {self.name}: option_template must contain {{letter}} and {{text}}")

    def question_text(self, question: str) -> str:
        return self.question_template.format(question=question)

    def options_text(self, options: tuple[str, ...] | list[str]) -> str:
        body = "".join(self.option_template.format(letter=LETTERS[i], text=o) for i, o in enumerate(options))
        return self.options_header + body + self.instruction

    def user_text(self, question: str, options: tuple[str, ...] | list[str]) -> str:
        return self.question_text(question) + self.options_text(options)


def load_prompt(name_or_path: str) -> Prompt:
    """A built-in prompt by name, or a YAML file with the fields of :class:`Prompt`."""
    if name_or_path in BUILTIN:
        text = resources.files("mcvqa").joinpath("prompt_files").joinpath(f"{name_or_path}.yaml").read_text(encoding="utf-8")
        source = name_or_path
    else:
        p = Path(name_or_path)
        if not p.is_file():
            raise ConfigError(f"prompt.name {name_or_path!r} is neither a built-in ({', '.join(BUILTIN)}) nor a YAML file")
        text = p.read_text(encoding="utf-8")
        source = str(p)
    try:
        data: dict[str, Any] = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"prompt {source}: not valid YAML ({e})") from None
    fields = ("system", "question_template", "options_header", "option_template", "instruction")
    missing = [f for f in fields if f not in data]
    if missing:
        raise ConfigError(f"prompt {source}: missing field {missing[0]}")
    values = {f: str(data[f] or "") for f in fields}
    # Templates may trim the system message; stripping here keeps rendered == template-rendered.
    values["system"] = values["system"].strip()
    return Prompt(name=str(data.get("name", source)), **values)


@dataclass(frozen=True)
class Frame:
    """The chat template's fixed text around one system message and one user turn (image + text)."""

    head: str
    """Everything before the image placeholder (system turn included)."""
    between: str
    """Between the image placeholder and the user text (empty for Qwen templates)."""
    tail: str
    """After the user text up to where the assistant's answer starts."""

    placeholder: str = IMAGE_PLACEHOLDER
    """What the template renders for one image (the processor expands it into the image's tokens)."""

    @classmethod
    def from_processor(cls, processor: Any, system: str, placeholder: str | None = IMAGE_PLACEHOLDER, template_kwargs: dict[str, Any] | None = None) -> Frame:
        """Split the checkpoint's template around sentinels. ``placeholder`` None: found as what an image item adds."""
        kwargs = dict(template_kwargs or {})

        def render(with_image: bool) -> str:
            messages: list[dict[str, Any]] = []
            if system:
                messages.append({"role": "system", "content": [{"type": "text", "text": _SYS}]})
            content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": _USR}]
            messages.append({"role": "user", "content": content})
            text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
            return text[0] if isinstance(text, list) else text

        text = render(True)
        if placeholder is None:
            plain = render(False)
            cut = plain.index(_USR) if _USR in plain else -1
            head = plain[:cut]
            if cut < 0 or not text.startswith(head) or _USR not in text:
                raise ConfigError("the checkpoint's chat template does not render one image and one user text as expected")
            placeholder = text[len(head) : text.index(_USR)]
            if not placeholder:
                raise ConfigError("the checkpoint's chat template renders nothing for an image")
        if text.count(_USR) != 1 or text.count(placeholder) != 1:
            raise ConfigError("the checkpoint's chat template does not render one image and one user text as expected")
        if system:
            if text.count(_SYS) != 1:
                raise ConfigError("the checkpoint's chat template does not render the system message")
            text = text.replace(_SYS, system)
        before_user, tail = text.split(_USR)
        head, between = before_user.split(placeholder)
        return cls(head=head, between=between, tail=tail, placeholder=placeholder)

    def render(self, user_text: str, image_text: str | None = None) -> str:
        return self.head + (self.placeholder if image_text is None else image_text) + self.between + user_text + self.tail
