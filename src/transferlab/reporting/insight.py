"""Per-class insight from one run's stored per-image test predictions (never from the test images' labels again).

The file ``test_predictions.json`` is written once, at the run's single test evaluation::

    {"format": "transferlab-test-predictions", "version": 1,
     "classes": [name, ...],            # label order
     "files":   [path, ...],            # one per test image, in evaluation order
     "labels":  [int, ...],             # true label of each image
     "probs":   [[float, ...], ...]}    # softmax probabilities, one row of len(classes) per image

From it, :func:`insight_html` writes next to the run (``out_dir``): ``per_class.csv`` (support, recall,
precision), ``confusion_matrix.csv`` / ``.png`` (rows: true class, columns: predicted class),
``confused_pairs.csv`` (the largest off-diagonal cells), ``calibration.csv`` / ``reliability.png`` and
``insight.json``, and returns a self-contained HTML fragment with a gallery of misclassified test images
as small inline JPEG thumbnails.

Definitions (prediction = argmax of the probabilities, ties to the lower label; confidence = its probability):

- recall_c = #(true c and predicted c) / #(true c); precision_c = #(true c and predicted c) / #(predicted c)
  (0 when the denominator is 0).
- ECE with B = 15 equal-width bins on the confidence: bin b holds the images with
  b/B < confidence <= (b+1)/B (bin 0 also holds confidence 0);
  ``ECE = sum_b (n_b / N) * |acc_b - conf_b|`` where acc_b is the fraction of correct predictions in
  bin b and conf_b the mean confidence there (empty bins add nothing).

Torch-free: numpy, scikit-learn, matplotlib and PIL only.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import os
from pathlib import Path

import numpy as np

from transferlab.core.files import atomic_write_bytes, write_json
from transferlab.core.predictions import read_test_predictions

N_BINS = 15
MAX_GALLERY = 60  # misclassified thumbnails per run: keeps a 100-class report page light
THUMB_SIZE = 96
THUMB_QUALITY = 70


# -- the numbers ----------------------------------------------------------------------------------
def predictions(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(predicted label, its probability) per image; argmax takes the lower label on ties."""
    pred = np.argmax(probs, axis=1)
    return pred, probs[np.arange(len(pred)), pred]


