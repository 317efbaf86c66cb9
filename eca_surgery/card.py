"""Model cards: the README.md of an exported folder, in the Hugging Face hub's format.

YAML front matter (library, tags, the license where the source weights name one) and
Markdown saying what was changed (every edit: path, channels, kernel size, gate), the
parameters and GMACs before and after, the init and heal records with their fidelity
figures, and how to load the folder.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from .models import dense_task
from .plan import Plan

LICENSE_NOTE = (
    "# license: fill in the license of the source weights (see https://hf.co/docs/hub/repositories-licenses)"
)


@dataclass(frozen=True)
class ModelCard:
    """What a card says of one patched model; :meth:`to_markdown` renders it."""

    plan: Plan
    source: str
    loading: str  # the Python code that loads the folder
    library: str = "timm"  # the hub's library_name
    macs: dict[str, Any] = field(default_factory=dict)  # macs_before/after, input_size, macs_scope
    init: dict[str, Any] = field(default_factory=lambda: {"method": "default"})
    heal: dict[str, Any] | None = None
    dtype: str = "float32"
    license: str | None = None
    version: str = ""
    task: str = "image-classification"  # the hub's pipeline tag

    def front_matter(self) -> dict[str, Any]:
        """The card's YAML metadata (license only where known)."""
        tags = [self.task, *(["timm"] if self.library == "timm" else []), "eca", "eca-surgery"]
        meta: dict[str, Any] = {"library_name": self.library, "pipeline_tag": self.task, "tags": tags}
        if self.license:
            meta["license"] = self.license
        return meta

    def to_markdown(self) -> str:
        """The whole README.md: front matter, then the sections."""
        head = yaml.safe_dump(self.front_matter(), sort_keys=False).rstrip("\n")
        note = "" if self.license else f"\n{LICENSE_NOTE}"
        sections = [self._intro(), self._changes(), self._costs(), self._fidelity(), self._how_to_load()]
        text = f"---\n{head}{note}\n---\n\n" + "\n\n".join(sections) + "\n"
        # a path that is not UTF-8 (a folder or source name, decoded with surrogate escapes) is
        # shown escaped, as \udcff: the card stays UTF-8, and in the loading code's string
        # literal the escape gives Python back the very path
        return text.encode("utf-8", "backslashreplace").decode("utf-8")

    def _intro(self) -> str:
        plan, n = self.plan, len(self.plan.edits)
        by = f"eca-surgery {self.version}" if self.version else "eca-surgery"
        return (
            f"# {plan.model} with ECA\n\n"
            f"`{plan.model}` converted by {by} with the recipe {_inline(plan.recipe.name or plan.recipe.source)}: "
            f"{n} edit{'s' if n != 1 else ''} placing ECA (Efficient Channel Attention, ECA-Net, CVPR 2020). "
            f"Source weights: {_inline(self.source or 'not recorded')}. Weights are stored as {self.dtype}."
        )

    def _changes(self) -> str:
        rows = [
            f"| `{e.eca_path}` | {_change(e.position, e.path, e.old_class)} | {e.channels} | {e.kernel_size} "
            f"| {e.gate} | {e.params_before:,} | {e.params_after:,} |"
            for e in self.plan.edits
        ]
        head = "| ECA at | change | channels | kernel size | gate | params before | params after |"
        return "## What was changed\n\n" + "\n".join([head, "|---|---|---:|---:|---|---:|---:|", *rows])

    def _costs(self) -> str:
        plan = self.plan
        lines = [
            "| | before | after |",
            "|---|---:|---:|",
            f"| parameters | {plan.params_before:,} | {plan.params_after:,} |",
        ]
        before, after = self.macs.get("macs_before"), self.macs.get("macs_after")
        if before is not None and after is not None:
            size = "x".join(map(str, self.macs.get("input_size", [])))
            scope = f" of `{self.macs['macs_scope']}`" if self.macs.get("macs_scope") else ""
            lines.append(f"| GMACs{scope} at {size} | {before / 1e9:.3f} | {after / 1e9:.3f} |")
        delta = plan.params_after - plan.params_before
        pct = 100 * delta / plan.params_before if plan.params_before else 0.0
        return (
            "## Parameters and compute\n\n" + "\n".join(lines) + f"\n\nParameters: {delta:+,} ({pct:+.2f}%)."
        )

    def _fidelity(self) -> str:
        init = _summary_of_init(self.init)
        heal = _summary_of_heal(self.heal) if self.heal else "Not healed."
        parts = ["## Initialisation and healing", _record("Init", init, self.init)]
        parts.append(_record("Heal", heal, self.heal) if self.heal else heal)
        return "\n\n".join(parts)

    def _how_to_load(self) -> str:
        text = f"## How to load\n\n{_fenced(self.loading.strip(), 'python')}"
        if self.library == "timm" and self.dtype != "float32":  # timm copies them into its float32 build
            text += (
                f"\n\ntimm loads the {self.dtype} weights into a float32 model; call "
                f"`model.to(torch.{self.dtype})` to run it in {self.dtype}."
            )
        return text


