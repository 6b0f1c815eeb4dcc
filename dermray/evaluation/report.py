"""The evaluation report: one self-contained HTML page (plots embedded as base64 PNG, every string escaped)."""

from __future__ import annotations

import base64
import html

import yaml

HEADLINE = (
    ("accuracy", "accuracy"),
    ("balanced_accuracy", "balanced accuracy (mean sensitivity; ISIC 2019 metric)"),
    ("roc_auc_ovr", "macro one-vs-rest ROC AUC"),
    ("melanoma_auc", "melanoma vs rest ROC AUC (ISIC 2020 metric)"),
    ("malignant_auc", "malignant vs benign ROC AUC (through the taxonomy)"),
)

_STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; line-height: 1.4; }
table { border-collapse: collapse; margin: 0.6em 0 1.4em; }
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
img { max-width: 100%; border: 1px solid #eee; margin: 4px; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 12px; }
.figures { display: flex; flex-wrap: wrap; }
.note { color: #666; font-size: 0.9em; }
"""


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return html.escape(str(value))


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render_report(title: str, metrics: dict, figures: dict[str, bytes], config: dict, provenance: dict) -> str:
    """The HTML page: headline metrics with 95% intervals, per-class and malignant tables, the figures, the
    model's config and where model and data came from."""
    intervals = metrics.get("confidence_intervals") or {}
    headline = [[label, metrics.get(key),
                 "–".join(f"{v:.3f}" for v in intervals[key]) if intervals.get(key) else "n/a"]
                for key, label in HEADLINE]
    headline += [["log loss", metrics.get("log_loss"), ""],
                 [f"expected calibration error ({metrics.get('ece_bins')} bins)", metrics.get("ece"), ""]]
    per_class = [[name, m["support"], m["sensitivity"], m["specificity"], m["precision"], m["auc"]]
                 for name, m in metrics["per_class"].items()]
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        _table(["what", "value"], [[k, v] for k, v in provenance.items()]),
        "<h2>Headline metrics</h2>",
        _table(["metric", "value", "95% bootstrap interval"], headline),
        f"<p class='note'>{metrics['images']} images; intervals from {metrics.get('bootstrap_resamples')} "
        "bootstrap resamples of the cases. The decision is the most probable class.</p>",
        "<h2>Per class</h2>",
        _table(["class", "images", "sensitivity", "specificity", "precision", "ROC AUC"], per_class),
    ]
    malignant = metrics.get("malignant")
    if malignant:
        rows = [["malignant classes", ", ".join(malignant["classes"])], ["images", malignant["support"]],
                ["ROC AUC", malignant["auc"]],
                [f"sensitivity at P(malignant) >= {malignant['threshold']}", malignant["sensitivity"]],
                [f"specificity at P(malignant) >= {malignant['threshold']}", malignant["specificity"]]]
        rows += [[f"sensitivity at specificity {k}", v] for k, v in malignant["sensitivity_at_specificity"].items()]
        rows += [[f"specificity at sensitivity {k}", v] for k, v in malignant["specificity_at_sensitivity"].items()]
        parts += ["<h2>Malignant vs benign (coarse probabilities: sums of the fine classes)</h2>",
                  _table(["", "value"], rows)]
    parts.append("<h2>Figures</h2><div class='figures'>")
    for name, png in figures.items():
        data = base64.b64encode(png).decode()
        parts.append(f"<img alt='{html.escape(name)}' title='{html.escape(name)}' src='data:image/png;base64,{data}'>")
    parts.append("</div>")
    parts += ["<h2>Model configuration</h2>",
              f"<pre>{html.escape(yaml.safe_dump(config, sort_keys=False))}</pre>"]
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
            + "\n".join(parts) + "</body></html>")