def confusion(labels: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts[i, j] = images of true class i predicted as j."""
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(labels, pred, labels=np.arange(n_classes))


def per_class(labels: np.ndarray, pred: np.ndarray, classes: list[str]) -> list[dict]:
    """One row per class: support, number predicted, recall, precision (0 when undefined)."""
    from sklearn.metrics import precision_recall_fscore_support

    precision, recall, _f1, support = precision_recall_fscore_support(
        labels, pred, labels=np.arange(len(classes)), zero_division=0
    )
    n_pred = np.bincount(pred, minlength=len(classes))
    return [{"class": c, "support": int(support[i]), "predicted": int(n_pred[i]), "recall": float(recall[i]),
             "precision": float(precision[i])} for i, c in enumerate(classes)]


def most_confused(cm: np.ndarray, classes: list[str], top: int = 10) -> list[dict]:
    """The largest off-diagonal cells (true -> predicted), largest count first (ties: label order)."""
    off = cm.copy()
    np.fill_diagonal(off, 0)
    cells = [(int(off[i, j]), i, j) for i, j in zip(*np.nonzero(off))]
    cells.sort(key=lambda t: (-t[0], t[1], t[2]))
    return [{"true": classes[i], "predicted": classes[j], "count": n, "share_of_true": n / int(cm[i].sum())}
            for n, i, j in cells[:top]]


def calibration_bins(labels: np.ndarray, probs: np.ndarray, n_bins: int = N_BINS) -> tuple[float, list[dict]]:
    """(ECE, one row per bin: lo, hi, n, accuracy, confidence); bins as in the module docstring."""
    pred, conf = predictions(probs)
    correct = (pred == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # number of inner edges strictly below the confidence: b/B < conf <= (b+1)/B -> bin b
    index = np.searchsorted(edges[1:-1], conf, side="left")
    n_total = len(labels)
    ece, rows = 0.0, []
    for b in range(n_bins):
        mask = index == b
        n = int(mask.sum())
        acc = float(correct[mask].mean()) if n else 0.0
        mean_conf = float(conf[mask].mean()) if n else 0.0
        ece += n / n_total * abs(acc - mean_conf)  # an empty bin adds nothing
        rows.append({"bin": b, "lo": float(edges[b]), "hi": float(edges[b + 1]), "n": n,
                     "accuracy": acc if n else None, "confidence": mean_conf if n else None})
    return ece, rows


# -- figures --------------------------------------------------------------------------------------
def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def plot_confusion(cm: np.ndarray, classes: list[str], title: str = "") -> bytes:
    """PNG of the confusion matrix with class names (cell counts written up to 25 classes)."""
    import matplotlib.pyplot as plt

    from transferlab.reporting import figures

    n = len(classes)
    side = min(14.0, 2.5 + 0.16 * n)
    fig, ax = plt.subplots(figsize=(side + 1.0, side))
    shown = ax.imshow(cm, cmap="Blues", interpolation="nearest")
    font = max(3.0, min(9.0, 260.0 / max(n, 1)))
    names = [figures._plain(c) for c in classes]  # a class named '$x^2$' is shown as written, not as maths
    ax.set_xticks(range(n), names, rotation=90, fontsize=font)
    ax.set_yticks(range(n), names, fontsize=font)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if n <= 25:
        top = cm.max() if cm.size else 0
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=font,
                            color="white" if cm[i, j] > top / 2 else "black")
    fig.colorbar(shown, ax=ax, fraction=0.04)
    ax.set_title(figures._plain(title) if title else "confusion matrix (test)")
    return _png(fig)


def plot_reliability(bins: list[dict], ece: float, title: str = "") -> bytes:
    """PNG of the reliability diagram: accuracy per confidence bin against the diagonal, counts below."""
    import matplotlib.pyplot as plt

    from transferlab.reporting import figures

    fig, (ax, ax_n) = plt.subplots(2, 1, figsize=(4.6, 5.2), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    width = bins[0]["hi"] - bins[0]["lo"]
    filled = [b for b in bins if b["n"]]
    ax.bar([b["lo"] for b in filled], [b["accuracy"] for b in filled], width=width, align="edge",
           edgecolor="#1f4e79", color="#6fa8dc", label="accuracy")
    ax.bar([b["lo"] for b in filled], [b["confidence"] - b["accuracy"] for b in filled], bottom=[b["accuracy"] for b in filled],
           width=width, align="edge", color="none", edgecolor="#cc0000", hatch="//", label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(figures._plain(title) if title else f"reliability (ECE {ece:.4f}, {len(bins)} bins)", fontsize=10)
    ax_n.bar([b["lo"] for b in bins], [b["n"] for b in bins], width=width, align="edge", color="#999999")
    ax_n.set_xlabel("confidence (max probability)")
    ax_n.set_ylabel("images")
    return _png(fig)


def thumbnail_jpeg(path: str, size: int = THUMB_SIZE, quality: int = THUMB_QUALITY) -> bytes | None:
    """A small RGB JPEG of an image file (None if it cannot be read any more)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as img:
            img.draft("RGB", (size, size))
            img = (ImageOps.exif_transpose(img) or img).convert("RGB")  # upright, as the model saw it
            img.thumbnail((size, size))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=quality, optimize=True)
            return buf.getvalue()
    except (OSError, ValueError, SyntaxError):
        return None


# -- files and the HTML fragment ------------------------------------------------------------------
def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())


def _b64(data: bytes, mime: str, alt: str, css: str = "") -> str:
    return f'<img{css} alt="{html.escape(alt)}" src="data:{mime};base64,{base64.b64encode(data).decode()}">'


STYLE = (
    "<style>.tl-insight table{border-collapse:collapse;margin:.5em 0}.tl-insight td,.tl-insight th{border:1px solid #ccc;"
    "padding:2px 6px;text-align:right}.tl-insight td:first-child,.tl-insight th:first-child{text-align:left}.tl-gallery{display:flex;flex-wrap:wrap;gap:6px}"
    ".tl-gallery figure{margin:0;width:112px;font-size:11px;line-height:1.2}.tl-gallery img{display:block;max-width:96px;max-height:96px}"
    ".tl-insight details{margin:.5em 0}.tl-figures{display:flex;flex-wrap:wrap;gap:0 2em;align-items:flex-start}</style>"
)


def insight(pred_file: str | os.PathLike) -> dict:
    """All the numbers of one run's test predictions (no files written)."""
    d = read_test_predictions(pred_file)
    labels, probs, classes = d["labels"], d["probs"], d["classes"]
    pred, conf = predictions(probs)
    cm = confusion(labels, pred, len(classes))
    ece, bins = calibration_bins(labels, probs)
    return {"classes": classes, "files": d["files"], "labels": labels, "pred": pred, "conf": conf, "confusion": cm,
            "per_class": per_class(labels, pred, classes), "confused_pairs": most_confused(cm, classes), "ece": ece, "bins": bins,
            "accuracy": float((pred == labels).mean()) if len(labels) else None, "n": int(len(labels))}


