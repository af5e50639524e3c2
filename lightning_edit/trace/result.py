"""The result of a causal trace: tables, recommendation, heat map, Markdown and JSON, reloading."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lightning_edit.trace.core import ROLE_LABELS, ROLES, FactTrace, Recommendation, aggregate_by_role, per_fact_tables, recommend


# ---- the result ----------------------------------------------------------------------------
@dataclass
class TraceResult:
    """Causal tracing over a sample of facts.

    Attributes:
        effects: ``(n_roles, n_layers)`` mean indirect effect per token role (rows in
            :data:`ROLES` order) and layer; NaN where no fact has the role.
        role_counts: how many facts contributed to each role.
        n_facts: facts traced; ``skipped`` lists ``(case_id, reason)`` of the others.
        mean_clean, mean_corrupted: mean answer score in clean and corrupted runs.
        recommendation: where to edit (:func:`recommend`).
        settings: how it was run (kind, score, noise, samples, seed, ...).
        facts: the per-fact traces.
    """

    effects: torch.Tensor
    role_counts: list[int]
    n_facts: int
    mean_clean: float
    mean_corrupted: float
    recommendation: Recommendation
    settings: dict
    facts: list[FactTrace] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    roles: tuple[str, ...] = ROLES

    @property
    def n_layers(self) -> int:
        return self.effects.shape[1]

    def _score_name(self) -> str:
        return "p(answer)" if self.settings.get("score", "prob") == "prob" else "mean log p(answer)"

    def _site_name(self) -> str:
        return "hidden states (block outputs)" if self.settings.get("kind", "hidden") == "hidden" else "MLP outputs"

    def to_dict(self, include_facts: bool = True) -> dict:
        d = {
            "roles": list(self.roles),
            "role_labels": [ROLE_LABELS[r] for r in self.roles],
            "layers": list(range(self.n_layers)),
            "effects": [[None if math.isnan(v) else round(v, 6) for v in row.tolist()] for row in self.effects],
            "role_counts": self.role_counts,
            "n_facts": self.n_facts,
            "mean_clean": self.mean_clean,
            "mean_corrupted": self.mean_corrupted,
            "recommendation": self.recommendation.to_dict(),
            "settings": self.settings,
            "skipped": [list(s) for s in self.skipped],
        }
        if include_facts:
            d["facts"] = [f.to_dict() for f in self.facts]
        return d

    def to_json(self, indent: int | None = 2, include_facts: bool = True) -> str:
        return json.dumps(self.to_dict(include_facts), indent=indent)

    def to_markdown(self) -> str:
        s = self.settings
        score = self._score_name()
        lines = [
            "# Causal trace",
            "",
            f"Mean indirect effect on {score} of restoring clean {self._site_name()} into runs whose subject "
            "embeddings were noised, by token role and layer.",
            "",
            f"- facts traced: {self.n_facts}" + (f" (skipped {len(self.skipped)})" if self.skipped else ""),
            f"- noise: {s.get('noise_factor')} x std(embeddings) = {s.get('noise_std', float('nan')):.4g}, "
            f"{s.get('n_samples')} samples, seed {s.get('seed')}",
            f"- mean clean {score}: {self.mean_clean:.4f}; mean corrupted: {self.mean_corrupted:.4f}; "
            f"total effect: {self.mean_clean - self.mean_corrupted:.4f}",
            "",
            "| token role | facts | " + " | ".join(f"L{i}" for i in range(self.n_layers)) + " |",
            "|---|---:|" + "---:|" * self.n_layers,
        ]
        for role, count, row in zip(self.roles, self.role_counts, self.effects.tolist()):
            cells = " | ".join("–" if math.isnan(v) else f"{v:.3f}".replace("-0.000", "0.000") for v in row)
            lines.append(f"| {ROLE_LABELS[role]} | {count} | {cells} |")
        r = self.recommendation
        if r.anchor is None:
            lines += ["", f"**No recommendation:** {r.reason}."]
        else:
            lines += [
                "",
                f"**Recommendation:** anchor `{r.anchor}`, layers {r.layers} "
                f"(mean effect {r.window_effect:.3f} there): {r.reason}.",
            ]
        if s.get("kind", "hidden") == "hidden":
            lines += [
                "",
                "Hidden-state effects at the last prompt token always reach the total effect in the final "
                "layers; trace with `--kind mlp` to see which MLP layers write the fact.",
            ]
        if self.skipped:
            lines += ["", "Skipped facts: " + "; ".join(f"{cid}: {why}" for cid, why in self.skipped[:20])]
        return "\n".join(lines) + "\n"

    def save_heatmap(self, path: str | Path) -> Path:
        """Write a ``role x layer`` heat-map of :attr:`effects` (PNG; Agg, no display)."""
        import numpy as np
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = np.ma.masked_invalid(self.effects.numpy())
        fig = Figure(figsize=(max(4.0, 0.45 * self.n_layers + 3.0), 3.4))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        cmap = "Purples" if self.settings.get("kind", "hidden") == "hidden" else "Greens"
        im = ax.imshow(data, aspect="auto", cmap=cmap, interpolation="nearest")
        ax.set_yticks(range(len(self.roles)), [ROLE_LABELS[r] for r in self.roles])
        step = max(1, self.n_layers // 16)
        ax.set_xticks(range(0, self.n_layers, step))
        ax.set_xlabel("layer")
        site = "hidden state" if self.settings.get("kind", "hidden") == "hidden" else "MLP output"
        ax.set_title(
            f"Causal trace: restoring the {site} ({self.n_facts} facts)\n"
            f"clean {self.mean_clean:.3f}, corrupted {self.mean_corrupted:.3f}; "
            f"noise {self.settings.get('noise_factor')}x std",
            fontsize=9,
        )
        cbar = fig.colorbar(im, ax=ax)
        cbar.set_label(f"mean indirect effect on {self._score_name()}", fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        return path

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        """Write ``trace.md``, ``trace.json`` and ``trace.png`` into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"markdown": out / "trace.md", "json": out / "trace.json", "heatmap": out / "trace.png"}
        paths["markdown"].write_text(self.to_markdown())
        paths["json"].write_text(self.to_json())
        self.save_heatmap(paths["heatmap"])
        return paths


