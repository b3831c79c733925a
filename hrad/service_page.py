"""The page ``hrad serve`` answers ``GET /`` with: try the served model in a browser.

An inspection engineer who has just started a service wants to drop a few images on it and look
before wiring a line controller to ``/predict``. The page does only what a client of the API
does: it reads ``/health`` (the model, its thresholds) and posts each dropped image to
``/predict?map=overlay``, one at a time, showing the decision, the score against the threshold,
the overlay, the strongest defect regions and any warning or error, as the API returned them.
One self-contained document (no external scripts, styles or fonts: the service may run where
nothing else can be reached); every text from a response goes in through ``textContent``, never
as markup. ``hrad serve --no-page`` leaves ``GET /`` unanswered (404).
"""

from __future__ import annotations

#: regions listed per image on the page (the response holds up to 1000)
PAGE_REGIONS = 10

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>hrad serve</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 24px auto; max-width: 1100px; color: #222; padding: 0 12px; }
h1 { font-size: 20px; } table { border-collapse: collapse; font-size: 13px; }
td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
#drop { border: 2px dashed #999; border-radius: 8px; padding: 28px; text-align: center; margin: 16px 0; background: #fafafa; }
#drop.over { background: #eef4ff; border-color: #4a86c5; }
.result { border: 1px solid #ddd; border-radius: 6px; padding: 10px; margin: 12px 0; }
.result.flagged { border-color: #c33; } .verdict { font-weight: 600; } .flagged .verdict { color: #c33; } .passed .verdict { color: #2a7a2a; }
.result img { max-width: 100%; display: block; margin: 8px 0; } .error { color: #a00; } .warning { color: #8a5a00; } .note { font-size: 12px; color: #555; }
</style></head><body>
<h1>hrad serve</h1>
<table id="model"><tr><td>model</td><td>loading /health ...</td></tr></table>
<div id="drop">Drop images here, or <label><u>choose files</u><input id="files" type="file" multiple hidden
 accept=".png,.jpg,.jpeg,.bmp,.tif,.tiff,image/*"></label>
<div class="note">Each image is posted to <code>/predict?map=overlay</code>, one at a time; nothing is kept here.
Thresholds for these requests: <label>sigmas <input id="sigmas" size="8" placeholder="model's"></label></div></div>
<div id="results"></div>
<script>
"use strict";
const REGIONS = __REGIONS__;
function cell(row, text, numeric) {
  const td = row.insertCell(); td.textContent = text; if (numeric) td.className = "num"; return td;
}
function fmt(value) { return value === null || value === undefined ? "none" : Number(value).toPrecision(4); }
async function showModel() {
  const table = document.getElementById("model");
  try {
    const health = await (await fetch("health")).json();
    table.textContent = "";
    const facts = [["strategy", health.strategy], ["detector", health.detector], ["backbone", health.backbone],
      ["fitted size", health.fitted_size ? health.fitted_size[1] + " x " + health.fitted_size[0] + " px" : "any"],
      ["image threshold", fmt(health.thresholds && health.thresholds.image)],
      ["pixel threshold", fmt(health.thresholds && health.thresholds.pixel)],
      ["device", health.device], ["hrad", health.hrad_version]];
    for (const [name, value] of facts) { const row = table.insertRow(); cell(row, name); cell(row, String(value)); }
  } catch (error) { table.rows[0].cells[1].textContent = "GET /health failed: " + error; }
}
function line(parent, text, className) {
  const div = document.createElement("div"); div.textContent = text; if (className) div.className = className;
  parent.appendChild(div); return div;
}
async function predict(file) {
  const box = document.createElement("div"); box.className = "result";
  document.getElementById("results").prepend(box);
  line(box, file.name, "verdict");
  const status = line(box, "predicting ...", "note");
  const form = new FormData(); form.append("image", file);
  const query = new URLSearchParams({ map: "overlay" });
  const sigmas = document.getElementById("sigmas").value.trim();
  if (sigmas) query.set("sigmas", sigmas);
  let body;
  try {
    const response = await fetch("predict?" + query, { method: "POST", body: form });
    const text = await response.text();
    try { body = JSON.parse(text); } catch { body = { error: text.slice(0, 200) || response.statusText }; }
    if (!response.ok) { status.textContent = response.status + ": " + (body.error || response.statusText); status.className = "error"; return; }
    if (body.score === undefined) { status.textContent = "unexpected answer: " + text.slice(0, 200); status.className = "error"; return; }
  } catch (error) { status.textContent = "request failed: " + error; status.className = "error"; return; }
  if (body.is_anomalous !== null) box.classList.add(body.is_anomalous ? "flagged" : "passed");
  box.firstChild.textContent = file.name + ": " + (body.is_anomalous === null ? "no threshold" : body.is_anomalous ? "flagged" : "passed");
  status.textContent = "score " + fmt(body.score) + " (image threshold " + fmt(body.image_threshold) + "), " +
    body.width + " x " + body.height + " px, " + body.seconds.toFixed(2) + " s" +
    (body.region_count === null || body.region_count === undefined ? "" : ", " + body.region_count + (body.region_count === 1 ? " defect region" : " defect regions"));
  for (const warning of body.warnings || []) line(box, "warning: " + warning, "warning");
  if (body.map) { const img = document.createElement("img"); img.alt = "overlay of " + file.name;
    img.src = "data:" + body.map.media_type + ";base64," + body.map.base64; box.appendChild(img); }
  if (body.regions && body.regions.length) {
    const table = document.createElement("table"); const head = table.insertRow();
    for (const name of ["x", "y", "width", "height", "area (px)", "peak", "mean"]) { const th = document.createElement("th"); th.textContent = name; head.appendChild(th); }
    for (const region of body.regions.slice(0, REGIONS)) {
      const row = table.insertRow();
      for (const value of [region.x, region.y, region.width, region.height, region.area]) cell(row, String(value), true);
      cell(row, fmt(region.peak), true); cell(row, fmt(region.mean), true);
    }
    box.appendChild(table);
    if (body.regions.length > REGIONS) line(box, "the strongest " + REGIONS + " of " + body.region_count + " regions", "note");
  }
}
async function predictAll(files) { for (const file of files) await predict(file); }
const drop = document.getElementById("drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => { event.preventDefault(); drop.classList.remove("over"); predictAll([...event.dataTransfer.files]); });
document.getElementById("files").addEventListener("change", (event) => predictAll([...event.target.files]));
showModel();
</script></body></html>
""".replace("__REGIONS__", str(PAGE_REGIONS))
