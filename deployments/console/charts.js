// A tiny line chart on <canvas>: no library, no build step.
// new LineChart(canvas, [{name, color}], {maxPoints}) ; chart.push([v1, v2, ...]) ; redraws.
// The canvas carries data-points (samples so far) and data-last (JSON of the last sample)
// so a browser test can see it update without reading pixels.
"use strict";

class LineChart {
  constructor(canvas, series, opts = {}) {
    this.canvas = canvas;
    this.series = series;
    this.maxPoints = opts.maxPoints || 120;
    this.format = opts.format || ((v) => (Math.abs(v) >= 100 ? v.toFixed(0) : v.toPrecision(3)));
    this.data = series.map(() => []);
    this.markers = [];  // [{at: sample number, label}]: policy switches, drawn as dashed lines
    this.count = 0;
    this.draw();
  }

  push(values) {
    values.forEach((v, i) => {
      const d = this.data[i];
      d.push(v === null || v === undefined || Number.isNaN(v) ? null : v);
      if (d.length > this.maxPoints) d.shift();
    });
    this.count += 1;
    this.canvas.dataset.points = String(this.count);
    this.canvas.dataset.last = JSON.stringify(values);
    this.draw();
  }

  mark(label) {
    this.markers.push({ at: this.count, label });
    this.canvas.dataset.markers = String(this.markers.length);
    this.draw();
  }

  draw() {
    const c = this.canvas, ctx = c.getContext("2d");
    const w = c.width, h = c.height, padL = 44, padB = 16, padT = 8;
    ctx.clearRect(0, 0, w, h);
    const all = this.data.flat().filter((v) => v !== null);
    const max = Math.max(1e-9, ...all) * 1.1;
    ctx.font = "11px system-ui, sans-serif";
    ctx.fillStyle = "#8b96a5";
    ctx.strokeStyle = "#2a3340";
    for (let k = 0; k <= 2; k++) {  // three horizontal grid lines with labels
      const y = padT + (h - padT - padB) * (1 - k / 2);
      ctx.beginPath(); ctx.moveTo(padL, y); ctx.lineTo(w, y); ctx.stroke();
      ctx.fillText(this.format((max * k) / 2), 2, y + 4);
    }
    const xStep = (w - padL) / Math.max(1, this.maxPoints - 1);
    const newest = this.maxPoints - 1;  // x slot of sample number this.count
    ctx.save();
    ctx.setLineDash([4, 4]);
    this.markers.forEach((m) => {
      const x = padL + (newest - (this.count - m.at)) * xStep;
      if (x < padL) return;  // scrolled out
      ctx.strokeStyle = "#c792ea";
      ctx.beginPath(); ctx.moveTo(x, padT); ctx.lineTo(x, h - padB); ctx.stroke();
      ctx.fillStyle = "#c792ea";
      ctx.fillText(m.label, Math.min(x + 3, w - ctx.measureText(m.label).width - 2), padT + 10);
    });
    ctx.restore();
    this.data.forEach((d, i) => {
      ctx.strokeStyle = this.series[i].color;
      ctx.lineWidth = 2;
      ctx.beginPath();
      let pen = false;
      const offset = this.maxPoints - d.length;
      d.forEach((v, j) => {
        if (v === null) { pen = false; return; }
        const x = padL + (offset + j) * xStep;
        const y = padT + (h - padT - padB) * (1 - v / max);
        if (pen) ctx.lineTo(x, y); else ctx.moveTo(x, y);
        pen = true;
      });
      ctx.stroke();
      const j = d.length - 1;  // the newest value as a dot: visible even before a line forms
      if (j >= 0 && d[j] !== null) {
        ctx.fillStyle = this.series[i].color;
        ctx.beginPath();
        ctx.arc(padL + (offset + j) * xStep - 3, padT + (h - padT - padB) * (1 - d[j] / max), 3, 0, 2 * Math.PI);
        ctx.fill();
      }
    });
    let lx = padL + 4;  // legend
    this.series.forEach((s) => {
      ctx.fillStyle = s.color;
      ctx.fillRect(lx, h - 11, 10, 3);
      ctx.fillStyle = "#8b96a5";
      ctx.fillText(s.name, lx + 14, h - 6);
      lx += 24 + ctx.measureText(s.name).width;
    });
  }
}
