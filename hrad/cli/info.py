"""``hrad info``: what a model is, read from its manifest or an export's sidecar without loading it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hrad.errors import ArtifactError

#: what hrad predict / serve accept as an exported model instead of an artifact directory
EXPORTED_SUFFIXES = (".onnx", ".xml")


def model_facts(path: Path) -> dict[str, Any]:
    """The facts ``hrad info`` shows, as values, from an artifact's manifest or an export's
    sidecar (a sidecar is not checked field by field when read: a damaged one is one line here,
    not a crash)."""
    exported = path.suffix in EXPORTED_SUFFIXES
    if exported:
        from hrad.export_runtime import load_sidecar

        record = load_sidecar(path)
        where, what = f"{path.with_suffix('.json')}", "corrupt ONNX sidecar"
    else:
        from hrad.artifact import MANIFEST, read_manifest

        record = read_manifest(path)
        where, what = f"{path / MANIFEST}", "corrupt model manifest"
    try:
        return _facts(path, record, exported, where)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as error:
        raise ArtifactError(f"{where}: {what} ({type(error).__name__}: {' '.join(str(error).split())})") from None


def _facts(path: Path, record: dict[str, Any], exported: bool, where: str) -> dict[str, Any]:
    from hrad.data.bit_depth import stored_bit_depth
    from hrad.postprocess.roi import RegionOfInterest

    if exported:
        about = record.get("model", {})
        kind: dict[str, Any] = {"export": path.suffix[1:], "sidecar": path.with_suffix(".json").name}
        names = {part: about.get(part) for part in ("strategy", "detector", "backbone")}
        weights, fitted, history = about.get("backbone_weights"), about.get("fitted_size"), None
    else:
        config = record.get("config", {})
        kind = {"model": "artifact", "weights_bytes": int(record["weights"]["bytes"])}
        names = {part: (config.get(part) or {}).get("name") for part in ("strategy", "detector", "backbone")}
        weights, fitted, history = record.get("backbone_weights"), record.get("fitted_size"), record.get("training_history")
    roi = RegionOfInterest.from_json(record.get("roi"), where)
    thresholds = record.get("thresholds")
    return {
        "path": str(path),
        "kind": kind,
        "saved_by": record.get("hrad_version"),
        **names,
        "backbone_weights": weights,
        "fitted_size": {"width": int(fitted[1]), "height": int(fitted[0])} if fitted else None,
        "bit_depth": stored_bit_depth(record.get("bit_depth"), where),  # what loading the model would accept
        "region_of_interest": (
            {"width": roi.mask.shape[1], "height": roi.mask.shape[0], "inspected": roi.inspected} if roi is not None else None
        ),
        "thresholds": (
            {
                "image": float(thresholds["image"]),
                "pixel": float(thresholds["pixel"]),
                "sigmas": None if thresholds.get("sigmas") is None else float(thresholds["sigmas"]),
                "held_out_images": len(thresholds.get("validation_image_scores") or []),
            }
            if thresholds
            else None
        ),
        "training": {
            str(stage): {"epochs": len(values), "first_loss": float(values[0]), "last_loss": float(values[-1])}
            for stage, values in (history or {}).items()
            if values
        },
    }


def described_facts(facts: dict[str, Any]) -> dict[str, Any]:
    """:func:`model_facts` as the lines ``hrad info`` prints (None: not recorded)."""
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
        "bit_depth": f"{facts['bit_depth']} (16-bit images scaled to the full range)" if facts["bit_depth"] else "16-bit images as stored",
        "region_of_interest": (
            f"{roi['width']}x{roi['height']} mask, {roi['inspected']:.1%} inspected" if roi is not None else "the whole image"
        ),
        "thresholds": "none (no held-out normal images)",
    }  # fmt: skip
    if thresholds:
        text = f"image {thresholds['image']:.6g}, pixel {thresholds['pixel']:.6g}"
        if thresholds["sigmas"] is not None:
            count = thresholds["held_out_images"]
            text += f" (mean + {thresholds['sigmas']:g} std of {count} held-out normal image{'' if count == 1 else 's'}"
            text += ": one score has no spread, so the image threshold is that score)" if count == 1 else ")"
        lines["thresholds"] = text
    if facts["training"]:
        lines["training"] = "; ".join(
            f"{stage} {run['epochs']} epochs, loss {run['first_loss']:.4g} -> {run['last_loss']:.4g}"
            for stage, run in facts["training"].items()
        )
    return lines
