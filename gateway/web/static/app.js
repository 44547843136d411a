// The status page: one EventSource on /api/v1/live, the DOM updated in place (text only, never HTML
// from data), one uPlot chart per scored device: the last hour's score, its threshold, events shaded.
// Each snapshot is the whole truth: a reload of the gateway can add, remove or change a device (gain or lose
// a model, change its tags), and the page follows it; one device that fails to render leaves the others live.
"use strict";
(function () {
  const HOUR = 3600;
  const cards = {};   // device -> {el, parts}
  const charts = {};  // device -> {u, ts, score, thr, events}
  const failing = {}; // device -> the error last warned about (once per error, not every second)
  const $ = (tag, cls, text) => {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  };
  const fmt = (v) => v === null || v === undefined ? "—" :
    (typeof v === "number" ? (Number.isInteger(v) ? String(v) : String(+v.toPrecision(6))) : String(v));
  const pct = (v) => v === null || v === undefined ? "—" : (100 * v).toFixed(1) + " %";
  const ago = (iso) => {
    if (!iso) return "never";
    const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
    return s < 90 ? s.toFixed(0) + " s ago" : s < 5400 ? (s / 60).toFixed(0) + " min ago" : (s / 3600).toFixed(1) + " h ago";
  };
  const stateClass = (s) => ({ok: "ok", running: "ok", normal: "ok", degraded: "warn", idle: "warn", starting: "",
    "not scored": "", planned_stop: "", error: "bad", down: "bad", anomaly: "bad"})[s] ?? "";
  const kv = (label, value) => { const d = $("div", "kv"); d.append($("b", null, value), $("span", null, label)); return d; };

  function renderHealth(snap) {
    const h = snap.health, up = h.upstream || {}, b = h.backlog || {};
    const box = document.getElementById("health");
    const items = [
      kv("upstream", up.connected ? "connected" : "NOT connected"),
      kv("backlog", `${b.messages} msgs`), kv("backlog bytes", fmt(b.bytes)), kv("oldest", `${fmt(b.oldest_age_s)} s`),
      kv("reconnects", fmt(up.reconnects)), kv("dropped", fmt(h.dropped)), kv("published", fmt(up.published)),
      kv("inference", snap.inference_us ? `${snap.inference_us.mean} µs` : "—"),
      kv("uptime", `${Math.round(snap.uptime_s)} s`),
    ];
    items[0].querySelector("b").className = up.connected ? "q-ok" : "q-bad";
    box.replaceChildren(...items);
    document.getElementById("title").textContent = `edge-gateway ${snap.gateway_id} · ${snap.version}`;
    document.title = `${snap.gateway_id} · edge-gateway`;
  }

  function card(dev) {
    let c = cards[dev.name];
    if (c) return c;
    const el = $("article", "card");
    el.dataset.device = dev.name;
    const head = $("div", "dev-head");
    const title = $("h2", null, dev.name), state = $("span", "pill"), when = $("span", "muted");
    head.append(title, state, when);
    const machine = $("div", "row"), oee = $("div", "row"), counters = $("div", "row"), alarms = $("div", "row");
    const model = $("div", "alarm model-error");
    const table = $("table");
    el.append(head, model, machine, oee, alarms, counters, table);
    c = {el, state, when, model, machine, oee, counters, alarms, table, rows: {}, seen: null, rest: ""};
    document.getElementById("devices").append(el);
    cards[dev.name] = c;
    return c;
  }

  // The chart's box, made when the device first has a model (at the page's start or after a reload that gave
  // it one), gone when a reload takes the model away.
  function chartBox(c) {
    if (c.chart) return c.chart;
    const box = $("div", "chart"), legend = $("div", "legend"), note = $("div", "event-note"), plot = $("div");
    const advice = $("div", "model-note");
    box.append(legend, advice, plot, note);
    c.el.append(box);
    return c.chart = {box, legend, advice, note, plot};
  }

  function dropChart(name) {
    const ch = charts[name], c = cards[name];
    if (ch) { ch.u.destroy(); delete charts[name]; }
    if (c && c.chart) { c.chart.box.remove(); delete c.chart; }
  }

  function dropCard(name) {
    dropChart(name);
    cards[name].el.remove();
    delete cards[name];
    delete failing[name];
  }

  // "last sample N s ago" counts on by itself: a device whose samples stop (or a stream that stalls) shows it.
  function showWhen(c) {
    c.when.textContent = `last sample ${ago(c.seen)} · ${c.rest}`;
  }

  function renderDevice(dev) {
    const c = card(dev);
    c.state.textContent = dev.state;
    c.state.className = "pill " + stateClass(dev.state);
    c.seen = dev.last_sample;
    c.rest = `${dev.source} · ${dev.polls} samples, ${dev.errors} errors`;
    showWhen(c);
    c.model.textContent = dev.model_error ? `not scored: ${dev.model_error} (fix it, then reload the gateway)` : "";
    const m = dev.machine;
    c.machine.replaceChildren(...(m ? [kv("machine", m.state), kv("since", m.since ? new Date(m.since).toLocaleTimeString() : "—"),
      kv("stop reason", m.reason ? `${m.reason.code} ${m.reason.text || ""}` : "—")] : []));
    if (m) c.machine.firstChild.querySelector("b").className = "q-" + (m.state === "running" ? "ok" : "bad");
    const o = dev.oee;
    c.oee.replaceChildren(...(o ? [kv("OEE", pct(o.oee)), kv("availability", pct(o.availability)),
      kv("performance", pct(o.performance)), kv("quality", pct(o.quality_rate))] : []));
    const names = Object.keys(dev.counters || {});
    c.counters.replaceChildren(...names.map((n) => kv(`${n} (shift ${dev.counters[n].shift_id || "—"})`,
      `${dev.counters[n].total} / ${dev.counters[n].shift}`)));
    const a = dev.alarms;
    if (a) {
      const list = a.active.length ? a.active.join(", ") : "none active";
      const line = $("div", a.active.length ? "alarm" : "muted", "alarms: " + list + (a.unknown.length ? ` (unknown: ${a.unknown.join(", ")})` : ""));
      c.alarms.replaceChildren(line);
    }
    const tags = new Set(dev.tags.map((t) => t.name));
    for (const [name, r] of Object.entries(c.rows)) {
      if (!tags.has(name)) { r.tr.remove(); delete c.rows[name]; }  // a reload took the tag away
    }
    for (const t of dev.tags) {
      let r = c.rows[t.name];
      if (!r) {
        const tr = $("tr"), n = $("td", null, t.name), v = $("td", "v"), u = $("td", "u", t.unit || ""), q = $("td", "q");
        tr.append(n, v, u, q);
        c.table.append(tr);
        r = c.rows[t.name] = {tr, v, q};
      }
      r.v.textContent = fmt(t.value);
      r.q.textContent = t.quality || "—";
      r.q.className = "q " + (t.quality === "ok" ? "q-ok" : "q-bad");
    }
    if (dev.anomaly) renderAnomaly(dev, c);
    else dropChart(dev.name);
  }

  function renderAnomaly(dev, c) {
    const an = dev.anomaly, parts = chartBox(c);
    const top = (an.top_tags || []).slice(0, 3).map((t) => `${t.tag} ${(100 * t.share).toFixed(0)}%`).join(", ");
    parts.legend.textContent = `anomaly score ${fmt(an.score)} / threshold ${fmt(an.threshold)} · ${an.state}` +
      (top ? ` · top tags: ${top}` : "");
    parts.legend.className = "legend " + (an.state === "anomaly" ? "alarm" : "");
    parts.advice.textContent = an.note || "";
    if (!charts[dev.name]) makeChart(dev.name, parts, an.threshold);
    charts[dev.name].threshold = an.threshold;  // (a reload may give it another model)
  }

  function shade(u) {
    const ch = charts[u.edgeDevice];
    if (!ch) return;
    const ctx = u.ctx, {top, height} = u.bbox;
    ctx.save();
    ctx.fillStyle = "rgba(180, 35, 24, 0.18)";
    const xmax = u.scales.x.max;
    for (const e of ch.events) {
      const x0 = u.valToPos(Math.max(e.start, u.scales.x.min), "x", true);
      const x1 = u.valToPos(e.end === null ? xmax : Math.min(e.end, xmax), "x", true);
      if (x1 > x0) ctx.fillRect(x0, top, Math.max(2, x1 - x0), height);
    }
    ctx.restore();
  }

  function size(box) {
    return {width: Math.max(240, box.clientWidth || 300), height: window.innerWidth < 520 ? 150 : 190};
  }

  function makeChart(name, parts, threshold) {
    const ch = charts[name] = {ts: [], score: [], thr: [], events: [], threshold, u: null};
    const opts = {
      ...size(parts.box),
      legend: {show: false},
      cursor: {show: true, drag: {x: false, y: false}},
      scales: {x: {time: true}, y: {range: (u, min, max) => [0, Math.max(ch.threshold * 1.5, max || 0) * 1.05]}},
      series: [{}, {label: "score", stroke: "#1f6feb", width: 1.5, spanGaps: false},
               {label: "threshold", stroke: "#b42318", dash: [6, 4], width: 1, points: {show: false}}],
      axes: [{}, {size: 44}],
      hooks: {drawClear: [shade]},
    };
    ch.u = new uPlot(opts, [[], [], []], parts.plot);
    ch.u.edgeDevice = name;
    fetch(`/api/v1/devices/${encodeURIComponent(name)}/anomaly`).then((r) => r.ok ? r.json() : null).then((doc) => {
      if (!doc || charts[name] !== ch) return;  // (dropped meanwhile)
      const known = ch.ts.length ? ch.ts[0] : Infinity;
      const older = doc.ts.map((t, i) => [t, doc.score[i], doc.thresholds[i]]).filter((p) => p[0] < known);
      ch.ts.unshift(...older.map((p) => p[0]));
      ch.score.unshift(...older.map((p) => p[1]));
      ch.thr.unshift(...older.map((p) => p[2]));
      ch.events = doc.events;
      redraw(name);
    }).catch(() => {});
  }

  function addPoint(name, p) {
    const ch = charts[name];
    if (!ch) return;
    if (!ch.ts.length || p.ts > ch.ts[ch.ts.length - 1]) {
      ch.ts.push(p.ts); ch.score.push(p.score); ch.thr.push(p.threshold);
    }
    ch.events = p.events;
    const since = p.ts - HOUR;
    while (ch.ts.length && ch.ts[0] < since) { ch.ts.shift(); ch.score.shift(); ch.thr.shift(); }
    redraw(name);
  }

  function redraw(name) {
    const ch = charts[name], c = cards[name];
    if (!ch || !c || !c.chart) return;
    ch.u.setData([ch.ts, ch.score, ch.thr]);
    c.chart.box.dataset.points = String(ch.ts.length);
    c.chart.box.dataset.events = String(ch.events.length);
    const open = ch.events.find((e) => e.end === null);
    const last = ch.events[ch.events.length - 1];
    const ev = open || last;
    c.chart.note.textContent = ev ? `anomaly event ${open ? "since" : "at"} ${new Date(ev.start * 1000).toLocaleTimeString()}` +
      (ev.top_tags && ev.top_tags.length ? ` · top tags ${ev.top_tags.map((t) => t.tag).join(", ")}` : "") +
      (open ? "" : ` · ended ${new Date(ev.end * 1000).toLocaleTimeString()}`) : "";
  }

  // One device's part of a snapshot; an error in it is warned about once and leaves the other devices live.
  function isolated(name, render) {
    try {
      render();
      delete failing[name];
    } catch (e) {
      if (failing[name] !== String(e)) console.warn(`device ${name}: cannot show this update`, e);
      failing[name] = String(e);
    }
  }

  function onSnapshot(snap) {
    renderHealth(snap);
    const names = new Set(snap.devices.map((d) => d.name));
    for (const name of Object.keys(cards)) if (!names.has(name)) dropCard(name);  // a reload removed it
    for (const dev of snap.devices) isolated(dev.name, () => renderDevice(dev));
    const box = document.getElementById("devices");
    const order = snap.devices.map((d) => cards[d.name] && cards[d.name].el).filter(Boolean);
    if (order.some((el, i) => box.children[i] !== el)) box.append(...order);  // config order, after a reload too
    for (const [name, p] of Object.entries(snap.anomaly || {})) {
      if (names.has(name)) isolated(name, () => addPoint(name, p));
    }
  }

  function connect() {
    const conn = document.getElementById("conn");
    const src = new EventSource("/api/v1/live");
    // The server ends each stream after a minute and the page reconnects at once: "reconnecting" only when
    // that takes longer than a few seconds.
    let lost = null;
    const live = () => { clearTimeout(lost); lost = null; conn.textContent = "live"; conn.className = "pill ok"; };
    src.onopen = live;
    src.onmessage = (m) => {
      if (lost !== null) live();
      try { onSnapshot(JSON.parse(m.data)); } catch (e) { console.warn("bad update", e); }
    };
    src.onerror = () => {
      if (lost === null) lost = setTimeout(() => { conn.textContent = "reconnecting…"; conn.className = "pill bad"; }, 3000);
    };
  }

  window.addEventListener("resize", () => {
    // Shrink first, then measure: a chart as wide as before would hold its card (and a phone's viewport) wide.
    for (const ch of Object.values(charts)) ch.u.setSize({width: 200, height: ch.u.height});
    for (const [name, ch] of Object.entries(charts)) ch.u.setSize(size(cards[name].chart.box));
  });
  setInterval(() => { for (const c of Object.values(cards)) showWhen(c); }, 1000);
  window.edgeGateway = {charts, cards};
  connect();
})();