def insight_html(pred_file: str | os.PathLike, out_dir: str | os.PathLike, title: str = "",
                 max_gallery: int = MAX_GALLERY) -> str:
    """Write the per-class CSVs, figures and insight.json into `out_dir`; return the HTML fragment."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    r = insight(pred_file)
    classes, cm = r["classes"], r["confusion"]
    _write_csv(out / "per_class.csv", ["class", "support", "predicted", "recall", "precision"],
               [[p["class"], p["support"], p["predicted"], p["recall"], p["precision"]] for p in r["per_class"]])
    _write_csv(out / "confusion_matrix.csv", ["true \\ predicted", *classes], [[c, *cm[i].tolist()] for i, c in enumerate(classes)])
    _write_csv(out / "confused_pairs.csv", ["true", "predicted", "count", "share_of_true"],
               [[p["true"], p["predicted"], p["count"], p["share_of_true"]] for p in r["confused_pairs"]])
    _write_csv(out / "calibration.csv", ["bin", "lo", "hi", "n", "accuracy", "confidence"],
               [[b["bin"], b["lo"], b["hi"], b["n"], b["accuracy"], b["confidence"]] for b in r["bins"]])
    cm_png = plot_confusion(cm, classes, f"{title}: confusion matrix (test)" if title else "")
    rel_png = plot_reliability(r["bins"], r["ece"])
    atomic_write_bytes(out / "confusion_matrix.png", cm_png)
    atomic_write_bytes(out / "reliability.png", rel_png)
    wrong = np.nonzero(r["pred"] != r["labels"])[0]
    write_json(out / "insight.json", {"n": r["n"], "accuracy": r["accuracy"], "ece": r["ece"], "n_bins": N_BINS,
                                      "n_misclassified": int(len(wrong)), "per_class": r["per_class"],
                                      "confused_pairs": r["confused_pairs"]})

    e = html.escape
    acc = "n/a" if r["accuracy"] is None else f"{r['accuracy']:.4f}"
    parts = [STYLE, '<section class="tl-insight">', f"<h3>{e(title or 'Per-class insight')} (test)</h3>",
             f"<p>{r['n']} test images, accuracy {acc}, {len(wrong)} misclassified; expected calibration error "
             f"{r['ece']:.4f} ({N_BINS} equal-width bins on the max probability: sum over bins of "
             "(images in bin / all images) &times; |accuracy &minus; mean confidence|).</p>"]
    parts.append("<details><summary>Per-class recall and precision</summary><table><tr><th>class</th><th>test images</th>"
                 "<th>predicted</th><th>recall</th><th>precision</th></tr>")
    parts += [f"<tr><td>{e(p['class'])}</td><td>{p['support']}</td><td>{p['predicted']}</td><td>{p['recall']:.3f}</td>"
              f"<td>{p['precision']:.3f}</td></tr>" for p in r["per_class"]]
    parts.append("</table></details>")
    if r["confused_pairs"]:
        parts.append("<p>Most confused (true &rarr; predicted, test images):</p><table><tr><th>true</th><th>predicted</th>"
                     "<th>images</th><th>share of true class</th></tr>")
        parts += [f"<tr><td>{e(p['true'])}</td><td>{e(p['predicted'])}</td><td>{p['count']}</td><td>{p['share_of_true']:.2f}</td></tr>"
                  for p in r["confused_pairs"]]
        parts.append("</table>")
    parts.append("<div class='tl-figures'><figure>" + _b64(cm_png, "image/png", "confusion matrix", ' style="max-width:100%"') +
                 "<figcaption>Confusion matrix on the test split (rows: true class, columns: predicted class)</figcaption></figure>")
    parts.append("<figure>" + _b64(rel_png, "image/png", "reliability diagram") +
                 f"<figcaption>Reliability diagram, ECE {r['ece']:.4f}</figcaption></figure></div>")  # side by side where they fit
    if len(wrong):
        # most confident mistakes first (ties: evaluation order)
        order = sorted(wrong.tolist(), key=lambda i: (-r["conf"][i], i))[:max_gallery]
        shown = len(order)
        parts.append(f"<p>Misclassified test images ({shown} of {len(wrong)}, most confident first):</p><div class='tl-gallery'>")
        for i in order:
            true, predicted = classes[r["labels"][i]], classes[r["pred"][i]]
            name = os.path.basename(r["files"][i])
            thumb = thumbnail_jpeg(r["files"][i])
            img = _b64(thumb, "image/jpeg", name) if thumb is not None else f"<div>({e(name)} unreadable)</div>"
            parts.append(f"<figure title='{e(r['files'][i])}'>{img}<figcaption>true: {e(true)}<br>pred: {e(predicted)} "
                         f"({r['conf'][i]:.2f})</figcaption></figure>")
        parts.append("</div>")
    parts.append("</section>")
    return "\n".join(parts)


def insight_page(pred_file: str | os.PathLike, out_dir: str | os.PathLike, title: str = "") -> str:
    """A whole self-contained HTML page around :func:`insight_html` (for a probe's output folder)."""
    fragment = insight_html(pred_file, out_dir, title)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title or 'transferlab')} insight</title>"
            "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
            f"img{{max-width:100%}}</style></head><body>\n{fragment}\n</body></html>\n")