def source_license(model: Any, source: str) -> str | None:
    """The license of timm's pretrained weights when ``source`` is their file in the Hugging
    Face cache (the model's ``pretrained_cfg`` names both); else None: unknown, left to the user."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    hub, license = cfg.get("hf_hub_id"), cfg.get("license")
    if isinstance(hub, str) and isinstance(license, str) and f"models--{hub.replace('/', '--')}" in source:
        return license
    return None


def timm_loading(folder: str) -> str:
    """The code that loads a timm-native folder with plain timm."""
    return (
        "import timm\n\n"
        f"model = timm.create_model({_literal('local-dir:' + folder)}, pretrained=True)\n"
        '# once uploaded to the hub: timm.create_model("hf-hub:USER/REPO", pretrained=True)'
    )


def hub_loading(folder: str, versions: dict[str, str | None]) -> str:
    """The code that loads an eca-surgery checkpoint folder, with the versions that wrote it."""
    pins = " ".join(f'"{k.replace("_", "-")}=={v}"' for k, v in versions.items() if v)
    return (
        f"# written by: pip install {pins}\n"
        "from eca_surgery import load_patched\n\n"
        f"model = load_patched({_literal(folder + '/model.safetensors')})  # rebuilt from the file, loaded strictly\n"
        "# once uploaded to the hub:\n"
        "# from huggingface_hub import hf_hub_download\n"
        '# model = load_patched(hf_hub_download("USER/REPO", "model.safetensors"))'
    )


def _literal(text: str) -> str:
    """``text`` as a Python string literal in double quotes (a folder's name may hold quotes,
    backslashes or newlines that would otherwise break, or inject into, the loading code)."""
    return json.dumps(text, ensure_ascii=False)


def task_of(model: Any) -> str:
    """The hub's pipeline tag for ``model``: detection, segmentation, feature extraction (a
    timm ``features_only`` model: feature maps, no classifier) or classification."""
    package = type(model).__module__
    if (
        package.startswith("timm.")
        and hasattr(model, "feature_info")
        and not hasattr(model, "get_classifier")
    ):
        return "image-feature-extraction"
    return {"detection": "object-detection", "segmentation": "image-segmentation"}.get(
        dense_task(model) or "", "image-classification"
    )


def _change(position: str, path: str, old_class: str) -> str:
    old = old_class.rsplit(".", 1)[-1]
    if position == "in-place":
        return f"replaces {old}"
    if position == "slot":
        return f"fills the empty slot of `{path}`"
    return f"{position} `{path or 'model'}` ({old})"


def _summary_of_init(record: dict[str, Any]) -> str:
    """The init method and, where it was measured, its fidelity to the original model."""
    text = f"{_inline(str(record.get('method', '?')))}."
    fidelity = record.get("fidelity")
    if isinstance(fidelity, dict):
        shown = ", ".join(f"{_name(k)} {_figure(v)}" for k, v in fidelity.items())
        text += f" Fidelity to the original model: {shown}."
    return text


def _summary_of_heal(record: dict[str, Any]) -> str:
    """How far distillation ran and how its loss moved."""
    first, last = record.get("loss_first"), record.get("loss_last")
    loss = f", distillation loss {_figure(first)} -> {_figure(last)}" if first is not None else ""
    teacher = _inline(str(record.get("teacher")))
    return f"{_figure(record.get('step', '?'))} steps of distillation from {teacher}{loss}."


def _figure(value: Any) -> str:
    """A number as a card shows it; anything else as inline code."""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value) if isinstance(value, int) else _inline(str(value))


def _name(key: Any) -> str:
    """A record's key as plain text if it is a plain name (``max_abs``), else as inline code:
    keys come from the file too, and may hold Markdown or HTML."""
    text = str(key)
    return text if re.fullmatch(r"[A-Za-z0-9_.-]{1,40}", text) else _inline(text, 60)


def _inline(text: str, limit: int = 300) -> str:
    """``text`` (a name or path from a file or the user) as one line of inline code in Markdown:
    whitespace collapsed, cut to ``limit`` characters, backticks and table pipes made harmless."""
    flat = " ".join(text.split())[:limit].replace("`", "'").replace("|", "\\|")
    return f"`{flat}`"


def _record(title: str, summary: str, record: dict[str, Any]) -> str:
    """A record's one-line summary, then the whole record as JSON in a folded block."""
    body = json.dumps(record, indent=2, sort_keys=True, default=str)
    return (
        f"{title}: {summary}\n\n<details><summary>{title} record</summary>\n\n"
        f"{_fenced(body, 'json')}\n\n</details>"
    )


def _fenced(code: str, language: str) -> str:
    """``code`` in a Markdown code block whose fence is longer than any run of backticks in it,
    so that text from a file (a record, a folder name) cannot close the block early."""
    longest = max((len(run) for run in re.findall(r"`+", code)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{code}\n{fence}"
