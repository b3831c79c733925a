"""``hrad info``: what a model is, read from its manifest or an export's sidecar without loading it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from hrad.errors import ArtifactError
from hrad.loading import EXPORTED_SUFFIXES

if TYPE_CHECKING:
    from hrad.postprocess.roi import RegionOfInterest

def _saved_record(path: Path) -> tuple[dict[str, Any], bool, str, dict[str, Any]]:
    """An artifact's manifest or an export's sidecar: the record, whether it is an export, the
    file's name for errors, and its kind."""
    exported = path.suffix in EXPORTED_SUFFIXES
    if exported:
        from hrad.export_runtime import load_sidecar

        record = load_sidecar(path)
        return record, True, f"{path.with_suffix('.json')}", {"export": path.suffix[1:], "sidecar": path.with_suffix(".json").name}
    from hrad.artifact import MANIFEST, read_manifest

    record = read_manifest(path)
    where = f"{path / MANIFEST}"
    try:
        return record, False, where, {"model": "artifact", "weights_bytes": int(record["weights"]["bytes"])}
    except (KeyError, TypeError, ValueError) as error:
        raise ArtifactError(f"{where}: corrupt model manifest ({type(error).__name__}: {' '.join(str(error).split())})") from None


def read_model(path: Path) -> tuple[dict[str, Any], RegionOfInterest | None]:
    """The facts ``hrad info`` shows, as values, from an artifact's manifest or an export's
    sidecar (the file's kind, then what :func:`~hrad.export_runtime.saved_model_facts` reads;
    ``hrad serve``'s ``/health`` summarises the same reading), with the region of interest they
    were read from (decoded once), which :func:`model_page` draws."""
    from hrad.export_runtime import saved_model_reading

    record, exported, where, kind = _saved_record(path)
    facts, roi = saved_model_reading(record, exported, where)
    return {"path": str(path), "kind": kind, **facts}, roi


def model_page(facts: dict[str, Any], roi: RegionOfInterest | None) -> str:
    """``hrad info --page``: the facts as ``hrad info`` prints them, and the pictures of its
    thresholds, training and region of interest (:mod:`hrad.reports.card`), from what
    :func:`read_model` read."""
    from hrad.reports.card import render_model_page

    return render_model_page(described_facts(facts), facts, roi.mask if roi is not None else None)


def _bit_depth_said(bit_depth: int | None, pixel_type: str | None) -> str:
    """How the model reads 16-bit images, said from what it knows: a model fitted on 8-bit or
    float images learned no depth, and "16-bit images as stored" read as if it had seen some."""
    if bit_depth:
        return f"{bit_depth} (16-bit images scaled to the full range)"
    if pixel_type in ("8-bit", "float"):
        return f"none learned (fitted on {pixel_type} images; a 16-bit image would be read as stored, 0..65535)"
    return "16-bit images as stored"


def described_facts(facts: dict[str, Any]) -> dict[str, Any]:
    """:func:`read_model`'s facts as the lines ``hrad info`` prints (None: not recorded)."""
    kind = facts["kind"]
    size, roi, thresholds = facts["fitted_size"], facts["region_of_interest"], facts["thresholds"]
    lines: dict[str, Any] = {
        "path": facts["path"],
        "kind": (
            f"export ({kind['export']}, sidecar {kind['sidecar']})" if "export" in kind
            else f"model ({kind['weights_bytes'] / 2**20:.1f} MiB of weights)"
        ),
        "saved_by": f"hrad {facts['saved_by'] or 'unknown'}",
        **{part: facts[part] for part in ("strategy", "detector", "backbone", "backbone_weights")},
        "fitted_size": f"{size['width']}x{size['height']}" if size else None,
        "bit_depth": _bit_depth_said(facts["bit_depth"], facts.get("pixel_type")),
        "region_of_interest": (
            f"{roi['width']}x{roi['height']} mask, {roi['inspected']:.1%} inspected" if roi is not None else "the whole image"
        ),
        "thresholds": "none (no held-out normal images)",
    }  # fmt: skip
    pixel_type = facts.get("pixel_type")
    calibrate = "" if "export" in kind else " (hrad calibrate warns of good images of another type or kind)"  # it takes model directories only
    gray = facts.get("gray")
    kind_said = "" if gray is None else " gray" if gray else " colour"
    lines["pixel_type"] = f"{pixel_type}{kind_said}, as the images it was fitted on{calibrate}" if pixel_type else None
    if thresholds:
        text = f"image {thresholds['image']:.6g}, pixel {thresholds['pixel']:.6g}"
        if thresholds["sigmas"] is not None:
            count = thresholds["held_out_images"]
            images = "good image" if thresholds["calibrated"] else "held-out normal image"
            text += f" (mean + {thresholds['sigmas']:g} std of {count} {images}{'' if count == 1 else 's'}"
            text += " given to hrad calibrate" if thresholds["calibrated"] else ""
            text += ": one score has no spread, so the image threshold is that score)" if count == 1 else ")"
        lines["thresholds"] = text
    if facts["training"]:
        lines["training"] = "; ".join(
            f"{stage} {run['epochs']} epochs, loss {run['first_loss']:.4g} -> {run['last_loss']:.4g}"
            for stage, run in facts["training"].items()
        )
    return lines
