"""What ``tagmill doctor`` writes: a page to read and files to act on.

    DIR/report.md, DIR/report.html   leakage first, then label issues, duplicates,
                                     outliers and scarce classes, with thumbnails
    DIR/label_issues.csv             id, split, given, suggested, score (+ kind, detail)
    DIR/duplicates.csv               id_a, split_a, id_b, split_b, kind, similarity (+ ...)
    DIR/outliers.csv                 id, split, reason, score, detail
    DIR/relabel_suggested.csv        id, labels: feed to ``tagmill import --relabel``
    DIR/drop_suggested.txt           one id per line: ``tagmill import --drop-ids``
    DIR/doctor.json                  counts, leakage, timings, how it was judged

Every file is written atomically (``storage.write_bytes``). Multi-label cells join
tags with ``|``, the separator ``tagmill import`` reads back.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from tagmill import __version__, storage
from tagmill.dataset.shards import iter_shard
from tagmill.doctor import duplicates as dup
from tagmill.doctor import outliers as out
from tagmill.doctor.diagnose import Diagnosis
from tagmill.evaluate.markdown import image, table, text, to_html
from tagmill.evaluate.report import write_thumbnail

#: rows shown (with thumbnails) per section of the report; the CSVs hold every row
SHOWN = 40
TAG_SEPARATOR = "|"
THUMBS = "thumbs"


def _csv(rows: list[list[Any]], header: list[str]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().encode("utf-8")


def _tags(labels: tuple[str, ...] | list[str]) -> str:
    return TAG_SEPARATOR.join(labels)


def _issue_rows(d: Diagnosis) -> list[dict[str, Any]]:
    """One row per image: single-label flags as they are; multi-label tag flags merged per image."""
    classes = d.manifest.classes
    if d.manifest.task == "single":
        return [{"row": i.index, "given": classes[i.given], "suggested": classes[i.suggested], "score": i.score,
                 "kind": i.kind, "detail": f"the held-out models prefer {classes[i.suggested]}"}
                for i in d.label_issues]
    merged: dict[int, dict[str, Any]] = {}
    for issue in d.label_issues:  # most suspicious first: an image's first issue sets its score
        row = merged.setdefault(issue.index, {"row": issue.index, "score": issue.score, "missing": [], "wrong": []})
        row["missing" if issue.kind == "missing_tag" else "wrong"].append(classes[issue.given])
    rows = []
    for row in merged.values():
        given = list(d.facts[row["row"]].labels)
        suggested = [t for t in given if t not in row["wrong"]] + row["missing"]
        detail = "; ".join(part for part in (
            f"looks missing: {', '.join(row['missing'])}" if row["missing"] else "",
            f"looks wrong: {', '.join(row['wrong'])}" if row["wrong"] else "") if part)
        kind = "+".join(k for k, v in (("missing_tag", row["missing"]), ("wrong_tag", row["wrong"])) if v)
        rows.append({"row": row["row"], "given": _tags(given), "suggested": _tags(suggested), "score": row["score"],
                     "kind": kind, "detail": detail})
    rows.sort(key=lambda r: -r["score"])
    return rows


def _ordered_pairs(d: Diagnosis) -> list[dup.DuplicatePair]:
    """Leaks first (they falsify the validation score), then conflicting labels, then the rest."""
    return sorted(d.duplicates, key=lambda p: (not d.is_leak(p), not d.is_conflict(p), p.kind != "exact", -p.similarity))


def _outlier_images(d: Diagnosis) -> list[tuple[int, list[out.Outlier]]]:
    """Findings grouped by image, in the order of each image's first finding."""
    by_image: dict[int, list[out.Outlier]] = {}
    for o in d.outliers:
        by_image.setdefault(o.row, []).append(o)
    return list(by_image.items())


def _drop_suggestions(d: Diagnosis) -> list[str]:
    """One image of every duplicate pair: the validation copy of a leak (validation must be
    unseen), else the second of the pair; undecodable images too."""
    ids: dict[str, None] = {}
    for p in _ordered_pairs(d):
        a, b = d.facts[p.a], d.facts[p.b]
        ids[(a if d.is_leak(p) and a.split != "train" else b).id] = None
    for o in d.outliers:
        if o.reason == "undecodable":
            ids[d.facts[o.row].id] = None
    return list(ids)


