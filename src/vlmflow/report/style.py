"""The report's inline stylesheet and the few lines of JavaScript of its sample viewer."""

CSS = """
:root { --fg:#1d2330; --muted:#5b6475; --line:#d9dde5; --bg:#fafbfc; --ok:#1a7f37; --bad:#c62828; --na:#8a8f99; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg); margin: 0; background: #fff; }
header { padding: 18px 28px; border-bottom: 1px solid var(--line); background: var(--bg); }
header h1 { margin: 0 0 4px; font-size: 22px; }
nav { position: sticky; top: 0; z-index: 2; background: #fff; border-bottom: 1px solid var(--line); padding: 6px 28px; }
nav a { margin-right: 14px; color: #0b57d0; text-decoration: none; font-size: 13px; }
main { padding: 0 28px 40px; max-width: 1500px; }
section { padding-top: 10px; border-bottom: 1px solid var(--line); padding-bottom: 18px; scroll-margin-top: 36px; }
h2 { font-size: 18px; margin: 18px 0 8px; }
h3 { font-size: 15px; margin: 14px 0 6px; }
p.note, .muted { color: var(--muted); font-size: 13px; }
.banner { border: 1px solid #e0c36a; background: #fff8e1; border-radius: 6px; padding: 8px 12px; margin: 8px 0 12px; font-size: 13px; }
.banner ul { margin: 4px 0 0; padding-left: 18px; }
table { border-collapse: collapse; margin: 6px 0 12px; font-size: 13px; }
th, td { border: 1px solid var(--line); padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: var(--bg); font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.scroll { overflow-x: auto; }
.grid { display: grid; gap: 12px; grid-template-columns: repeat(auto-fill, minmax(420px, 1fr)); }
.grid.wide { grid-template-columns: repeat(auto-fill, minmax(900px, 1fr)); }
figure { margin: 0; border: 1px solid var(--line); padding: 6px; background: #fff; }
figure svg, figure img { width: 100%; height: auto; display: block; }
figcaption { font-size: 12px; color: var(--muted); margin-top: 4px; }
.badge { display: inline-block; border-radius: 10px; padding: 0 8px; font-size: 12px; font-weight: 600; color: #fff; white-space: nowrap; }
.badge.holds { background: var(--ok); } .badge.fails { background: var(--bad); } .badge.not-run { background: var(--na); }
details { margin: 4px 0; } summary { cursor: pointer; }
ul.conditions { margin: 4px 0 8px 18px; padding: 0; font-size: 13px; }
.cond-true::marker { content: "✔ "; color: var(--ok); } .cond-false::marker { content: "✘ "; color: var(--bad); } .cond-none::marker { content: "– "; color: var(--na); }
pre { background: var(--bg); border: 1px solid var(--line); padding: 8px; overflow-x: auto; font-size: 12px; }
.viewer { border: 1px solid var(--line); padding: 8px; margin-bottom: 12px; }
.viewer .controls { margin-bottom: 6px; }
.viewer button { margin-right: 6px; }
.slide { display: flex; gap: 14px; align-items: flex-start; }
.slide[hidden] { display: none; }
.stack { position: relative; display: inline-block; line-height: 0; }
.stack img { image-rendering: pixelated; max-width: 320px; }
.stack img.overlay { position: absolute; left: 0; top: 0; }
.viewer.no-overlay img.overlay { display: none; }
"""

JS = """
document.querySelectorAll('.viewer').forEach(function (viewer) {
  var slides = viewer.querySelectorAll('.slide');
  var position = viewer.querySelector('.pos');
  var index = 0;
  function show(k) {
    if (!slides.length) { return; }
    index = (k + slides.length) % slides.length;
    slides.forEach(function (slide, j) { slide.hidden = j !== index; });
    position.textContent = (index + 1) + ' / ' + slides.length;
  }
  viewer.querySelector('.prev').addEventListener('click', function () { show(index - 1); });
  viewer.querySelector('.next').addEventListener('click', function () { show(index + 1); });
  viewer.querySelector('.overlay-toggle').addEventListener('change', function (event) {
    viewer.classList.toggle('no-overlay', !event.target.checked);
  });
  show(0);
});
"""
