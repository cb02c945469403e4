"""What the browser runs and shows: the theme, the CSS and the small JavaScript functions of the page.

Everything here runs in the browser only (Gradio events with `fn=None`), so none of it is a server endpoint a
client could call. The result view is drawn by `VIEW_JS` from the (hidden) galleries the endpoints return: one
column per decoder, one block per class with its label above the images, each decoder's time and speed-up at the
top of its column. The CSS grid puts at most the class's images in a row and none narrower than 56 px, so a narrow
column wraps them (8 per row on a wide column, 4 or 2 on a narrow one): readable from 1 x 1 to 8 x 8, on a phone as
on a wide screen.
"""

import json

import gradio as gr

# System fonts: the page loads no font file at all (Gradio 6 serves its theme fonts itself, older releases and some
# themes fetch Google Fonts); the browser test fails on any request that leaves 127.0.0.1.
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "SFMono-Regular", "monospace"])

EMPTY_VIEW = '<div class="ssdd-empty">Choose classes, then <b>Generate</b> or <b>Compare decoders</b>.</div>'

CSS = """
.ssdd-result { min-height: 160px; }
.ssdd-empty { padding: 2.5em 1em; text-align: center; color: var(--body-text-color-subdued); }
.ssdd-view { display: flex; flex-direction: column; gap: 10px; }
.ssdd-heads, .ssdd-row { display: grid; grid-template-columns: repeat(var(--decoders), minmax(0, 1fr)); gap: 12px; }
.ssdd-head { display: flex; flex-direction: column; padding: 6px 8px; border-radius: 6px;
             background: var(--background-fill-secondary); overflow-wrap: anywhere; }
.ssdd-head .ssdd-time { font-family: var(--font-mono); font-size: var(--text-sm); }
.ssdd-label { font-weight: 600; overflow-wrap: anywhere; margin-top: 4px; }
.ssdd-cell { min-width: 0; }
.ssdd-tag { font-size: var(--text-xs); color: var(--body-text-color-subdued); overflow-wrap: anywhere; }
/* at most --n images per row (the images of one class), none narrower than 56 px: 8 per row on a wide column, 4 or
   2 on a narrow one */
.ssdd-images { display: grid; gap: 3px;
               grid-template-columns: repeat(auto-fit, minmax(max(56px, calc(100% / var(--n) - 3px)), 1fr)); }
.ssdd-images a { display: block; min-width: 0; padding: 0; margin: 0; }  /* Gradio pads links */
.ssdd-images img { display: block; width: 100%; height: auto; aspect-ratio: 1 / 1; object-fit: contain;
                   image-rendering: pixelated; border-radius: 3px; background: var(--background-fill-secondary); }
/* Gradio's own timer shows an ETA from earlier requests; while the app's progress bar (with its own ETA) is up,
   hide it. */
.ssdd-result:has(.progress-level) .meta-text, .ssdd-result:has(.progress-level) .meta-text-center { display: none; }
"""

# (...galleries, timings) -> the HTML of the result view. Text from the server is escaped: class names are data.
VIEW_JS = """(...values) => {
  const t = values.pop();
  if (!t || !values.length || !values[0] || !values[0].length) return %(empty)s;
  const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;',
                                                           "'": '&#39;'})[c]);
  const per = t.decoders ? Object.entries(t.decoders) : [[t.decoder, t]];
  const slowest = per.reduce((a, b) => (b[1].decoder_s > a[1].decoder_s ? b : a))[0];
  const num = t.per_class, rows = values[0].length / num;
  const heads = per.map(([name, d]) => {
    let speed = '';
    if (per.length > 1) speed = name === slowest ? ' · the slowest' :
      ` · ${d.speedup_vs_slowest.toFixed(1)}x faster than ${esc(slowest)}`;
    const steps = `${d.decoder_steps} step${d.decoder_steps > 1 ? 's' : ''}`;
    return `<div class="ssdd-head"><b class="ssdd-name">${esc(name)}</b>` +
           `<span class="ssdd-time">${d.decoder_s.toFixed(3)} s for ${t.images} images (${steps})${speed}</span></div>`;
  });
  let html = `<div class="ssdd-view" style="--decoders: ${per.length}; --n: ${num}">` +
             `<div class="ssdd-heads">${heads.join('')}</div>`;
  for (let r = 0; r < rows; r++) {
    const label = values[0][r * num].caption || '';
    html += `<div class="ssdd-class"><div class="ssdd-label">${esc(label)}</div><div class="ssdd-row">`;
    values.forEach((gallery, k) => {
      const name = per[k][0];
      const images = (gallery || []).slice(r * num, (r + 1) * num).map((item, j) => {
        const url = esc(item.image.url), alt = esc(`${label}, image ${j + 1}, ${name}`);
        return `<a href="${url}" target="_blank" rel="noopener"><img src="${url}" alt="${alt}" title="${alt}"></a>`;
      });
      const tag = per.length > 1 ? `<div class="ssdd-tag">${esc(name)}</div>` : '';
      html += `<div class="ssdd-cell">${tag}<div class="ssdd-images">${images.join('')}</div></div>`;
    });
    html += '</div></div>';
  }
  return html + '</div>';
}""" % {"empty": json.dumps(EMPTY_VIEW)}

# A random seed over the whole range 0..2^32-1 (Math.random would stop short of it and is not uniform over it).
RANDOM_SEED_JS = "() => { const x = new Uint32Array(1); crypto.getRandomValues(x); return x[0]; }"
# A seed typed as 1.5 becomes 2 when the box is left or submitted: the box holds whole numbers only.
WHOLE_SEED_JS = "(s) => (typeof s === 'number' && isFinite(s) && !Number.isInteger(s)) ? Math.round(s) : s"


def show_tab(elem_id: str) -> str:
    """JS run before an endpoint's request: show the tab its results go to, and pass the inputs on unchanged."""
    return f"(...args) => {{ document.querySelector('#{elem_id}-button')?.click(); return args; }}"


def set_values(values: list) -> str:
    """JS of a preset: set the inputs to `values`."""
    return f"() => {json.dumps(values)}"