def _thumbnails(d: Diagnosis, out_dir: str, rows: set[int]) -> dict[int, str]:
    """Write a thumbnail of each of ``rows``; returns row → path relative to ``out_dir``."""
    by_key = {d.facts[r].key: r for r in rows}
    splits = {d.facts[r].split for r in rows}
    written: dict[int, str] = {}
    for split in sorted(splits):
        for shard in d.manifest.split(split).shards:
            if len(written) == len(rows):
                return written
            for sample in iter_shard(storage.join(d.dataset, shard.name)):
                row = by_key.get(sample.key)
                if row is None or d.facts[row].error:
                    continue
                path = f"{THUMBS}/{sample.key}.jpg"
                write_thumbnail(sample.image, storage.join(out_dir, path))
                written[row] = path
    return written


def _picture(out_dir: str, thumbs: dict[int, str], row: int, alt: str) -> str:
    return image(out_dir, thumbs[row], alt) if row in thumbs else "(no image)"


def _leakage_section(d: Diagnosis, pairs: list[dup.DuplicatePair]) -> list[str]:
    leaks = [p for p in pairs if d.is_leak(p)]
    lines = ["## Leakage between splits", ""]
    if not leaks:
        return lines + ["No image of one split has a copy in another."]
    lines.append(f"**{len(leaks)} pair(s)** of copies sit in different splits: the model is validated on images it trained on.")
    leak = d.leakage
    if leak and leak.get("without_leaked") is not None:
        lines += ["", f"A head trained on the training split scores validation {leak['metric']} "
                      f"**{leak['with_leaked']:.4f}** with the {leak['leaked_val_images']} leaked validation image(s) and "
                      f"**{leak['without_leaked']:.4f}** without them "
                      f"({leak['with_leaked'] - leak['without_leaked']:+.4f} from leakage)."]
    return lines + ["", "They are listed first under *Duplicates* below."]


def _markdown(d: Diagnosis, out_dir: str, issues: list[dict[str, Any]], pairs: list[dup.DuplicatePair],
              thumbs: dict[int, str]) -> str:
    counts = d.counts()
    f = d.facts
    lines = [f"# Doctor's report: {text(storage.basename(d.dataset))}", "",
             f"{counts['images']:,} images, {len(d.manifest.classes)} {'classes' if d.manifest.task == 'single' else 'tags'} "
             f"({d.manifest.task}-label). Features: {text(d.features_from)}. Labels judged out of fold: {text(d.head)}.",
             "", table(["check", "found"], [
                 ["images with a label issue", str(counts["label_issues"])],
                 ["exact duplicate pairs", str(counts["duplicate_pairs"]["exact"])],
                 ["near-duplicate pairs", str(counts["duplicate_pairs"]["near"])],
                 ["pairs across splits (leakage)", str(counts["leaked_pairs"])],
                 ["pairs with different labels", str(counts["conflicting_pairs"])],
                 ["outliers", str(sum(counts["outliers"].values()))],
                 ["classes or tags with too few images", str(counts["scarce_labels"])]]), ""]
    lines += _leakage_section(d, pairs)

    lines += ["", "## Label issues", ""]
    if issues:
        lines += [f"Most suspicious first; {len(issues)} in all in `label_issues.csv` "
                  f"(`relabel_suggested.csv` holds the suggestions, ready for `tagmill import --relabel`).", ""]
        lines.append(table(["image", "id", "split", "given", "suggested", "score"], [
            [_picture(out_dir, thumbs, r["row"], f[r["row"]].id), text(f[r["row"]].id), f[r["row"]].split,
             text(r["given"]), text(r["suggested"]), f"{r['score']:.3f}"] for r in issues[:SHOWN]]))
    else:
        lines.append("No label looks wrong to the held-out models.")

    lines += ["", "## Duplicates", ""]
    if pairs:
        lines += [f"Leaks and conflicting labels first; {len(pairs)} pair(s) in all in `duplicates.csv`. "
                  f"`drop_suggested.txt` names one image of each pair (the validation copy of a leak).", ""]
        lines.append(table(["image", "copy", "kind", "splits", "labels", "similarity", "ids"], [
            [_picture(out_dir, thumbs, p.a, f[p.a].id), _picture(out_dir, thumbs, p.b, f[p.b].id), p.kind,
             f"{f[p.a].split} / {f[p.b].split}" + (" **leak**" if d.is_leak(p) else ""),
             text(f"{_tags(f[p.a].labels) or '(none)'} / {_tags(f[p.b].labels) or '(none)'}") + (" **differ**" if d.is_conflict(p) else ""),
             f"{p.similarity:.3f} (pixels ≤ {p.difference:.0f})", text(f"{f[p.a].id} / {f[p.b].id}")] for p in pairs[:SHOWN]]))
    else:
        lines.append("No exact or near copies.")

    lines += ["", "## Outliers", ""]
    if d.outliers:
        by_image = _outlier_images(d)
        lines += [f"{len(by_image)} image(s), {len(d.outliers)} finding(s) in all in `outliers.csv`.", ""]
        lines.append(table(["image", "id", "split", "why"], [
            [_picture(out_dir, thumbs, row, f[row].id), text(f[row].id), f[row].split,
             "; ".join(f"**{o.reason}**: {text(o.detail)}" for o in found)]
            for row, found in by_image[:SHOWN]]))
    else:
        lines.append("No image stands out.")

    lines += ["", "## Balance", ""]
    if d.scarce:
        lines.append(table(["class", "split", "images", "wanted", "problem"],
                           [[text(s.label), s.split, str(s.count), f"≥ {s.needed}", s.problem] for s in d.scarce]))
    else:
        lines.append(f"Every class has at least {out.MIN_TRAIN} training and {out.MIN_VAL} validation images.")

    lines += ["", "## Acting on it", "", "Review the suggestions, edit them, then re-import in one command:", "",
              "```", f"tagmill import SOURCE --out FIXED --drop-ids {storage.join(out_dir, 'drop_suggested.txt')} "
              f"--relabel {storage.join(out_dir, 'relabel_suggested.csv')}", "```"]
    return "\n".join(lines) + "\n"