def load_trace(path: str | Path, noise_z: float | None = None, n_layers_window: int | None = None) -> "TraceResult":
    """A saved ``trace.json`` (with its facts) as a :class:`TraceResult`, tables and
    recommendation recomputed by this code (e.g. with another ``noise_z`` or window width)."""
    d = json.loads(Path(path).read_text())
    s = dict(d["settings"])
    if noise_z is not None:
        s["noise_z"] = noise_z
    if n_layers_window is not None:
        s["n_layers_window"] = n_layers_window
    facts = [FactTrace(f["case_id"], f["prompt"], f["subject"], f["answer"], f["tokens"], f["subject_tokens"][0], f["subject_tokens"][1],
                       f["prompt_last"], f["clean"], f["corrupted"],
                       torch.tensor([[float("nan") if v is None else v for v in row] for row in f["effects"]]))
             for f in d["facts"]]
    n_layers = len(d["layers"])
    effects, counts = aggregate_by_role(facts, n_layers)
    mean_clean = sum(t.clean for t in facts) / len(facts)
    mean_corrupted = sum(t.corrupted for t in facts) / len(facts)
    rec = recommend(effects, mean_clean - mean_corrupted, s.get("kind", "hidden"), s.get("n_layers_window", 3),
                    s.get("subject_threshold", 0.5), per_fact=per_fact_tables(facts, n_layers), noise_z=s.get("noise_z", 2.0))
    return TraceResult(effects, counts, len(facts), mean_clean, mean_corrupted, rec, s, facts,
                       [tuple(x) for x in d.get("skipped", [])])


