"""report.html: one self-contained page per evaluation (pictures inlined), to open or attach.

It holds the headline metrics, the training curves, the confusion matrix, the
per-class table, the top losses and the run's resolved recipe. Imports no torch.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from tlcli.files import write_text_atomic
from tlcli.text import printable
from tlcli.run.rundir import CURVES, EVAL_CONFUSION_PLOT, EVAL_TOP_LOSSES, RECIPE, RunDir

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
.muted { color: #666; } .headline { display: flex; gap: 2em; margin: 1em 0; }
.headline div { background: #f4f6f8; padding: 0.6em 1em; border-radius: 6px; }
.headline b { display: block; font-size: 1.6em; }
table { border-collapse: collapse; } td, th { padding: 0.25em 0.8em; border-bottom: 1px solid #eee; text-align: right; }
th:first-child, td:first-child { text-align: left; } img { max-width: 100%; border: 1px solid #eee; }
pre { background: #f7f7f7; padding: 1em; overflow-x: auto; font-size: 13px; }
"""


def _image(path: Path, alt: str) -> str:
    if not path.is_file():
        return f'<p class="muted">({alt}: not available)</p>'
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _per_class(metrics: dict) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{c['precision']:.4f}</td><td>{c['recall']:.4f}</td>"
        f"<td>{c['f1']:.4f}</td><td>{c['support']}</td></tr>"
        for name, c in metrics["per_class"].items())
    return f"<table><tr><th>class</th><th>precision</th><th>recall</th><th>f1</th><th>support</th></tr>{rows}</table>"


def _top_losses(losses: list[dict]) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(str(item['source']))}</td><td>{html.escape(item['true'])}</td>"
        f"<td>{html.escape(item['predicted'])}</td><td>{item['probability']:.3f}</td><td>{item['loss']:.3f}</td></tr>"
        for item in losses)
    return (f"<table><tr><th>image</th><th>true</th><th>predicted</th><th>probability</th><th>loss</th></tr>{rows}</table>"
            if losses else '<p class="muted">No test image was misclassified.</p>')


def write_report(path: Path, run: RunDir, metrics: dict, losses: list[dict], eval_dir: Path) -> None:
    recipe = (run / RECIPE).read_text(encoding="utf-8") if (run / RECIPE).is_file() else ""
    title = f"tl report: {run.path.resolve().name}"
    headline = "".join(f"<div>{label}<b>{metrics[key]:.4f}</b></div>"
                       for key, label in (("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"), ("top5", "top-5"),
                                          ("macro_f1", "macro F1")))
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p class="muted">{html.escape(str(run.path.resolve()))} · scored on {html.escape(metrics.get('data', 'test split'))}
 ({metrics['n']} images, from {html.escape(metrics.get('scored_from', 'images'))})</p>
<div class="headline">{headline}</div>
<h2>Training curves</h2>{_image(run / CURVES, "training curves")}
<h2>Confusion matrix</h2>{_image(eval_dir / EVAL_CONFUSION_PLOT, "confusion matrix")}
<h2>Per class</h2>{_per_class(metrics)}
<h2>Top losses</h2>{_image(eval_dir / EVAL_TOP_LOSSES, "top losses")}{_top_losses(losses)}
<h2>Recipe</h2><pre>{html.escape(recipe)}</pre>
</body></html>
"""
    write_text_atomic(path, printable(page))  # the page is UTF-8, whatever the file names were