def write_report(d: Diagnosis, out_dir: str) -> str:
    """Write everything listed in the module docstring; returns the report's location."""
    storage.makedirs(out_dir)
    f = d.facts
    issues = _issue_rows(d)
    pairs = _ordered_pairs(d)

    wanted = {r["row"] for r in issues[:SHOWN]} | {row for row, _ in _outlier_images(d)[:SHOWN]}
    wanted |= {row for p in pairs[:SHOWN] for row in (p.a, p.b)}
    thumbs = _thumbnails(d, out_dir, wanted)

    files = {
        "label_issues.csv": _csv([[f[r["row"]].id, f[r["row"]].split, r["given"], r["suggested"], f"{r['score']:.4f}",
                                   r["kind"], r["detail"]] for r in issues],
                                 ["id", "split", "given", "suggested", "score", "kind", "detail"]),
        "duplicates.csv": _csv([[f[p.a].id, f[p.a].split, f[p.b].id, f[p.b].split, p.kind, f"{p.similarity:.4f}", p.hash_bits, f"{p.difference:.1f}",
                                 int(d.is_leak(p)), int(d.is_conflict(p)), _tags(f[p.a].labels), _tags(f[p.b].labels)]
                                for p in pairs],
                               ["id_a", "split_a", "id_b", "split_b", "kind", "similarity", "hash_bits", "pixel_difference", "leakage",
                                "conflict", "labels_a", "labels_b"]),
        "outliers.csv": _csv([[f[o.row].id, f[o.row].split, o.reason, f"{o.score:.4f}", o.detail] for o in d.outliers],
                             ["id", "split", "reason", "score", "detail"]),
        "relabel_suggested.csv": _csv([[f[r["row"]].id, r["suggested"]] for r in issues], ["id", "labels"]),
        "drop_suggested.txt": ("# one image of each duplicate pair, and undecodable images: review before use\n"
                               + "".join(f"{i}\n" for i in _drop_suggestions(d))).encode("utf-8"),
    }
    summary = {
        "format": "tagmill.doctor", "tagmill_version": __version__, "dataset": d.dataset, "task": d.manifest.task,
        "counts": d.counts(), "leakage": d.leakage, "features_from": d.features_from, "label_judgement": d.head,
        "scarce": [vars(s) for s in d.scarce], "seconds": {k: round(v, 3) for k, v in d.seconds.items()},
        "settings": {"near_copy_layout": dup.LAYOUT, "near_copy_min_cosine": dup.MIN_COSINE,
                     "near_copy_max_difference": dup.MAX_DIFFERENCE,
                     "near_copy_candidate_hash_bits": dup.CANDIDATE_HASH_BITS,
                     "outlier_max_z": out.MAX_Z, "outlier_neighbours": out.K},
    }
    files["doctor.json"] = (json.dumps(summary, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    markdown = _markdown(d, out_dir, issues, pairs, thumbs)
    files["report.md"] = markdown.encode("utf-8")
    files["report.html"] = to_html(markdown, f"Doctor's report: {storage.basename(d.dataset)}").encode("utf-8")
    for name, data in files.items():
        storage.write_bytes(storage.join(out_dir, name), data)
    return storage.join(out_dir, "report.md")


__all__ = ["SHOWN", "TAG_SEPARATOR", "write_report"]
